"""Faults: a full archive (configured limit and a real ENOSPC write error) and failing compaction
(codec error, write error) leave the index consistent and every stored instance served."""

import errno
import os

import pytest
from sqlalchemy import select

import models
from node_helpers import dataset_bytes, make_series, node  # noqa: F401 (fixture)
from scu_helpers import find, get, store_bytes
from storage.index import Blob, Instance, Job

CT = "1.2.840.10008.5.1.4.1.1.2"


def _items(datasets):
    return [(CT, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in datasets]


def _consistent(archive):
    """Every file in the blob store is referenced by the index and every reference exists."""
    with archive.index.read() as s:
        refs = set(s.scalars(select(Instance.staged_key).where(Instance.staged_key.is_not(None))))
        refs |= set(s.scalars(select(Blob.key)))
    assert set(archive.blobs.keys()) == refs
    assert not list(archive.blobs.root.rglob("*.tmp"))


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_archive_refuses_serves_and_resumes_after_compaction(node, tmp_path):
    series = make_series(8, 64, 64)
    items = _items(series)
    node.archive.max_storage_bytes = sum(len(i[3]) for i in items) + 100
    extra = _items(make_series(1, 64, 64, study_uid=series[0].StudyInstanceUID, seed=3))
    assert store_bytes(node.port, items, tmp_path) == [0] * 8
    assert store_bytes(node.port, extra, tmp_path) == [0xA700]
    _consistent(node.archive)
    assert node.archive.stats()["instances"] == 8
    status, matches = find(node.port, {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": "",
                                       "SeriesInstanceUID": series[0].SeriesInstanceUID})
    assert status == 0 and len(matches) == 8
    final, received = get(node.port, {"QueryRetrieveLevel": "SERIES",
                                      "SeriesInstanceUID": series[0].SeriesInstanceUID},
                          [(CT, items[0][2])])
    assert final.Status == 0 and received == {uid: (ts, data) for _, uid, ts, data in items}
    assert node.archive.compact(0) == (1, 0)          # compaction frees space
    assert store_bytes(node.port, extra, tmp_path) == [0]
    _consistent(node.archive)


def test_write_error_is_a700_and_leaves_nothing(node, tmp_path, monkeypatch):
    before = _items(make_series(2, 16, 16))
    assert store_bytes(node.port, before, tmp_path) == [0, 0]
    monkeypatch.setattr(os, "fsync", _enospc)           # the disk fills during the write
    assert store_bytes(node.port, _items(make_series(2, 16, 16)), tmp_path) == [0xA700] * 2
    monkeypatch.undo()
    _consistent(node.archive)
    assert node.archive.stats()["instances"] == 2
    for _, uid, _, data in before:
        assert node.archive.retrieve(uid).data == data
    assert store_bytes(node.port, _items(make_series(1, 16, 16)), tmp_path) == [0]


def _failed_job(archive):
    with archive.index.read() as s:
        return s.scalar(select(Job))


@pytest.mark.parametrize("fault", ["codec", "disk"])
def test_failed_compaction_stays_staged_and_retries_with_backoff(tmp_path, monkeypatch, fault):
    from storage.archive import Archive
    arch = Archive(tmp_path)
    sent = {}
    for ds in make_series(4, 16, 16):
        ts, data = dataset_bytes(ds)
        arch.store(data, ts)
        sent[ds.SOPInstanceUID] = data
    if fault == "codec":
        def broken(*_args, **_kwargs):
            raise RuntimeError("codec exploded")
        monkeypatch.setattr(models, "encode_volume", broken)
        reason = "RuntimeError: codec exploded"
    else:
        monkeypatch.setattr(os, "fsync", _enospc)
        reason = "StorageFullError"
    assert arch.compact(0) == (0, 1)
    first = _failed_job(arch)
    assert first.state == "failed" and reason in first.reason and first.attempts == 1
    assert arch.pending_series(0) == []                          # waits for its retry time
    assert arch.compactor.run_once(0, now=first.next_attempt + 1) == (0, 1)
    second = _failed_job(arch)
    assert second.attempts == 2
    assert second.next_attempt - second.updated_at == pytest.approx(
        2 * (first.next_attempt - first.updated_at))            # backoff doubles
    monkeypatch.undo()
    _consistent(arch)
    assert arch.stats()["pending_instances"] == 4
    for uid, data in sent.items():
        assert arch.retrieve(uid).data == data
    assert arch.compactor.run_once(0, now=second.next_attempt + 1) == (1, 0)
    assert _failed_job(arch).state == "done" and arch.stats()["pending_instances"] == 0
    for uid, data in sent.items():
        assert arch.retrieve(uid).data == data
    arch.close()


def test_oversized_dataset_is_a700_and_leaves_nothing(tmp_path):
    from service.ae import Node
    from service.config import load_settings
    small, large = _items(make_series(1, 16, 16)), _items(make_series(1, 64, 64, seed=5))
    limit = len(small[0][3]) + 10
    assert len(large[0][3]) > limit
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             stable_age=3600.0, max_dataset_bytes=limit)
    running = Node(settings, compaction=False).start()
    try:
        assert store_bytes(running.port, large, tmp_path) == [0xA700]
        assert store_bytes(running.port, small, tmp_path) == [0]
        assert running.archive.stats()["instances"] == 1
        _consistent(running.archive)
    finally:
        running.stop()
