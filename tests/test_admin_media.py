"""Studies as DICOM media file-sets (a DICOMDIR and its files): `voxarc export --dicomdir`, the
admin page's ZIP download, and storage.media's handling of what a directory cannot record."""

import io
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RTDoseStorage

from admin_helpers import admin_site, http_get, http_token  # noqa: F401
from node_helpers import (bundled, dataset_bytes, iod_errors, make_series, needs_dciodvfy,
                          store_as_received, write_series)
from scu_helpers import store_bytes
from service import web_media
from storage import media
from storage.archive import Archive
from storage.errors import StorageError
from storage.part10 import split_file

REPO = Path(__file__).resolve().parents[1]


def _voxarc(*args):
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _two_studies():
    """A study of a CT and an MR series; a second study, sent in Implicit VR, whose instances
    lack the Patient ID, Study ID and Series Number a directory record needs, have an
    anonymiser's Study Date, and a name in UTF-8."""
    first = make_series(4, 16, 16, seed=1)
    first += make_series(3, 8, 8, modality="MR", seed=2, study_uid=first[0].StudyInstanceUID)
    second = make_series(3, 8, 8, transfer_syntax=ImplicitVRLittleEndian, seed=3,
                         patient_id="", patient_name="Müller^Jörg")
    for ds in second:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.StudyID, ds.SeriesNumber = "", None
        ds.StudyDate, ds.SeriesDate = "***", "20240305"
    return first, second


def _file_set(folder: Path) -> dict:
    """SOP Instance UID -> (record's transfer syntax, the file's (syntax, dataset bytes))."""
    fs = FileSet(folder / "DICOMDIR")
    return {inst.SOPInstanceUID: (inst.TransferSyntaxUID, split_file(Path(inst.path).read_bytes()))
            for inst in fs}


@needs_dciodvfy
def test_export_dicomdir_is_a_valid_file_set_of_the_received_bytes(tmp_path):
    first, second = _two_studies()
    sent = {ds.SOPInstanceUID: dataset_bytes(ds) for ds in first + second}
    data = tmp_path / "data"
    assert _voxarc("import", "--data-dir", data,
                   write_series(first + second, tmp_path / "in")[0].parent).returncode == 0
    studies = (first[0].StudyInstanceUID, second[0].StudyInstanceUID)

    proc = _voxarc("export", "--dicomdir", "--data-dir", data, *studies, tmp_path / "cd")
    assert proc.returncode == 0, proc.stderr
    assert "3 directory records carry an invented key" in proc.stderr
    found = _file_set(tmp_path / "cd")
    assert set(found) == set(sent)
    for uid, (record_ts, received) in found.items():
        assert received == sent[uid] and record_ts == sent[uid][0]
    names = [p.relative_to(tmp_path / "cd").parts for p in (tmp_path / "cd").rglob("*")
             if p.is_file()]
    assert all(len(n) <= 8 and n.isupper() for parts in names for n in parts), names
    iods, errors = iod_errors(tmp_path / "cd" / "DICOMDIR")
    assert iods == ("BasicDirectory",) and not errors, errors

    records = {inst.SOPInstanceUID: inst for inst in FileSet(tmp_path / "cd" / "DICOMDIR")}
    kept, invented = records[first[0].SOPInstanceUID], records[second[0].SOPInstanceUID]
    assert (kept.PatientID, kept.StudyID, kept.SeriesNumber) == ("PAT1", "S1", 3)
    assert str(invented.PatientName) == "Müller^Jörg" and invented.PatientID.startswith("VX")
    assert invented.StudyID == "2" and invented.SeriesNumber == 1
    assert invented.StudyDate == "20240305" and kept.StudyDate == "20240102"
    ds = invented.load()                # the file still has what was sent: nothing invented
    assert ds.PatientID == "" and ds.StudyID == "" and ds.SeriesNumber is None
    assert ds.StudyDate == "***"

    assert _voxarc("compress", "--now", "--data-dir", data).returncode == 0
    proc = _voxarc("export", "--dicomdir", "--data-dir", data, *studies, tmp_path / "usb")
    assert proc.returncode == 0, proc.stderr
    assert _file_set(tmp_path / "usb") == found

    # the stick read in by another node: every instance, the DICOMDIR passed over
    proc = _voxarc("import", "--data-dir", tmp_path / "other", tmp_path / "usb")
    assert proc.returncode == 0 and "imported 10 of 11 files" in proc.stderr, proc.stderr
    assert "(0 refused, 1 DICOMDIR passed over)" in proc.stderr
    assert _voxarc("export", "--dicomdir", "--data-dir", data, studies[0], "1.2.3",
                   tmp_path / "none").returncode == 1
    assert not (tmp_path / "none").exists()


