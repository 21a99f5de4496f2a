"""De-identified copies (storage.deidentify, `voxarc export --deidentify`): nothing that named
the patient, the staff or the hospital is left in the bytes, references between instances
still hold, dates keep their intervals, pixels are untouched, and DICOM's own validator finds
no new error; on generated series, pydicom's bundled files and, when present, a real CT."""

import csv
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import SecondaryCaptureImageStorage

from admin_helpers import admin_site, http_token  # noqa: F401
from node_helpers import (DCIODVFY, dataset_bytes, file_bytes, iod_errors,  # noqa: F401
                          make_series, real_series_files, store_as_received)
from storage import access_log
from storage.archive import Archive
from storage.deidentify import Deidentifier, copy_of, key_from, refusal
from storage.part10 import split_file
from storage.reconstruct import StoredInstance

REPO = Path(__file__).resolve().parents[1]
KEY = b"k" * 32
SECRETS = ["Doe^Jane", "PAT1", "St Elsewhere Hospital", "House^Gregory", "CT-SCANNER-7",
           "SN123456", "ACC1", "Jane wrist pain", "Smith^Operator", "RQ0042", "19700101"]


def _identified_series(n: int = 3) -> list[Dataset]:
    """A generated series carrying every kind of identifier, one instance referring to another."""
    series = make_series(n, 8, 8)
    for ds in series:
        ds.InstitutionName, ds.StationName = "St Elsewhere Hospital", "CT-SCANNER-7"
        ds.DeviceSerialNumber, ds.PatientBirthDate = "SN123456", "19700101"
        ds.ReferringPhysicianName, ds.OperatorsName = "House^Gregory", "Smith^Operator"
        ds.ImageComments = "Jane wrist pain"
        ds.AcquisitionDateTime = "20240102101500.5"
        ds.PatientAge = "094Y"
        request = Dataset()
        request.RequestedProcedureID, request.StudyInstanceUID = "RQ0042", ds.StudyInstanceUID
        request.PatientID = "PAT1"                 # nested: the same pseudonym
        ds.RequestAttributesSequence = Sequence([request])
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = series[0].SOPInstanceUID
        ds.ReferencedImageSequence = Sequence([ref])
    return series


def _copy(ds: Dataset, deid: Deidentifier):
    ts, data = dataset_bytes(ds)
    return copy_of(StoredInstance(ds.SOPInstanceUID, ds.SOPClassUID, ts, data), deid)


def test_nothing_identifying_is_left_and_references_hold():
    series = _identified_series()
    deid = Deidentifier(KEY)
    copies = [_copy(ds, deid) for ds in series]
    for ds, copy in zip(series, copies):
        for secret in SECRETS + [ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID]:
            assert secret.encode() not in copy.data, secret
        assert b"VOXTEST" not in copy.data                      # the private element
        out = pydicom.dcmread(io.BytesIO(copy.data))
        assert out.PixelData == ds.PixelData and out.SOPClassUID == ds.SOPClassUID
        assert out.PatientID == out.PatientName == deid.pseudonym("PAT1")
        assert (out.PatientIdentityRemoved, out.LongitudinalTemporalInformationModified) == \
            ("YES", "MODIFIED")
        assert out.PatientAge == "090Y" and out.PatientSex == "F"
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID == copy.sop_uid
        # the reference to the first instance names its copy; the study UID in the request too
        assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == copies[0].sop_uid
        assert out.RequestAttributesSequence[0].StudyInstanceUID == out.StudyInstanceUID
        assert "RequestedProcedureID" not in out.RequestAttributesSequence[0]
        assert out.RequestAttributesSequence[0].PatientID == out.PatientID
    studies = {pydicom.dcmread(io.BytesIO(c.data)).StudyInstanceUID for c in copies}
    assert len(studies) == 1 and len({c.series_uid for c in copies}) == 1


