"""Group commit of concurrent C-STOREs and the slab-ordered, prefetched retrieval of compressed
stacks: same guarantees as the one-at-a-time paths (durable before success, byte-exact back)."""

import threading
import time

import numpy as np
import pytest

import models
from sqlalchemy import func, select

from node_helpers import (archive, dataset_bytes, make_series, make_time_points,  # noqa: F401
                          store_series)
from storage.index import Instance, Series
from storage.reconstruct import Reconstructor


def test_concurrent_stores_share_commits_and_all_land(archive):
    series = make_series(24, 8, 8) + make_series(8, 8, 8, seed=3)
    items = [dataset_bytes(ds) for ds in series]
    errors = []
    start = threading.Barrier(8)

    def push(part):
        start.wait()
        for ts, data in part:
            try:
                assert archive.store(data, ts).outcome == "stored"
            except Exception as exc:       # pragma: no cover - reported below
                errors.append(exc)

    threads = [threading.Thread(target=push, args=(items[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert archive.stager.committed == len(items)
    assert archive.stager.batches <= len(items)
    with archive.index.read() as s:
        assert s.scalar(select(func.count(Instance.id))) == len(items)
        assert s.scalar(select(func.count(Series.id))) == 2
    for ds, (ts, data) in zip(series, items):
        got = archive.retrieve(ds.SOPInstanceUID)
        assert got.data == data


def test_duplicate_in_one_batch_keeps_the_first(archive):
    ds = make_series(1, 8, 8)[0]
    ts, data = dataset_bytes(ds)
    outcomes = []
    threads = [threading.Thread(target=lambda: outcomes.append(archive.store(data, ts).outcome))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["duplicate_ignored"] * 3 + ["stored"]
    assert archive.retrieve(ds.SOPInstanceUID).data == data
    assert len(list(archive.blobs.keys())) == 1           # the ignored copies were removed


def _store_and_compact(archive, series) -> dict:
    """Store a series, compact it, and return the sent bytes by SOP Instance UID."""
    sent = store_series(archive, series)
    assert archive.compact_series(series[0].SeriesInstanceUID)
    return sent


def test_planned_retrieval_is_slab_ordered_and_exact(archive, monkeypatch):
    series = make_series(21, 12, 10, seed=5)                # 3 slabs of 8 slices
    sent = _store_and_compact(archive, series)
    archive.reconstructor = Reconstructor(archive.index, archive.blobs, 1 << 20)   # cold cache
    on_demand, decode_slices = [], models.decode_slices
    monkeypatch.setattr(models, "decode_slices",
                        lambda *args: on_demand.append(args[1:]) or decode_slices(*args))
    uids = list(sent)
    ordered, prefetch = archive.plan_retrieval(uids)
    assert sorted(ordered) == sorted(uids) and prefetch is not None
    with archive.index.read() as s:
        starts = [s.scalar(select(Instance.frame_start).where(Instance.sop_uid == u))
                  for u in ordered]
    assert starts == sorted(starts)
    first = prefetch.steps[0]
    assert (first.lo, first.lo + first.head) == (0, 1)    # first image after one slice
    assert len(prefetch.steps) == 1                       # one stream for the whole blob
    for uid in ordered:
        assert archive.retrieve(uid).data == sent[uid]
    prefetch.thread.join(30)
    assert not prefetch.thread.is_alive()
    assert on_demand == []    # every slab came from the plan, the first one in two pieces


def test_a_first_instance_of_several_slabs_is_decoded_before_the_rest(archive, monkeypatch):
    """A stack of multi-frame instances: the first one's slabs are a decode of their own, so
    that it goes out without waiting for groups that may hold the rest of the blob; then the
    rest, every instance exact and nothing decoded outside the plan."""
    series = make_time_points(4, 12, 10, seed=6)          # 47 frames: 6 slabs of 8
    last = max(series, key=lambda ds: ds.InstanceNumber)  # unequal frames: instance order
    last.NumberOfFrames, last.PixelData = 11, last.PixelData[:11 * 10 * 10 * 2]
    sent = _store_and_compact(archive, series)
    archive.reconstructor = Reconstructor(archive.index, archive.blobs, 1 << 20)   # cold cache
    on_demand, decode_slices = [], models.decode_slices
    monkeypatch.setattr(models, "decode_slices",
                        lambda *args: on_demand.append(args[1:]) or decode_slices(*args))
    ordered, prefetch = archive.plan_retrieval(list(sent))
    assert [(st.lo, st.hi) for st in prefetch.steps] == [(0, 16), (16, 47)]
    for uid in ordered:
        assert archive.retrieve(uid).data == sent[uid]
    prefetch.thread.join(30)
    assert not prefetch.thread.is_alive() and on_demand == []


def test_concurrent_retrievals_of_one_slab_decode_it_once(archive, monkeypatch):
    """A web viewer asks for the frames of several instances of one slab at once (no plan):
    each slab is decoded once, not once per request."""
    from concurrent.futures import ThreadPoolExecutor
    series = make_series(16, 12, 10, seed=7)                # 2 slabs of 8 slices
    sent = _store_and_compact(archive, series)
    archive.reconstructor = Reconstructor(archive.index, archive.blobs, 1 << 20)   # cold cache
    decoded, decode_slices, decode_stream = [], models.decode_slices, models.decode_stream

    def slow(*args):
        decoded.append(args[1:3])
        time.sleep(0.2)                   # long enough for every request to miss the cache
        return decode_slices(*args)

    def slow_stream(*args, **kwargs):
        decoded.append(args[1:3])
        time.sleep(0.2)
        yield from decode_stream(*args, **kwargs)
    monkeypatch.setattr(models, "decode_slices", slow)
    monkeypatch.setattr(models, "decode_stream", slow_stream)
    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(sent, pool.map(lambda u: archive.retrieve(u).data, list(sent))))
    assert got == sent
    assert sorted(decoded) == [(0, 8), (8, 16)]


def test_one_instance_asked_for_goes_out_before_the_rest_of_its_slab_is_decoded(archive,
                                                                               monkeypatch):
    series = make_series(8, 12, 10, seed=9)                 # 1 slab of 8 slices
    sent = _store_and_compact(archive, series)
    archive.reconstructor = Reconstructor(archive.index, archive.blobs, 1 << 20)   # cold cache
    streams, decode_stream = [], models.decode_stream

    def recorded(*args, **kwargs):
        streams.append((args[1:3], kwargs.get("head", 0)))
        yield from decode_stream(*args, **kwargs)
    monkeypatch.setattr(models, "decode_stream", recorded)
    with archive.index.read() as s:
        at = dict(s.execute(select(Instance.frame_start, Instance.sop_uid)).all())
    assert archive.retrieve(at[2]).data == sent[at[2]]
    assert streams == [((0, 8), 3)]      # the whole slab, its first 3 slices handed over first
    for uid in at.values():               # the rest of the slab was decoded by that same step
        assert archive.retrieve(uid).data == sent[uid]
    assert len(streams) == 1


def test_a_failed_shared_load_fails_every_waiter_and_the_next_call_loads_again():
    from concurrent.futures import ThreadPoolExecutor

    from storage.reconstruct import SlabCache
    cache, calls = SlabCache(1 << 20), []

    def failing():
        calls.append(1)
        time.sleep(0.2)
        raise ValueError("damaged")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cache.get, "k", failing) for _ in range(4)]
    assert all(isinstance(f.exception(), ValueError) for f in futures) and len(calls) == 1
    assert cache.get("k", lambda: np.zeros(3)).tolist() == [0, 0, 0]


def test_keys_loaded_in_turn_reach_their_waiters_as_each_comes():
    """One decode giving a first part early, then the whole: a caller of the first key gets
    it while the second is still loading; nobody loads either again; a failure reaches the
    keys not given yet; keys cached or loading already are not taken over."""
    from concurrent.futures import ThreadPoolExecutor

    from storage.reconstruct import SlabCache
    cache, gate = SlabCache(1 << 20), threading.Event()

    def values():
        yield np.zeros(2)
        gate.wait(10)
        yield np.ones(3)

    def again():
        raise AssertionError("loaded again")
    with ThreadPoolExecutor(3) as pool:
        loading = pool.submit(cache.load_in_turn, ("a", "b"), values())
        first = pool.submit(cache.get, "a", again)
        assert first.result(5).tolist() == [0, 0] and not loading.done()
        second = pool.submit(cache.get, "b", again)
        gate.set()
        assert second.result(5).tolist() == [1, 1, 1] and loading.result(5) is True
    assert cache.load_in_turn(("b", "c"), iter([np.zeros(1)] * 2)) is False   # b is cached

    def broken():
        yield np.zeros(1)
        raise ValueError("damaged")
    with pytest.raises(ValueError):
        cache.load_in_turn(("d", "e"), broken())
    assert cache.peek("d").tolist() == [0] and cache.peek("e") is None
    assert cache.get("e", lambda: np.ones(1)).tolist() == [1]


def test_retrieval_works_when_the_cache_cannot_hold_a_slab(archive):
    series = make_series(10, 12, 10, seed=6)
    sent = _store_and_compact(archive, series)
    archive.reconstructor = Reconstructor(archive.index, archive.blobs, 100)   # nothing fits
    ordered, prefetch = archive.plan_retrieval(list(sent))
    for uid in ordered:
        assert archive.retrieve(uid).data == sent[uid]
    prefetch.thread.join(30)


def test_lone_store_commits_on_its_own_thread(archive, monkeypatch):
    """No hand-off to a writer thread: the receiving thread runs its own transaction."""
    from storage import ingest
    threads = []
    apply = ingest._apply

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return apply(*args, **kwargs)

    monkeypatch.setattr(ingest, "_apply", recording)
    ts, data = dataset_bytes(make_series(1, 8, 8)[0])
    assert archive.store(data, ts).outcome == "stored"
    assert threads == [threading.current_thread()]


def test_rows_waiting_behind_a_commit_share_the_next_one(archive, monkeypatch):
    """While one transaction is slow, the stores arriving meanwhile are committed together."""
    items = [dataset_bytes(ds) for ds in make_series(7, 8, 8)]
    connect, entered, release = archive.index.connect, threading.Event(), threading.Event()

    def slow_first(*args, **kwargs):
        if not entered.is_set():
            entered.set()
            release.wait(10)
        return connect(*args, **kwargs)

    monkeypatch.setattr(archive.index, "connect", slow_first)
    first = threading.Thread(target=archive.store, args=(items[0][1], items[0][0]))
    first.start()
    assert entered.wait(10)
    rest = [threading.Thread(target=archive.store, args=(data, ts)) for ts, data in items[1:]]
    for t in rest:
        t.start()
    deadline = time.monotonic() + 10
    while len(archive.stager._waiting) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in [first, *rest]:
        t.join()
    assert archive.stager.committed == 7
    assert archive.stager.batches == 2                  # the first, then the six that waited
    assert archive.stats()["instances"] == 7


def test_a_row_is_not_committed_before_its_file_is_durable(archive, monkeypatch):
    """The file's write fails after the row's statements ran: nothing is committed or left."""
    from storage.errors import StorageFullError
    sync_new = archive.blobs.sync_new

    def failing(new):
        sync_new(new)
        archive.blobs.delete(new.key)
        raise StorageFullError("disk gone")

    monkeypatch.setattr(archive.blobs, "sync_new", failing)
    ts, data = dataset_bytes(make_series(1, 8, 8)[0])
    with pytest.raises(StorageFullError):
        archive.store(data, ts)
    assert archive.stats()["instances"] == 0 and not list(archive.blobs.keys())


def test_put_new_writes_in_place_and_never_overwrites(tmp_path):
    from storage.blobstore import BlobStore, new_key
    blobs = BlobStore(tmp_path / "b")
    key, other = new_key("s"), "s-custom-zz"        # a fan-out folder that is not made upfront
    blobs.put_new(key, b"first")
    blobs.put_new(other, b"other")
    assert blobs.get(key) == b"first" and blobs.get(other) == b"other"
    with pytest.raises(FileExistsError):
        blobs.put_new(key, b"second")
    assert blobs.get(key) == b"first"
    assert not list(blobs.root.rglob("*.tmp"))


def test_decoders_are_warmed_only_when_compressed_volumes_are_stored(archive, monkeypatch):
    from models import parallel
    calls = []
    monkeypatch.setattr(parallel, "warm", lambda: calls.append(1))
    assert not archive.warm_decoders() and not calls
    series = make_series(9, 12, 10, seed=7)
    for ds in series:
        ts, data = dataset_bytes(ds)
        archive.store(data, ts)
    assert not archive.warm_decoders() and not calls       # staged only: nothing to decode
    assert archive.compact_series(series[0].SeriesInstanceUID)
    assert archive.warm_decoders() and calls == [1]


def test_relaxed_commits_skip_only_the_database_flush(archive):
    """``connect(durable=False)``: SQLite synchronous NORMAL for that transaction only;
    PostgreSQL always durable (a crash of its server must not lose what a running node
    acknowledged); both see the same rows."""
    sqlite = archive.index.engine.dialect.name == "sqlite"
    setting = "PRAGMA synchronous" if sqlite else "SHOW synchronous_commit"
    with archive.index.connect(durable=False) as conn:
        relaxed = conn.exec_driver_sql(setting).scalar()
    with archive.index.connect() as conn:
        durable = conn.exec_driver_sql(setting).scalar()
    assert (relaxed, durable) == ((1, 2) if sqlite else ("on", "on"))
    ts, data = dataset_bytes(make_series(1, 8, 8)[0])
    archive.store(data, ts)
    with archive.index.read() as s:
        assert s.scalar(select(func.count(Instance.id))) == 1


def test_warming_the_ingest_statements_leaves_no_rows(archive, monkeypatch):
    """Opening an archive runs the ingest statements in a transaction that is rolled back."""
    from storage import ingest
    from storage.index import Patient, Study
    calls = []
    apply = ingest._apply
    monkeypatch.setattr(ingest, "_apply", lambda *a, **k: calls.append(1) or apply(*a, **k))
    ingest.Stager(archive.index).close()
    assert calls == [1]
    with archive.index.read() as s:
        for table in (Patient, Study, Series, Instance):
            assert s.scalar(select(func.count()).select_from(table)) == 0


def test_a_multi_frame_instance_of_several_slabs_streams_through_the_workers(archive,
                                                                            monkeypatch):
    """An instance of 40 frames (5 slabs) that no retrieval plan covers is decoded by one
    parallel stream, not slab after slab, cached slab by slab for the next request, and given
    back exactly, its words copied once (not three times); a planned one waits for its
    plan."""
    import tracemalloc
    (ds,) = make_series(1, 256, 256, seed=11)
    frames = 40
    rng = np.random.default_rng(3)
    volume = (rng.integers(-30, 30, (frames, 256, 256)) + np.arange(frames)[:, None, None]
              ).astype(np.int16)
    ds.NumberOfFrames, ds.PixelData = frames, volume.tobytes()
    sent = _store_and_compact(archive, [ds])
    (uid,) = sent
    archive.reconstructor = Reconstructor(archive.index, archive.blobs, 16 << 20)  # cold cache
    calls, decode_slices, decode_stream = [], models.decode_slices, models.decode_stream
    monkeypatch.setattr(models, "decode_slices",
                        lambda *a, **k: calls.append(("slices", a[1:3])) or decode_slices(*a, **k))

    def stream(*args, **kwargs):
        calls.append(("stream", args[1:3]))
        yield from decode_stream(*args, **kwargs)
    monkeypatch.setattr(models, "decode_stream", stream)
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "1")
    tracemalloc.start()
    try:
        data = archive.retrieve(uid).data
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data == sent[uid] and calls == [("stream", (0, frames))]
    # 5.6x before (five one-slab decodes cached, joined, copied, joined again), 4.0x now, most
    # of it the decoder's working memory at this size
    assert peak < 4.8 * volume.nbytes
    assert archive.retrieve(uid).data == sent[uid] and len(calls) == 1     # from the cache
    archive.reconstructor = Reconstructor(archive.index, archive.blobs, 16 << 20)
    ordered, prefetch = archive.plan_retrieval([uid])
    assert archive.retrieve(uid).data == sent[uid]
    prefetch.thread.join(30)
    assert calls[1:] == [("stream", (0, frames))]         # the plan's stream, and only it
