"""`voxarc bench`: bits per voxel and speed of voxarc against classical lossless codecs.

For each DICOM series folder, every codec encodes the stored-value volume, decodes it again and
the round trip is checked bit-exact (a mismatch is reported as a failed row and makes the command
exit non-zero; it never becomes a number). Speeds are the median of ``--repeat`` runs of each
phase whose first run took under ``--repeat-below-s`` seconds (15: every codec's encode and
decode of the test series but zstd -19's slowest, so a first run's one-time costs, such as
memory a process touches for the first time, do not decide a codec's rate), in M voxels per
second of wall time and of CPU time (all threads of this process and of its worker processes).
voxarc's worker processes (decoding, fine-tuning) are started before anything of it is timed,
as a running node has them: otherwise the first adapted encode of a run paid for starting them,
and on a slow host took over 15 s, so that it stood alone for its volume (the head CT's rate
0.48 M voxels/s in one run, about 1.0 in the median of three).

Slow voxarc models get an automatic subset of slices: a short probe times a round trip of two
slices, and when one round trip of the whole volume would exceed ``--budget-s``, only as many
slices as fit are coded: a central block of consecutive slices by default, since a model that
predicts from previous slices loses that context on evenly spaced ones (measured on
mr_uih_t1_3d_sag_B: ratio to JPEG-XL e7 0.995 on all 160 slices, 0.988 on a 50-slice block,
1.024 on 48 evenly spaced slices). Those rows are marked, and their ratios compare with JPEG-XL
and JPEG-LS run on the same slices.

``OMP_WAIT_POLICY=PASSIVE`` is set when unset, before torch can start its thread pool: on this
two-core machine, torch threads that spin while waiting made the codec 50-100x slower under load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Only effective if the OpenMP runtime (torch) is not loaded yet; main() warns otherwise.
_OMP_TOO_LATE = "OMP_WAIT_POLICY" not in os.environ and "torch" in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from service import bench_codecs, bench_report  # noqa: E402
from service.cpu_clock import cpu_seconds  # noqa: E402
from service.node_stacks import read_folder_as_node  # noqa: E402
from service.series_reader import SeriesVolume, read_folder, read_path  # noqa: E402

log = logging.getLogger(__name__)

ALL_CODECS = ("voxarc", *bench_codecs.ANCHORS)
REFERENCE_CODECS = ("jpegxl-e7", "jpegls")


class RoundTripError(AssertionError):
    """A codec's decoded volume differs from the volume it encoded."""


@dataclass
class BenchOptions:
    """What to run.

    Attributes
    ----------
    codecs : list of str
        Codec names from :data:`ALL_CODECS` (``"voxarc"`` runs every model in ``models``).
    models : list of str
        voxarc model names.
    max_slices : int or None
        Code at most this many slices of every volume (all codecs), picked by ``subset_mode``.
    budget_s : float
        Estimated encode + decode time above which a voxarc model is run on a subset of slices.
    repeat : int
        Timed runs per phase when one run is cheap (median reported).
    repeat_below_s : float
        A phase whose first run took less than this many seconds is run ``repeat`` times (the
        median excludes a first run's one-time costs, the same for every codec); longer ones
        once.
    subset_mode : str
        ``"block"`` (consecutive central slices) or ``"even"`` (evenly spaced slices).
    crop : int or None
        Code only the central ``crop x crop`` region of every slice (all codecs): lets the slow
        paper models code many consecutive slices, with their inter-slice context, in CPU time.
    as_node : bool
        Read each folder as the storage node stacks it (service.node_stacks): 4D series in the
        order and the slabs the node codes them in.
    """

    codecs: list[str] = field(default_factory=lambda: list(ALL_CODECS))
    models: list[str] = field(default_factory=lambda: ["default"])
    max_slices: int | None = None
    budget_s: float = 120.0
    repeat: int = 3
    repeat_below_s: float = 15.0
    subset_mode: str = "block"
    crop: int | None = None
    as_node: bool = False


