"""Helpers of the storage and service tests: generated DICOM series, archives on SQLite and
PostgreSQL, the bundled pydicom test files, and a running node on a free port."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         generate_uid)

from service.dcmtk import dcmtk
from storage.archive import Archive
from storage.part10 import split_file

PG_URL = os.environ.get("VOXARC_TEST_PG_URL", "")
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.skipif(
    not PG_URL, reason="VOXARC_TEST_PG_URL not set"))]
DCMTK = all(dcmtk(b) for b in ("storescu", "findscu", "getscu", "movescu", "storescp"))
needs_dcmtk = pytest.mark.skipif(not DCMTK, reason="DCMTK binaries not installed")
DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(not DCIODVFY, reason="dicom3tools' dciodvfy not installed")
TESTDATA = Path(pydicom.data.__file__).parent / "test_files"
# Bundled files with a File Meta group and SOP/Study/Series UIDs (mixed syntaxes and objects)
BUNDLED = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm",
           "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
           "JPEG2000.dcm", "SC_rgb_small_odd.dcm", "rtdose.dcm", "rtplan.dcm", "test-SR.dcm",
           "image_dfl.dcm", "examples_palette.dcm", "waveform_ecg.dcm", "badVR.dcm"]


def make_series(n: int = 4, rows: int = 16, cols: int = 16, *, dtype: str = "int16",
                transfer_syntax: str = ExplicitVRLittleEndian, study_uid: str | None = None,
                patient_id: str = "PAT1", patient_name: str = "Doe^Jane", modality: str = "CT",
                study_date: str = "20240102", seed: int = 0) -> list[Dataset]:
    """A stack of ``n`` single-frame images, positions shuffled, with private and odd elements."""
    rng = np.random.default_rng(seed)
    study_uid, series_uid = study_uid or generate_uid(), generate_uid()
    info = np.iinfo(dtype)
    out = []
    for k in rng.permutation(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName, ds.PatientSex = patient_id, patient_name, "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate, ds.StudyTime, ds.Modality = study_date, "101500", modality
        ds.StudyDescription, ds.SeriesNumber, ds.InstanceNumber = "Test study", 3, int(k) + 1
        ds.AccessionNumber, ds.StudyID = "ACC1", "S1"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, -2.5 * float(k)]
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = np.dtype(dtype).itemsize * 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(info.min < 0)
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.add_new(0x00091010, "LO", "VOXTEST")
        ds.add_new(0x00091011, "OB", b"\x01\x02\x03")        # odd length private value
        pix = (rng.integers(-50, 50, (rows, cols)) + 100 * k + np.arange(cols)).clip(
            info.min, info.max).astype(dtype)
        pix[0, 0] = info.min                                 # stored words untouched
        data = pix.tobytes()
        ds.PixelData = data + (b"\x7f" if len(data) % 2 else b"")   # nonzero padding byte
        ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
        out.append(ds)
    return out


def with_scanner_private_elements(ds: Dataset) -> Dataset:
    """``ds`` with private elements as real scanners write them, which Implicit VR reads with
    another VR or none: empty ones, an Equipment UID written as OB that pydicom's private
    dictionary calls UI (GE), text in a sequence item (Siemens functional groups)."""
    ds.add_new(0x00090010, "LO", "GEMS_IDEN_01")
    ds.add_new(0x000910E3, "OB", b"")
    ds.add_new(0x00650010, "LO", "Uways")
    ds.add_new(0x00651011, "SH", "")
    ds.add_new(0x0065102B, "LT", "")
    ds.add_new(0x00651031, "SH", "T1 ")
    item = Dataset()
    item.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
    item.add_new(0x0019100C, "IS", "1000")
    item.add_new(0x0019100D, "CS", "")
    ds.add_new(0x52009229, "SQ", [item])
    return ds


def make_time_points(count: int, frames: int, size: int, seed: int) -> list:
    """``count`` multi-frame instances of one series, one volume per time point (as enhanced
    MR fMRI comes), the same frames' format, InstanceNumber the time point."""
    series = make_series(count, size, size, seed=seed)
    rng = np.random.default_rng(seed)
    base = rng.normal(500, 80, (frames, size, size))
    for ds in series:
        t = ds.InstanceNumber
        ds.NumberOfFrames = frames
        ds.PixelData = np.round(base + 3 * t + rng.normal(0, 4, base.shape)).astype(
            np.int16).tobytes()
    return series


