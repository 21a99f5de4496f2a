"""Deleting patients, studies, series and instances (storage.deletion, `voxarc delete`)."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import insert, select
from sqlalchemy.exc import OperationalError

import models
from node_helpers import (PG_URL, all_gone, archive, damage_the_blob,  # noqa: F401
                          database_url, lose_commit_answer, make_series, retrieves_exactly, series_uid_of,
                          store_series)
from storage import deletion, header_pack
from storage.archive import Archive
from storage.deletion import DeletionError, Deleter
from storage.index import Blob, Deletion, Instance, Job, Patient, Removal, Series, Study

REPO = Path(__file__).resolve().parents[1]


def _count(arch, model) -> int:
    with arch.index.read() as s:
        return len(list(s.scalars(select(model.id))))


def _files(arch) -> set:
    return set(arch.blobs.keys())


def _two_patients(arch):
    """Patient A: one study of two series; patient B: one series. Returns (A1, A2, B) as
    {SOP UID: bytes} each."""
    study = generate_uid()
    a1 = store_series(arch, make_series(5, study_uid=study, patient_id="A", seed=1))
    a2 = store_series(arch, make_series(3, study_uid=study, patient_id="A", seed=2))
    b = store_series(arch, make_series(4, patient_id="B", patient_name="Roe^Ann", seed=3))
    return a1, a2, b


@pytest.mark.parametrize("compacted", [False, True])
def test_deleting_a_series_removes_its_rows_and_files_and_nothing_else(archive, compacted):
    a1, a2, b = _two_patients(archive)
    if compacted:
        assert archive.compact(stable_age=0) == (3, 0)
    before_files, before = _files(archive), archive.stats()
    summary = archive.delete("series", series_uid_of(archive, next(iter(a2))), reason="test")
    assert summary["instances"] == 3 and summary["series"] == 1
    assert summary["studies"] == summary["patients"] == 0 and summary["restaged"] == 0
    after = archive.stats()
    assert after["instances"] == before["instances"] - 3 and after["series"] == 2
    assert before["stored_bytes"] - after["stored_bytes"] == summary["freed_bytes"] > 0
    assert len(before_files - _files(archive)) == (1 if compacted else 3)
    assert not _files(archive) - before_files
    assert all_gone(archive, a2) and retrieves_exactly(archive, a1) and retrieves_exactly(archive, b)
    assert archive.find("SERIES", {"SeriesInstanceUID": series_uid_of(archive, next(iter(a1)))})
    assert _count(archive, Removal) == 0
    (row,) = deletion.history(archive.index)
    assert row["level"] == "series" and row["instances"] == 3 and row["reason"] == "test"


def test_deleting_a_patient_removes_its_studies_and_the_patient_row(archive):
    a1, a2, b = _two_patients(archive)
    assert archive.compact(stable_age=0) == (3, 0)
    summary = archive.delete("patient", "A")
    assert (summary["instances"], summary["series"], summary["studies"],
            summary["patients"]) == (8, 2, 1, 1)
    assert all_gone(archive, a1) and all_gone(archive, a2) and retrieves_exactly(archive, b)
    assert archive.find("PATIENT", {"PatientID": "A"}) == []
    assert [r["PatientID"] for r in archive.find("PATIENT", {"PatientID": "*"})] == ["B"]
    assert _count(archive, Patient) == _count(archive, Study) == 1
    with archive.index.read() as s:
        assert list(s.scalars(select(Job.series_fk))) == list(s.scalars(select(Series.id)))
    assert archive.stats()["instances"] == 4


def test_deleting_one_instance_of_a_coded_stack_codes_the_rest_anew_without_it(archive):
    sent = store_series(archive, make_series(6, 24, 24, seed=4))
    assert archive.compact(stable_age=0) == (1, 0)
    victim = sorted(sent)[2]
    with archive.index.read() as s:
        (old_key,) = s.scalars(select(Blob.key))
    summary = archive.delete("instance", victim)
    assert summary["instances"] == 1 and summary["restaged"] == 5 and summary["series"] == 0
    assert summary["restaged_bytes"] == sum(len(d) for u, d in sent.items() if u != victim)
    assert not archive.blobs.exists(old_key)             # the victim's pixels are gone
    assert archive.stats()["stored_bytes"] == summary["restaged_bytes"]
    kept = {uid: data for uid, data in sent.items() if uid != victim}
    assert retrieves_exactly(archive, kept) and all_gone(archive, {victim: b""})
    assert archive.stats()["pending_instances"] == 5
    assert archive.compact(stable_age=0) == (1, 0)
    with archive.index.read() as s:
        (blob,) = s.scalars(select(Blob))
    coded = header_pack.coded_view(archive.blobs.get(blob.key))
    assert models.blob_info(coded)["shape"][0] == 5
    assert retrieves_exactly(archive, kept) and archive.stats()["pending_instances"] == 0


def test_a_crash_between_commit_and_file_removal_never_brings_an_instance_back(tmp_path,
                                                                              monkeypatch):
    arch = Archive(tmp_path / "data")
    sent = store_series(arch, make_series(3, seed=5))
    keys = _files(arch)
    monkeypatch.setattr(deletion, "finish_removals", lambda *a, **k: 0)    # the "crash"
    arch.delete("series", series_uid_of(arch, next(iter(sent))))
    assert _files(arch) == keys and _count(arch, Removal) == 3
    arch.close()
    monkeypatch.undo()
    arch = Archive(tmp_path / "data")              # recovery: staged files have names it
    try:                                           # would index again, were they orphans
        assert arch.recovery.removals_finished == 3 and not arch.recovery.reindexed
        assert _files(arch) == set() and arch.stats()["instances"] == 0
        assert _count(arch, Removal) == 0
    finally:
        arch.close()


def test_a_change_after_planning_is_never_half_applied(archive):
    sent = store_series(archive, make_series(4, seed=6))
    victim = sorted(sent)[0]
    todo = archive.deletion_plan("instance", victim)          # planned while staged
    assert archive.compact(stable_age=0) == (1, 0)              # then compacted
    files = _files(archive)
    with pytest.raises(deletion._Changed):
        Deleter(archive.index, archive.blobs, archive.retrieve).execute(todo)
    assert _files(archive) == files and retrieves_exactly(archive, sent)
    assert _count(archive, Deletion) == 0
    summary = archive.delete("instance", victim)                # plans again
    assert summary["restaged"] == 3 and all_gone(archive, {victim: b""})


@pytest.mark.parametrize("really_commit", [True, False])
def test_a_commit_whose_answer_is_lost_keeps_every_kept_instance(tmp_path, monkeypatch,
                                                                  really_commit):
    arch = Archive(tmp_path / "data")
    sent = store_series(arch, make_series(5, seed=4))
    assert arch.compact(stable_age=0) == (1, 0)
    victim = sorted(sent)[0]
    lose_commit_answer(arch.index, monkeypatch, really_commit)
    outcome = None
    try:
        outcome = arch.delete("instance", victim)
    except OperationalError:
        assert not really_commit          # the deletion did not happen, and says so
    arch.close()
    arch = Archive(tmp_path / "data")     # the next start's recovery
    try:
        kept = {u: d for u, d in sent.items() if u != victim}
        assert retrieves_exactly(arch, kept) and not arch.recovery.missing_staged
        if really_commit:
            assert outcome["restaged"] == 4 and all_gone(arch, {victim: b""})
        else:
            assert retrieves_exactly(arch, sent) and _count(arch, Deletion) == 0
            assert len(_files(arch)) == 1            # the blob; no restaged file left behind
    finally:
        arch.close()


@pytest.mark.skipif(not PG_URL, reason="VOXARC_TEST_PG_URL not set")
def test_deleting_a_series_while_an_instance_is_committed_into_it(tmp_path):
    # PostgreSQL runs both at once: the deletion waits for the instance's commit and keeps the
    # series it then sees (no foreign-key error escaping as a crash, nothing lost)
    arch = Archive(tmp_path / "data", database_url("postgres", tmp_path))
    try:
        sent = store_series(arch, make_series(3, seed=1))
        with arch.index.read() as s:
            series_id, series_uid = s.execute(select(Series.id, Series.series_uid)).one()
        with arch.index.engine.connect() as conn:
            tx = conn.begin()
            conn.execute(insert(Instance).values(
                sop_uid="1.2.3.999", series_fk=series_id, sop_class_uid="1.2",
                transfer_syntax="1.2", size=1, sha256="x", received_at=time.time(),
                staged_key="s-late"))
            done = {}
            deleting = threading.Thread(target=lambda: done.update(
                summary=arch.delete("series", series_uid)))
            deleting.start()
            time.sleep(1.0)
            tx.commit()
        deleting.join(30)
        assert done["summary"]["instances"] == 3 and done["summary"]["series"] == 0
        assert all_gone(arch, sent) and arch.stats()["series"] == 1
    finally:
        arch.close()


def test_a_stack_whose_kept_instances_cannot_be_rebuilt_deletes_nothing(archive):
    sent = store_series(archive, make_series(4, seed=7))
    assert archive.compact(stable_age=0) == (1, 0)
    damage_the_blob(archive)
    files = _files(archive)
    with pytest.raises(DeletionError, match="nothing deleted"):
        archive.delete("instance", sorted(sent)[0])
    assert _files(archive) == files and archive.stats()["instances"] == 4


def test_an_unknown_uid_deletes_nothing(archive):
    store_series(archive, make_series(2, seed=8))
    assert archive.delete("study", "1.2.3.4")["instances"] == 0
    assert archive.stats()["instances"] == 2 and deletion.history(archive.index) == []
    with pytest.raises(ValueError):
        archive.deletion_plan("frame", "1.2.3")


def test_a_node_that_cached_a_deleted_series_stores_into_it_again(tmp_path):
    node_side = Archive(tmp_path / "data")
    series = make_series(4, seed=9)
    store_series(node_side, series[:2])              # the stager caches the series' rows
    admin_side = Archive(tmp_path / "data")          # `voxarc delete` in another process
    try:
        admin_side.delete("patient", "PAT1")
        assert admin_side.stats()["instances"] == 0
    finally:
        admin_side.close()
    sent = store_series(node_side, series[2:])
    try:
        assert retrieves_exactly(node_side, sent) and node_side.stats()["series"] == 1
    finally:
        node_side.close()


def _patients_of(arch) -> dict:
    """{SOP Instance UID: Patient ID} of every instance, as the index files them."""
    with arch.index.read() as s:
        return dict(s.execute(select(Instance.sop_uid, Patient.patient_id)
                              .join(Series, Instance.series_fk == Series.id)
                              .join(Study, Series.study_fk == Study.id)
                              .join(Patient, Study.patient_fk == Patient.id)).all())


def test_a_node_never_files_an_instance_under_rows_that_took_a_deleted_rows_id(tmp_path):
    # SQLite gives a deleted row's id to the next new row: the node's cached ids of a deleted
    # patient must not then point at whoever came next
    node_side = Archive(tmp_path / "data")
    wrong = make_series(4, patient_id="WRONG", seed=1)
    store_series(node_side, wrong[:2])
    admin_side = Archive(tmp_path / "data")
    try:
        admin_side.delete("patient", "WRONG")
    finally:
        admin_side.close()
    other = store_series(node_side, make_series(2, patient_id="OTHER", seed=2))
    late = store_series(node_side, wrong[2:])
    try:
        filed = _patients_of(node_side)
        assert {filed[u] for u in late} == {"WRONG"}
        assert {filed[u] for u in other} == {"OTHER"}
        assert len(node_side.find("PATIENT", {"PatientID": "WRONG"})) == 1
    finally:
        node_side.close()


def test_a_deletion_committed_while_a_batch_is_indexed_is_noticed(tmp_path, monkeypatch):
    # the deletion (and a new patient taking the freed ids) lands after the node checked for
    # deletions and before its batch writes: the batch's own check in its transaction sees it
    from storage import ingest
    node_side = Archive(tmp_path / "data")
    wrong = make_series(4, patient_id="WRONG", seed=1)
    store_series(node_side, wrong[:2])
    admin_side = Archive(tmp_path / "data")
    real_apply, other = ingest._apply, []

    def apply_after_a_deletion(*args, **kwargs):
        if not other:
            other.append(None)          # once (the other side's ingest comes through here too)
            admin_side.delete("patient", "WRONG")
            other[:] = store_series(admin_side, make_series(2, patient_id="OTHER", seed=2))
        return real_apply(*args, **kwargs)
    monkeypatch.setattr(ingest, "_apply", apply_after_a_deletion)
    late = store_series(node_side, wrong[2:3])
    try:
        filed = _patients_of(node_side)
        assert {filed[u] for u in late} == {"WRONG"}
        assert {filed[u] for u in other} == {"OTHER"}
    finally:
        admin_side.close()
        node_side.close()


def test_compaction_of_a_series_deleted_meanwhile_is_a_no_op(archive):
    sent = store_series(archive, make_series(2, seed=10))
    with archive.index.read() as s:
        series_id = s.scalar(select(Series.id))
    archive.delete("series", series_uid_of(archive, next(iter(sent))))
    assert archive.compactor.compact_series(series_id) is True
    assert archive.compactor._start_job(series_id) is None


def _voxarc(*args, data_dir, stdin=subprocess.DEVNULL):
    return subprocess.run([sys.executable, "-m", "service.cli", *args, "--data-dir",
                           str(data_dir)], cwd=REPO, capture_output=True, text=True,
                          stdin=stdin, timeout=120)


def test_voxarc_delete(tmp_path):
    data_dir = tmp_path / "data"
    arch = Archive(data_dir)
    a1, a2, b = _two_patients(arch)
    study = arch.find("STUDY", {"PatientID": "A"})[0]["StudyInstanceUID"]
    arch.close()
    out = _voxarc("delete", "study", study, data_dir=data_dir)
    assert out.returncode == 2 and "--yes" in out.stderr          # no terminal to ask on
    out = _voxarc("delete", "study", study, "--dry-run", "--json", data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    (plan_summary,) = json.loads(out.stdout)["plans"]
    assert plan_summary["instances"] == 8 and plan_summary["patients"] == 1
    out = _voxarc("delete", "study", study, "1.2.999", "--yes", "--json", "--reason", "wrong "
                  "patient", data_dir=data_dir)
    assert out.returncode == 1, out.stderr                       # one UID matched nothing
    result = json.loads(out.stdout)
    assert result["not_found"] == ["1.2.999"] and result["deleted"][0]["instances"] == 8
    out = _voxarc("delete", "--history", data_dir=data_dir)
    assert out.returncode == 0 and "study " + study in out.stdout and "wrong patient" in out.stdout
    out = _voxarc("stats", "--json", data_dir=data_dir)
    assert json.loads(out.stdout)["instances"] == 4
    arch = Archive(data_dir)
    try:
        assert retrieves_exactly(arch, b) and all_gone(arch, a1)
    finally:
        arch.close()
    assert _voxarc("delete", data_dir=data_dir).returncode == 2


def test_removal_rows_only_name_files_of_that_deletion(archive):
    sent = store_series(archive, make_series(2, seed=11))
    other = store_series(archive, make_series(2, seed=12))
    archive.delete("series", series_uid_of(archive, next(iter(sent))))
    assert retrieves_exactly(archive, other)
    assert np.all([archive.blobs.exists(k) for k in _files(archive)])
    assert len(_files(archive)) == 2


def test_the_history_never_claims_bytes_it_did_not_keep():
    from service.delete_cli import describe
    row = {"level": "instance", "uid": "1.2", "instances": 1, "series": 0, "studies": 0,
           "patients": 0, "restaged": 4, "freed_bytes": 4143}         # an audit row
    assert "as received" not in describe(row)
    assert "0.01 MB as received" in describe({**row, "restaged_bytes": 8774})    # a plan


def test_a_compaction_interrupted_before_removing_its_staged_copies_brings_nothing_back(
        tmp_path):
    node = Archive(tmp_path / "data")                 # the running node
    sent = store_series(node, make_series(3, 8, 8, seed=12))
    compress_now = Archive(tmp_path / "data")         # `voxarc compress --now` beside it
    real_delete = compress_now.blobs.delete

    def interrupted(key):
        raise KeyboardInterrupt                       # Ctrl-C right after the commit
    compress_now.blobs.delete = interrupted
    with pytest.raises(KeyboardInterrupt):
        compress_now.compact(stable_age=0)
    compress_now.blobs.delete = real_delete
    compress_now.close()
    node.delete("series", series_uid_of(node, next(iter(sent))), "erasure request")
    node.close()
    node = Archive(tmp_path / "data")                 # the next start
    try:
        assert node.stats()["instances"] == 0 and not node.recovery.reindexed
        assert _files(node) == set()
    finally:
        node.close()


def test_voxarc_delete_matching_a_retention_period(tmp_path):
    """``--matching`` selects by C-FIND keys: studies before a date, not those without one,
    and refuses a rule that would select everything or keys below the level."""
    data_dir = tmp_path / "data"
    arch = Archive(data_dir)
    old = store_series(arch, make_series(2, 8, 8, patient_id="OLD", study_date="20090301"))
    adult = store_series(arch, make_series(2, 8, 8, patient_id="OLD", study_date="20150101",
                                           seed=1))
    recent = store_series(arch, make_series(2, 8, 8, patient_id="NEW", study_date="20240102",
                                            seed=2))
    undated = make_series(2, 8, 8, patient_id="UND", study_date="", seed=3)
    undated = store_series(arch, undated)
    arch.close()
    rule = "StudyDate=-20151231"
    out = _voxarc("delete", "study", "--matching", rule, "--dry-run", "--json",
                  data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    assert sorted(p["instances"] for p in json.loads(out.stdout)["plans"]) == [2, 2]
    out = _voxarc("delete", "study", "--matching", rule, "--dry-run", data_dir=data_dir)
    assert "2 study records match; 4 instances" in out.stdout
    out = _voxarc("delete", "study", "--matching", "StudyDate=-20151231; ModalitiesInStudy=MR",
                  "--dry-run", "--json", data_dir=data_dir)
    assert json.loads(out.stdout)["plans"] == []                  # CT studies, all of them
    for bad, why in (("StudyDate=*", "would select everything"),
                     ("SourceAETitle=CT1", "key 'SourceAETitle' is not one of"),
                     ("Modality=CT", "Modality is not a key of a study"),
                     ("StudyDate", "is not Keyword=pattern")):
        out = _voxarc("delete", "study", "--matching", bad, "--yes", data_dir=data_dir)
        assert out.returncode == 2 and why in out.stderr, out.stderr
    out = _voxarc("delete", "study", "1.2.3", "--matching", rule, data_dir=data_dir)
    assert out.returncode == 2                                   # UIDs or a rule, not both
    out = _voxarc("delete", "study", "--matching", rule, "--yes", "--reason", "retention 10 y",
                  data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    out = _voxarc("delete", "study", "--matching", rule, "--yes", data_dir=data_dir)
    assert out.returncode == 0 and "nothing matches" in out.stdout
    arch = Archive(data_dir)
    try:
        assert all_gone(arch, old) and all_gone(arch, adult)
        assert retrieves_exactly(arch, recent) and retrieves_exactly(arch, undated)     # no date: never "old"
        assert [r["reason"] for r in deletion.history(arch.index)] == ["retention 10 y"] * 2
    finally:
        arch.close()