def test_what_a_directory_cannot_record_is_left_out_and_named(tmp_path):
    arch = Archive(tmp_path / "data")
    images = make_series(3, 8, 8)
    dose = make_series(1, 8, 8, seed=5, study_uid=images[0].StudyInstanceUID)[0]
    dose.SOPClassUID = dose.file_meta.MediaStorageSOPClassUID = RTDoseStorage
    dose.Modality = "RTDOSE"                       # an RT DOSE record needs DoseSummationType
    sent = store_as_received(arch, images + [dose])
    plan = media.plan_file_set(arch, [images[0].StudyInstanceUID])
    assert set(plan.left_out) == {dose.SOPInstanceUID}
    assert "Dose Summation Type" in plan.left_out[dose.SOPInstanceUID]
    assert {uid for _, uid in plan.files} == {ds.SOPInstanceUID for ds in images}
    assert media.write_file_set(arch, plan, tmp_path / "cd") == []
    assert set(_file_set(tmp_path / "cd")) == {ds.SOPInstanceUID for ds in images}

    members = zipfile.ZipFile(io.BytesIO(b"".join(media.zip_file_set(arch, plan))))
    assert members.testzip() is None
    assert sorted(members.namelist()[:-1]) == sorted(f for f, _ in plan.files)
    assert members.namelist()[-1] == "DICOMDIR"
    for file_id, uid in plan.files:
        assert split_file(members.read(file_id)) == sent[uid]
    assert members.read("DICOMDIR") == plan.dicomdir
    arch.close()


def test_an_instance_that_cannot_be_rebuilt_stops_the_file_set(tmp_path, monkeypatch):
    arch = Archive(tmp_path / "data")
    series = make_series(3, 8, 8)
    store_as_received(arch, series)
    plan = media.plan_file_set(arch, [series[0].StudyInstanceUID])
    broken = plan.files[1][1]
    rebuild = arch.retrieve_parts

    def retrieve_parts(uid, *args, **kwargs):
        if uid == broken:
            raise StorageError(f"instance {uid}: SHA-256 mismatch")
        return rebuild(uid, *args, **kwargs)
    monkeypatch.setattr(arch, "retrieve_parts", retrieve_parts)
    assert media.write_file_set(arch, plan, tmp_path / "cd") == [broken]
    assert not (tmp_path / "cd" / "DICOMDIR").exists()     # no directory naming a missing file
    chunks = []
    with pytest.raises(StorageError, match="SHA-256"):
        for chunk in media.zip_file_set(arch, plan):
            chunks.append(chunk)
    assert chunks and b"DICOMDIR" not in b"".join(chunks)
    arch.close()


def test_admin_download_is_the_study_as_a_zipped_file_set(admin_site, tmp_path):
    node, admin = admin_site
    first, second = _two_studies()
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in first + second]
    assert set(store_bytes(node.port, items, tmp_path)) == {0}
    sent = {uid: (ts, data) for _, uid, ts, data in items}
    study = first[0].StudyInstanceUID

    status, body = http_get(f"{admin.url}/api/studies/{study}/media.zip")
    assert status == 200
    members = zipfile.ZipFile(io.BytesIO(body))
    assert members.testzip() is None and "DICOMDIR" in members.namelist()
    members.extractall(tmp_path / "unzipped")
    found = _file_set(tmp_path / "unzipped")
    assert set(found) == {ds.SOPInstanceUID for ds in first}
    assert all(received == sent[uid] for uid, (_, received) in found.items())
    status, _ = http_get(f"{admin.url}/api/studies/1.2.3/media.zip")
    assert status == 404


@pytest.mark.parametrize("http_token", ["s3cret"])
def test_admin_download_needs_the_token(admin_site, http_token, tmp_path):
    node, admin = admin_site
    series = make_series(2, 8, 8)
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    assert set(store_bytes(node.port, items, tmp_path)) == {0}
    url = f"{admin.url}/api/studies/{series[0].StudyInstanceUID}/media.zip"
    assert http_get(url)[0] == 401
    status, body = http_get(f"{url}?token={http_token}")
    assert status == 200 and len(zipfile.ZipFile(io.BytesIO(body)).namelist()) == 3


