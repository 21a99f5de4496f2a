"""Correcting a study's or a patient's patient (storage.correction, `voxarc correct`): the
elements replaced in the stored bytes and nothing else, the study moved to its patient, the
refusals, the audit trail; staged and compacted, on SQLite and, when configured, PostgreSQL."""

import io
import struct
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from admin_helpers import (CHROMIUM, admin_site, chromium, get_json,  # noqa: F401
                           http_token)
from node_helpers import archive, dataset_bytes, make_series, store_as_received  # noqa: F401
from storage import correction, element_scan
from storage.correction import CorrectionError, corrected_bytes

REPO = Path(__file__).resolve().parents[1]


def _parsed(data: bytes, ts: str):
    implicit = ts == ImplicitVRLittleEndian
    return pydicom.filereader.read_dataset(io.BytesIO(data), implicit, True)


def _others_unchanged(before: bytes, after: bytes, ts: str, changed: set[int]):
    """Every top-level element but ``changed`` has the same bytes (values and order)."""
    explicit = ts != ImplicitVRLittleEndian
    old = [(e.tag, bytes(before[e.start:e.end])) for e in element_scan.scan(before, explicit)
           if e.tag not in changed]
    new = [(e.tag, bytes(after[e.start:e.end])) for e in element_scan.scan(after, explicit)
           if e.tag not in changed]
    assert old == new


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_only_the_patient_elements_change(ts):
    (ds,) = make_series(1, 8, 8, transfer_syntax=ts)
    assert "PatientBirthDate" not in ds
    ts, data = dataset_bytes(ds)
    values = {"PatientName": "Roe^Richard^Q", "PatientID": "X9", "PatientBirthDate": "19700101"}
    new = corrected_bytes(data, ts, values)
    got = _parsed(new, ts)
    assert (str(got.PatientName), got.PatientID, got.PatientBirthDate) == \
        ("Roe^Richard^Q", "X9", "19700101")
    assert got.PixelData == ds.PixelData
    _others_unchanged(data, new, ts, {0x00100010, 0x00100020, 0x00100030})
    # an empty value for a missing element inserts nothing
    assert corrected_bytes(data, ts, {"PatientBirthDate": ""}) == data


def test_names_go_in_the_instances_character_set():
    (ds,) = make_series(1, 8, 8)
    ts, data = dataset_bytes(ds)
    with pytest.raises(CorrectionError, match="character set"):
        corrected_bytes(data, ts, {"PatientName": "Müller^Jörg"})       # default repertoire
    ds.SpecificCharacterSet = "ISO_IR 192"
    ts, data = dataset_bytes(ds)
    got = _parsed(corrected_bytes(data, ts, {"PatientName": "Müller^Jörg"}), ts)
    got.SpecificCharacterSet = "ISO_IR 192"
    got.decode()
    assert str(got.PatientName) == "Müller^Jörg"


def test_a_group_length_follows_and_big_endian_is_refused():
    (ds,) = make_series(1, 8, 8)
    ts, data = dataset_bytes(ds)          # pydicom writes no group length: one is put in

    def group_length(data: bytes) -> int:
        return sum(e.end - e.start + 8 for e in element_scan.scan(data, True)
                   if e.tag >> 16 == 0x0010 and e.tag & 0xFFFF)
    first = next(e for e in element_scan.scan(data, True) if e.tag >> 16 == 0x0010)
    at = first.start - 8
    data = data[:at] + struct.pack("<HH2sHI", 0x0010, 0, b"UL", 4, group_length(data)) + \
        data[at:]
    new = corrected_bytes(data, ts, {"PatientName": "A^Much^Longer^Name"})
    assert str(_parsed(new, ts).PatientName) == "A^Much^Longer^Name"
    (length,) = [e for e in element_scan.scan(new, True) if e.tag == 0x00100000]
    assert struct.unpack_from("<I", new, length.start)[0] == group_length(new) != \
        group_length(data)
    with pytest.raises(CorrectionError, match="in place"):
        corrected_bytes(data, ExplicitVRBigEndian, {"PatientName": "X"})