def make_4d_instance(time_points: int, positions: int, size: int, seed: int,
                     contrasts: bool = False, by_position: bool = False) -> Dataset:
    """One enhanced multi-frame instance holding a whole 4D series in time-major order (time
    point ``t``'s ``positions`` frames together, each frame's place in its per-frame
    functional groups), as an enhanced MR fMRI can come; ``by_position``: each position's
    time points together instead. With ``contrasts``, each "time point" is another contrast
    of the same places (a field map's magnitude and phase)."""
    (ds,) = make_series(1, size, size, seed=seed)
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(size), np.arange(size)) * 7.0
    base = ramp + 40 * np.arange(positions)[:, None, None] ** 1.5 + 300
    points = []
    for t in range(time_points):
        scale = (-3.0 if t % 2 else 1.0) * (1 + t) if contrasts else 1.0
        points.append(base * scale + (2000 if contrasts and t % 2 else 0) + 3 * t
                      + rng.normal(0, 3, base.shape))
    ds.NumberOfFrames = time_points * positions
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    places = [(t, z) for t in range(time_points) for z in range(positions)]
    if by_position:
        places.sort(key=lambda tz: (tz[1], tz[0]))
    frames = []
    for _, z in places:
        item, place = Dataset(), Dataset()
        place.ImagePositionPatient = [-10.5, 4.25, 3.0 * z - 20]
        item.PlanePositionSequence = [place]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    pixels = np.stack([points[t][z] for t, z in places])
    ds.PixelData = np.round(pixels).astype(np.int16).tobytes()
    return ds


def file_bytes(ds: Dataset) -> bytes:
    """Encode a dataset as a Part 10 file in its File Meta transfer syntax."""
    fp = io.BytesIO()
    ts = pydicom.uid.UID(ds.file_meta.TransferSyntaxUID)
    ds.save_as(fp, enforce_file_format=True, implicit_vr=ts.is_implicit_VR,
               little_endian=ts.is_little_endian)
    return fp.getvalue()


def dataset_bytes(ds: Dataset) -> tuple[str, bytes]:
    """Return ``(transfer syntax, dataset bytes)`` of a generated dataset."""
    return split_file(file_bytes(ds))


def store_as_received(arch, series: list[Dataset]) -> dict[str, tuple[str, bytes]]:
    """Store generated datasets in an archive; return (transfer syntax, dataset bytes) by SOP
    Instance UID."""
    sent = {}
    for ds in series:
        ts, data = dataset_bytes(ds)
        arch.store(data, ts)
        sent[ds.SOPInstanceUID] = (ts, data)
    return sent


def store_series(arch, series: list[Dataset]) -> dict[str, bytes]:
    """Store generated datasets in an archive; return their bytes by SOP Instance UID."""
    return {uid: data for uid, (_, data) in store_as_received(arch, series).items()}


def bundled(name: str) -> tuple[str, bytes]:
    """Return ``(transfer syntax, dataset bytes)`` of a pydicom bundled test file."""
    return split_file((TESTDATA / name).read_bytes())


def write_series(series: list[Dataset], folder: Path) -> list[Path]:
    """Write datasets as Part 10 files into ``folder``; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(series):
        path = folder / f"IM{i:04d}.dcm"
        path.write_bytes(file_bytes(ds))
        paths.append(path)
    return paths


def iod_errors(path: Path) -> tuple[tuple[str, ...], Counter]:
    """What dicom3tools' ``dciodvfy`` says of a Part 10 file: the IODs it checked the file
    against, and its error lines, counted. A crash of the checker is an assertion error, not a
    clean report."""
    proc = subprocess.run([DCIODVFY, "-new", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode in (0, 1), f"dciodvfy {path}: exit {proc.returncode} {proc.stderr[-500:]}"
    lines = (proc.stdout + proc.stderr).splitlines()
    iods = tuple(line.strip() for line in lines
                 if line.strip() and not line.startswith(("Error", "Warning")))
    return iods, Counter(line for line in lines if line.startswith("Error"))


def database_url(backend: str, tmp_path: Path) -> str:
    """A clean database URL of ``backend`` (the PostgreSQL tables are dropped first)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    from storage.index import Index
    index = Index(PG_URL)
    index.drop_all()
    index.close()
    return PG_URL


