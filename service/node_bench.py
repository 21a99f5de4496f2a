"""`voxarc bench-node`: voxarc and Orthanc side by side on the same series and the same machine.

For each series folder: push it with DCMTK ``storescu`` (``TCP_NODELAY=1``) to a fresh voxarc
node and to a fresh Orthanc (``StorageCompression`` off and on), several runs each, and time the
whole transfer; compress voxarc's copy (``compress --now``) and measure the bytes each stores;
then pull the series back with C-GET from a freshly started node (cold caches) with DCMTK's
``getscu`` (or a pynetdicom SCU), timestamping every received instance: time to the first
instance and whole-series throughput. The codec's own decode rate of the same blobs is measured
in this process after each C-GET (the node stopped), and the table gives the median of the
per-run ratios.

Both servers run as separate processes with the same client, so their numbers are comparable;
the table says medians of the runs and the load average of the machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from service.dcmtk import dcmtk

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
SCU_AET = "BENCHSCU"
ENV = {**os.environ, "TCP_NODELAY": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def series_files(folder: Path) -> list[Path]:
    """Part 10 files under ``folder`` (other files skipped), sorted by name."""
    out = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            if f.read(132)[128:132] == b"DICM":
                out.append(path)
    return out


def dir_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


@dataclass
class Server:
    """A DICOM server process under test."""

    name: str
    aet: str
    port: int
    proc: subprocess.Popen
    storage: Path
    log_file: object = None
    warm_seen: int = 0   # "decoder processes: " lines in the log before this start

    def stop(self) -> None:
        """Terminate the process and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log_file:
            self.log_file.close()


def start_voxarc(data_dir: Path, http_port: int = 0) -> Server:
    """``voxarc serve`` on a free port (no compaction and no integrity patrol during the run,
    admin page on ``http_port``, a free one for 0)."""
    port = free_port()
    log_path = Path(data_dir).with_suffix(".log")
    seen = log_path.read_text(errors="replace").count("decoder processes: ") \
        if log_path.exists() else 0
    config = Path(data_dir).with_suffix(".toml")
    config.write_text("scrub_every_days = 0\n")
    logf = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--config", str(config), "--data-dir",
         str(data_dir), "--port", str(port), "--http-port", str(http_port), "--stable-age",
         "1e9"],
        cwd=ROOT, env=ENV, stdout=logf, stderr=subprocess.STDOUT)
    server = Server("voxarc", "VOXARC", port, proc, Path(data_dir), logf, seen)
    try:
        _wait_port(port, proc)
    except Exception:
        server.stop()
        raise
    return server


def wait_for_decoders(server: Server, timeout: float = 60.0) -> float:
    """Wait until a node holding compressed series has started its decoder processes (it does
    at startup; a running node keeps them), so that a C-GET measures retrieval, not process
    start; returns the seconds waited."""
    start = time.monotonic()
    log_path = Path(server.storage).with_suffix(".log")
    while time.monotonic() - start < timeout:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if text.count("decoder processes: ") > server.warm_seen:
            server.warm_seen += 1
            return time.monotonic() - start
        time.sleep(0.1)
    log.warning("%s did not report its decoder processes within %.0f s", server.name, timeout)
    return time.monotonic() - start


def orthanc_binary() -> str | None:
    """Path of the Orthanc server (Debian package ``orthanc``), or None."""
    return shutil.which("Orthanc") or shutil.which("orthanc")


def start_orthanc(work: Path, compression: bool, binary: str | None = None,
                  http_port: int | None = None, modalities: dict | None = None) -> Server:
    """Orthanc with its own storage and index folders on a free DICOM port; its REST API on
    ``http_port`` when given (else no HTTP), and ``modalities`` (name: {"AET", "Host", "Port"})
    besides the benchmark's C-GET client."""
    binary = binary or orthanc_binary()
    if not binary:
        raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc)")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "bench", "DicomAet": "ORTHANC", "DicomPort": port,
        "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
        "StorageCompression": compression, "HttpServerEnabled": http_port is not None,
        "HttpPort": http_port or 8042, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowEcho": True, "DicomModalities": {
            "bench": {"AET": SCU_AET, "Host": "127.0.0.1", "Port": 1, "AllowGet": True},
            **(modalities or {})},
        "Plugins": [], "SaveJobs": False,
    }
    (work / "orthanc.json").write_text(json.dumps(config, indent=1))
    logf = open(work / "orthanc.log", "ab")
    proc = subprocess.Popen([binary, str(work / "orthanc.json")], cwd=work, env=ENV,
                            stdout=logf, stderr=subprocess.STDOUT)
    server = Server("orthanc" + ("+z" if compression else ""), "ORTHANC", port, proc,
                    work / "storage", logf)
    try:
        _wait_port(port, proc, 60)
    except Exception:
        server.stop()
        raise
    return server


