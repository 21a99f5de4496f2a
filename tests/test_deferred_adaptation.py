"""A compaction that falls behind codes without the codec's adaptation, and the idle worker
codes those stacks again with it (storage.compaction, storage.recode, service.ae)."""

import pytest
from sqlalchemy import select

import models
from node_helpers import archive, make_series, store_series  # noqa: F401
from service.ae import CompactionWorker
from storage import compaction, header_pack
from storage.compaction import is_deferred
from storage.index import Blob, Instance


@pytest.fixture
def recorded(monkeypatch):
    """Every volume counts as one the codec adapts to; each ``encode_volume`` call's ``adapt``
    is recorded, and a stack coded without adaptation is coded poorly (one-voxel tiles), so
    that coding it again with adaptation (here: normally) makes it smaller."""
    monkeypatch.setattr(compaction, "adapts_by_default", lambda voxels, model: True)
    calls, encode = [], models.encode_volume

    def encode_volume(volume, **kwargs):
        calls.append(kwargs.get("adapt"))
        if kwargs.get("adapt") is False:
            return encode(volume, tile=(1, 1), adapt=False)
        return encode(volume, **{**kwargs, "adapt": False})   # (small volumes: none pays)

    monkeypatch.setattr(models, "encode_volume", encode_volume)
    return calls


def _three_series(arch) -> dict[str, bytes]:
    sent = {}
    for k in range(3):
        sent.update(store_series(arch, make_series(4, 24, 24, study_uid=f"1.2.3.{k}",
                                                   patient_id=f"P{k}", seed=k)))
    return sent


def _deferred(arch) -> list[bool]:
    with arch.index.read() as s:
        rows = s.scalars(select(Blob).where(Blob.codec.in_(header_pack.VOLUME_CODECS))
                         .order_by(Blob.id))
        return [is_deferred(b.codec_info) for b in rows]


def test_a_compaction_behind_codes_without_adaptation_and_marks_the_stacks(archive, recorded):
    sent = _three_series(archive)
    assert archive.compact(stable_age=0, fast_backlog=1) == (3, 0)
    # two series still had one waiting behind them; the last had none
    assert recorded == [False, False, None]
    assert _deferred(archive) == [True, True, False]
    assert archive.stats()["deferred_stacks"] == 2
    with archive.index.read() as s:
        infos = list(s.scalars(select(Blob.codec_info).order_by(Blob.id)))
    assert all(header_pack.pack_bytes(info) > 0 for info in infos)   # the header size still read
    for uid, data in sent.items():
        assert archive.retrieve(uid).data == data


def test_without_a_backlog_limit_every_series_is_adapted(archive, recorded):
    _three_series(archive)
    assert archive.compact(stable_age=0) == (3, 0)
    assert recorded == [None, None, None] and _deferred(archive) == [False] * 3
    assert archive.adapt_deferred(5) == []


def test_deferred_stacks_are_coded_again_with_adaptation_one_at_a_time(archive, recorded):
    sent = _three_series(archive)
    archive.compact(stable_age=0, fast_backlog=1)
    before = archive.stats()["stored_bytes"]
    (first,) = archive.adapt_deferred(1)
    assert first.state == "recoded" and first.new_bytes < first.old_bytes
    assert recorded[-1] is None                       # coded again with adaptation
    assert sorted(_deferred(archive)) == [False, False, True]   # (the new row comes last)
    rest = archive.adapt_deferred(5)
    assert [r.state for r in rest] == ["recoded"] and archive.stats()["deferred_stacks"] == 0
    saved = sum(r.old_bytes - r.new_bytes for r in [first, *rest])
    assert archive.stats()["stored_bytes"] == before - saved
    for uid, data in sent.items():
        assert archive.retrieve(uid).data == data
    assert archive.adapt_deferred(5) == []


def test_a_deferred_stack_adaptation_would_not_shrink_is_unmarked_and_left(archive, recorded,
                                                                          monkeypatch):
    _three_series(archive)
    archive.compact(stable_age=0, fast_backlog=1)
    with archive.index.read() as s:
        keys = list(s.scalars(select(Blob.key).order_by(Blob.id)))
    encode = models.encode_volume

    def no_better(volume, **kwargs):          # "adaptation" that codes as the fast pass did
        assert kwargs.get("adapt") is not False
        return encode(volume, adapt=False)

    monkeypatch.setattr(models, "encode_volume", no_better)
    done = archive.adapt_deferred(5)
    assert [d.state for d in done] == ["kept", "kept"]
    assert _deferred(archive) == [False] * 3 and archive.stats()["deferred_stacks"] == 0
    with archive.index.read() as s:
        assert list(s.scalars(select(Blob.key).order_by(Blob.id))) == keys
    assert archive.adapt_deferred(5) == []       # not tried again


