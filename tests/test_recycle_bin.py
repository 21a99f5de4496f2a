"""The recycle bin (storage.recycle_bin, `voxarc deleted`): deleted instances kept as received,
restorable byte for byte until they expire."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from admin_helpers import (CHROMIUM, admin_site, chromium, get_json, http_token,  # noqa: F401
                           post_json)
from node_helpers import (BACKENDS, all_gone, damage_the_blob, database_url, make_series,
                          retrieves_exactly, series_uid_of, store_series)
from storage import recycle_bin
from storage.archive import Archive
from storage.deletion import DeletionError
from storage.part10 import split_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=BACKENDS)
def binned(request, tmp_path):
    """An empty archive whose deletions go through a 7-day recycle bin."""
    arch = Archive(tmp_path / "data", database_url(request.param, tmp_path),
                   deleted_keep_days=7)
    yield arch
    arch.close()


@pytest.mark.parametrize("compacted", [False, True])
def test_a_deleted_series_is_kept_as_received_and_restored_byte_for_byte(binned, compacted):
    sent = store_series(binned, make_series(5, seed=1, patient_id="P1"))
    other = store_series(binned, make_series(3, seed=2, patient_id="P2"))
    if compacted:
        assert binned.compact(stable_age=0) == (2, 0)
    series = series_uid_of(binned, next(iter(sent)))
    done = binned.delete("series", series, reason="wrong series")
    assert done["instances"] == 5 and all_gone(binned, sent) and retrieves_exactly(binned, other)
    (entry,) = binned.recycle.entries()
    assert entry.name == done["kept_as"] and (entry.level, entry.uid) == ("series", series)
    assert entry.reason == "wrong series" and entry.bytes == sum(map(len, sent.values()))
    assert {i["patient_id"] for i in entry.instances} == {"P1"}
    for item in entry.instances:        # plain Part 10 files any DICOM tool reads
        path = binned.recycle.root / entry.name / item["file"]
        assert split_file(path.read_bytes())[1] == sent[item["sop_uid"]]
        assert dcmread(path).SOPInstanceUID == item["sop_uid"]
    assert binned.stats()["recycle_bin_bytes"] > entry.bytes
    counts = binned.restore_deleted(entry.name)
    assert (counts["restored"], counts["present"], counts["failed"]) == (5, 0, 0)
    assert retrieves_exactly(binned, sent) and retrieves_exactly(binned, other)
    assert binned.recycle.entries() == [] and binned.stats()["recycle_bin_bytes"] == 0
    assert binned.compact(stable_age=0) == (1 if compacted else 2, 0)   # as any new series
    assert retrieves_exactly(binned, sent)


def test_one_instance_out_of_a_coded_stack_comes_back_into_its_series(binned):
    sent = store_series(binned, make_series(6, seed=3))
    assert binned.compact(stable_age=0) == (1, 0)
    victim = sorted(sent)[2]
    done = binned.delete("instance", victim)
    assert done["restaged"] == 5 and all_gone(binned, {victim: sent[victim]})
    binned.restore_deleted(done["kept_as"])
    assert retrieves_exactly(binned, sent)
    assert len(binned.find("IMAGE", {"SeriesInstanceUID": series_uid_of(binned, victim),
                                     "SOPInstanceUID": ""})) == 6


def test_no_room_for_the_copies_deletes_nothing(binned, monkeypatch):
    sent = store_series(binned, make_series(3, seed=4))
    usage = recycle_bin.shutil.disk_usage(binned.data_dir)
    monkeypatch.setattr(recycle_bin.shutil, "disk_usage",
                        lambda path: usage._replace(free=recycle_bin.SPARE_BYTES))
    with pytest.raises(DeletionError, match="no room to keep .* --no-keep"):
        binned.delete("series", series_uid_of(binned, next(iter(sent))))
    assert retrieves_exactly(binned, sent) and list(binned.recycle.root.iterdir()) == []
    done = binned.delete("series", series_uid_of(binned, next(iter(sent))), keep=False)
    assert done["instances"] == 3 and "kept_as" not in done and all_gone(binned, sent)


def test_a_deletion_that_fails_after_the_copies_leaves_no_entry(binned, monkeypatch):
    sent = store_series(binned, make_series(3, seed=5))

    def broken(*args, **kwargs):
        raise OSError("the index's disk went away")

    monkeypatch.setattr(binned.index, "write_checked", broken)
    with pytest.raises(OSError):
        binned.delete("series", series_uid_of(binned, next(iter(sent))))
    monkeypatch.undo()
    assert retrieves_exactly(binned, sent) and list(binned.recycle.root.iterdir()) == []


def test_a_copy_that_cannot_be_rebuilt_deletes_nothing(binned):
    sent = store_series(binned, make_series(3, seed=6))
    assert binned.compact(stable_age=0) == (1, 0)
    damage_the_blob(binned)
    with pytest.raises(DeletionError, match="could not keep .* nothing deleted"):
        binned.delete("series", series_uid_of(binned, next(iter(sent))))
    assert binned.stats()["instances"] == 3 and list(binned.recycle.root.iterdir()) == []


def test_expired_and_interrupted_entries_are_purged_and_fresh_ones_kept(binned):
    old = store_series(binned, make_series(2, seed=7))
    new = store_series(binned, make_series(2, seed=8))
    first = binned.delete("series", series_uid_of(binned, next(iter(old))))["kept_as"]
    second = binned.delete("series", series_uid_of(binned, next(iter(new))))["kept_as"]
    assert [e.name for e in binned.recycle.entries(newest=1)] == [second]     # in order
    manifest = binned.recycle.root / first / recycle_bin.MANIFEST
    meta = json.loads(manifest.read_text())
    meta["deleted_at"] -= 8 * 86400
    manifest.write_text(json.dumps(meta))
    interrupted = binned.recycle.root / "20260101T000000.000000Z-deadbe"
    interrupted.mkdir()
    (interrupted / "1.2.3.dcm").write_bytes(b"half")
    assert binned.recycle.entry(interrupted.name) is None          # never listed
    assert binned.recycle.purge() == [first]                        # the other is too recent
    stale = time.time() - recycle_bin.INTERRUPTED_S - 60
    os.utime(interrupted, (stale, stale))
    assert binned.recycle.purge() == [interrupted.name]
    assert [e.name for e in binned.recycle.entries()] == [second]
    assert binned.recycle.entries(newest=1)[0].name == second
    with pytest.raises(recycle_bin.RecycleBinError, match="no entry"):
        binned.restore_deleted(first)


def test_a_tampered_copy_is_not_restored_and_its_entry_stays(binned):
    from storage.scrub import check_stored_files, scrub
    sent = store_series(binned, make_series(3, seed=9))
    name = binned.delete("series", series_uid_of(binned, next(iter(sent))))["kept_as"]
    assert scrub(binned).bin_files_checked == 3 and scrub(binned).ok
    item = binned.recycle.entry(name).instances[0]
    path = binned.recycle.root / name / item["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    damaged = {f"{name}/{item['file']}": "its bytes differ from the SHA-256 its manifest records"}
    for report in (scrub(binned), check_stored_files(binned)):     # voxarc verify, the patrol
        assert not report.ok and report.bad_bin_files == damaged
    counts = binned.restore_deleted(name)
    assert (counts["restored"], counts["failed"]) == (2, 1)
    assert binned.recycle.entry(name) is not None
    assert binned.restore_deleted(name)["present"] == 2           # the others are back


def test_a_bin_turned_off_deletes_for_good(tmp_path):
    arch = Archive(tmp_path / "data")           # deleted_keep_days 0
    try:
        sent = store_series(arch, make_series(2, seed=10))
        done = arch.delete("series", series_uid_of(arch, next(iter(sent))))
        assert "kept_as" not in done and arch.recycle.entries() == []
        assert not arch.recycle.root.exists()
    finally:
        arch.close()


def test_the_compaction_worker_purges_expired_entries(tmp_path):
    from service.ae import CompactionWorker
    arch = Archive(tmp_path / "data", deleted_keep_days=1)
    try:
        sent = store_series(arch, make_series(2, seed=11))
        name = arch.delete("series", series_uid_of(arch, next(iter(sent))))["kept_as"]
        worker = CompactionWorker(arch, stable_age=0, interval=60)
        worker.run_pass()
        assert arch.recycle.entry(name) is not None
        manifest = arch.recycle.root / name / recycle_bin.MANIFEST
        meta = json.loads(manifest.read_text())
        meta["deleted_at"] -= 2 * 86400
        manifest.write_text(json.dumps(meta))
        worker.run_pass()                        # looked an instant ago: not yet
        assert arch.recycle.entry(name) is not None
        arch.recycle._last_purge -= recycle_bin.PURGE_EVERY_S
        worker.run_pass()
        assert arch.recycle.entry(name) is None
    finally:
        arch.close()


def _voxarc(*args, data_dir):
    return subprocess.run([sys.executable, "-m", "service.cli", *args, "--data-dir",
                           str(data_dir)], cwd=REPO, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_voxarc_deleted_lists_restores_and_empties(tmp_path):
    data_dir = tmp_path / "data"
    arch = Archive(data_dir)
    a = store_series(arch, make_series(3, seed=12, patient_id="KEEPME"))
    b = store_series(arch, make_series(2, seed=13, patient_id="GONE"))
    study_a = arch.find("STUDY", {"PatientID": "KEEPME", "StudyInstanceUID": ""})[0]
    arch.close()
    assert "the recycle bin is empty" in _voxarc("deleted", data_dir=data_dir).stdout
    out = _voxarc("delete", "study", study_a["StudyInstanceUID"], "--yes", "--reason", "oops",
                  data_dir=data_dir)
    assert out.returncode == 0 and "voxarc deleted restore" in out.stdout, out.stderr
    out = _voxarc("delete", "patient", "GONE", "--yes", "--no-keep", data_dir=data_dir)
    assert out.returncode == 0 and "voxarc deleted restore" not in out.stdout
    listed = json.loads(_voxarc("deleted", "--json", data_dir=data_dir).stdout)
    (row,) = listed["entries"]
    assert listed["keep_days"] == 7 and row["instances"] == 3 and row["reason"] == "oops"
    assert row["patients"] == ["KEEPME"] and row["expires_at"] > time.time() + 6 * 86400
    text = _voxarc("deleted", data_dir=data_dir).stdout
    assert row["entry"] in text and "KEEPME" in text and "oops" in text
    assert "recycle" in _voxarc("stats", data_dir=data_dir).stdout
    assert _voxarc("deleted", "restore", data_dir=data_dir).returncode == 2
    out = _voxarc("deleted", "restore", "nonesuch", data_dir=data_dir)
    assert out.returncode == 1 and "no entry" in out.stderr
    out = _voxarc("deleted", "restore", row["entry"], data_dir=data_dir)
    assert out.returncode == 0 and "3 instances restored" in out.stdout, out.stderr
    trail = json.loads(_voxarc("accesses", "--json", data_dir=data_dir).stdout)
    (restore,) = [r for r in trail if r["action"] == "restore"]
    assert restore["actor"].startswith("cli deleted restore") and restore["instances"] == 3
    assert restore["detail"] == f"recycle bin entry {row['entry']}"
    arch = Archive(data_dir)
    try:
        assert retrieves_exactly(arch, a) and all_gone(arch, b)
    finally:
        arch.close()
    _voxarc("delete", "study", study_a["StudyInstanceUID"], "--yes", data_dir=data_dir)
    assert _voxarc("deleted", "empty", data_dir=data_dir).returncode == 2     # asks first
    assert _voxarc("deleted", "empty", "--expired", data_dir=data_dir).stdout.startswith("0 ")
    out = _voxarc("deleted", "empty", "--yes", data_dir=data_dir)
    assert out.returncode == 0 and out.stdout.startswith("1 entries removed")
    assert json.loads(_voxarc("deleted", "--json", data_dir=data_dir).stdout)["entries"] == []


def test_the_admin_page_lists_the_bin_and_restores_an_entry(admin_site, tmp_path):
    node, admin = admin_site
    sent = store_series(node.archive, make_series(3, 8, 8, seed=14, patient_id="BINNED"))
    done = node.archive.delete("series", series_uid_of(node.archive, next(iter(sent))),
                               reason="sent to the wrong patient")
    listed = get_json(f"{admin.url}/api/deleted")
    (row,) = listed["entries"]
    assert listed["keep_days"] == 7 and row["entry"] == done["kept_as"]
    assert (row["instances"], row["patients"]) == (3, ["BINNED"])
    if CHROMIUM is not None:
        dom = chromium(f"{admin.url}/", tmp_path / "page", "--dump-dom")
        item = re.search(r'<li class="recycled">.*?</li>', dom, re.S).group(0)
        assert "3 instances of BINNED" in item and "sent to the wrong patient" in item
        assert ">Restore</button>" in item
    restore = f"{admin.url}/api/deleted/{row['entry']}/restore"
    assert post_json(restore, b"{}", "application/x-www-form-urlencoded")[0] == 415
    assert post_json(f"{admin.url}/api/deleted/nonesuch/restore", b"{}")[0] == 404
    status, answer = post_json(restore, b"{}")
    assert status == 200 and (answer["restored"], answer["failed"]) == (3, 0)
    assert list(answer["studies"].values()) == [["BINNED", 3]]
    assert retrieves_exactly(node.archive, sent) and get_json(f"{admin.url}/api/deleted")["entries"] == []


def test_a_nearly_full_disk_takes_the_oldest_entries_first(binned, monkeypatch):
    """New images come first: below 5% free the oldest entries go before they expire, until
    10% is free; a deletion whose copies would leave less than 10% free deletes nothing."""
    names = [binned.delete("series", series_uid_of(binned, next(iter(
        store_series(binned, make_series(1, 8, 8, seed=20 + k))))))["kept_as"]
        for k in range(3)]
    real = recycle_bin.shutil.disk_usage

    def usage(path):          # each entry takes 3% of a disk that is 87% full without them
        left = len(list(binned.recycle.root.iterdir()))
        return real(path)._replace(total=100 << 30, free=int((13 - 3 * left) / 100 * (100 << 30)))

    monkeypatch.setattr(recycle_bin.shutil, "disk_usage", usage)
    assert binned.recycle.purge_if_due() == names[:2]
    assert [e.name for e in binned.recycle.entries()] == names[2:]
    assert binned.recycle.make_room() == []                        # 10% free now
    sent = store_series(binned, make_series(1, 8, 8, seed=30))
    with pytest.raises(DeletionError, match="no room"):
        binned.delete("series", series_uid_of(binned, next(iter(sent))))