def test_a_downloaded_zip_imports_into_another_node(tmp_path):
    """`voxarc import` takes ZIP files: the study a node gave as a ZIP arrives byte for byte
    at another, its DICOMDIR passed over; a member whose CRC fails is refused."""
    arch = Archive(tmp_path / "data")
    series = make_series(3, 8, 8, seed=41)
    sent = store_as_received(arch, series)
    plan = media.plan_file_set(arch, [series[0].StudyInstanceUID])
    (tmp_path / "study.ZIP").write_bytes(b"".join(media.zip_file_set(arch, plan)))
    arch.close()
    member = dataset_bytes(make_series(1, 8, 8, seed=42)[0])
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("IM9", b"\0" * 128 + b"DICM" + member[1])
    damaged = bytearray((tmp_path / "bad.zip").read_bytes())
    damaged[200] ^= 0xFF                                  # inside the member's bytes
    (tmp_path / "bad.zip").write_bytes(bytes(damaged))

    proc = _voxarc("import", "--data-dir", tmp_path / "other", tmp_path / "study.ZIP",
                   tmp_path / "bad.zip")
    assert proc.returncode == 0, proc.stderr
    assert "imported 3 of 5 files" in proc.stderr
    assert "(1 refused, 1 DICOMDIR passed over)" in proc.stderr and "CRC" in proc.stderr
    other = Archive(tmp_path / "other")
    for uid, (ts, data) in sent.items():
        inst = other.retrieve(uid)
        assert (inst.transfer_syntax, inst.data) == (ts, data)
    other.close()


def test_admin_downloads_a_patients_studies_as_one_file_set(admin_site, tmp_path, monkeypatch):
    """``/api/media.zip?patient=ID`` holds every study of that patient (not of PAT10), each
    instance as received, under one DICOMDIR; ``study=`` names studies; what names none,
    nobody or too many is refused."""
    node, admin = admin_site
    studies = [make_series(3, 8, 8, seed=51), make_series(2, 8, 8, modality="MR", seed=52),
               make_series(2, 8, 8, patient_id="PAT10", seed=53)]
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds))
             for series in studies for ds in series]
    assert set(store_bytes(node.port, items, tmp_path)) == {0}
    sent = {uid: (ts, data) for _, uid, ts, data in items}
    uid = [series[0].StudyInstanceUID for series in studies]

    def file_set(query: str, name: str) -> dict:
        with urllib.request.urlopen(f"{admin.url}/api/media.zip?{query}") as response:
            body = response.read()
            assert response.headers["content-disposition"] == \
                f'attachment; filename="{name}"'
        folder = tmp_path / name
        zipfile.ZipFile(io.BytesIO(body)).extractall(folder)
        found = _file_set(folder)
        assert all(received == sent[sop] for sop, (_, received) in found.items())
        return found

    found = file_set("patient=PAT1", "patient-PAT1.zip")
    assert set(found) == {ds.SOPInstanceUID for ds in studies[0] + studies[1]}
    records = FileSet(tmp_path / "patient-PAT1.zip" / "DICOMDIR")
    assert {r.StudyInstanceUID for r in records} == set(uid[:2])
    found = file_set(f"study={uid[0]}&study={uid[2]}", "studies-2.zip")
    assert set(found) == {ds.SOPInstanceUID for ds in studies[0] + studies[2]}
    assert set(file_set(f"study={uid[2]}", f"study-{uid[2]}.zip")) == \
        {ds.SOPInstanceUID for ds in studies[2]}

    assert http_get(f"{admin.url}/api/media.zip")[0] == 400
    assert http_get(f"{admin.url}/api/media.zip?patient=PAT")[0] == 404
    monkeypatch.setattr(web_media, "MAX_STUDIES", 1)
    status, body = http_get(f"{admin.url}/api/media.zip?patient=PAT1")
    assert status == 400 and b"at most 1 studies" in body


def test_download_names_are_safe_in_a_header():
    assert web_media.download_name("PAT-1_2.x") == "PAT-1_2.x"
    assert web_media.download_name('a"b\r\nc/../d é') == "a_b_c_.._d"
    assert web_media.download_name('"/"') == "unnamed"
    assert len(web_media.download_name("9" * 100)) == 48


