"""Startup recovery (storage.recovery): orphans and temporary files removed, missing files
reported and kept, interrupted jobs reset, and no scan while another process has the archive."""

import logging

from sqlalchemy import select

from node_helpers import dataset_bytes, make_series
from storage.archive import Archive
from storage.blobstore import new_key
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