def test_dates_move_together_and_the_key_decides():
    (ds,) = _identified_series(1)
    shifted = pydicom.dcmread(io.BytesIO(_copy(ds, Deidentifier(KEY)).data))
    assert shifted.DeviceSerialNumber.startswith("X") and len(shifted.DeviceSerialNumber) == 12
    shift = Deidentifier(KEY).day_shift("PAT1")
    assert 1 <= shift <= 1096
    import datetime
    day = datetime.date(2024, 1, 2) - datetime.timedelta(days=shift)
    assert shifted.StudyDate == day.strftime("%Y%m%d")
    assert shifted.AcquisitionDateTime == day.strftime("%Y%m%d") + "101500.5"
    assert shifted.PatientBirthDate == ""
    kept = pydicom.dcmread(io.BytesIO(_copy(ds, Deidentifier(KEY, keep_dates=True)).data))
    assert kept.StudyDate == "20240102" and kept.LongitudinalTemporalInformationModified == \
        "UNMODIFIED"
    # the same key: the same pseudonyms and UIDs; another: others
    assert _copy(ds, Deidentifier(KEY)).sop_uid == _copy(ds, Deidentifier(KEY)).sop_uid
    assert _copy(ds, Deidentifier(b"x" * 32)).sop_uid != _copy(ds, Deidentifier(KEY)).sop_uid
    assert Deidentifier().pseudonym("PAT1") != Deidentifier().pseudonym("PAT1")


def test_descriptions_go_unless_kept():
    (ds,) = _identified_series(1)
    ds.SeriesDescription = "T1 MPRAGE"
    assert "SeriesDescription" not in pydicom.dcmread(io.BytesIO(_copy(ds, Deidentifier()).data))
    kept = pydicom.dcmread(io.BytesIO(_copy(ds, Deidentifier(keep_descriptions=True)).data))
    assert kept.SeriesDescription == "T1 MPRAGE" and kept.StudyDescription == "Test study"


def test_what_may_show_names_in_its_pixels_is_left_out():
    (ds,) = make_series(1, 8, 8)
    assert refusal(ds) == ""
    ds.BurnedInAnnotation = "YES"
    assert "burned-in" in refusal(ds)
    ds.BurnedInAnnotation = ""
    ds.SOPClassUID = SecondaryCaptureImageStorage
    assert "Secondary Capture Image Storage without BurnedInAnnotation NO" in refusal(ds)
    ds.BurnedInAnnotation = "NO"
    assert refusal(ds) == ""
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"              # Enhanced SR
    assert "not an image" in refusal(ds)
    assert "not an image" in _copy(ds, Deidentifier())


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "693_J2KI.dcm",
                                  "examples_overlay.dcm", "MR_small_bigendian.dcm"])
def test_bundled_files_validate_as_before(name, tmp_path):
    """dciodvfy (dicom3tools) finds no error in the copy that the original did not have."""
    path = Path(get_testdata_file(name))
    ts, data = split_file(path.read_bytes())
    ds = pydicom.dcmread(path)
    copy = copy_of(StoredInstance(ds.SOPInstanceUID, ds.SOPClassUID, ts, data), Deidentifier())
    out = tmp_path / "copy.dcm"
    out.write_bytes(copy.data)
    assert pydicom.dcmread(out).PixelData == ds.PixelData
    if str(ds.PatientName):
        assert str(ds.PatientName).encode() not in copy.data
    _, before = iod_errors(path)
    _, after = iod_errors(out)
    assert not set(after) - set(before), set(after) - set(before)


@pytest.mark.parametrize("name", ["ct_ge_hispeed_head_tilt", "mr_enh_siemens_xa30_T1w_s5"])
def test_real_series_validate_as_before(name, shared_series, tmp_path):
    """A real CT and an enhanced multi-frame MR (functional groups, a Type 1 serial number)."""
    folder = shared_series("test", name)
    path = real_series_files(folder, 1)[0]
    ts, data = split_file(path.read_bytes())
    ds = pydicom.dcmread(path)
    copy = copy_of(StoredInstance(ds.SOPInstanceUID, ds.SOPClassUID, ts, data), Deidentifier())
    out = tmp_path / "copy.dcm"
    out.write_bytes(copy.data)
    for elem in ds.iterall():                     # no value of an identifying VR survives
        if elem.VR in ("PN", "UI") and str(elem.value) and elem.value not in \
                pydicom.uid.UID_dictionary:
            assert str(elem.value).encode() not in copy.data, elem
    _, before = iod_errors(path)
    _, after = iod_errors(out)
    assert not set(after) - set(before), set(after) - set(before)