def test_export_takes_a_patients_studies(tmp_path):
    """``voxarc export --dicomdir --patient ID`` writes every study of that patient (not of
    an ID it begins) as one file-set; an unknown patient is an error, and so is naming none."""
    arch = Archive(tmp_path / "data")
    mine = make_series(2, 8, 8, seed=61) + make_series(2, 8, 8, modality="MR", seed=62)
    theirs = make_series(2, 8, 8, patient_id="PAT10", seed=63)
    sent = store_as_received(arch, mine + theirs)
    arch.close()
    proc = _voxarc("export", "--dicomdir", "--data-dir", tmp_path / "data", "--patient", "PAT1",
                   tmp_path / "cd")
    assert proc.returncode == 0, proc.stderr
    found = _file_set(tmp_path / "cd")
    assert set(found) == {ds.SOPInstanceUID for ds in mine}
    assert all(received == sent[uid] for uid, (_, received) in found.items())
    proc = _voxarc("export", "--data-dir", tmp_path / "data", "--patient", "PAT", tmp_path / "x")
    assert proc.returncode == 1 and "no study of patient 'PAT'" in proc.stderr
    proc = _voxarc("export", "--data-dir", tmp_path / "data", tmp_path / "x")
    assert proc.returncode == 2 and "name studies" in proc.stderr


def _received(ts: str, data: bytes):
    from pydicom.dataset import FileMetaDataset
    from storage.dataset_parts import parse_dataset
    ds = parse_dataset(data, ts)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


@needs_dciodvfy
def test_a_std_gen_cd_file_set_has_every_file_in_explicit_vr(tmp_path):
    """``--profile STD-GEN-CD``: files received in Implicit VR or a lossless compressed syntax
    are converted to Explicit VR Little Endian (the same elements, the same pixels) and their
    records say so; a lossy JPEG is written as received, and the command says the file-set is
    not STD-GEN-CD then."""
    arch = Archive(tmp_path / "data")
    first, second = _two_studies()                      # second: Implicit VR Little Endian
    sent = store_as_received(arch, first + second)
    for name in ("MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        ts, data = bundled(name)
        arch.store(data, ts)
        sent[str(_received(ts, data).SOPInstanceUID)] = (ts, data)
    rle = str(_received(*bundled("MR_small_RLE.dcm")).SOPInstanceUID)
    jpeg = str(_received(*bundled("SC_rgb_jpeg_dcmtk.dcm")).SOPInstanceUID)
    studies = sorted({str(_received(*v).StudyInstanceUID) for v in sent.values()})
    arch.close()

    proc = _voxarc("export", "--dicomdir", "--profile", "STD-GEN-CD", "--data-dir",
                   tmp_path / "data", *studies, tmp_path / "cd")
    assert proc.returncode == 0, proc.stderr
    assert "1 instances written as received" in proc.stderr and "not STD-GEN-CD" in proc.stderr
    found = _file_set(tmp_path / "cd")
    assert set(found) == set(sent)
    for uid, (record_ts, (file_ts, data)) in found.items():
        assert record_ts == file_ts
        if uid == jpeg:
            assert (file_ts, data) == sent[uid]
            continue
        assert file_ts == ExplicitVRLittleEndian
        if sent[uid][0] == ExplicitVRLittleEndian:
            assert data == sent[uid][1]                     # untouched
            continue
        before, after = _received(*sent[uid]), _received(file_ts, data)
        assert (after.pixel_array == before.pixel_array).all()
        kept = {e.tag for e in before} - {0x7FE00010}
        assert all(after[t].value == before[t].value for t in kept if before[t].VR != "SQ")
    assert found[rle][0] == ExplicitVRLittleEndian
    iods, errors = iod_errors(tmp_path / "cd" / "DICOMDIR")
    assert iods == ("BasicDirectory",) and not errors, errors
    proc = _voxarc("export", "--profile", "STD-GEN-CD", "--data-dir", tmp_path / "data",
                   studies[0], tmp_path / "plain")
    assert proc.returncode == 2 and "add --dicomdir" in proc.stderr


def test_the_download_takes_a_profile(admin_site, tmp_path):
    node, admin = admin_site
    series = make_series(2, 8, 8, transfer_syntax=ImplicitVRLittleEndian, seed=71)
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    assert set(store_bytes(node.port, items, tmp_path)) == {0}
    url = f"{admin.url}/api/studies/{series[0].StudyInstanceUID}/media.zip"
    with urllib.request.urlopen(url + "?profile=STD-GEN-CD") as response:
        body = response.read()
        assert response.headers["x-voxarc-outside-profile"] == "0"
    zipfile.ZipFile(io.BytesIO(body)).extractall(tmp_path / "cd")
    assert {ts for ts, _ in _file_set(tmp_path / "cd").values()} == {ExplicitVRLittleEndian}
    status, body = http_get(url + "?profile=STD-XYZ")
    assert status == 400 and b"unknown media profile" in body