#: storescu's option proposing a compressed transfer syntax (it proposes uncompressed ones only)
STORESCU_PROPOSE = {"1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.57": "-xs",
                    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.80": "-xt",
                    "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd"}


def storescu_options(syntaxes) -> list[str]:
    """Options so that storescu sends files of these transfer syntaxes as they are (one
    compressed syntax per series; uncompressed ones need nothing)."""
    flags = sorted({STORESCU_PROPOSE[ts] for ts in syntaxes if ts in STORESCU_PROPOSE})
    if len(flags) > 1:
        raise ValueError(f"storescu can propose one compressed syntax per run, not {flags}")
    return flags


def push(server: Server, files: list[Path], syntaxes=()) -> float:
    """Send ``files`` with storescu on one association; return the seconds it took."""
    start = time.perf_counter()
    proc = subprocess.run([dcmtk("storescu"), *storescu_options(syntaxes), "-aet", SCU_AET,
                           "-aec", server.aet, "127.0.0.1", str(server.port), *map(str, files)],
                          env=ENV, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"storescu to {server.name} failed: {proc.stderr[-2000:]}")
    return seconds


@dataclass
class GetResult:
    """What one C-GET delivered and when."""

    received: int = 0
    first_s: float = 0.0
    total_s: float = 0.0
    times: list = field(default_factory=list)


#: getscu options that accept one compressed transfer syntax (besides the uncompressed ones)
GETSCU_ACCEPT = {"1.2.840.10008.1.2.4.70": "+xs", "1.2.840.10008.1.2.4.90": "+xv",
                 "1.2.840.10008.1.2.4.80": "+xt", "1.2.840.10008.1.2.5": "+xr",
                 "1.2.840.10008.1.2.1.99": "+xd"}
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
GET_CLIENTS = ("dcmtk", "pynetdicom")


def getscu_options(syntaxes) -> list[str] | None:
    """getscu's options to accept these transfer syntaxes as sent; None when it cannot (more
    than one compressed syntax, or one it has no option for)."""
    other = set(syntaxes) - _UNCOMPRESSED
    if len(other) > 1 or not other <= set(GETSCU_ACCEPT):
        return None
    return [GETSCU_ACCEPT[ts] for ts in other]


def c_get(server: Server, study_uid: str, series_uid: str, sop_classes: set[str],
          syntaxes: set[str], client: str = "dcmtk") -> GetResult:
    """C-GET a series and timestamp every received instance: with DCMTK's ``getscu``
    (C++, little CPU taken from the server under test on a small machine) when it can accept
    the series' transfer syntaxes, else (or with ``client="pynetdicom"``) a pynetdicom SCU."""
    options = getscu_options(syntaxes) if client == "dcmtk" and dcmtk("getscu") else None
    if options is not None:
        return c_get_dcmtk(server, study_uid, series_uid, options)
    return c_get_pynetdicom(server, study_uid, series_uid, sop_classes, syntaxes)


def c_get_dcmtk(server: Server, study_uid: str, series_uid: str, options: list[str]
                ) -> GetResult:
    """C-GET with ``getscu`` (largest PDU, received data not written, ``TCP_NODELAY=1``),
    stamping each instance when getscu reports it on its verbose output."""
    cmd = [dcmtk("getscu"), "-v", "-S", *options, "-aet", SCU_AET, "-aec", server.aet,
           "-pdu", "131072", "--ignore", "-k", "QueryRetrieveLevel=SERIES",
           "-k", f"StudyInstanceUID={study_uid}", "-k", f"SeriesInstanceUID={series_uid}",
           "127.0.0.1", str(server.port)]
    result, tail = GetResult(), deque(maxlen=20)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        if "Received C-STORE Request" in line:
            result.times.append(time.perf_counter())
        tail.append(line)
    proc.wait()
    end = time.perf_counter()
    if proc.returncode != 0:
        raise RuntimeError(f"getscu from {server.name} failed: {''.join(tail)[-2000:]}")
    result.received = len(result.times)
    result.first_s = result.times[0] - start if result.times else float("nan")
    result.total_s = end - start
    return result