def test_a_study_moves_to_its_patient_staged_or_compacted(archive):  # noqa: F811
    wrong = make_series(3, 16, 16, patient_id="TRAUMA1", patient_name="Unknown^Trauma", seed=1)
    other = make_series(2, 16, 16, patient_id="TRAUMA1", patient_name="Unknown^Trauma",
                        seed=2)
    mine = make_series(2, 16, 16, patient_id="P42", patient_name="Doe^Jane", seed=3)
    sent = store_as_received(archive, wrong + other + mine)
    study = wrong[0].StudyInstanceUID
    archive.compact_series(wrong[0].SeriesInstanceUID)

    with pytest.raises(CorrectionError, match="other studies"):      # TRAUMA1 has two
        archive.correction_plan("study", study, {"PatientName": "Roe^Rick"})
    with pytest.raises(CorrectionError, match="held with PatientName 'Doe\\^Jane'"):
        archive.correction_plan("study", study, {"PatientID": "P42", "PatientName": "Roe"})
    with pytest.raises(CorrectionError, match="cannot correct StudyDate"):
        archive.correction_plan("study", study, {"StudyDate": "20240101"})

    done = archive.correct("study", study, {"PatientID": "P42"}, reason="ER mix-up")
    assert done["instances"] == 3 and done["changes"] == {
        "PatientID": ["TRAUMA1", "P42"], "PatientName": ["Unknown^Trauma", "Doe^Jane"]}
    values = {"PatientID": "P42", "PatientName": "Doe^Jane"}
    for rounds in ("staged again", "compacted again"):
        for ds in wrong:
            ts, data = sent[ds.SOPInstanceUID]
            inst = archive.retrieve(ds.SOPInstanceUID)          # SHA-256 checked
            assert inst.data == corrected_bytes(data, ts, values), rounds
        for ds in other + mine:
            assert archive.retrieve(ds.SOPInstanceUID).data == sent[ds.SOPInstanceUID][1]
        archive.compact(0)
    studies = {r["StudyInstanceUID"]: r for r in archive.find("STUDY", {"PatientID": "P42"})}
    assert set(studies) == {study, mine[0].StudyInstanceUID}
    assert archive.find("PATIENT", {"PatientID": "TRAUMA1"})[0]["PatientName"] == \
        "Unknown^Trauma"

    # the other trauma study: its patient's only one now, so corrected in place; then that
    # patient merged into P42's
    done = archive.correct("patient", "TRAUMA1", {"PatientName": "Roe^Rick",
                                                  "PatientSex": "M"})
    assert done["studies"] == 1 and done["instances"] == 2
    assert archive.correct("patient", "TRAUMA1", {"PatientID": "P42"})["changes"] == {
        "PatientID": ["TRAUMA1", "P42"], "PatientName": ["Roe^Rick", "Doe^Jane"],
        "PatientSex": ["M", "F"]}
    assert archive.find("PATIENT", {"PatientID": "TRAUMA1"}) == []
    assert len(archive.find("STUDY", {"PatientID": "P42"})) == 3
    trail = correction.history(archive.index)
    assert [r["level"] for r in trail] == ["patient", "patient", "study"]
    assert trail[2]["reason"] == "ER mix-up" and "'TRAUMA1' -> 'P42'" in trail[2]["changes"]
    with pytest.raises(CorrectionError, match="nothing to change"):
        archive.correction_plan("patient", "P42", {"PatientName": "Doe^Jane"})


