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
from storage.ingest import Stager

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
    with pytest.raises(CorrectionError, match="cannot correct StudyDate of a patient"):
        archive.correction_plan("patient", "TRAUMA1", {"StudyDate": "20240101"})
    with pytest.raises(CorrectionError, match="cannot correct SeriesNumber of a study"):
        archive.correction_plan("study", study, {"SeriesNumber": "4"})

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
    proc = voxarc("series", series[0].SeriesInstanceUID, "--set", "SeriesDescription=Axial",
                  "--set", "BodyPartExamined=CHEST", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert f"corrected series {series[0].SeriesInstanceUID}: 2 instances; " \
        "SeriesDescription '' -> 'Axial'; BodyPartExamined '' -> 'CHEST'" in proc.stdout
    proc = voxarc("study", study, "--set", "StudyDate=20241301", "--yes")
    assert proc.returncode == 1 and "Invalid value for VR DA" in proc.stderr
    arch = Archive(tmp_path / "data")
    assert [r["PatientID"] for r in arch.find("STUDY", {"StudyInstanceUID": study})] == ["NEW"]
    assert arch.find("SERIES", {"BodyPartExamined": "CHEST"})[0]["SeriesDescription"] == \
        "Axial"
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


def test_a_commit_whose_outcome_cannot_be_told_keeps_the_corrected_files(tmp_path,
                                                                          monkeypatch):
    """The commit took place but its answer was lost and the index cannot be read to tell:
    the corrected files stay (the rows point at them), so the next start finds every instance,
    corrected; before, they were removed under the committed rows."""
    from contextlib import contextmanager

    from sqlalchemy.exc import OperationalError

    from storage.archive import Archive
    from storage.errors import CommitOutcomeUnknown
    arch = Archive(tmp_path / "data")
    series = make_series(3, 8, 8, patient_id="OLD")
    store_as_received(arch, series)
    index, real_write = arch.index, arch.index.write

    @contextmanager
    def write():
        monkeypatch.setattr(index, "write", real_write)
        with real_write() as s:
            yield s
        monkeypatch.setattr(index, "read", unreadable)
        raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection"))

    @contextmanager
    def unreadable():
        raise OperationalError("connect", {}, ConnectionError("server unreachable"))
        yield

    monkeypatch.setattr(index, "write", write)
    with pytest.raises(CommitOutcomeUnknown):
        arch.correct("study", series[0].StudyInstanceUID, {"PatientID": "NEW"})
    monkeypatch.undo()
    arch.close()
    arch = Archive(tmp_path / "data")                   # recovery runs
    try:
        assert not arch.recovery.missing_staged
        for ds in series:
            assert b"NEW" in arch.retrieve(ds.SOPInstanceUID).data
        assert arch.find("STUDY", {"PatientID": ""})[0]["PatientID"] == "NEW"
    finally:
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


def test_a_studys_own_attributes_are_corrected(archive):  # noqa: F811
    """Accession number, description and date of one study of a patient with others: only those
    elements change, in the index (C-FIND finds the new accession) and the bytes, staged and
    compacted; the patient and the other study stay as they were."""
    first = make_series(3, 16, 16, patient_id="P1", seed=4)
    second = make_series(2, 16, 16, patient_id="P1", seed=5)
    sent = store_as_received(archive, first + second)
    study = first[0].StudyInstanceUID
    archive.compact_series(first[0].SeriesInstanceUID)
    values = {"AccessionNumber": "ACC-2024-77", "StudyDescription": "CT CHEST W/O",
              "StudyDate": "20240103"}
    done = archive.correct("study", study, values, reason="RIS order fixed")
    assert done["changes"] == {"StudyDate": ["20240102", "20240103"],
                               "AccessionNumber": ["ACC1", "ACC-2024-77"],
                               "StudyDescription": ["Test study", "CT CHEST W/O"]}
    for rounds in ("staged again", "compacted again"):
        for ds in first:
            ts, data = sent[ds.SOPInstanceUID]
            new = archive.retrieve(ds.SOPInstanceUID).data
            assert new == corrected_bytes(data, ts, values), rounds
            _others_unchanged(data, new, ts, {0x00080020, 0x00080050, 0x00081030})
        for ds in second:
            assert archive.retrieve(ds.SOPInstanceUID).data == sent[ds.SOPInstanceUID][1]
        archive.compact(0)
    (row,) = archive.find("STUDY", {"AccessionNumber": "ACC-2024-77", "StudyDate": "",
                                    "StudyDescription": "", "PatientID": ""})
    assert (row["StudyInstanceUID"], row["StudyDate"], row["StudyDescription"],
            row["PatientID"]) == (study, "20240103", "CT CHEST W/O", "P1")
    assert len(archive.find("STUDY", {"PatientID": "P1"})) == 2
    assert archive.find("STUDY", {"AccessionNumber": "ACC1"})[0]["StudyInstanceUID"] == \
        second[0].StudyInstanceUID


@pytest.mark.parametrize("level, key, value, message", [
    ("study", "StudyDate", "20240230", "day is out of range"),
    ("study", "StudyDate", "2024-01-03", "Invalid value for VR DA"),
    ("study", "AccessionNumber", "A" * 17, "maximum length of 16"),
    ("study", "PatientSex", "X", "one of M, F, O"),
    ("study", "StudyTime", "256100", "Invalid value for VR TM"),
    ("series", "StudyInstanceUID", "1.2.abc", "Invalid value for VR UI"),
    ("series", "StudyInstanceUID", "", "not empty"),
    ("series", "Modality", "MR", "cannot correct Modality of a series"),
])
def test_values_their_vr_does_not_allow_are_refused(archive, level, key, value,  # noqa: F811
                                                    message):
    series = make_series(1, 8, 8)
    store_as_received(archive, series)
    uid = series[0].StudyInstanceUID if level == "study" else series[0].SeriesInstanceUID
    with pytest.raises(CorrectionError, match=message):
        archive.correction_plan(level, uid, {key: value})


def test_a_series_moves_to_the_study_it_belongs_to(archive):  # noqa: F811
    """A series filed under the wrong patient's study moves to the right study: its instances
    take that study's patient and study attributes; the study and patient it leaves empty go."""
    stray = make_series(3, 16, 16, patient_id="WRONG", patient_name="Wrong^Pat", seed=6,
                        study_date="20240101")
    home = make_series(2, 16, 16, patient_id="RIGHT", patient_name="Right^Pat", seed=7)
    sent = store_as_received(archive, stray + home)
    archive.compact_series(stray[0].SeriesInstanceUID)
    target = home[0].StudyInstanceUID
    done = archive.correct("series", stray[0].SeriesInstanceUID,
                           {"StudyInstanceUID": target, "SeriesDescription": "Scout"})
    assert done["instances"] == 3 and done["changes"] == {
        "PatientID": ["WRONG", "RIGHT"], "PatientName": ["Wrong^Pat", "Right^Pat"],
        "StudyDate": ["20240101", "20240102"], "StudyInstanceUID":
        [stray[0].StudyInstanceUID, target], "SeriesDescription": ["", "Scout"]}
    for rounds in ("staged again", "compacted again"):
        for ds in stray:
            got = _parsed(archive.retrieve(ds.SOPInstanceUID).data, ds.file_meta.TransferSyntaxUID)
            assert (got.StudyInstanceUID, got.PatientID, got.StudyDate, got.SeriesDescription) \
                == (target, "RIGHT", "20240102", "Scout"), rounds
            assert got.PixelData == ds.PixelData
        archive.compact(0)
    # a late instance of the series, sent with its old patient and study, joins the series
    # where it now is: no empty patient or study is made for it
    late = make_series(4, 16, 16, patient_id="WRONG", patient_name="Wrong^Pat", seed=6,
                       study_uid=stray[0].StudyInstanceUID)[0]
    late.SeriesInstanceUID = stray[0].SeriesInstanceUID
    archive.stager.close()
    archive.stager = Stager(archive.index)           # as after a restart: no row ids cached
    archive.store(*reversed(dataset_bytes(late)))
    assert archive.find("PATIENT", {"PatientID": "WRONG"}) == []
    assert archive.find("STUDY", {"StudyInstanceUID": stray[0].StudyInstanceUID}) == []
    rows = archive.find("SERIES", {"StudyInstanceUID": target, "SeriesDescription": "",
                                   "NumberOfSeriesRelatedInstances": ""})
    assert sorted((r["SeriesDescription"], r["NumberOfSeriesRelatedInstances"])
                  for r in rows) == [("", 2), ("Scout", 4)]
    for ds in home:
        assert archive.retrieve(ds.SOPInstanceUID).data == sent[ds.SOPInstanceUID][1]


def test_a_series_split_off_into_a_study_of_its_own_then_given_its_patient(archive):  # noqa
    """Moved to a Study Instance UID the archive does not hold, the series becomes a study with
    its old study's patient and attributes; correcting that study then gives it its patient.
    A late instance of the series, sent with its old study UID, joins the series where it now
    is."""
    both = make_series(2, 16, 16, patient_id="MIX", seed=8)
    other = make_series(2, 16, 16, patient_id="MIX", study_uid=both[0].StudyInstanceUID,
                        seed=9)
    late = make_series(3, 16, 16, patient_id="MIX", study_uid=both[0].StudyInstanceUID,
                       seed=9)[0]
    late.SeriesInstanceUID = other[0].SeriesInstanceUID
    store_as_received(archive, both + other)
    new_uid = "1.2.826.0.1.3680043.8.498.424242"
    archive.correct("series", other[0].SeriesInstanceUID, {"StudyInstanceUID": new_uid})
    studies = {r["StudyInstanceUID"]: r for r in archive.find(
        "STUDY", {"PatientID": "MIX", "AccessionNumber": "", "NumberOfStudyRelatedInstances": ""})}
    assert set(studies) == {both[0].StudyInstanceUID, new_uid}
    assert studies[new_uid]["AccessionNumber"] == "ACC1"
    assert studies[new_uid]["NumberOfStudyRelatedInstances"] == 2
    archive.correct("study", new_uid, {"PatientID": "OTHER", "PatientName": "Other^Pat"})
    assert [r["StudyInstanceUID"] for r in archive.find("STUDY", {"PatientID": "OTHER"})] == \
        [new_uid]
    ts, data = dataset_bytes(late)
    archive.store(data, ts)
    (row,) = archive.find("STUDY", {"StudyInstanceUID": new_uid,
                                    "NumberOfStudyRelatedInstances": ""})
    assert row["NumberOfStudyRelatedInstances"] == 3


def test_a_patient_row_freed_by_a_correction_is_not_reused_from_the_ingest_cache(archive):  # noqa
    """A correction that drops a patient row frees its id (SQLite gives it to the next new
    row): a study that arrives later for the old Patient ID must not be filed under the patient
    who got the id, through the ingest's cache of row ids."""
    store_as_received(archive, make_series(1, 8, 8, patient_id="B", seed=10))
    wrong = make_series(1, 8, 8, patient_id="A", seed=11)
    store_as_received(archive, wrong)
    archive.correct("study", wrong[0].StudyInstanceUID, {"PatientID": "B"})
    store_as_received(archive, make_series(1, 8, 8, patient_id="C", seed=12))
    store_as_received(archive, make_series(1, 8, 8, patient_id="A", seed=13))
    patients = {r["PatientID"]: r["NumberOfPatientRelatedStudies"] for r in archive.find(
        "PATIENT", {"PatientID": "", "NumberOfPatientRelatedStudies": ""})}
    assert patients == {"A": 1, "B": 2, "C": 1}



def test_a_series_sent_after_its_study_was_corrected_is_brought_in_line(archive,  # noqa
                                                                      caplog):
    """The modality sends one more series of a study after it was moved to its patient, with
    the old patient: the series joins the study, its instances take the corrected patient's
    values (logged; pixels and every other element as sent), and no empty patient is made for
    the old ID. A new study that names the old Patient ID is stored as sent."""
    first = make_series(2, 8, 8, patient_id="TRAUMA9", patient_name="Unknown^Trauma", seed=14)
    store_as_received(archive, first)
    archive.correct("study", first[0].StudyInstanceUID, {"PatientID": "P77",
                                                         "PatientName": "Doe^John"})
    later = make_series(2, 8, 8, patient_id="TRAUMA9", patient_name="Unknown^Trauma",
                        study_uid=first[0].StudyInstanceUID, seed=15)
    elsewhere = make_series(1, 8, 8, patient_id="TRAUMA9", seed=16)
    with caplog.at_level("WARNING", logger="storage.ingest"):
        sent = store_as_received(archive, later + elsewhere)
    values = {"PatientID": "P77", "PatientName": "Doe^John"}
    for ds in later:
        ts, data = sent[ds.SOPInstanceUID]
        assert archive.retrieve(ds.SOPInstanceUID).data == corrected_bytes(data, ts, values)
    (ts, data), = [sent[ds.SOPInstanceUID] for ds in elsewhere]
    assert archive.retrieve(elsewhere[0].SOPInstanceUID).data == data
    (row,) = archive.find("STUDY", {"PatientID": "P77", "NumberOfStudyRelatedSeries": ""})
    assert row["NumberOfStudyRelatedSeries"] == 2
    assert [r["StudyInstanceUID"] for r in archive.find("STUDY", {"PatientID": "TRAUMA9"})] \
        == [elsewhere[0].StudyInstanceUID]
    brought = [r.getMessage() for r in caplog.records if "brought in line" in r.getMessage()]
    assert len(brought) == 2 and "PatientID -> 'P77'" in brought[0]


def test_a_late_instance_of_a_moved_series_follows_it_in_another_process(tmp_path):
    """A series moved to another study by `voxarc correct` in another process (as beside a
    running node): an instance of it sent afterwards with its old study takes the new study,
    its patient and attributes, once the node has read the correction (within a second)."""
    import time
    from storage.archive import Archive
    node = Archive(tmp_path / "data")
    stray = make_series(3, 8, 8, patient_id="WRONG", seed=17)
    home = make_series(1, 8, 8, patient_id="RIGHT", study_date="20240505", seed=18)
    store_as_received(node, stray[:2] + home)
    command = Archive(tmp_path / "data")
    command.correct("series", stray[0].SeriesInstanceUID,
                    {"StudyInstanceUID": home[0].StudyInstanceUID})
    command.close()
    time.sleep(1.1)
    ts, data = dataset_bytes(stray[2])
    node.store(data, ts)
    got = _parsed(node.retrieve(stray[2].SOPInstanceUID).data, ts)
    assert (got.StudyInstanceUID, got.PatientID, got.StudyDate) == \
        (home[0].StudyInstanceUID, "RIGHT", "20240505")
    assert got.PixelData == stray[2].PixelData
    assert node.find("PATIENT", {"PatientID": "WRONG"}) == []
    node.close()