def select_slices(total: int, count: int | None, mode: str = "even") -> list[int]:
    """Indices of ``count`` slices out of ``total`` (all of them when ``count`` is None or larger).

    Parameters
    ----------
    total : int
        Number of slices in the volume.
    count : int or None
        How many to keep.
    mode : {"even", "block"}
        Evenly spaced over the volume, or a block of consecutive slices in its middle.

    Returns
    -------
    list of int
        Sorted distinct indices.
    """
    if count is None or count >= total:
        return list(range(total))
    count = max(1, count)
    if mode == "block":
        start = (total - count) // 2
        return list(range(start, start + count))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, count)})


def timed(fn: Callable[[], object], repeat: int, cheap_s: float = BenchOptions.repeat_below_s):
    """Run ``fn`` once, and ``repeat - 1`` more times when the first run took under ``cheap_s``.

    Returns
    -------
    results : list
        What each run returned.
    walls : list of float
        Wall-clock seconds of each run.
    wall_s, cpu_s : float
        Median wall-clock and CPU seconds per run (descendant processes included).
    """
    results, walls, cpus = [], [], []
    for i in range(max(1, repeat)):
        if i and walls[0] > cheap_s:
            break
        cpu0 = cpu_seconds()        # reads /proc of every worker process: not timed
        wall0 = time.perf_counter()
        results.append(fn())
        walls.append(time.perf_counter() - wall0)
        cpus.append(cpu_seconds() - cpu0)
    return results, walls, statistics.median(walls), statistics.median(cpus)


def verify(volume: np.ndarray, decoded: np.ndarray, codec: str) -> None:
    """Raise :class:`RoundTripError` unless ``decoded`` equals ``volume`` in dtype, shape, values."""
    decoded = np.asarray(decoded)
    if decoded.dtype != volume.dtype or decoded.shape != volume.shape:
        raise RoundTripError(f"{codec}: decoded {decoded.dtype}{decoded.shape}, "
                             f"expected {volume.dtype}{volume.shape}")
    if not np.array_equal(decoded, volume):
        wrong = int(np.count_nonzero(decoded != volume))
        raise RoundTripError(f"{codec}: {wrong} of {volume.size} voxels differ")


def measure(codec: bench_codecs.Codec, volume: np.ndarray, repeat: int,
            repeat_below_s: float = BenchOptions.repeat_below_s, coding: dict | None = None
            ) -> dict:
    """Encode, decode and verify ``volume`` with ``codec`` (a voxarc codec with the encoder
    options ``coding``); return sizes and speeds.

    Raises
    ------
    RoundTripError
        If any decode differs from ``volume``.
    """
    encoded, enc_walls, enc_wall, enc_cpu = timed(lambda: codec.encode(volume, **(coding or {})),
                                                  repeat, repeat_below_s)
    decoded, dec_walls, dec_wall, dec_cpu = timed(lambda: codec.decode(encoded[0]), repeat,
                                                  repeat_below_s)
    for out in decoded:
        verify(volume, out, codec.name)
    nbytes = encoded[0].nbytes
    slice_s, slice_walls = _time_one_slice(codec, encoded[0], volume, repeat)
    row = {"voxels": int(volume.size), "bytes": nbytes, "bpv": 8 * nbytes / volume.size,
           "verified": True, "encode_runs": len(encoded), "decode_runs": len(decoded),
           "encode_first_wall_s": enc_walls[0], "decode_first_wall_s": dec_walls[0],
           "slice_decode_s": slice_s, "slice_decode_walls_s": slice_walls}
    for phase, wall, cpu in (("encode", enc_wall, enc_cpu), ("decode", dec_wall, dec_cpu)):
        row[f"{phase}_wall_s"], row[f"{phase}_cpu_s"] = wall, cpu
        row[f"{phase}_wall_mvox_s"] = volume.size / wall / 1e6 if wall > 0 else None
        row[f"{phase}_cpu_mvox_s"] = volume.size / cpu / 1e6 if cpu > 0 else None
    return row