def test_the_command_shows_asks_and_corrects(tmp_path):
    from storage.archive import Archive
    arch = Archive(tmp_path / "data")
    series = make_series(2, 8, 8, patient_id="OLD")
    store_as_received(arch, series)
    arch.close()
    study = series[0].StudyInstanceUID

    def voxarc(*args):
        return subprocess.run([sys.executable, "-m", "service.cli", "correct", "--data-dir",
                               str(tmp_path / "data"), *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)
    proc = voxarc("study", study, "--set", "PatientID=NEW", "--dry-run")
    assert proc.returncode == 0 and "would correct study" in proc.stdout
    assert "PatientID 'OLD' -> 'NEW'" in proc.stdout
    proc = voxarc("study", study, "--set", "PatientID=NEW")
    assert proc.returncode == 2 and "without --yes" in proc.stderr
    proc = voxarc("study", study, "--set", "PatientID=NEW", "--yes", "--reason", "typo")
    assert proc.returncode == 0, proc.stderr
    proc = voxarc("--history")
    assert "study " + study in proc.stdout and "(typo)" in proc.stdout
    proc = voxarc("study", "1.2.3", "--set", "PatientID=X", "--yes")
    assert proc.returncode == 1 and "no study 1.2.3" in proc.stderr
    arch = Archive(tmp_path / "data")
    assert [r["PatientID"] for r in arch.find("STUDY", {"StudyInstanceUID": study})] == ["NEW"]
    arch.close()


def test_corrections_show_on_the_admin_page(admin_site, tmp_path):
    node, admin = admin_site
    series = make_series(2, 8, 8, patient_id="OLD")
    store_as_received(node.archive, series)
    node.archive.correct("study", series[0].StudyInstanceUID, {"PatientID": "NEW"}, "typo")
    (row,) = get_json(f"{admin.url}/api/corrections")
    assert (row["level"], row["uid"], row["instances"]) == \
        ("study", series[0].StudyInstanceUID, 2)
    assert row["changes"] == "PatientID: 'OLD' -> 'NEW'" and row["reason"] == "typo"
    if CHROMIUM is not None:
        dom = chromium(admin.url + "/", tmp_path / "profile", "--dump-dom")
        listed = dom[dom.index('<ul id="corrections">'):]
        assert "PatientID: 'OLD' -&gt; 'NEW' (typo)" in listed[:listed.index("</ul>")]


def test_a_crash_before_the_commit_leaves_the_originals(tmp_path, monkeypatch):
    """The corrected files of a correction that never committed are orphans: the next start
    removes them (they are not indexed again as duplicates), and the originals stay."""
    from storage.archive import Archive
    from storage.blobstore import BlobStore
    arch = Archive(tmp_path / "data")
    series = make_series(3, 8, 8, patient_id="OLD")
    sent = store_as_received(arch, series)
    files_before = {p.name for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()}

    def killed(*args):
        raise KeyboardInterrupt           # the process dies inside the transaction
    monkeypatch.setattr(correction.Corrector, "_write", staticmethod(killed))
    monkeypatch.setattr(BlobStore, "delete", lambda self, key: None)    # no cleanup either
    with pytest.raises(KeyboardInterrupt):
        arch.correct("study", series[0].StudyInstanceUID, {"PatientID": "NEW"})
    arch.close()
    monkeypatch.undo()
    orphans = {p.name for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()} - \
        files_before
    assert len(orphans) == 3
    arch = Archive(tmp_path / "data")                   # recovery runs
    assert {p.name for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()} == \
        files_before
    for uid, (ts, data) in sent.items():
        assert arch.retrieve(uid).data == data
    assert arch.find("STUDY", {})[0]["PatientID"] == "OLD"
    arch.close()


def test_a_compaction_between_plan_and_commit_is_a_conflict_that_changes_nothing(tmp_path):
    """The instances were compacted after the correction was planned: its commit finds them
    moved and raises CorrectionConflict; nothing changed and its new files are gone; planned
    again (as Archive.correct does once), it succeeds."""
    from storage.archive import Archive
    arch = Archive(tmp_path / "data")
    series = make_series(4, 16, 16, patient_id="OLD", seed=31)
    sent = store_as_received(arch, series)
    stale = arch.correction_plan("study", series[0].StudyInstanceUID, {"PatientID": "NEW"})
    assert arch.compact_series(series[0].SeriesInstanceUID)
    files = {p for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()}
    corrector = correction.Corrector(arch.index, arch.blobs, arch.retrieve)
    with pytest.raises(correction.CorrectionConflict, match="changed meanwhile"):
        corrector.correct(stale)
    assert {p for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()} == files
    for uid, (_, data) in sent.items():
        assert arch.retrieve(uid).data == data
    assert correction.history(arch.index) == []
    assert arch.correct("study", series[0].StudyInstanceUID, {"PatientID": "NEW"})[
        "instances"] == 4
    assert arch.find("STUDY", {})[0]["PatientID"] == "NEW"
    arch.close()
