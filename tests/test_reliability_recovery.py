"""Startup recovery (storage.recovery): orphans and temporary files removed, missing files
reported and kept, interrupted jobs reset, and no scan while another process has the archive."""

import logging
import os
import time

import pytest
from sqlalchemy import delete, select, update

from node_helpers import dataset_bytes, make_series
from storage.archive import Archive
from storage.blobstore import BlobStore, new_key
from storage.index import Blob, Instance, Job


def _filled(path, n=3):
    arch = Archive(path)
    sent = {}
    for ds in make_series(n, 8, 8):
        ts, data = dataset_bytes(ds)
        arch.store(data, ts)
        sent[ds.SOPInstanceUID] = data
    return arch, sent


def test_orphans_and_temp_files_removed_on_open(tmp_path):
    arch, sent = _filled(tmp_path)
    arch.compact(0)
    arch.store(*reversed(dataset_bytes(make_series(1, 8, 8)[0])))   # one staged instance too
    orphan_staged, orphan_blob = new_key("s"), new_key("b")
    arch.blobs.put(orphan_staged, b"never committed")
    arch.blobs.put(orphan_blob, b"never committed")
    half = arch.blobs.path(new_key("s")).with_suffix(".tmp")
    half.parent.mkdir(exist_ok=True)
    half.write_bytes(b"half")
    kept = set(arch.blobs.keys()) - {orphan_staged, orphan_blob}
    arch.close()

    arch = Archive(tmp_path)
    assert arch.recovery.ran and arch.recovery.clean
    assert sorted(arch.recovery.orphans_removed) == sorted([orphan_staged, orphan_blob])
    assert arch.recovery.temp_removed == 1 and not half.exists()
    assert set(arch.blobs.keys()) == kept
    for uid, data in sent.items():
        assert arch.retrieve(uid).data == data
    arch.close()


def test_missing_staged_file_is_reported_not_dropped(tmp_path, caplog):
    arch, sent = _filled(tmp_path)
    uid = next(iter(sent))
    with arch.index.read() as s:
        key = s.scalar(select(Instance.staged_key).where(Instance.sop_uid == uid))
    arch.blobs.delete(key)
    arch.close()
    caplog.set_level(logging.ERROR)
    arch = Archive(tmp_path)
    assert arch.recovery.missing_staged == [uid] and not arch.recovery.clean
    assert "MISSING" in caplog.text and uid in caplog.text
    assert arch.stats()["instances"] == 3                     # the row is kept
    arch.close()


def test_missing_blob_is_reported(tmp_path):
    arch, _ = _filled(tmp_path)
    arch.compact(0)
    with arch.index.read() as s:
        key = s.scalar(select(Blob.key))
    arch.blobs.delete(key)
    arch.close()
    arch = Archive(tmp_path)
    assert arch.recovery.missing_blobs == [key]
    arch.close()


def test_interrupted_job_is_reset(tmp_path):
    arch, _ = _filled(tmp_path)
    with arch.index.write() as s:
        s.add(Job(series_fk=1, state="running", attempts=1))
    arch.close()
    arch = Archive(tmp_path)
    assert arch.recovery.jobs_reset == 1
    with arch.index.read() as s:
        assert s.scalar(select(Job.state)) == "pending"
    assert arch.compact(0) == (1, 0)
    arch.close()


def test_no_scan_while_the_archive_is_open_elsewhere(tmp_path):
    first, _ = _filled(tmp_path)
    uncommitted = new_key("s")                     # as if first were between put and commit
    first.blobs.put(uncommitted, b"in flight")
    second = Archive(tmp_path)
    assert not second.recovery.ran and first.blobs.exists(uncommitted)
    second.close()
    first.close()
    third = Archive(tmp_path)
    assert third.recovery.ran and not third.blobs.exists(uncommitted)
    third.close()


def _lose_rows(arch, uids):
    """What a power loss may do to commits that were not flushed: the rows are gone, their
    (durable) staged files are not."""
    with arch.index.write() as s:
        for uid in uids:
            s.delete(s.scalars(select(Instance).where(Instance.sop_uid == uid)).one())


def test_staged_files_whose_rows_were_lost_are_indexed_again(tmp_path):
    arch, sent = _filled(tmp_path, n=4)
    lost = sorted(sent)[:3]
    _lose_rows(arch, lost)
    arch.close()
    arch = Archive(tmp_path)
    assert sorted(arch.recovery.reindexed) == lost and not arch.recovery.orphans_removed
    assert arch.stats()["instances"] == 4
    for uid, data in sent.items():
        assert arch.retrieve(uid).data == data
    arch.compact(0)                                       # and they compress like any other
    for uid, data in sent.items():
        assert arch.retrieve(uid).data == data
    arch.close()


def test_an_unfinished_staged_file_is_removed_not_indexed(tmp_path):
    arch, sent = _filled(tmp_path, n=2)
    uid = sorted(sent)[0]
    with arch.index.read() as s:
        key = s.scalar(select(Instance.staged_key).where(Instance.sop_uid == uid))
    _lose_rows(arch, [uid])
    path = arch.blobs.path(key)
    data = path.read_bytes()             # its write never finished: the last pixels are zeros
    path.write_bytes(data[:-100] + bytes(100))            # (it still parses)
    arch.close()
    arch = Archive(tmp_path)
    assert arch.recovery.orphans_removed == [key] and not arch.recovery.reindexed
    assert arch.stats()["instances"] == 1 and not path.exists()
    arch.close()