def _time_one_slice(codec: bench_codecs.Codec, encoded, volume: np.ndarray, repeat: int = 1
                    ) -> tuple[float | None, list[float]]:
    """Median seconds to decode the middle slice alone (random access), over ``repeat`` runs
    (one slice is quick, so each is repeated), each verified; and every run's seconds.
    (None, []) if unsupported."""
    if codec.decode_slice is None:
        return None, []
    middle = volume.shape[0] // 2
    parts, walls, median, _ = timed(lambda: codec.decode_slice(encoded, middle), repeat)
    for part in parts:
        verify(volume[middle:middle + 1], part, f"{codec.name} (slice {middle} alone)")
    return median, walls


def _run_row(codec, volume: SeriesVolume, indices: list[int], role: str,
             options: BenchOptions) -> dict:
    total = volume.voxels.shape[0]
    base = {"volume": volume.name, "codec": codec.name, "role": role,
            "slices": len(indices), "total_slices": total, "slice_indices": indices,
            "subset": len(indices) < total,
            "subset_mode": options.subset_mode if len(indices) < total else "all"}
    # the node's slabs and groups where the whole stack is coded as the node codes it
    coding = volume.coding if codec.name.startswith(bench_codecs.VOXARC_PREFIX) \
        and len(indices) == total else None
    try:
        return {**base, "status": "ok", "error": None,
                **measure(codec, np.ascontiguousarray(volume.voxels[indices]), options.repeat,
                          options.repeat_below_s, coding)}
    except Exception as exc:  # a codec that fails is a loud failed row, never a number
        log.error("%s on %s FAILED: %s", codec.name, volume.name, exc)
        return {**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "verified": False, "voxels": int(volume.voxels[indices].size), "bytes": None,
                "bpv": None}


def probe_slices(codec, volume: np.ndarray, budget_s: float) -> int | None:
    """Slices of ``volume`` that ``codec`` can encode and decode once within ``budget_s``
    (None: all of them).

    A tiny warm-up call first (model loading), then a round trip of two slices is timed.
    """
    total = volume.shape[0]
    codec.encode(np.ascontiguousarray(volume[:1, :8, :8]))
    probe = np.ascontiguousarray(volume[: min(2, total)])
    start = time.perf_counter()
    codec.decode(codec.encode(probe))
    per_slice = (time.perf_counter() - start) / probe.shape[0]
    if per_slice * total <= budget_s:
        return None
    return max(2, int(budget_s / max(per_slice, 1e-9)))


class Progress:
    """A one-line progress display on a TTY, plain log lines otherwise."""

    def __init__(self, total: int, stream=None):
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, message: str) -> None:
        """Announce the next unit of work."""
        self.done += 1
        text = f"[{self.done}/{self.total}] {message}"
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        else:
            log.info(text)

    def close(self) -> None:
        """End the progress line."""
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def bench_volume(volume: SeriesVolume, options: BenchOptions, progress: Progress) -> list[dict]:
    """All result rows of one volume: anchors on the main selection, each voxarc model on its own
    (possibly automatic) selection, and reference anchors on any other selection."""
    total = volume.voxels.shape[0]
    main = select_slices(total, options.max_slices, options.subset_mode)
    rows = []
    for name in options.codecs:
        if name in bench_codecs.ANCHORS:
            progress.step(f"{volume.name}: {name}")
            rows.append(_run_row(bench_codecs.ANCHORS[name](), volume, main, "main",
                                 options))
    if "voxarc" in options.codecs:
        for model in options.models:
            rows.extend(_bench_model(model, volume, main, options, progress))
    return rows


def _bench_model(model, volume, main, options, progress) -> list[dict]:
    progress.step(f"{volume.name}: {bench_codecs.VOXARC_PREFIX}{model}")
    codec = bench_codecs.voxarc_codec(model)
    try:
        if codec.prepare is not None:
            codec.prepare()
        keep = probe_slices(codec, volume.voxels[main], options.budget_s)
    except Exception as exc:  # the full run below records the failure as its row
        log.debug("probe of %s failed: %s", codec.name, exc)
        keep = None
    if keep is None:
        return [_run_row(codec, volume, main, "main", options)]
    picked = select_slices(len(main), keep, options.subset_mode)
    indices = [main[i] for i in picked]
    log.info("%s on %s: subset of %d of %d slices (%s) to stay within %.0f s", codec.name,
             volume.name, len(indices), len(main), options.subset_mode, options.budget_s)
    rows = [_run_row(codec, volume, indices, "main", options)]
    for name in REFERENCE_CODECS:
        rows.append(_run_row(bench_codecs.ANCHORS[name](), volume, indices, "reference",
                             options))
    return rows


