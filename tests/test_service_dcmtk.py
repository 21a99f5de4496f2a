"""End to end with DCMTK: storescu pushes, findscu queries, getscu and movescu (to storescp)
retrieve; every retrieved dataset equals the original byte for byte, before and after compaction."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from pydicom.uid import ImplicitVRLittleEndian

from node_helpers import (TESTDATA, dataset_bytes, free_port, make_series,  # noqa: F401
                          needs_dcmtk, node, real_series_files, with_scanner_private_elements,
                          write_series)
from scu_helpers import store_bytes
from service.dcmtk import dcmtk
from storage import transcode
from storage.dataset_parts import parse_dataset
from storage.part10 import split_file

pytestmark = needs_dcmtk
ENV = {**os.environ, "TCP_NODELAY": "1"}


def _run(*args, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run([dcmtk(args[0])] + [str(a) for a in args[1:]], env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _originals(paths) -> dict:
    out = {}
    for path in paths:
        ts, data = split_file(Path(path).read_bytes())
        out[str(parse_dataset(data, ts).SOPInstanceUID)] = (ts, data)
    return out


def _received(folder: Path) -> dict:
    return _originals(p for p in folder.iterdir() if p.is_file())


def _keys(**keys):
    out = []
    for k, v in keys.items():
        out += ["-k", f"{k}={v}" if v is not None else k]
    return out


@contextlib.contextmanager
def _storescp(tmp_path, aet: str, *options):
    """A DCMTK storescp (``options``: the syntaxes it accepts) as C-MOVE destination, writing
    what it receives bit-preserving; yields its port and folder."""
    port, out = free_port(), Path(tempfile.mkdtemp(prefix=f"{aet.lower()}-", dir=tmp_path))
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", aet, *options, "+B", "-od", str(out),
                             str(port)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def storescp(tmp_path):
    """A storescp that accepts every syntax."""
    with _storescp(tmp_path, "DEST", "+xa") as scp:
        yield scp


def _push(port, paths):
    _run("storescu", "-aec", "VOXARC", "127.0.0.1", port, *paths)


def _get(port, tmp_path, tag, **keys) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"get-{tag}-", dir=tmp_path))
    _run("getscu", "-S", "-aec", "VOXARC", "+B", "-od", out, *_keys(**keys), "127.0.0.1", port)
    return _received(out)


def _move(port, dest_dir, **keys) -> dict:
    for f in dest_dir.iterdir():
        f.unlink()
    _run("movescu", "-S", "-aec", "VOXARC", "-aem", "DEST", *_keys(**keys), "127.0.0.1", port)
    return _received(dest_dir)


def _study_count(port, study_uid) -> int:
    proc = _run("findscu", "-S", "-aec", "VOXARC", *_keys(
        QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid,
        NumberOfStudyRelatedInstances=None, ModalitiesInStudy=None, RetrieveAETitle=None),
        "127.0.0.1", port)
    counts = re.findall(r"\(0020,1208\) IS \[(\d+)", proc.stdout + proc.stderr)
    assert "(0008,0054) AE [VOXARC]" in proc.stdout + proc.stderr   # where to retrieve from
    return int(counts[0])


def _round_trip(node, tmp_path, storescp, originals, study_uids, stage):
    dest_port, dest_dir = storescp
    node.settings.destinations["dest"] = f"DEST@127.0.0.1:{dest_port}"
    for n, study in enumerate(study_uids):
        got = _get(node.port, tmp_path, f"{stage}{n}", QueryRetrieveLevel="STUDY",
                   StudyInstanceUID=study)
        assert got and all(got[uid] == originals[uid] for uid in got), stage
        moved = _move(node.port, dest_dir, QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
        assert moved == got, stage
    return originals


def test_dcmtk_generated_series(node, tmp_path, storescp):
    a = make_series(5, 16, 16)
    b = make_series(3, 9, 7, dtype="uint8", seed=3)
    paths = write_series(a, tmp_path / "a") + write_series(b, tmp_path / "b")
    paths.append(TESTDATA / "CT_small.dcm")
    _push(node.port, paths)
    assert node.archive.stats()["instances"] == 9
    assert _study_count(node.port, a[0].StudyInstanceUID) == 5
    studies = [a[0].StudyInstanceUID, b[0].StudyInstanceUID]
    originals = _round_trip(node, tmp_path, storescp, _originals(paths), studies, "staged")
    for ds in a + b:           # storescu sent our files unchanged (it rewrites CT_small.dcm)
        assert node.archive.retrieve(ds.SOPInstanceUID).data == originals[ds.SOPInstanceUID][1]
    node.archive.compact(0)
    assert node.archive.stats()["pending_instances"] == 0
    _round_trip(node, tmp_path, storescp, originals, studies, "compacted")


def test_dcmtk_lone_images_coded_as_one_slice_volumes_come_back_exactly(node, tmp_path):
    """A radiograph-like lone image (pynetdicom's 1024 x 1024 RT image) and CT_small, each
    alone in its series: after compaction they are coded volumes, and getscu receives the
    datasets storescu sent, byte for byte."""
    import pynetdicom
    from sqlalchemy import select
    from storage.index import Blob, Instance
    rt = Path(pynetdicom.__file__).parent / "tests" / "dicom_files" / "RTImageStorage.dcm"
    paths = [rt, TESTDATA / "CT_small.dcm"]
    _push(node.port, paths)
    sent = {uid: node.archive.retrieve(uid).data for uid in _originals(paths)}  # as received
    node.archive.compact(0)
    with node.archive.index.read() as s:
        codecs = dict(s.execute(select(Instance.sop_uid, Blob.codec)
                                .join(Blob, Instance.blob_fk == Blob.id)).all())
    assert set(codecs) == set(sent) and set(codecs.values()) == {"volume+headers"}
    for path in paths:
        got = _get(node.port, tmp_path, path.stem, QueryRetrieveLevel="STUDY",
                   StudyInstanceUID=_study(path))
        assert got and all(data == sent[uid] for uid, (_, data) in got.items())


def _study(path: Path) -> str:
    ts, data = split_file(path.read_bytes())
    return str(parse_dataset(data, ts).StudyInstanceUID)


def test_dcmtk_real_series(node, tmp_path, storescp, shared_series):
    """storescu rewrites what it sends (undefined-length sequences get lengths), so the CT pushed
    with it is compared with what the node received; the MR is sent unchanged by a pynetdicom
    SCU and compared with the original files."""
    ct = real_series_files(shared_series("test", "ct_ge_revolution_lungbases_cptacpda"))
    mr = real_series_files(shared_series("test", "mr_enh_siemens_xa10"))
    _push(node.port, ct)
    mr_originals = _originals(mr)
    items = [(str(parse_dataset(d, ts).SOPClassUID), uid, ts, d)
             for uid, (ts, d) in mr_originals.items()]
    assert store_bytes(node.port, items, tmp_path) == [0] * len(mr)
    assert node.archive.stats()["instances"] == len(ct) + len(mr)
    received = {uid: (ts, node.archive.retrieve(uid).data) for uid, (ts, _) in
                _originals(ct).items()}
    _round_trip(node, tmp_path, storescp, received, [_study(ct[0])], "staged")
    _round_trip(node, tmp_path, storescp, mr_originals, [_study(mr[0])], "staged")
    # compact the small MR series only (the codec's speed bounds the test time)
    for record in node.archive.find("SERIES", {"StudyInstanceUID": _study(mr[0]),
                                               "SeriesInstanceUID": ""}):
        assert node.archive.compact_series(record["SeriesInstanceUID"])
    assert node.archive.stats()["pending_instances"] == len(ct)
    _round_trip(node, tmp_path, storescp, mr_originals, [_study(mr[0])], "compacted")


def test_dcmtk_get_of_compressed_instances_with_getscu_preferring_their_syntax(node, tmp_path):
    """getscu +xt proposes JPEG-LS lossless and the uncompressed syntaxes in one context per
    class; the node accepts the syntax it holds the class in, so the instance stored as
    JPEG-LS goes out (before, explicit VR was accepted and every sub-operation failed)."""
    originals = _originals([TESTDATA / "MR_small_jpeg_ls_lossless.dcm"])
    items = [(str(parse_dataset(d, ts).SOPClassUID), uid, ts, d)
             for uid, (ts, d) in originals.items()]
    assert store_bytes(node.port, items, tmp_path) == [0]
    out = Path(tempfile.mkdtemp(prefix="get-jls-", dir=tmp_path))
    (uid, (_, data)), = originals.items()
    _run("getscu", "-S", "+xt", "-aec", "VOXARC", "+B", "-od", out,
         *_keys(QueryRetrieveLevel="IMAGE", StudyInstanceUID=_study(
             TESTDATA / "MR_small_jpeg_ls_lossless.dcm"),
             SeriesInstanceUID=str(parse_dataset(data, originals[uid][0]).SeriesInstanceUID),
             SOPInstanceUID=uid), "127.0.0.1", node.port)
    assert _received(out) == originals


def test_dcmtk_peers_that_take_only_uncompressed_syntaxes_get_it_decompressed(node, tmp_path):
    """getscu without +x options and a storescp without +xa propose and accept only the
    uncompressed syntaxes: the JPEG-LS lossless instance reaches both decompressed, with the
    pixels and elements of the bundled uncompressed original (before, every sub-operation
    failed)."""
    import numpy as np
    from pydicom import dcmread
    name = "MR_small_jpeg_ls_lossless.dcm"
    originals = _originals([TESTDATA / name])
    (uid, (ts, data)), = originals.items()
    ds = parse_dataset(data, ts)
    assert store_bytes(node.port, [(str(ds.SOPClassUID), uid, ts, data)], tmp_path) == [0]
    keys = _keys(QueryRetrieveLevel="IMAGE", StudyInstanceUID=_study(TESTDATA / name),
                 SeriesInstanceUID=str(ds.SeriesInstanceUID), SOPInstanceUID=uid)
    got_dir = Path(tempfile.mkdtemp(prefix="get-plain-", dir=tmp_path))
    _run("getscu", "-S", "-aec", "VOXARC", "+B", "-od", got_dir, *keys, "127.0.0.1", node.port)
    with _storescp(tmp_path, "PLAIN") as (port, moved_dir):
        node.settings.destinations["plain"] = f"PLAIN@127.0.0.1:{port}"
        _run("movescu", "-S", "-aec", "VOXARC", "-aem", "PLAIN", *keys, "127.0.0.1", node.port)
    reference = dcmread(TESTDATA / "MR_small.dcm")
    for folder in (got_dir, moved_dir):
        (path,) = [p for p in folder.iterdir() if p.is_file()]
        received = dcmread(path)
        assert received.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1",
                                                        "1.2.840.10008.1.2")
        assert received.SOPInstanceUID == uid and received.PatientName == reference.PatientName
        np.testing.assert_array_equal(received.pixel_array, reference.pixel_array)


def _move_implicit_only(node, tmp_path, originals: dict) -> None:
    """movescu to a storescp that takes Implicit VR Little Endian only (``+xi``; DCMTK 3.6.7's
    getscu proposes Explicit VR under that flag) of ``originals``' study: every instance
    arrives, as the node's checked conversion of what it received."""
    ts, data = next(iter(originals.values()))
    with _storescp(tmp_path, "IMPLICIT", "+xi") as (port, out):
        node.settings.destinations["implicit"] = f"IMPLICIT@127.0.0.1:{port}"
        _run("movescu", "-S", "-aec", "VOXARC", "-aem", "IMPLICIT",
             *_keys(QueryRetrieveLevel="STUDY",
                    StudyInstanceUID=str(parse_dataset(data, ts).StudyInstanceUID)),
             "127.0.0.1", node.port)
        got = _received(out)
    assert got.keys() == originals.keys()
    for uid, (ts, data) in originals.items():
        assert got[uid] == (ImplicitVRLittleEndian,
                            transcode.convert(data, ts, ImplicitVRLittleEndian))


def test_dcmtk_peer_taking_only_implicit_vr_gets_scanners_private_elements(node, tmp_path):
    """Private elements whose VR Implicit VR loses or changes (empty ones, GE's Equipment UID
    written as OB, Siemens text in functional groups): every sub-operation used to fail."""
    series = [with_scanner_private_elements(ds) for ds in make_series(3, 8, 8, seed=21)]
    originals = {ds.SOPInstanceUID: dataset_bytes(ds) for ds in series}
    items = [(str(ds.SOPClassUID), ds.SOPInstanceUID, *originals[ds.SOPInstanceUID])
             for ds in series]
    assert store_bytes(node.port, items, tmp_path) == [0] * 3
    _move_implicit_only(node, tmp_path, originals)


def test_dcmtk_peer_taking_only_implicit_vr_gets_real_scanners_series(node, tmp_path,
                                                                      shared_series):
    """The GE CT and the Siemens enhanced MR of the test series, staged; the MR compacted too
    (the codec's speed bounds the test time)."""
    ct, mr = (_originals(real_series_files(shared_series("test", name)))
              for name in ("ct_ge_revolution_lungbases_cptacpda", "mr_enh_siemens_xa10"))
    for originals in (ct, mr):
        items = [(str(parse_dataset(d, ts).SOPClassUID), uid, ts, d)
                 for uid, (ts, d) in originals.items()]
        assert store_bytes(node.port, items, tmp_path) == [0] * len(items)
        _move_implicit_only(node, tmp_path, originals)
    ts, data = next(iter(mr.values()))
    assert node.archive.compact_series(str(parse_dataset(data, ts).SeriesInstanceUID))
    assert node.archive.stats()["pending_instances"] == len(ct)
    _move_implicit_only(node, tmp_path, mr)


def test_dcmtk_storescp_gets_the_forwarded_series(tmp_path):
    """A running node forwarding CT series to a DCMTK storescp: a series pushed by storescu
    arrives there byte for byte once stable, an MR series does not."""
    from service.ae import Node
    from service.config import load_settings
    ct, mr = make_series(4, 16, 16, seed=41), make_series(2, 16, 16, modality="MR", seed=42)
    paths = write_series(ct, tmp_path / "ct") + write_series(mr, tmp_path / "mr")
    with _storescp(tmp_path, "READWS", "+xa") as (dest_port, dest_dir):
        settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                                 stable_age=1.0, compaction_interval=0.3,
                                 destination=[f"reading=READWS@127.0.0.1:{dest_port}"],
                                 forward=["reading=Modality=CT"])
        node = Node(settings).start()
        try:
            _push(node.port, paths)
            deadline = time.monotonic() + 60
            while len(list(dest_dir.iterdir())) < len(ct) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.5)                    # the MR series would have come by now
            got = _received(dest_dir)
        finally:
            node.stop()
    assert got == _originals(paths[:len(ct)])