@pytest.fixture(params=BACKENDS)
def archive(request, tmp_path):
    """An empty archive on SQLite and, when configured, on PostgreSQL."""
    arch = Archive(tmp_path / "data", database_url(request.param, tmp_path))
    yield arch
    arch.close()


def free_port() -> int:
    """Return a TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_series_files(folder: Path, limit: int | None = None) -> list[Path]:
    """DICOM files of an unpacked real series (non-DICOM files like DIRFILE skipped)."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            head = f.read(132)
        if head[128:132] == b"DICM":
            files.append(path)
    return files[:limit] if limit else files


@pytest.fixture
def node(tmp_path):
    """A running node on a free port (compaction only when a test asks for it)."""
    from service.ae import Node
    from service.config import load_settings
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             stable_age=3600.0)
    running = Node(settings, compaction=False).start()
    yield running
    running.stop()


def lose_commit_answer(index, monkeypatch, really_commit: bool, skip: int = 0) -> None:
    """Make ``index.write()`` raise at its commit, after committing (the server's answer lost
    with its connection) or instead of committing, once, after ``skip`` writes that go well."""
    from contextlib import contextmanager

    from sqlalchemy.exc import OperationalError
    real_write, calls = index.write, []

    @contextmanager
    def write():
        calls.append(None)
        if len(calls) <= skip:
            with real_write() as s:
                yield s
            return
        monkeypatch.setattr(index, "write", real_write)
        with real_write() as s:
            yield s
            if not really_commit:
                s.rollback()
        raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection"))
    monkeypatch.setattr(index, "write", write)


def series_uid_of(arch, sop_uid: str) -> str:
    """The Series Instance UID the index files instance ``sop_uid`` under."""
    from sqlalchemy import select
    from storage.index import Instance, Series
    with arch.index.read() as s:
        return s.scalar(select(Series.series_uid).join(Instance, Instance.series_fk == Series.id)
                        .where(Instance.sop_uid == sop_uid))


def retrieves_exactly(arch, sent: dict) -> bool:
    """Whether every instance of ``sent`` ({SOP UID: dataset bytes}) comes back as sent."""
    return all(arch.retrieve(uid).data == data for uid, data in sent.items())


def stored_codecs(arch) -> dict[str, str]:
    """SOP Instance UID -> the codec of the blob holding it (compacted instances only)."""
    from sqlalchemy import select

    from storage.index import Blob, Instance
    with arch.index.read() as s:
        return dict(s.execute(select(Instance.sop_uid, Blob.codec)
                              .join(Blob, Instance.blob_fk == Blob.id)).all())


def all_gone(arch, sent: dict) -> bool:
    """Assert that no instance of ``sent`` can be retrieved any more (then True)."""
    from storage.errors import InstanceNotFoundError
    for uid in sent:
        with pytest.raises(InstanceNotFoundError):
            arch.retrieve(uid)
    return True


def damage_the_blob(arch) -> None:
    """Flip a byte near the end of the archive's one coded blob, and drop what the archive
    decoded of it, so that rebuilding its instances fails their SHA-256 check."""
    from sqlalchemy import select
    from storage.index import Blob
    with arch.index.read() as s:
        (key,) = s.scalars(select(Blob.key))
    data = bytearray(arch.blobs.get(key))
    data[-20] ^= 0xFF
    arch.blobs.put(key, bytes(data))
    arch.reconstructor = type(arch.reconstructor)(arch.index, arch.blobs)