def run_bench(paths: list[str | Path], options: BenchOptions | None = None,
              progress: Progress | None = None) -> dict:
    """Benchmark every volume found in ``paths``.

    Parameters
    ----------
    paths : list of str or pathlib.Path
        DICOM series folders (or single files).
    options : BenchOptions, optional
        Codecs, models, slice limits; defaults run everything on all slices.
    progress : Progress, optional
        Where progress goes; by default a line on stderr.

    Returns
    -------
    dict
        ``{"environment", "volumes", "rows", "overall", "ok"}``; ``ok`` is False when any round
        trip failed.
    """
    options = options or BenchOptions()
    reader = read_folder_as_node if options.as_node else read_folder
    volumes = [v for path in paths for v in read_path(path, reader)]
    if not volumes:
        raise ValueError(f"no DICOM image series found in {', '.join(map(str, paths))}")
    if options.crop:
        volumes = [crop_volume(v, options.crop) for v in volumes]
    steps = len(volumes) * (sum(c in bench_codecs.ANCHORS for c in options.codecs)
                            + ("voxarc" in options.codecs) * len(options.models))
    progress = progress or Progress(steps)
    rows = []
    for volume in volumes:
        rows.extend(bench_volume(volume, options, progress))
    progress.close()
    bench_report.add_ratios(rows)
    return {
        "environment": _environment(options),
        "volumes": [_describe(v) for v in volumes],
        "rows": rows,
        "overall": bench_report.overall_rows(rows),
        "ok": all(r["status"] == "ok" for r in rows),
    }