def test_the_worker_codes_deferred_stacks_again_only_when_nothing_is_staged(archive, recorded):
    sent = _three_series(archive)
    archive.compact(stable_age=0, fast_backlog=1)
    late = store_series(archive, make_series(3, 16, 16, study_uid="1.2.9", seed=9))
    waiting = CompactionWorker(archive, stable_age=3600, interval=1, fast_backlog=1)
    waiting.run_pass()                  # a series is being received: no recoding
    assert _deferred(archive) == [True, True, False]
    worker = CompactionWorker(archive, stable_age=0, interval=1, fast_backlog=1)
    worker.run_pass()                   # compacts the late series (alone: adapted)
    assert _deferred(archive) == [True, True, False, False]
    worker.run_pass()                   # nothing staged: one deferred stack per pass
    assert _deferred(archive).count(True) == 1
    worker.run_pass()
    assert not any(_deferred(archive))
    with archive.index.read() as s:
        assert s.scalar(select(Instance.id).where(Instance.staged_key.is_not(None))) is None
    for uid, data in {**sent, **late}.items():
        assert archive.retrieve(uid).data == data


def test_recode_takes_the_deferred_stacks_too(archive, recorded):
    _three_series(archive)
    archive.compact(stable_age=0, fast_backlog=1)
    recoder = archive.recoder()
    states = [recoder.recode(b).state for b in recoder.volume_blobs()]
    assert sorted(states) == ["current", "recoded", "recoded"]
    assert not any(_deferred(archive))


def test_a_node_with_its_metrics_defers_too(archive, recorded):
    """The node times each compaction (service.metrics wraps compact_series): the wrapper
    passes the fast option on."""
    from service.metrics import NodeMetrics
    metrics = NodeMetrics(archive)
    metrics.watch_compactor(archive.compactor)
    _three_series(archive)
    worker = CompactionWorker(archive, stable_age=0, interval=1, fast_backlog=1)
    worker.run_pass()
    assert recorded == [False, False, None] and archive.stats()["deferred_stacks"] == 2
    assert b"voxarc_deferred_stacks 2.0" in metrics.exposition()


def test_a_damaged_deferred_stack_is_left_and_not_tried_again(archive, recorded, caplog):
    _three_series(archive)
    archive.compact(stable_age=0, fast_backlog=1)
    with archive.index.read() as s:
        blob = s.scalars(select(Blob).where(Blob.codec_info.contains("deferred"))
                         .order_by(Blob.id)).first()
    path = archive.blobs.path(blob.key)
    damaged = bytearray(path.read_bytes())
    damaged[-5] ^= 0x10
    path.write_bytes(bytes(damaged))
    done = archive.adapt_deferred(1)
    assert done == [] and "SHA-256" in caplog.text
    assert path.read_bytes() == bytes(damaged)            # left for `voxarc verify`
    assert archive.stats()["deferred_stacks"] == 1        # the other one; not this again
    assert [d.state for d in archive.adapt_deferred(5)] == ["recoded"]


def test_an_idle_worker_looks_for_deferred_stacks_again_only_after_a_compaction(
        archive, recorded, monkeypatch):
    """Each look scans the blob rows: after one that found nothing, the idle worker waits for
    a compaction (only it defers) instead of scanning at every pass; a damaged stack does not
    make it stop while others are left."""
    looks = []
    adapt_deferred = archive.adapt_deferred
    monkeypatch.setattr(archive, "adapt_deferred",
                        lambda limit=1: looks.append(limit) or adapt_deferred(limit))
    worker = CompactionWorker(archive, stable_age=0, interval=1, fast_backlog=1)
    worker.run_pass()
    worker.run_pass()
    assert looks == [1]                         # nothing deferred, and no compaction since
    _three_series(archive)
    worker.run_pass()                           # compacts, two stacks deferred
    with archive.index.read() as s:
        first = s.scalars(select(Blob).where(Blob.codec_info.contains("deferred"))
                          .order_by(Blob.created_at, Blob.id)).first()
    path = archive.blobs.path(first.key)
    path.write_bytes(path.read_bytes()[:-5] + b"xxxxx")       # damaged: unmarked, not returned
    for _ in range(4):
        worker.run_pass()
    assert looks == [1, 1, 1, 1] and not any(_deferred(archive))