def test_the_key_file(tmp_path):
    path = tmp_path / "key"
    key = key_from(path)
    assert len(key) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert key_from(path) == key
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        key_from(path)


def _voxarc(*args):
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_voxarc_export_deidentify(tmp_path):
    data_dir = tmp_path / "data"
    arch = Archive(data_dir)
    series = _identified_series(3)
    sent = store_as_received(arch, series)
    (screen,) = make_series(1, 8, 8, study_uid=series[0].StudyInstanceUID, seed=2)
    screen.SOPClassUID = screen.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    store_as_received(arch, [screen])
    arch.close()
    study = series[0].StudyInstanceUID
    out_dir, key, mapping = tmp_path / "out", tmp_path / "key", tmp_path / "map.csv"
    proc = _voxarc("export", study, out_dir, "--deidentify", "--key-file", key, "--mapping",
                   mapping, "--data-dir", data_dir)
    assert proc.returncode == 0, proc.stderr
    assert "1 instances left out: a Secondary Capture Image Storage" in proc.stderr
    files = sorted(out_dir.rglob("*.dcm"))
    assert len(files) == 3
    for path in files:
        data = path.read_bytes()
        assert not any(s.encode() in data for s in SECRETS + [study])
    rows = list(csv.DictReader(mapping.open()))
    assert {r["original"] for r in rows if r["kind"] == "SOPInstanceUID"} == set(sent)
    (patient,) = [r for r in rows if r["kind"] == "patient"]
    assert patient["original"] == "PAT1" and patient["replacement"].startswith("ANON-")
    # the same key again: the same files; the archive's own copies untouched
    again = tmp_path / "again"
    assert _voxarc("export", study, again, "--deidentify", "--key-file", key, "--data-dir",
                   data_dir).returncode == 0
    assert sorted(p.name for p in again.rglob("*.dcm")) == [p.name for p in files]
    proc = _voxarc("stats", "--json", "--data-dir", data_dir)
    assert json.loads(proc.stdout)["instances"] == 4
    proc = _voxarc("export", study, again, "--keep-dates", "--data-dir", data_dir)
    assert proc.returncode == 2 and "--keep-dates is for --deidentify" in proc.stderr
    proc = _voxarc("export", study, again, "--deidentify", "--dicomdir", "--data-dir", data_dir)
    assert proc.returncode == 2
    proc = _voxarc("accesses", "--json", "--data-dir", data_dir)
    assert "export (de-identified)" in proc.stdout


def test_every_listed_keyword_is_a_dicom_one():
    """A misspelt keyword would remove nothing, silently."""
    from pydicom.datadict import tag_for_keyword
    from storage import deidentify
    listed = deidentify.REMOVED | deidentify.DESCRIPTIONS | deidentify.EMPTIED | \
        deidentify.STAND_INS
    assert [k for k in listed if tag_for_keyword(k) is None] == []


def test_the_admin_page_downloads_a_study_de_identified(admin_site, tmp_path):  # noqa: F811
    node, admin = admin_site
    series = _identified_series(3)
    sent = store_as_received(node.archive, series)
    study = series[0].StudyInstanceUID
    with urllib.request.urlopen(f"{admin.url}/api/studies/{study}/deidentified.zip",
                                timeout=120) as answer:
        assert answer.headers["content-disposition"] == \
            'attachment; filename="deidentified-study.zip"'
        data = answer.read()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        assert names[-1] == "README.txt" and len(names) == 4
        assert b"3 of 3 instances" in zf.read("README.txt")
        for name in names[:-1]:
            member = zf.read(name)
            assert not any(s.encode() in member for s in SECRETS + list(sent) + [study])
            assert pydicom.dcmread(io.BytesIO(member)).PatientIdentityRemoved == "YES"
    for bad, status in ((f"{study[:-3]}*", 400), ("1.2.3", 404)):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{admin.url}/api/studies/{bad}/deidentified.zip",
                                   timeout=60)
        assert err.value.code == status
    node.archive.accesses.flush()
    assert [r["action"] for r in access_log.history(node.archive.index, study_uid=study)] == \
        ["download (de-identified)"]