def crop_volume(volume: SeriesVolume, size: int) -> SeriesVolume:
    """``volume`` reduced to the central ``size x size`` region of every slice."""
    _, ny, nx = volume.voxels.shape
    y0, x0 = max(0, (ny - size) // 2), max(0, (nx - size) // 2)
    voxels = np.ascontiguousarray(volume.voxels[:, y0:y0 + size, x0:x0 + size])
    return dataclasses.replace(volume, voxels=voxels)


def _describe(volume: SeriesVolume) -> dict:
    vox = volume.voxels
    return {"name": volume.name, "series_uid": volume.series_uid, "modality": volume.modality,
            "transfer_syntax": volume.transfer_syntax, "files": volume.files,
            "sorted_by": volume.sorted_by, "coding": volume.coding,
            "shape": list(vox.shape), "dtype": vox.dtype.name,
            "voxels": int(vox.size), "min": int(vox.min()), "max": int(vox.max())}


def _environment(options: BenchOptions) -> dict:
    env = {"options": {k: v for k, v in vars(options).items()},
           "cpu_count": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
           "numpy": np.__version__, "codecs": bench_codecs.codec_versions(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if "voxarc" in options.codecs:
        env["voxarc_models"] = {m: _model_info(m) for m in options.models}
        env["voxarc_kernels"] = _kernel_status()
        env["voxarc_network_layers"] = _network_layers()
        env["voxarc_device"] = _network_device()
    return env


def _network_device() -> str:
    """Where voxarc's network runs (``VOXARC_DEVICE``; the GPU by default when torch has one)."""
    from models.predictor import compute_device
    device = compute_device()
    if device.startswith("cuda"):
        import torch
        device += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def _kernel_status() -> str:
    from models import kernels
    return kernels.status()


def _network_layers() -> str:
    from models import kernels
    return kernels.layers()


def _model_info(model: str) -> dict | str:
    """Header facts of a tiny blob of ``model`` (which codec body is active), or the error;
    ``name/no-adapt`` is the model ``name``."""
    try:
        import models

        blob = models.encode_volume(np.zeros((1, 2, 2), np.uint16),
                                    model=model.removesuffix(bench_codecs.NO_ADAPT))
        info = models.blob_info(blob)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in info.items()}
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def register(subparsers) -> None:
    """Add the ``bench`` sub-command to the ``voxarc`` command line."""
    p = subparsers.add_parser("bench", help="compare voxarc with classical lossless codecs",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="DICOM series folders or files, or .npy volumes (slices, rows, columns) "
                        "of uint8, int8, uint16 or int16")
    p.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    p.add_argument("--plot", metavar="OUT.png", help="draw bits per voxel per series and codec")
    p.add_argument("--codecs", default=",".join(ALL_CODECS),
                   help=f"comma-separated subset of {','.join(ALL_CODECS)} (default: all)")
    p.add_argument("--models", default="default",
                   help="comma-separated voxarc model names, each optionally with the suffix "
                        "/no-adapt (encode without per-volume adaptation) (default: default)")
    p.add_argument("--max-slices", type=int, metavar="N",
                   help="code at most N slices of every volume (see --subset), all codecs")
    p.add_argument("--budget-s", type=float, default=BenchOptions.budget_s,
                   help="a voxarc model whose estimated encode + decode time exceeds this many seconds "
                        "runs on a subset of slices (default: %(default)s)")
    p.add_argument("--subset", choices=("block", "even"), default=BenchOptions.subset_mode,
                   help="which slices a subset keeps: a central block of consecutive slices "
                        "(keeps inter-slice context) or evenly spaced ones (default: %(default)s)")
    p.add_argument("--crop", type=int, metavar="N",
                   help="code only the central N x N region of every slice, all codecs (for the "
                        "slow paper models: many consecutive slices in CPU time)")
    p.add_argument("--repeat", type=int, default=BenchOptions.repeat,
                   help="timed runs per phase when a run is cheap (median; default: %(default)s)")
    p.add_argument("--repeat-below-s", type=float, default=BenchOptions.repeat_below_s,
                   metavar="S", help="a phase whose first run took less than S seconds is "
                   "repeated (default: %(default)s)")
    p.add_argument("--as-node", action="store_true",
                   help="read each folder as the storage node stacks it: 4D series (time "
                        "points, repetitions) in the order and slabs the node codes them in")
    p.set_defaults(func=main)


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(args) -> int:
    """Run the benchmark for parsed ``args``; print the table; 0 if every round trip held."""
    if _OMP_TOO_LATE:
        log.warning("torch was imported before OMP_WAIT_POLICY=PASSIVE was set; timings may "
                    "suffer from spinning threads (set it in the environment)")
    codecs = _split(args.codecs)
    kernel_status = _kernel_status() if "voxarc" in codecs else "compiled"
    if kernel_status != "compiled":
        log.warning("voxarc's compiled kernels are %s: its speeds are those of the numpy and "
                    "torch path", kernel_status)
    unknown = sorted(set(codecs) - set(ALL_CODECS))
    if unknown:
        log.error("unknown codec(s) %s; known: %s", ", ".join(unknown), ", ".join(ALL_CODECS))
        return 2
    options = BenchOptions(codecs=codecs, models=_split(args.models), max_slices=args.max_slices,
                           budget_s=args.budget_s, repeat=args.repeat,
                           repeat_below_s=args.repeat_below_s, subset_mode=args.subset,
                           crop=args.crop, as_node=args.as_node)
    try:
        report = run_bench(args.paths, options)
    except (ValueError, OSError) as exc:     # nothing to read, or not a volume of ours
        log.error("bench: %s", exc)
        return 2
    print(bench_report.format_table(report["rows"], report["overall"]))
    if args.crop:
        print(f"every codec coded the central {args.crop} x {args.crop} region of each slice")
    env = report["environment"]
    if "voxarc_kernels" in env:
        print(f"voxarc: kernels {env['voxarc_kernels']}, network layers "
              f"{env['voxarc_network_layers']}, device {env['voxarc_device']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        log.info("wrote %s", args.json)
    if args.plot:
        from service.bench_plot import plot_bpv

        plot_bpv(report, args.plot)
        log.info("wrote %s", args.plot)
    if not report["ok"]:
        log.error("ROUND TRIP FAILED for %d row(s); see the table",
                  sum(r["status"] != "ok" for r in report["rows"]))
        return 1
    return 0