def c_get_pynetdicom(server: Server, study_uid: str, series_uid: str, sop_classes: set[str],
                     syntaxes: set[str]) -> GetResult:
    """C-GET a series with a pynetdicom SCU; timestamp every received instance."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    from service import command_encoding
    from service.socket_tuning import tune_association

    result = GetResult()
    ae = AE(ae_title=SCU_AET)
    ae.maximum_pdu_size = 0
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    ae.add_requested_context(GET)
    tss = sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian})
    for sop_class in sorted(sop_classes):
        for ts in tss:  # one context per syntax: the server sends each instance as received
            ae.add_requested_context(sop_class, ts)
    roles = [build_role(c, scp_role=True) for c in sorted(sop_classes)]

    def on_store(event):
        result.times.append(time.perf_counter())
        return 0x0000

    # the client gets the node's own pynetdicom tuning (large socket reads, event-driven
    # reactors, packed command sets), so that it takes less CPU from the server under test
    command_encoding.install()
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.aet, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store),
                                       (evt.EVT_CONN_OPEN, tune_association)])
    if not assoc.is_established:
        raise RuntimeError(f"C-GET association to {server.name} refused")
    ident = Dataset()
    ident.QueryRetrieveLevel = "SERIES"
    ident.StudyInstanceUID, ident.SeriesInstanceUID = study_uid, series_uid
    start = time.perf_counter()
    last = None
    for status, _ in assoc.send_c_get(ident, GET):
        last = status
    end = time.perf_counter()
    assoc.release()
    if last is None or last.Status not in (0x0000,):
        log.warning("C-GET from %s ended with status %s", server.name,
                    hex(last.Status) if last is not None else None)
    result.received = len(result.times)
    result.first_s = result.times[0] - start if result.times else float("nan")
    result.total_s = end - start
    return result


@dataclass
class SeriesInfo:
    """What the benchmark needs to know of a series folder."""

    name: str
    files: list
    original_bytes: int
    voxels: int
    study_uid: str
    series_uid: str
    sop_classes: set
    syntaxes: set


def describe_series(folder: Path) -> SeriesInfo:
    """Read the UIDs and pixel counts of a series folder."""
    import pydicom
    files = series_files(folder)
    if not files:
        raise ValueError(f"no DICOM files in {folder}")
    voxels, classes, tss, uids, kept = 0, set(), set(), set(), []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:   # e.g. a DICOMDIR
            log.info("skipping %s: not a composite instance", path)
            continue
        kept.append(path)
        voxels += int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * \
            int(ds.get("NumberOfFrames", 1) or 1) * int(ds.get("SamplesPerPixel", 1))
        classes.add(str(ds.SOPClassUID))
        tss.add(str(ds.file_meta.TransferSyntaxUID))
        uids.add((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)))
    if len(uids) != 1:
        raise ValueError(f"{folder} holds {len(uids)} series; give one series per folder")
    (study, series), = uids
    return SeriesInfo(Path(folder).name, kept, sum(p.stat().st_size for p in kept), voxels,
                      study, series, classes, tss)


def voxarc_cli(*args) -> subprocess.CompletedProcess:
    """Run ``voxarc ARGS`` (this checkout's) and return it; RuntimeError when it fails."""
    proc = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"voxarc {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return proc


def codec_decode_rate(data_dir: Path, series_uid: str) -> float:
    """M voxels/s of ``models.decode_volume`` on the series' compressed blobs (0: none)."""
    import models
    from sqlalchemy import select
    from storage import header_pack
    from storage.archive import Archive
    from storage.index import Blob, Instance, Series
    archive = Archive(data_dir)
    try:
        with archive.index.read() as s:
            keys = s.scalars(select(Blob.key).distinct().join(Instance, Instance.blob_fk == Blob.id)
                             .join(Series, Instance.series_fk == Series.id)
                             .where(Series.series_uid == series_uid,
                                    Blob.codec.in_(header_pack.VOLUME_CODECS))).all()
        blobs = [header_pack.coded_view(archive.blobs.get(k)) for k in keys]
    finally:
        archive.close()
    if not blobs:
        return 0.0
    from models import parallel
    parallel.warm()         # the rate of running decoders, as in a running node
    start, voxels = time.perf_counter(), 0
    for blob in blobs:
        voxels += models.decode_volume(blob).size
    return voxels / (time.perf_counter() - start) / 1e6


def median_of(values):
    """The median of ``values`` without their NaNs (NaN when none is left)."""
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def bench_voxarc(info: SeriesInfo, work: Path, runs: int, get_runs: int,
                 client: str = "dcmtk") -> dict:
    """Ingest, compress and C-GET one series on voxarc."""
    rates, data_dir = [], None
    for run in range(runs):
        data_dir = work / f"voxarc-{info.name}-{run}"
        server = start_voxarc(data_dir)
        try:
            seconds = push(server, info.files, info.syntaxes)
        finally:
            server.stop()
        rates.append(len(info.files) / seconds)
        log.info("voxarc ingest %s run %d: %.1f instances/s", info.name, run + 1, rates[-1])
        if run < runs - 1:
            shutil.rmtree(data_dir, ignore_errors=True)
    staged = dir_bytes(data_dir / "blobs")
    start = time.perf_counter()
    voxarc_cli("compress", "--now", "--data-dir", str(data_dir))
    compress_s = time.perf_counter() - start
    stats = json.loads(voxarc_cli("stats", "--json", "--data-dir", str(data_dir)).stdout)
    log.info("voxarc compress %s: %.1f s, %d -> %d bytes", info.name, compress_s,
             stats["original_bytes"], stats["stored_bytes"])
    gets, decodes = [], []
    for run in range(get_runs):        # each C-GET beside a decode of the same blobs
        server = start_voxarc(data_dir)
        try:
            wait_for_decoders(server)
            gets.append(c_get(server, info.study_uid, info.series_uid, info.sop_classes,
                              info.syntaxes, client))
        finally:
            server.stop()
        decodes.append(codec_decode_rate(data_dir, info.series_uid))
        log.info("voxarc C-GET %s run %d: %d instances, first %.3f s, all %.2f s; codec decode "
                 "%.2f M voxels/s", info.name, run + 1, gets[-1].received, gets[-1].first_s,
                 gets[-1].total_s, decodes[-1])
    summary = _get_summary(gets, info)
    ratios = [info.voxels * g.received / len(info.files) / g.total_s / 1e6 / d
              for g, d in zip(gets, decodes) if d]
    return {"ingest_rates": rates, "ingest_per_s": median_of(rates), "staged_bytes": staged,
            "stored_bytes": stats["stored_bytes"], "stats": stats,
            "disk_bytes": dir_bytes(data_dir), "compress_s": compress_s, **summary,
            "codec_decode_runs": decodes, "codec_decode_mvox_s": median_of(decodes),
            "get_vs_decode": median_of(ratios)}


def _get_summary(gets: list[GetResult], info: SeriesInfo) -> dict:
    if not gets:
        return {}
    return {"get_received": min(g.received for g in gets),
            "get_first_s": median_of([g.first_s for g in gets]),
            "get_total_s": median_of([g.total_s for g in gets]),
            "get_per_s": median_of([g.received / g.total_s for g in gets]),
            "get_mvox_s": median_of([info.voxels * g.received / len(info.files) / g.total_s / 1e6
                                   for g in gets])}


def bench_orthanc(info: SeriesInfo, work: Path, runs: int, get_runs: int, compression: bool,
                  binary: str | None = None, client: str = "dcmtk") -> dict:
    """Ingest (and, compressed, C-GET) one series on Orthanc."""
    rates, folder = [], None
    label = "orthanc+z" if compression else "orthanc"
    for run in range(runs):
        folder = work / f"{label}-{info.name}-{run}"
        server = start_orthanc(folder, compression, binary)
        try:
            seconds = push(server, info.files, info.syntaxes)
        finally:
            server.stop()
        rates.append(len(info.files) / seconds)
        log.info("%s ingest %s run %d: %.1f instances/s", label, info.name, run + 1, rates[-1])
        if run < runs - 1:
            shutil.rmtree(folder, ignore_errors=True)
    stored = dir_bytes(folder / "storage")
    gets = []
    for run in range(get_runs):
        server = start_orthanc(folder, compression, binary)
        try:
            gets.append(c_get(server, info.study_uid, info.series_uid, info.sop_classes,
                              info.syntaxes, client))
        finally:
            server.stop()
        log.info("%s C-GET %s run %d: %d instances, first %.3f s, all %.2f s", label, info.name,
                 run + 1, gets[-1].received, gets[-1].first_s, gets[-1].total_s)
    return {"ingest_rates": rates, "ingest_per_s": median_of(rates), "stored_bytes": stored,
            **_get_summary(gets, info)}


def bench_ingest(info: SeriesInfo, work: Path, runs: int, orthanc: bool = True,
                 binary: str | None = None) -> dict:
    """Ingest only: ``runs`` rounds of a fresh voxarc then a fresh Orthanc (no compression), back
    to back in each round, so that both see the same machine load; medians and their ratio."""
    rates: dict = {"voxarc": [], "orthanc": []} if orthanc else {"voxarc": []}
    for run in range(runs):
        for name, values in rates.items():
            folder = work / f"{name}-{info.name}-ingest-{run}"
            server = start_voxarc(folder) if name == "voxarc" else \
                start_orthanc(folder, False, binary)
            try:
                seconds = push(server, info.files, info.syntaxes)
            finally:
                server.stop()
            values.append(len(info.files) / seconds)
            log.info("%s ingest %s round %d: %.1f instances/s", name, info.name, run + 1,
                     values[-1])
            shutil.rmtree(folder, ignore_errors=True)
    out = {name: {"ingest_rates": values, "ingest_per_s": median_of(values)}
           for name, values in rates.items()}
    if orthanc:
        out["ingest_ratio"] = out["voxarc"]["ingest_per_s"] / out["orthanc"]["ingest_per_s"]
    return out


def run_bench(folders: list[Path], runs: int = 3, get_runs: int = 3, orthanc: bool = True,
              work: Path | None = None, binary: str | None = None,
              json_path: Path | None = None, ingest_only: bool = False,
              client: str = "dcmtk") -> dict:
    """Benchmark every series folder; return a JSON-able dict (see :func:`table`), also written
    to ``json_path`` after each series when given. ``ingest_only``: the C-STORE rates of voxarc
    and Orthanc (no compression) alone, in alternating rounds (see :func:`bench_ingest`)."""
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    own = work is None
    work = Path(work or tempfile.mkdtemp(prefix="voxarc-bench-node-"))
    work.mkdir(parents=True, exist_ok=True)
    out = {"load_before": os.getloadavg(), "runs": runs, "get_runs": 0 if ingest_only else get_runs,
           "cpus": os.cpu_count(), "ingest_only": ingest_only, "get_client": client,
           "series": []}
    try:
        for folder in folders:
            info = describe_series(Path(folder))
            log.info("series %s: %d instances, %.1f MB", info.name, len(info.files),
                     info.original_bytes / 1e6)
            row = {"name": info.name, "instances": len(info.files),
                   "original_bytes": info.original_bytes, "voxels": info.voxels}
            if ingest_only:
                row.update(bench_ingest(info, work, runs, orthanc, binary))
            else:
                row["voxarc"] = bench_voxarc(info, work, runs, get_runs, client)
            if orthanc and not ingest_only:
                row["orthanc"] = bench_orthanc(info, work, runs, 0, False, binary)
                row["orthanc_z"] = bench_orthanc(info, work, runs, get_runs, True, binary,
                                                 client)
            out["series"].append(row)
            out["load_after"] = os.getloadavg()
            if json_path:
                Path(json_path).write_text(json.dumps(out, indent=1, default=list))
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    out["load_after"] = os.getloadavg()
    return out


def _f(value, fmt="{:.1f}"):
    return "-" if value is None or value != value else fmt.format(value)


def ingest_table(result: dict) -> str:
    """The ingest-only benchmark as a Markdown table."""
    lines = ["| series | inst | MB | ingest/s voxarc | ingest/s Orthanc | voxarc / Orthanc |"
             " voxarc runs | Orthanc runs |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for row in result["series"]:
        v, o = row["voxarc"], row.get("orthanc", {})

        def runs(d):
            return ", ".join(f"{r:.1f}" for r in d.get("ingest_rates", [])) or "-"
        lines.append(f"| {row['name']} | {row['instances']} | {row['original_bytes'] / 1e6:.1f} | "
                     f"{_f(v['ingest_per_s'])} | {_f(o.get('ingest_per_s'))} | "
                     f"{_f(row.get('ingest_ratio'), '{:.2f}')} | {runs(v)} | {runs(o)} |")
    lines += ["", f"{result['runs']} rounds per series (voxarc then Orthanc without compression, "
              f"each a fresh server), medians; {_machine_note(result)}"]
    return "\n".join(lines)


def _machine_note(result: dict) -> str:
    lb, la = result["load_before"], result["load_after"]
    client = result.get("get_client")
    note = f" C-GET client: {client}." if client and result.get("get_runs") else ""
    return (f"{result['cpus']} CPUs; load average {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f} before, "
            f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f} after.{note}")


def table(result: dict) -> str:
    """The benchmark as Markdown tables."""
    if result.get("ingest_only"):
        return ingest_table(result)
    lines = [
        "| series | inst | original MB | ingest/s voxarc | ingest/s Orthanc | ingest/s Orthanc+z |"
        " stored MB voxarc (ratio) | Orthanc+z (ratio) | Orthanc (ratio) | voxarc / Orthanc+z |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["series"]:
        orig, v = row["original_bytes"], row["voxarc"]
        o, oz = row.get("orthanc", {}), row.get("orthanc_z", {})

        def size(d):
            b = d.get("stored_bytes")
            return "-" if b is None else f"{b / 1e6:.2f} ({b / orig:.3f})"
        rel = v["stored_bytes"] / oz["stored_bytes"] if oz.get("stored_bytes") else None
        lines.append(f"| {row['name']} | {row['instances']} | {orig / 1e6:.1f} | "
                     f"{_f(v['ingest_per_s'])} | {_f(o.get('ingest_per_s'))} | "
                     f"{_f(oz.get('ingest_per_s'))} | {size(v)} | {size(oz)} | {size(o)} | "
                     f"{_f(rel, '{:.3f}')} |")
    lines += ["", "| series | C-GET first instance s voxarc | Orthanc+z | inst/s voxarc | Orthanc+z |"
              " M vox/s voxarc | Orthanc+z | codec decode M vox/s | voxarc / decode |"
              " voxarc compress s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["series"]:
        v, oz = row["voxarc"], row.get("orthanc_z", {})
        lines.append(f"| {row['name']} | {_f(v.get('get_first_s'), '{:.3f}')} | "
                     f"{_f(oz.get('get_first_s'), '{:.3f}')} | {_f(v.get('get_per_s'))} | "
                     f"{_f(oz.get('get_per_s'))} | {_f(v.get('get_mvox_s'))} | "
                     f"{_f(oz.get('get_mvox_s'))} | {_f(v.get('codec_decode_mvox_s'))} | "
                     f"{_f(v.get('get_vs_decode'), '{:.2f}')} | {_f(v.get('compress_s'))} |")
    lines += ["", f"{result['runs']} ingest runs and {result['get_runs']} C-GET runs (cold "
              f"server) per cell, medians; {_machine_note(result)}"]
    return "\n".join(lines)


def register(subparsers) -> None:
    """Add ``bench-node`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("bench-node", help="voxarc and Orthanc side by side: ingest rate, "
                              "bytes stored, C-GET latency and throughput")
    p.add_argument("series", nargs="+", help="folders of one DICOM series each")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--runs", type=int, default=3, help="ingest runs per server (median)")
    p.add_argument("--get-runs", type=int, default=3, help="C-GET runs per server (median)")
    p.add_argument("--no-orthanc", action="store_true", help="voxarc only")
    p.add_argument("--orthanc", help="Orthanc binary (default: Orthanc on PATH)")
    p.add_argument("--work-dir", help="keep the servers' folders here (default: a temp dir)")
    p.add_argument("--ingest-only", action="store_true",
                   help="only the C-STORE ingest rates: voxarc and Orthanc (no compression) in "
                        "alternating rounds, and their ratio (no compression, no C-GET)")
    p.add_argument("--get-client", choices=GET_CLIENTS, default="dcmtk",
                   help="C-GET client: DCMTK getscu (default; little CPU of its own) or a "
                        "pynetdicom SCU (also used when getscu cannot accept the series' syntaxes)")
    p.set_defaults(func=bench_node)


def bench_node(args) -> int:
    """Run the benchmark and print its tables."""
    if not dcmtk("storescu"):
        log.error("storescu (DCMTK) is not installed")
        return 1
    use_orthanc = not args.no_orthanc
    if use_orthanc and not (args.orthanc or orthanc_binary()):
        log.error("Orthanc is not installed (apt-get install orthanc), or pass --no-orthanc")
        return 1
    result = run_bench([Path(s) for s in args.series], args.runs, args.get_runs, use_orthanc,
                       Path(args.work_dir) if args.work_dir else None, args.orthanc, args.json,
                       args.ingest_only, args.get_client)
    print(table(result))
    return 0