def test_a_stale_staged_copy_never_replaces_its_newer_row(tmp_path):
    """A staged copy left behind (its delete not yet on disk) of an instance received again
    later is dropped, even under the replace policy."""
    ts, data = dataset_bytes(make_series(1, 8, 8)[0])
    arch = Archive(tmp_path, duplicates="replace")
    arch.store(data, ts)
    with arch.index.read() as s:
        first_key = s.scalar(select(Instance.staged_key))
    stale = arch.blobs.path(first_key).read_bytes()
    arch.store(data, ts)                                  # replaces: the first file is deleted
    arch.blobs.path(first_key).write_bytes(stale)         # ... but the delete was lost
    import os
    os.utime(arch.blobs.path(first_key), (1, 1))          # written long before the new row
    with arch.index.read() as s:
        second_key = s.scalar(select(Instance.staged_key))
    arch.close()
    arch = Archive(tmp_path, duplicates="replace")
    assert arch.recovery.orphans_removed == [first_key] and not arch.recovery.reindexed
    with arch.index.read() as s:
        assert s.scalar(select(Instance.staged_key)) == second_key
    arch.close()


def test_staged_rows_skip_the_database_flush_only_with_recoverable_names(tmp_path, monkeypatch):
    from storage import staged_keys
    arch = Archive(tmp_path)
    flags = []
    connect = arch.index.connect
    monkeypatch.setattr(arch.index, "connect",
                        lambda durable=True: flags.append(durable) or connect(durable))
    ts, data = dataset_bytes(make_series(1, 8, 8)[0])
    arch.store(data, ts)
    monkeypatch.setattr(staged_keys, "staged_key", lambda ts, digest: None)   # no code for it
    ts, data = dataset_bytes(make_series(1, 8, 8)[0])
    arch.store(data, ts)
    assert flags == [False, True]
    arch.close()


def test_staged_keys_name_their_syntax_and_content():
    import hashlib
    from storage.blobstore import check_key
    from storage.staged_keys import SYNTAXES, recoverable, staged_key
    digest = hashlib.sha256(b"x").hexdigest()
    for ts in SYNTAXES:
        key = check_key(staged_key(ts, digest))
        assert recoverable(key) == (ts, digest[:40])
    assert staged_key("1.2.3.4.5", digest) is None
    assert recoverable(new_key("s")) is None               # the names of earlier releases


def test_a_lost_replacement_found_again_is_not_reported_missing(tmp_path):
    # power loss after a relaxed `replace` commit whose removal of the old file reached the
    # disk: recovery indexes the new version again, and the instance is not "missing"
    (ds,) = make_series(1, 8, 8)
    ts, first = dataset_bytes(ds)
    ds.StudyDescription = "corrected"
    _, second = dataset_bytes(ds)
    arch = Archive(tmp_path, duplicates="replace")
    arch.store(first, ts)
    with arch.index.read() as s:
        row = s.scalars(select(Instance)).one()
        lost = dict(staged_key=row.staged_key, sha256=row.sha256, size=row.size,
                    received_at=row.received_at)
    time.sleep(0.02)                         # file times are coarser than time.time()
    arch.store(second, ts)
    with arch.index.write() as s:            # the commit is gone, the file removal is not
        s.execute(update(Instance).values(**lost))
    arch.close()
    arch = Archive(tmp_path, duplicates="replace")
    try:
        assert arch.recovery.reindexed and arch.recovery.clean
        assert arch.retrieve(ds.SOPInstanceUID).data == second
    finally:
        arch.close()


@pytest.mark.parametrize("policy", ["keep_first", "replace"])
def test_two_lost_versions_come_back_in_the_order_they_were_received(tmp_path, policy):
    # both rows lost (relaxed commits, power loss) and the removal of the dropped version's
    # file too; the files' modification times tie (one coarse tick): the names tell the order
    (ds,) = make_series(1, 8, 8)
    ts, first = dataset_bytes(ds)
    ds.StudyDescription = "second version"
    _, second = dataset_bytes(ds)
    arch = Archive(tmp_path, duplicates=policy)
    arch.store(first, ts)
    files = {k: arch.blobs.get(k) for k in arch.blobs.keys()}
    arch.store(second, ts)
    files.update({k: arch.blobs.get(k) for k in arch.blobs.keys()})
    with arch.index.write() as s:
        s.execute(delete(Instance))
    arch.close()
    blobs = BlobStore(tmp_path / "blobs")
    for key, data in files.items():
        if not blobs.exists(key):
            blobs.put_new(key, data)
        os.utime(blobs.path(key), ns=(1_700_000_000_000_000_000,) * 2)
    arch = Archive(tmp_path, duplicates=policy)
    try:
        kept = arch.retrieve(ds.SOPInstanceUID).data
        assert kept == (first if policy == "keep_first" else second)
    finally:
        arch.close()
