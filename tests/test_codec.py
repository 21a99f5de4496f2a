"""The codec's promises: exact round trips, random access, determinism, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
from models import api
from models.container import CorruptBlobError

DTYPES = ["uint8", "int8", "uint16", "int16"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def phantom(shape, dtype, seed=0):
    """A smooth ellipsoid with noise and a constant padding ring, like a CT slab."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    info = np.iinfo(dtype)
    span = min(info.max - info.min, 3000)
    base = info.min + span * 0.3 + span * 0.4 * (x ** 2 + y ** 2 + 0.5 * z ** 2 < 0.6)
    vol = base + rng.normal(0, span * 0.01, shape)
    vol[:, (x[0] ** 2 + y[0] ** 2) > 0.95] = info.min
    return np.clip(np.round(vol), info.min, info.max).astype(dtype)


@st.composite
def volumes(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 11)), draw(st.integers(1, 13)), draw(st.integers(1, 13)))
    kind = draw(st.sampled_from(["noise", "constant", "extremes", "phantom"]))
    info = np.iinfo(dtype)
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    if kind == "noise":
        vol = rng.integers(info.min, info.max, shape, endpoint=True)
    elif kind == "constant":
        vol = np.full(shape, draw(st.sampled_from([info.min, info.max, 0, -1 if info.min else 1])))
    elif kind == "extremes":
        vol = rng.choice([info.min, info.max], shape)
    else:
        vol = phantom(shape, dtype, seed)
    return vol.astype(dtype)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(volumes(), st.integers(1, 5), st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_round_trip_is_exact(vol, slab, tile):
    blob = models.encode_volume(vol, slab=slab, tile=tile)
    out = models.decode_volume(blob)
    assert out.dtype == vol.dtype and out.shape == vol.shape
    np.testing.assert_array_equal(out, vol)


@settings(max_examples=25, deadline=None)
@given(volumes(), st.data())
def test_decode_slices_equals_full_decode(vol, data):
    blob = models.encode_volume(vol, slab=3)
    start = data.draw(st.integers(0, vol.shape[0] - 1))
    stop = data.draw(st.integers(start, vol.shape[0]))
    np.testing.assert_array_equal(models.decode_slices(blob, start, stop), vol[start:stop])


@settings(max_examples=25, deadline=None)
@given(volumes(), st.integers(1, 5), st.data())
def test_decode_slab_slices_equals_every_slabs_slice_of_the_full_decode(vol, slab, data):
    blob = models.encode_volume(vol, slab=slab)
    slab = models.blob_info(blob)["slab"]           # at most the volume's slices
    k = data.draw(st.integers(0, slab - 1))
    np.testing.assert_array_equal(models.decode_slab_slices(blob, k), vol[k::slab])


def test_decode_slab_slices_on_the_workers_and_refusing_a_slice_outside_the_slab():
    vol = phantom((40, 96, 96), "int16")
    blob = models.encode_volume(vol, slab=10)
    for k in (0, 9):
        np.testing.assert_array_equal(models.decode_slab_slices(blob, k), vol[k::10])
    with pytest.raises(ValueError):
        models.decode_slab_slices(blob, 10)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_decode_with_slab_slices_gives_a_slice_of_every_slab_then_the_volume(monkeypatch,
                                                                            workers):
    """One decode: slice k of every slab that has one, then the whole volume (on the workers
    the first part through shared memory), for any k, over column bands, with padding put
    back, a short last slab, and stream groups that k falls inside or at the end of."""
    monkeypatch.setattr(api, "PARALLEL_VOXELS", 1)
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", workers)
    vol = phantom((23, 20, 300), "int16", seed=41)
    vol[:, :3, :5] = -2000                              # padding: coded as a stand-in
    blob = models.encode_volume(vol, slab=5, max_group=2)
    assert (models.blob_info(blob)["bands"], models.blob_info(blob)["stream_group"]) == (2, 2)
    for k in (0, 1, 3, 4):
        point, whole = models.decode_with_slab_slices(blob, k)
        np.testing.assert_array_equal(point, vol[k::5])    # k = 3, 4: the last slab has none
        np.testing.assert_array_equal(whole, vol)
        assert point.dtype == whole.dtype == vol.dtype
    with pytest.raises(ValueError):
        next(models.decode_with_slab_slices(blob, 5))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(volumes(), st.integers(1, 4), st.tuples(st.integers(1, 9), st.integers(1, 9)),
       st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_sheared_decoder_equals_the_flat_reference(vol, slab, tile, wanted):
    """The fast decoder (neighbours as shifted windows of a sheared buffer, phantom and ghost
    rows) reads exactly what the plain gather from a padded slab reads."""
    from models.codec import decode_slabs, decode_slabs_flat, encode_slab
    from models.registry import load_model
    predictor = load_model("default")
    slab = min(slab, vol.shape[0])
    tile = (min(tile[0], vol.shape[1]), min(tile[1], vol.shape[2]))
    lo, hi = int(np.iinfo(vol.dtype).min), int(np.iinfo(vol.dtype).max)
    payload = encode_slab(predictor, vol[:slab], lo, hi, slab, tile)
    counts = [min(c, slab) for c in wanted]  # the same slab several times, any order of counts
    args = (predictor, [payload] * len(counts), counts, vol.shape[1], vol.shape[2], lo, hi,
            slab, tile)
    for fast, ref, c in zip(decode_slabs(*args), decode_slabs_flat(*args), counts):
        np.testing.assert_array_equal(fast, ref)
        np.testing.assert_array_equal(fast, vol[:c])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(volumes(), st.integers(1, 6), st.tuples(st.integers(1, 9), st.integers(1, 9)),
       st.integers(2, 6), st.lists(st.integers(1, 6), min_size=1, max_size=3),
       st.integers(0, 6))
def test_stream_groups_decode_from_any_first_slices(vol, slab, tile, group, wanted, split):
    """Format 6: slices sharing streams in groups decode exactly, whichever slices are wanted
    (a group decodes whole), with the first slices handed over early, on the sheared decoder
    (one tile, or several with ghost rows and phantoms) and on the flat reference."""
    from models.codec import _group_counts, decode_slabs, decode_slabs_flat, encode_slab
    from models.registry import load_model
    predictor = load_model("default")
    slab = min(slab, vol.shape[0])
    tile = (min(tile[0], vol.shape[1]), min(tile[1], vol.shape[2]))
    lo, hi = int(np.iinfo(vol.dtype).min), int(np.iinfo(vol.dtype).max)
    payload = encode_slab(predictor, vol[:slab], lo, hi, slab, tile, group=group)
    counts = [min(c, slab) for c in wanted]
    args = (predictor, [payload] * len(counts), counts, vol.shape[1], vol.shape[2], lo, hi,
            slab, tile)
    handed = []
    split = min(split, min(counts))
    parts = decode_slabs(*args, split=split, on_split=handed.append, group=group)
    for part, c in zip(parts, counts):
        np.testing.assert_array_equal(part, vol[:c])
    if split:
        assert len(handed) == 1
        for h in handed[0]:
            np.testing.assert_array_equal(h, vol[:split])
    whole = _group_counts(args[1], counts, group, slab)
    for ref, c in zip(decode_slabs_flat(*args[:2], whole, *args[3:], group=group), whole):
        np.testing.assert_array_equal(ref, vol[:c])


def test_a_slab_claiming_more_slices_than_the_slab_size_is_refused():
    """A payload whose slice count passes the slab size (a crafted blob: its CRC would match)
    is refused, not read past the decoder's buffer."""
    import struct

    from models.codec import decode_slabs, encode_slab
    from models.registry import load_model
    predictor = load_model("default")
    vol = phantom((5, 12, 12), "uint16", seed=42)
    payload = encode_slab(predictor, vol, 0, 65535, 5, (12, 12), group=2)
    forged = struct.pack("<I", 6) + payload[4:]      # three groups either way: the same table
    with pytest.raises(CorruptBlobError):
        decode_slabs(predictor, [forged], [5], 12, 12, 0, 65535, 5, (12, 12), group=2)


def test_stream_groups_are_for_small_slices_and_fill_a_slab():
    from models.api import stream_group
    sizes = {(ny, band, slab): stream_group(ny, band, slab) for ny, band, slab in
             [(64, 64, 8), (128, 128, 8), (128, 128, 3), (96, 96, 20), (129, 129, 8),
              (256, 256, 8), (512, 256, 8), (1, 1, 1)]}
    assert sizes == {(64, 64, 8): 8, (128, 128, 8): 8, (128, 128, 3): 3, (96, 96, 20): 14,
                     (129, 129, 8): 1, (256, 256, 8): 1, (512, 256, 8): 1, (1, 1, 1): 1}


def test_stream_groups_cut_the_range_decoder_calls(monkeypatch):
    """What groups are for: a step decodes a group's slices in one call per stream, not one
    per slice. The symbols and their probabilities are the same, so the payload is no larger
    (fewer streams to flush)."""
    from models import entropy
    from models.codec import decode_slabs, encode_slab
    from models.registry import load_model
    predictor = load_model("default")
    vol = phantom((8, 24, 24), "uint16", seed=40)
    calls = []
    real = entropy._segment_parts

    def counted(decoders, streams, bounds, *rest, **kw):
        parts = real(decoders, streams, bounds, *rest, **kw)
        calls.append(len(parts))
        return parts

    monkeypatch.setattr(entropy, "_segment_parts", counted)
    made = {}
    for group in (1, 4):
        payload = encode_slab(predictor, vol, 0, 65535, 8, (24, 24), group=group)
        calls.clear()
        (back,) = decode_slabs(predictor, [payload], [8], 24, 24, 0, 65535, 8, (24, 24),
                               group=group)
        np.testing.assert_array_equal(back, vol)
        made[group] = sum(calls), len(payload)
    assert made[4][0] * 2 < made[1][0]        # 514 against 1478 calls when written
    assert made[4][1] < made[1][1]


def test_phantom_compresses_and_round_trips():
    vol = phantom((12, 64, 80), "int16")
    blob = models.encode_volume(vol)
    np.testing.assert_array_equal(models.decode_volume(blob), vol)
    assert len(blob) < vol.nbytes / 2
    info = models.blob_info(blob)
    assert info["shape"] == vol.shape and info["dtype"] == "int16" and info["model"] == "default"


def test_full_range_16_bit_values_round_trip():
    rng = np.random.default_rng(7)
    for dtype in ("uint16", "int16"):
        info = np.iinfo(dtype)
        vol = rng.integers(info.min, info.max, (3, 17, 19), endpoint=True).astype(dtype)
        vol[0, 0, :4] = [info.min, info.max, info.min, info.max]
        np.testing.assert_array_equal(models.decode_volume(models.encode_volume(vol)), vol)


def test_lockstep_width_does_not_change_the_result(monkeypatch):
    vol = phantom((10, 23, 31), "uint16", seed=3)
    blob = models.encode_volume(vol, slab=2)
    expected = models.decode_volume(blob)
    monkeypatch.setattr(api, "LOCKSTEP_VOXELS", 1)           # one slab per job
    np.testing.assert_array_equal(models.decode_volume(blob), expected)
    monkeypatch.setattr(api, "LOCKSTEP_VOXELS", 3 * 2 * 23 * 31)  # three
    np.testing.assert_array_equal(models.decode_volume(blob), expected)
    np.testing.assert_array_equal(expected, vol)


_CHILD = """
import sys, hashlib, numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
import models
blob = open(sys.argv[2], 'rb').read()
print(hashlib.sha256(models.decode_volume(blob).tobytes()).hexdigest())
"""


def test_decoding_in_other_processes_and_thread_counts_is_identical(tmp_path):
    """Other processes, thread counts and compute devices (the CPU, and the GPU by default
    where there is one) decode the same volume."""
    vol = phantom((9, 40, 44), "int16", seed=5)
    path = tmp_path / "v.vxa"
    path.write_bytes(models.encode_volume(vol))
    import hashlib
    want = hashlib.sha256(vol.tobytes()).hexdigest()
    search = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    for threads, device in (("1", "auto"), ("2", "auto"), ("2", "cpu")):
        env = dict(os.environ, PYTHONPATH=search, OMP_WAIT_POLICY="PASSIVE",
                   VOXARC_DEVICE=device)
        out = subprocess.run([sys.executable, "-c", _CHILD, threads, str(path)], env=env,
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want


def test_unsupported_input_is_refused():
    with pytest.raises(ValueError):
        models.encode_volume(np.zeros((2, 2), np.uint16))
    with pytest.raises(ValueError):
        models.encode_volume(np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError):
        models.encode_volume(np.zeros((0, 2, 2), np.uint16))
    with pytest.raises(KeyError, match="known models"):
        models.encode_volume(np.zeros((1, 2, 2), np.uint16), model="no-such-model")


# ---------------------------------------------------------------- corruption
@pytest.fixture(scope="module")
def blob():
    return models.encode_volume(phantom((6, 24, 20), "uint16", seed=11), slab=2)


def test_wrong_magic_is_refused(blob):
    with pytest.raises(CorruptBlobError, match="magic"):
        models.decode_volume(b"NOTVOXAR" + blob[8:])
    with pytest.raises(CorruptBlobError):
        models.decode_volume(b"")


def test_every_truncation_is_refused(blob):
    for cut in range(0, len(blob), max(1, len(blob) // 150)):
        with pytest.raises(CorruptBlobError):
            models.decode_volume(blob[:cut])


def test_trailing_garbage_is_refused(blob):
    with pytest.raises(CorruptBlobError):
        models.decode_volume(blob + b"\0")


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_flipped_bits_are_refused(blob, data):
    pos = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(blob)
    bad[pos] ^= 1 << bit
    with pytest.raises(CorruptBlobError):
        models.decode_volume(bytes(bad))


def test_unknown_model_id_is_refused(blob):
    from models.container import unpack_header, pack, slab_payload
    header, base = unpack_header(blob)
    payloads = [slab_payload(blob, header, base, i) for i in range(len(header.slab_table))]
    foreign = pack(b"\x01" * 16, "elsewhere", header.dtype, header.shape, header.slab,
                   header.tile, payloads)
    with pytest.raises(CorruptBlobError, match="lacks"):
        models.decode_volume(foreign)


def test_worker_processes_give_the_same_blob_and_volume(monkeypatch):
    vol = phantom((20, 48, 40), "int16", seed=9)
    monkeypatch.setattr(api, "PARALLEL_VOXELS", 1)
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "1")
    single = models.encode_volume(vol, slab=4)
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    assert models.encode_volume(vol, slab=4) == single
    np.testing.assert_array_equal(models.decode_volume(single), vol)
    np.testing.assert_array_equal(models.decode_slices(single, 3, 17), vol[3:17])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_decode_stream_pieces_are_ordered_slices_of_the_volume(monkeypatch, workers):
    vol = phantom((23, 20, 16), "uint16", seed=4)
    blob = models.encode_volume(vol, slab=2)
    monkeypatch.setattr(api, "PARALLEL_VOXELS", 1)
    monkeypatch.setattr(api, "LOCKSTEP_VOXELS", 8 * 2 * 20 * 16)     # groups may grow to 8 slabs
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", workers)
    for start, stop in [(0, 23), (3, 22), (5, 6), (22, 23), (7, 7)]:
        pieces = list(models.decode_stream(blob, start, stop))
        assert [z for z, _ in pieces] == sorted({z for z, _ in pieces})
        assert all(p.dtype == vol.dtype and len(p) for _, p in pieces)
        if stop - start > 8:     # the first slab alone, then larger lockstep groups
            assert len(pieces[0][1]) == 2 - start % 2
            assert max(len(p) for _, p in pieces) > 2
        if (start, stop) == (0, 23) and workers == "2":
            # 12 slabs: the first alone, the other 11 (21 slices) in two groups balanced by
            # slices, the last of them halved
            assert [len(p) for _, p in pieces] == [2, 10, 6, 5]
        if (start, stop) == (0, 23) and workers == "1":
            # decoded here, groups grow: 1, 2, 4 slabs, then the last 5 (9 slices) in two
            assert [len(p) for _, p in pieces] == [2, 4, 8, 4, 5]
        got = np.concatenate([p for _, p in pieces]) if pieces else vol[:0]
        np.testing.assert_array_equal(got, vol[start:stop])
        z = start
        for z0, p in pieces:
            assert z0 == z
            z += len(p)


def test_stream_groups_start_with_one_slab_and_halve_the_last_group():
    left = [(i, 8) for i in range(12)] + [(12, 4)]          # 100 slices
    groups = api._stream_groups(left, 2, 4, 2)
    assert sum(groups, []) == left
    assert groups[0] == [(0, 8)]
    assert [len(g) for g in groups] == [1, 6, 3, 3]         # slabs 1-12 as _lockstep_groups
    assert api._stream_groups(left[:1], 2, 4, 2) == [left[:1]]
    assert api._stream_groups(left[:2], 2, 4, 2) == [left[:1], left[1:2]]
    # decoded in this process they grow from one slab, its memory a few slabs at most
    assert [len(g) for g in api._stream_groups(left, 1, 4, 2)] == [1, 2, 4, 3, 3]


def test_slab_groups_share_slices_evenly_between_workers():
    # 100 slices in slabs of 8: 48 and 52 slices (consecutive halves by count gave 56 and 44)
    assert api._lockstep_groups(list(range(13)), [8] * 12 + [4], 2, 8) == \
        [list(range(6)), list(range(6, 13))]
    groups = api._lockstep_groups(list(range(40)), [8] * 40, 2, 8)
    assert sum(groups, []) == list(range(40)) and len(groups) % 2 == 0
    assert max(map(len, groups)) <= 8 and min(map(len, groups)) >= 4


@given(st.lists(st.integers(1, 9), min_size=1, max_size=40), st.integers(1, 8))
def test_balanced_runs_cut_in_order_near_each_share(weights, runs):
    items = list(range(len(weights)))
    groups = api.balanced_runs(items, weights, runs)
    assert sum(groups, []) == items and all(groups) and len(groups) <= runs
    if len(set(weights)) == 1 and len(items) >= runs:      # equal weights: sizes differ by <= 1
        assert len(groups) == runs and max(map(len, groups)) - min(map(len, groups)) <= 1


def test_smaller_volumes_go_to_worker_processes_once_they_run(monkeypatch):
    from models import parallel
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    parallel.shutdown()
    assert not api._parallel(api.WARM_PARALLEL_VOXELS) and api._parallel(api.PARALLEL_VOXELS)
    parallel.pool()
    assert api._parallel(api.WARM_PARALLEL_VOXELS)
    assert not api._parallel(api.WARM_PARALLEL_VOXELS - 1)
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "1")
    assert not parallel.running() and not api._parallel(api.PARALLEL_VOXELS - 1)


def test_small_volumes_of_several_jobs_code_on_running_workers_one_job_here(monkeypatch):
    from models import parallel
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    parallel.pool()
    rng = np.random.default_rng(3)
    several = rng.integers(0, 900, (24, 64, 64)).astype(np.uint16)   # 3 slabs, 98 k voxels
    one = rng.integers(0, 900, (8, 96, 96)).astype(np.uint16)        # one slab, one band
    for v in (several, one):
        assert api.SMALL_PARALLEL_VOXELS <= v.size < api.WARM_PARALLEL_VOXELS
    jobs = []
    real = parallel.imap
    monkeypatch.setattr(parallel, "imap", lambda fn, it, **kw: real(fn, _counted(it, jobs), **kw))
    blobs = [models.encode_volume(several, adapt=False)]
    assert len(jobs) == 3                                              # a job per slab
    jobs.clear()
    blobs.append(models.encode_volume(one, adapt=False))
    assert jobs == []
    assert np.array_equal(models.decode_volume(blobs[0]), several)
    assert len(jobs) >= 2
    jobs.clear()
    assert np.array_equal(models.decode_volume(blobs[1]), one)
    assert jobs == []


def _counted(iterable, seen: list):
    for item in iterable:
        seen.append(item)
        yield item


def test_warm_returns_once_every_worker_process_is_ready(monkeypatch):
    from models import parallel
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    parallel.shutdown()                  # a fresh pool: its workers start while warm() runs
    pids = parallel.warm()
    assert len(pids) == 2 and os.getpid() not in pids


def test_parallel_imap_keeps_order_and_a_bounded_window(monkeypatch):
    from models import parallel
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    jobs = list(range(9))
    got = parallel.imap(abs, [-j for j in jobs], window=3)
    assert next(got) == 0
    assert list(got) == jobs[1:]
    closed = parallel.imap(abs, [-j for j in jobs], window=2)
    assert next(closed) == 0
    closed.close()                       # a consumer that stops early cancels the rest


def test_a_new_streams_first_job_goes_before_an_older_streams_later_ones(monkeypatch):
    """Two retrievals at once: the second one's first slab is decoded as soon as a worker is
    free, not after every job the first had queued."""
    import time

    from models import parallel
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    parallel.warm()
    done = {}

    def stamp(name):
        return lambda future: done.setdefault(name, time.monotonic())
    older = [parallel.submit(time.sleep, 0.3, rank) for rank in range(8)]
    for k, future in enumerate(older):
        future.add_done_callback(stamp(f"older {k}"))
    time.sleep(0.1)
    newer = parallel.submit(time.sleep, 0.3, 0)
    newer.add_done_callback(stamp("newer"))
    newer.result()
    for future in older:
        future.result()
    assert done["newer"] < done["older 3"], done
    with_rank = sorted(done, key=done.get)
    assert with_rank.index("newer") <= 3, with_rank


def test_encoding_jobs_wait_behind_any_retrievals(monkeypatch):
    from models import parallel
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    ranks, imap = [], parallel.imap

    def recording(fn, jobs, window=4, first_rank=0):
        ranks.append(first_rank)
        return imap(fn, jobs, window, first_rank)
    monkeypatch.setattr(parallel, "imap", recording)
    monkeypatch.setattr(api, "_parallel", lambda voxels, warm=None: True)
    vol = phantom((16, 24, 24), "int16", seed=23)
    blob = models.encode_volume(vol, slab=4, adapt=False)
    assert ranks[0] == parallel.BACKGROUND
    np.testing.assert_array_equal(models.decode_volume(blob), vol)
    assert ranks[1:] and all(r < parallel.BACKGROUND for r in ranks[1:])


def test_jobs_waiting_for_a_worker_fail_when_the_pool_shuts_down(monkeypatch):
    """None of them is left waiting for a worker that will never come."""
    import time
    from concurrent.futures.process import BrokenProcessPool

    from models import parallel
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    parallel.warm()
    futures = [parallel.submit(time.sleep, 0.3, rank) for rank in range(6)]
    parallel.shutdown()
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result(timeout=20))
        except BrokenProcessPool:
            outcomes.append("failed")
    assert outcomes.count("failed") >= 4          # the two running may finish
    parallel.warm()                               # a fresh pool for the tests after this one


def test_adapted_model_travels_in_the_blob_and_decodes_exactly(monkeypatch):
    from models import adapt
    monkeypatch.setattr(adapt, "ADAPT_STEPS", (5, 5))
    monkeypatch.setattr(adapt, "pays_off", lambda *args: True)
    vol = phantom((10, 40, 48), "int16", seed=13)
    blob = models.encode_volume(vol, adapt=True)
    plain = models.encode_volume(vol, adapt=False)
    assert blob != plain
    from models.container import unpack_header
    header = unpack_header(blob)[0]
    assert header.embedded and not unpack_header(plain)[0].embedded
    np.testing.assert_array_equal(models.decode_volume(blob), vol)
    np.testing.assert_array_equal(models.decode_slices(blob, 4, 7), vol[4:7])
    # its network has 10-bit weights (the shipped one's are 8-bit), which only the kernels'
    # integer layers or float64 compute exactly: the same voxels without the kernels
    from models.registry import load_model
    net = adapt.with_embedded(load_model("default"), header.embedded).net
    assert max(np.abs(layer.weight).max() for layer in net.layers) == adapt.ADAPT_WEIGHT_MAX
    assert not net.is_default and net.integer_exact
    monkeypatch.setenv("VOXARC_KERNELS", "numpy")
    np.testing.assert_array_equal(models.decode_slices(blob, 0, 10), vol)


def test_adaptation_that_does_not_pay_is_left_out(monkeypatch):
    """On a volume this small the embedded model costs more than it can save."""
    from models import adapt
    monkeypatch.setattr(adapt, "ADAPT_STEPS", (5, 5))
    vol = phantom((10, 40, 48), "int16", seed=13)
    assert models.encode_volume(vol, adapt=True) == models.encode_volume(vol, adapt=False)


@pytest.mark.parametrize("shorter_is_better", [True, False])
def test_adaptation_keeps_the_checkpoint_that_codes_the_held_out_voxels_best(
        monkeypatch, shorter_is_better):
    """A long fine-tuning run can fit its sample of slabs too closely: the state at
    ADAPT_CHECKPOINT steps is kept when it does better on the held-out check sample, and only
    the kept state is quantised."""
    import torch

    from models import adapt
    from models.registry import load_model
    monkeypatch.setattr(adapt, "ADAPT_STEPS", (6, 12))
    monkeypatch.setattr(adapt, "ADAPT_CHECKPOINT", 4)
    monkeypatch.setattr(adapt, "TUNE_RUNS", 1)
    monkeypatch.setattr(adapt, "pays_off", lambda *args: True)
    monkeypatch.setenv("VOXARC_TUNE_WORKERS", "0")     # the patches live in this process
    states, quantised = [], []
    original = adapt._fine_tune

    def tune(model, samples, seed, steps, stops, *rest):
        assert (steps, stops) == (6, [4, 6])
        for _ in original(model, samples, seed, steps, stops, *rest):
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            yield
    monkeypatch.setattr(adapt, "_fine_tune", tune)
    scores = iter([1.0, 2.0] if shorter_is_better else [2.0, 1.0])
    monkeypatch.setattr(adapt, "_float_bits", lambda model, samples: next(scores))
    real = adapt._quantised
    monkeypatch.setattr(adapt, "_quantised",
                        lambda model, *a: quantised.append(model.state_dict()) or real(model, *a))
    assert adapt.adapt(load_model("default"), phantom((10, 40, 48), "int16", seed=13), 8,
                       (64, 256)) is not None
    assert len(states) == 2 and len(quantised) == 1
    kept = states[0 if shorter_is_better else 1]
    assert all(torch.equal(quantised[0][k], v) for k, v in kept.items())
    assert not all(torch.equal(states[0][k], v) for k, v in states[1].items())


def test_checkpoints_tie_to_the_longer_run(monkeypatch):
    import torch

    from models import adapt, train
    from models.registry import load_model
    predictor = load_model("default")
    samples = _tuning_samples(predictor)
    monkeypatch.setattr(adapt, "_float_bits", lambda model, s: 1.0)
    longer = adapt.tuned(train.float_model(predictor), samples, samples, 0, 6, [4, 6])
    alone = adapt.tuned(train.float_model(predictor), samples, samples, 0, 6, [6])
    assert all(torch.equal(v, alone.state_dict()[k]) for k, v in longer.state_dict().items())


def _tuning_samples(predictor, seed=13):
    from models import train
    vol = phantom((10, 40, 48), "int16", seed=seed)
    return train.collect_samples([vol], 8, 2, 1.0, np.random.default_rng(0), tile=(64, 256),
                                 hood=predictor.neighbourhood)


@pytest.mark.parametrize("steps, stops", [(3, [1, 2, 3]), (8, [4, 8])])
def test_fine_tuning_yields_the_moving_average_of_its_weights(monkeypatch, steps, stops):
    """At each stop the fine-tuning hands over a twin holding the exponential moving average
    of the weights, starting from the weights it began with, updated every AVERAGE_EVERY
    steps and at every stop by the decay's power of the steps since the last update."""
    import torch

    from models import adapt, train
    from models.registry import load_model
    monkeypatch.setattr(adapt, "AVERAGE_EVERY", 4)
    predictor = load_model("default")
    samples = _tuning_samples(predictor)
    settings = adapt.default_settings()._replace(average=0.75)
    model = train.float_model(predictor)
    expected = [p.detach().clone() for p in model.parameters()]
    twins, last = [], 0
    for done, twin in zip(stops, adapt._fine_tune(model, samples, 0, steps, stops, settings)):
        keep = 0.75 ** (done - last)
        expected = [keep * e + (1 - keep) * p.detach()
                    for e, p in zip(expected, model.parameters())]
        twins.append([p.detach().clone() for p in twin.parameters()])
        last = done
    assert len(twins) == len(stops)
    for got, want, now in zip(twins[-1], expected, model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(got, now) for got, now in zip(twins[-1], model.parameters()))


@pytest.mark.parametrize("average_is_better", [True, False])
def test_fine_tuning_keeps_the_average_when_it_codes_the_check_sample_best(
        monkeypatch, average_is_better):
    import torch

    from models import adapt, train
    from models.registry import load_model
    predictor = load_model("default")
    samples = _tuning_samples(predictor)
    real = adapt._fine_tune
    seen = {}

    def tune(model, *args):
        for average in real(model, *args):
            seen.update(average=average, states={
                "weights": {k: v.clone() for k, v in model.state_dict().items()},
                "average": {k: v.clone() for k, v in average.state_dict().items()}})
            yield average
    monkeypatch.setattr(adapt, "_fine_tune", tune)
    monkeypatch.setattr(adapt, "_float_bits", lambda m, s: 1.0 if (
        m is seen["average"]) == average_is_better else 2.0)
    kept = adapt.tuned(train.float_model(predictor), samples, samples, 0, 4, [4]).state_dict()
    want = seen["states"]["average" if average_is_better else "weights"]
    other = seen["states"]["weights" if average_is_better else "average"]
    assert all(torch.equal(v, want[k]) for k, v in kept.items())
    assert not all(torch.equal(v, other[k]) for k, v in kept.items())


def test_adaptation_is_tried_by_default_from_a_million_voxels(monkeypatch):
    """A 96 x 128 x 128 MR (1.5 M voxels) is adapted by default: measured 2.8% to 6.3% fewer
    bits on the three Siemens test MRs; smaller volumes are not tried (it rarely pays there)."""
    from models import adapt, api
    tried = []
    monkeypatch.setattr(adapt, "adapt", lambda predictor, vol, *a, **k: tried.append(vol.size))
    small, large = np.zeros((4, 16, 16), np.uint16), np.zeros((64, 128, 128), np.uint16)
    for vol in (small, large):
        np.testing.assert_array_equal(models.decode_volume(models.encode_volume(vol)), vol)
    assert tried == [large.size]
    assert small.size < api.ADAPT_VOXELS <= 96 * 128 * 128


def test_embedded_model_is_stored_in_narrow_integers():
    from models import adapt
    from models.registry import load_model
    base = load_model("default")
    data = adapt.embedded_bytes(base)
    restored = adapt.with_embedded(base, data)
    inputs = np.eye(base.net.layers[0].weight.shape[1], dtype=np.int64) * 100
    assert restored.net.reference(inputs).tolist() == base.net.reference(inputs).tolist()
    assert restored.neighbourhood == base.neighbourhood
    np.testing.assert_array_equal(restored.tables.tokens, base.tables.tokens)
    import io
    arrays = adapt.embedded_arrays(data)
    assert arrays["token_table"].dtype.itemsize <= 2 and arrays["net_w0"].dtype.itemsize <= 2
    assert arrays["net_b0"].dtype.itemsize <= 4     # 10-bit weights' biases pass int16
    from models import array_pack
    assert len(data) < len(array_pack.pack_arrays({k: v.astype(np.int64)
                                                   for k, v in arrays.items()}))
    npz = io.BytesIO()           # the form of blobs written before 2026-12-03
    np.savez_compressed(npz, **arrays)
    assert len(data) < 0.8 * len(npz.getvalue())
    np.testing.assert_array_equal(adapt.with_embedded(base, npz.getvalue()).net.reference(inputs),
                                  restored.net.reference(inputs))


def test_unreadable_embedded_model_is_refused():
    from models import adapt
    from models.registry import load_model
    with pytest.raises(CorruptBlobError, match="adapted model"):
        adapt.with_embedded(load_model("default"), b"PK\x03\x04 not a zip")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_decode_stream_head_piece_comes_first_and_nothing_twice(monkeypatch, workers):
    vol = phantom((21, 12, 10), "uint16", seed=8)
    blob = models.encode_volume(vol, slab=4)
    monkeypatch.setattr(api, "PARALLEL_VOXELS", 1)
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", workers)
    for start, stop, head, want in [(0, 21, 1, 1), (3, 17, 5, 1), (8, 21, 2, 2), (4, 6, 3, 2)]:
        pieces = list(models.decode_stream(blob, start, stop, head=head))
        z0, first = pieces[0]
        assert z0 == start and len(first) == want
        np.testing.assert_array_equal(first, vol[start:start + want])
        z = start
        for z0, p in pieces:            # in order, each slice once
            assert z0 == z and len(p)
            z += len(p)
        np.testing.assert_array_equal(np.concatenate([p for _, p in pieces]), vol[start:stop])


def test_decode_slabs_hands_over_the_first_slices_before_the_rest():
    from models.codec import decode_slabs, encode_slab
    from models.registry import load_model
    vol = phantom((8, 40, 300), "int16", seed=9)
    predictor, tile = load_model("default"), (40, 256)   # two tiles per row, in one stream
    payloads = [encode_slab(predictor, vol[z:z + 4], -32768, 32767, 4, tile) for z in (0, 4)]
    handed = []
    args = (predictor, payloads, [4, 3], 40, 300, -32768, 32767, 4, tile)
    parts = decode_slabs(*args, split=2, on_split=handed.append)
    assert len(handed) == 1 and [len(h) for h in handed[0]] == [2, 2]
    for g, h in enumerate(handed[0]):
        np.testing.assert_array_equal(h, vol[4 * g:4 * g + 2])
    np.testing.assert_array_equal(parts[0], vol[:4])
    np.testing.assert_array_equal(parts[1], vol[4:7])
    for got, plain in zip(parts, decode_slabs(*args)):
        np.testing.assert_array_equal(got, plain)


def test_a_model_file_carries_its_neighbourhood():
    """The shipped model reads 26 neighbours (the wide neighbourhood, stored in its file); the
    model it replaced has none stored and reads the 19 of the default neighbourhood."""
    from models.features import DEFAULT_NEIGHBOURHOOD, WIDE_NEIGHBOURHOOD
    from models.predictor import DefaultPredictor, model_id
    from models.registry import load_model, model_by_id
    shipped = load_model("default")
    assert shipped.neighbourhood == WIDE_NEIGHBOURHOOD
    arrays = shipped.to_arrays()
    again = DefaultPredictor.from_arrays("copy", arrays)
    assert again.neighbourhood == WIDE_NEIGHBOURHOOD and model_id(again.to_arrays()) == model_id(arrays)
    old = model_by_id(bytes.fromhex("a9fe0de846cdc05d39d4fdf05c5a357f"))
    assert old.neighbourhood == DEFAULT_NEIGHBOURHOOD and "offsets" not in old.to_arrays()
    with pytest.raises(ValueError, match="inputs"):
        DefaultPredictor("mismatch", old.net, old.head, old.tables, neighbourhood=WIDE_NEIGHBOURHOOD)
    bad = dict(arrays, offsets=arrays["offsets"][::-1])
    with pytest.raises(ValueError, match="start with"):
        DefaultPredictor.from_arrays("reordered", bad)


def test_codec_runs_its_network_on_one_thread_and_restores_the_setting(monkeypatch):
    import torch
    from models import codec, parallel
    seen = []
    original = codec.encode_slab, api.decode_slabs

    def encode_slab(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original[0](*args, **kwargs)

    def decode_slabs(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original[1](*args, **kwargs)

    monkeypatch.setattr(api, "encode_slab", encode_slab)
    monkeypatch.setattr(api, "decode_slabs", decode_slabs)
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "1")      # everything in this process
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vol = phantom((3, 20, 24), "int16", seed=21)
        blob = models.encode_volume(vol, slab=2)
        np.testing.assert_array_equal(models.decode_slices(blob, 1, 3), vol[1:3])
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        with parallel.one_thread():
            with parallel.one_thread():
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_parallel_imap_takes_jobs_only_as_it_submits_them(monkeypatch):
    from models import parallel
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    taken = []

    def jobs():
        for j in range(12):
            taken.append(j)
            yield -j

    got = parallel.imap(abs, jobs(), window=3)
    assert next(got) == 0 and len(taken) <= 4
    assert list(got) == list(range(1, 12))


def test_decoding_on_workers_holds_a_few_groups_beside_the_output(monkeypatch):
    """The worker processes' results are written into the output as they come, so a long
    volume's decode does not hold a second copy of it (issue: 2,000+ slices in a few slabs of
    working memory)."""
    import tracemalloc
    from models import parallel
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    monkeypatch.setattr(api, "LOCKSTEP_VOXELS", 8 * 48 * 48)   # jobs of 8 one-slice slabs
    vol = phantom((256, 48, 48), "int16", seed=21)
    blob = models.encode_volume(vol, slab=1, adapt=False)     # 32 groups of 8 one-slice slabs
    parallel.warm()
    tracemalloc.start()
    try:
        out = models.decode_volume(blob)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out, vol)
    assert peak < 1.5 * vol.nbytes, f"peak {peak} bytes for a {vol.nbytes}-byte volume"


def test_encoding_on_workers_holds_the_blob_once(monkeypatch):
    """Slab payloads go into the blob as the worker processes return them, so assembling a
    long volume's blob does not hold every payload and the blob at once."""
    import tracemalloc
    from models import parallel
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    vol = phantom((256, 48, 48), "int16", seed=22)
    parallel.warm()
    models.encode_volume(vol[:4], slab=1, adapt=False)        # the model loaded beforehand
    tracemalloc.start()
    try:
        blob = models.encode_volume(vol, slab=1, adapt=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(models.decode_volume(blob), vol)
    assert peak < 1.6 * len(blob), f"peak {peak} bytes for a {len(blob)}-byte blob"


def test_pack_takes_payloads_as_a_list_or_as_they_come():
    from models.container import pack, slab_payload, unpack_header
    payloads = [b"first slab", b"", b"third" * 99]
    args = (b"\x02" * 16, "m", "uint16", (5, 3, 4), 2, (3, 4))
    blob = pack(*args, payloads)
    assert pack(*args, iter(payloads)) == blob
    header, base = unpack_header(blob)
    assert [bytes(slab_payload(blob, header, base, i)) for i in range(3)] == payloads
    with pytest.raises(ValueError, match="2 payloads for 3 slab bands"):
        pack(*args, iter(payloads[:2]))


def test_pack_keeps_a_payload_per_band_of_every_slab():
    from models.container import pack, slab_payload, unpack_header
    args = (b"\x02" * 16, "m", "uint16", (5, 3, 9), 2, (3, 4))    # bands 0-4, 4-8, 8-9
    payloads = [f"slab {i} band {b}".encode() for i in range(3) for b in range(3)]
    header, base = unpack_header(pack(*args, payloads))
    assert header.bands == [(0, 4), (4, 8), (8, 9)] and header.slabs == 3
    assert slab_payload(pack(*args, payloads), header, base, 2, 1) == b"slab 2 band 1"
    with pytest.raises(ValueError, match="3 payloads for 9 slab bands"):
        pack(*args, payloads[:3])


def test_parallel_imap_finishes_in_this_process_when_the_pool_breaks(monkeypatch):
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool
    from models import parallel
    monkeypatch.setattr(parallel, "_BROKEN", False)
    monkeypatch.setattr(parallel, "shutdown", lambda: None)
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    submitted = []

    def submit(fn, job, rank=0):      # the pool answers the first two jobs, then breaks
        if parallel._BROKEN:
            return None
        future = Future()
        if len(submitted) < 2:
            future.set_result(fn(job))
        else:
            future.set_exception(BrokenProcessPool("a worker died"))
        submitted.append(job)
        return future

    monkeypatch.setattr(parallel, "submit", submit)
    assert list(parallel.imap(abs, (-j for j in range(10)), window=3)) == list(range(10))
    assert parallel._BROKEN and len(submitted) == 5   # three, then one after each good result


def test_adaptation_fine_tunes_on_one_torch_thread(monkeypatch):
    """A second intra-op thread made the steps no faster; the other core stays free."""
    import torch

    from models import adapt
    from models.registry import load_model
    monkeypatch.setattr(adapt, "ADAPT_STEPS", (3, 3))
    monkeypatch.setenv("VOXARC_TUNE_WORKERS", "0")     # threads: see the worker test below
    seen = []
    real = adapt._fine_tune

    def tune(*args):
        for _ in real(*args):
            seen.append(torch.get_num_threads())
            yield
    monkeypatch.setattr(adapt, "_fine_tune", tune)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        adapt.adapt(load_model("default"), phantom((10, 40, 48), "int16", seed=13), 8, (64, 256))
        assert seen == [1] * adapt.TUNE_RUNS and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("lose", [0, 1])
def test_adaptation_keeps_the_better_of_its_side_by_side_runs(monkeypatch, lose):
    """Two fine-tuning runs with their own batch orders; the check sample picks between them."""
    from models import adapt
    from models.registry import load_model
    monkeypatch.setattr(adapt, "ADAPT_STEPS", (5, 5))
    monkeypatch.setattr(adapt, "TUNE_RUNS", 2)
    monkeypatch.setattr(adapt, "pays_off", lambda *args: True)
    monkeypatch.setattr(adapt, "_table_variants", lambda adapted, base: iter([adapted]))
    monkeypatch.setenv("VOXARC_TUNE_WORKERS", "0")
    made = {}
    real_tune, real_quantised = adapt._fine_tune, adapt._quantised

    def tune(model, samples, seed, steps, stops, *rest):
        for _ in real_tune(model, samples, seed, steps, stops, *rest):
            made[seed] = model
            yield

    def quantised(model, *args):
        net = real_quantised(model, *args)
        net.seed = next(s for s, m in made.items() if m is model)
        return net
    monkeypatch.setattr(adapt, "_fine_tune", tune)
    monkeypatch.setattr(adapt, "_quantised", quantised)
    nets = []
    monkeypatch.setattr(adapt, "check_bits",
                        lambda p, r, j: nets.append(p) or (2.0 if p.seed == 7 + lose else 1.0))
    best = adapt.adapt(load_model("default"), phantom((10, 40, 48), "int16", seed=13), 8,
                       (64, 256), seed=7)
    assert sorted(made) == [7, 8] and sorted(n.seed for n in nets) == [7, 8]
    assert best.seed == 8 - lose
    assert not np.array_equal(nets[0].net.layers[0].weight, nets[1].net.layers[0].weight)


def test_a_flipped_version_is_refused_not_read_as_an_older_format():
    """The header CRC covers the version from format 3 on: a version bit flipped into an
    older format (or a later one) is refused."""
    blob = models.encode_volume(phantom((4, 12, 10), "uint16", seed=30), slab=2)
    assert models.blob_info(blob)["format"] == 6
    for version in (1, 2, 3, 4, 5, 7):
        bad = bytearray(blob)
        bad[8:10] = version.to_bytes(2, "little")
        with pytest.raises(CorruptBlobError, match="checksum" if version < 6 else "version"):
            models.decode_volume(bytes(bad))


def test_column_bands_are_coded_apart_and_give_the_whole_slices(monkeypatch):
    """Format 3 on: a payload per tile column of a slab, decoded apart (on both workers) and put
    side by side; the bands' bits are those of the slab coded whole, but for their headers."""
    from models.codec import encode_slab
    from models.registry import load_model
    vol = phantom((6, 20, 50), "int16", seed=31)
    tile = (8, 16)                                     # bands 0-16, 16-32, 32-48, 48-50
    blob = models.encode_volume(vol, slab=4, tile=tile, adapt=False)
    info = models.blob_info(blob)
    assert (info["slabs"], info["bands"]) == (2, 4)
    from models.container import unpack_header
    header = unpack_header(blob)[0]
    v = header.values
    g = header.group                                   # slices per stream group
    assert g == 4
    whole = sum(len(encode_slab(load_model("default"), v.mapped(vol[z:z + 4]), v.lo, v.hi, 4,
                                tile, group=g))
                for z in (0, 4))
    payloads = sum(length for _, length, _ in header.slab_table)
    groups = -(-4 // g) + -(-2 // g)                   # stream groups of the two slabs
    extra_headers = 3 * (2 * 4 + 12 * groups)         # slice count and stream lengths
    extra_streams = 3 * 3 * groups                     # each ends in at most a word of flush
    assert 0 <= payloads - whole - extra_headers <= 4 * extra_streams
    monkeypatch.setattr(api, "PARALLEL_VOXELS", 1)
    for workers in ("1", "2"):
        monkeypatch.setenv("VOXARC_DECODE_WORKERS", workers)
        np.testing.assert_array_equal(models.decode_volume(blob), vol)
        np.testing.assert_array_equal(models.decode_slices(blob, 5, 6), vol[5:6])
        pieces = list(models.decode_stream(blob, 1, 6, head=2))
        assert [(z, len(p)) for z, p in pieces][:1] == [(1, 2)]
        np.testing.assert_array_equal(np.concatenate([p for _, p in pieces]), vol[1:6])


def test_decode_plan_gives_a_slab_bands_to_both_workers_or_one_wavefront_here():
    from models.api import _decode_plan
    two = [(0, 256), (256, 512)]
    assert _decode_plan([3], {3: 7}, two, 2, 2) == [[(3, 0)], [(3, 1)]]
    assert _decode_plan([3], {3: 7}, two, 1, 2) == [[(3, 0), (3, 1)]]        # one lockstep
    assert _decode_plan([3], {3: 7}, [(0, 256), (256, 460)], 1, 2) == [[(3, 0)], [(3, 1)]]
    both = _decode_plan([0, 1, 2, 3], {i: 8 for i in range(4)}, two, 2, 2)
    assert both == [[(i, 0) for i in range(4)], [(i, 1) for i in range(4)]]
    many = _decode_plan(list(range(40)), {i: 8 for i in range(40)}, two, 2, 2)
    assert len(many) % 2 == 0 and max(map(len, many)) <= 2 * 2
    assert sorted(u for job in many for u in job) == [(i, b) for i in range(40) for b in (0, 1)]


def test_one_slab_decodes_its_equal_bands_in_one_wavefront_here(monkeypatch):
    """In this process, a two-band slab's bands go to the decoder together (as one slab did
    before format 3), and come back in their places."""
    vol = phantom((8, 16, 48), "uint16", seed=32)
    blob = models.encode_volume(vol, tile=(16, 24))
    seen = []
    original = api._decode_group

    def spy(job, *args, **kwargs):
        seen.append((len(job[0]), job[3]))
        return original(job, *args, **kwargs)

    monkeypatch.setattr(api, "_decode_group", spy)
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "1")
    np.testing.assert_array_equal(models.decode_slices(blob, 6, 7), vol[6:7])
    assert seen == [(2, 0)]
    seen.clear()                   # a stream, too: one job per slab group, both bands in it
    pieces = list(models.decode_stream(blob, 2, 8, head=1))
    np.testing.assert_array_equal(np.concatenate([p for _, p in pieces]), vol[2:8])
    assert seen == [(2, 0)] and [len(p) for _, p in pieces] == [1, 5]


def test_running_workers_take_a_slab_bands_apart_only_for_enough_work(monkeypatch):
    from models import parallel
    from models.api import _split_bands
    even, uneven = [(0, 256), (256, 512)], [(0, 256), (256, 460)]
    monkeypatch.setattr(parallel, "running", lambda: True)
    assert not _split_bands(512 * 512, even)               # one wavefront here is as fast
    assert _split_bands(2 * 512 * 512, even)
    assert _split_bands(512 * 460, uneven)                  # here: a wavefront per width
    assert not _split_bands(7 * 256 * 256, [(0, 256)])
    monkeypatch.setattr(parallel, "running", lambda: False)
    assert not _split_bands(7 * 512 * 512, even)            # no pool to start for one slice


def test_lockstep_groups_hold_a_bounded_number_of_voxels_not_of_slabs():
    """Four 8-slice slabs of 512 x 512 per job; slices of 128 x 128 take 64 slabs together
    (their wavefront steps are short, so a job wants many of them)."""
    assert api.lockstep_slabs(8, 512, 512) == 4 and api.lockstep_slabs(8, 512, 460) == 4
    assert api.lockstep_slabs(8, 128, 128) == 64 and api.lockstep_slabs(8, 4096, 4096) == 1
    groups = api._lockstep_groups(list(range(12)), [8] * 12, 2, api.lockstep_slabs(8, 128, 128))
    assert groups == [list(range(6)), list(range(6, 12))]
    groups = api._lockstep_groups(list(range(13)), [8] * 13, 2, api.lockstep_slabs(8, 512, 512))
    assert groups == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9], [10, 11, 12]]   # 4 at most, 2 x 2


@pytest.mark.parametrize("bf16", [False, True])
def test_fine_tuning_lowers_the_bits_in_float32_and_in_bfloat16(monkeypatch, bf16):
    """Where the CPU multiplies bfloat16 the fine-tuning's network products run in it (the loss
    stays float32); either way the tuned float model codes its samples in fewer bits, and the
    two precisions take different paths."""
    import torch

    from models import adapt, train
    from models.registry import load_model
    predictor = load_model("default")
    samples = _tuning_samples(predictor)
    before = adapt._float_bits(train.float_model(predictor), samples)
    tuned = {}
    for half in (bf16, not bf16):
        monkeypatch.setattr(adapt, "ADAPT_BF16", half)
        model = train.float_model(predictor)
        for _ in adapt._fine_tune(model, samples, 0, 30, [30]):
            pass
        tuned[half] = model
    assert adapt._float_bits(tuned[bf16], samples) < before - 0.01
    first = [p for p in tuned[False].parameters()][0]
    assert not torch.equal(first, [p for p in tuned[True].parameters()][0])


def test_float32_fine_tuning_takes_the_compiled_step_with_torchs_result(monkeypatch):
    """Without bfloat16 each fine-tuning step is one compiled call (models.kernels.TrainStep)
    where the kernels are, and torch's autograd where they are not: a few steps later both
    networks are the same to float32 rounding."""
    import torch

    from models import adapt, kernels, train
    from models.registry import load_model
    predictor = load_model("default")
    samples = _tuning_samples(predictor, seed=14)
    monkeypatch.setattr(adapt, "ADAPT_BF16", False)
    calls = []
    real_call = kernels.TrainStep.__call__
    monkeypatch.setattr(kernels.TrainStep, "__call__",
                        lambda self, *a: calls.append(1) or real_call(self, *a))
    tuned = {}
    for mode in ("auto", "numpy"):
        monkeypatch.setenv("VOXARC_KERNELS", mode)
        model = train.float_model(predictor)
        for _ in adapt._fine_tune(model, samples, 0, 5, [5]):
            pass
        tuned[mode] = list(model.parameters())
        assert len(calls) == 5      # five with the kernels, and none more without them
    for a, b in zip(*tuned.values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.detach().abs().max()))
    start = list(train.float_model(predictor).parameters())
    assert any(not torch.equal(a, b) for a, b in zip(tuned["auto"], start))


@pytest.mark.parametrize("cpu_bf16", [False, True])
@pytest.mark.parametrize("built", [False, True])
def test_fine_tuning_uses_bfloat16_only_where_the_compiled_step_is_missing(monkeypatch,
                                                                           cpu_bf16, built):
    """The compiled float32 step is faster than torch's bfloat16 one, so bfloat16 is used
    only where the CPU has it and the kernels are not built; ADAPT_BF16 still forces either."""
    from models import adapt, kernels
    monkeypatch.setattr(adapt, "bf16_products", lambda: cpu_bf16)
    monkeypatch.setattr(kernels, "available", lambda: built)
    assert adapt.default_settings().bf16 == (cpu_bf16 and not built)
    for forced in (False, True):
        monkeypatch.setattr(adapt, "ADAPT_BF16", forced)
        assert adapt.default_settings().bf16 is forced


def test_fine_tuning_step_size_warms_up_holds_its_peak_then_falls_to_its_floor():
    from models import adapt
    steps, peak = 200, 0.01
    settings = adapt.default_settings()._replace(lr=peak, warmup=0.1, decay_from=0.5, floor=0.1)
    sizes = [adapt.step_size(settings, done, steps) for done in range(1, steps + 1)]
    rise, fall = 19, 99        # sizes[k] is that of step k + 1: steps 20 to 100 at the peak
    assert sizes[0] == pytest.approx(0.145 * peak)
    assert all(a < b for a, b in zip(sizes[:rise], sizes[1:rise + 1]))
    assert sizes[rise:fall + 1] == [peak] * (fall + 1 - rise)
    assert all(a > b for a, b in zip(sizes[fall:], sizes[fall + 1:]))
    assert sizes[-1] == pytest.approx(0.1 * peak)


@pytest.mark.parametrize("bf16", [False, True])
def test_each_fine_tuning_step_takes_its_scheduled_size_and_decays(monkeypatch, bf16):
    """The compiled Adam and torch's (bfloat16) path both step by step_size of the step, on
    the module's schedule, with the module's decays of Adam's moments."""
    from models import adapt, kernels, train
    from models.registry import load_model
    predictor = load_model("default")
    samples = _tuning_samples(predictor)
    monkeypatch.setattr(adapt, "ADAPT_BF16", bf16)
    monkeypatch.setattr(adapt, "ADAPT_BETAS", (0.8, 0.9))
    monkeypatch.setattr(adapt, "ADAPT_WARMUP", 0.25)
    taken = []
    real_adam, real_torch = kernels.AdamStep.__call__, adapt._Adam.step
    monkeypatch.setattr(kernels.AdamStep, "__call__", lambda self, lr, betas=(0.9, 0.999): (
        taken.append((lr, tuple(betas))) or real_adam(self, lr, betas)))
    monkeypatch.setattr(adapt._Adam, "step", lambda self: (
        taken.append((self.lr, tuple(self.betas))) or real_torch(self)))
    for _ in adapt._fine_tune(train.float_model(predictor), samples, 0, 12, [12]):
        pass
    assert taken == [(adapt.step_size(adapt.default_settings(), done, 12), (0.8, 0.9))
                     for done in range(1, 13)]


def test_adam_steps_every_tensor_by_the_textbook_formula():
    """The optimiser's whole-list kernels give Adam's update, tensor by tensor (and skip a
    tensor without a gradient)."""
    import torch

    from models.adapt import _Adam
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen), torch.zeros(2)]
    start = [p.clone() for p in params]
    opt = _Adam(params, lr=0.01)
    grads = [[torch.randn(p.shape, generator=gen) for p in params[:2]] for _ in range(3)]
    m = [torch.zeros_like(p) for p in start]
    v = [torch.zeros_like(p) for p in start]
    expected = [p.clone() for p in start]
    for t, step in enumerate(grads, 1):
        for i, g in enumerate(step):
            params[i].grad = g
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            mhat, vhat = m[i] / (1 - 0.9 ** t), v[i] / (1 - 0.999 ** t)
            expected[i] = expected[i] - 0.01 * mhat / (vhat.sqrt() + 1e-8)
        opt.step()
    for p, e in zip(params[:2], expected[:2]):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
    assert torch.equal(params[2], start[2])


def test_tuning_processes_start_without_waiting(monkeypatch):
    """``start`` launches the fine-tuning processes and returns; ``warm`` then finds them."""
    from models import tune_workers
    monkeypatch.setenv("VOXARC_TUNE_WORKERS", "1")
    monkeypatch.setattr(tune_workers, "_BROKEN", False)
    tune_workers.shutdown()
    tune_workers.start(2)
    assert tune_workers._POOL is not None and len(tune_workers._POOL._processes) == 2
    assert tune_workers.warm(2) == set(tune_workers._POOL._processes)


def test_fine_tuning_runs_in_worker_processes_with_the_same_result(monkeypatch):
    """Each fine-tuning run goes to a worker process of its own (one torch thread, lower
    priority, the samples memory-mapped); the adapted model is the one that threads give."""
    from models import adapt, tune_workers
    from models.registry import load_model
    monkeypatch.setattr(adapt, "ADAPT_STEPS", (8, 8))
    monkeypatch.setattr(adapt, "pays_off", lambda *args: True)
    vol = phantom((10, 40, 48), "int16", seed=13)
    monkeypatch.setenv("VOXARC_TUNE_WORKERS", "1")
    states = tune_workers.map_runs(tune_workers.worker_state, {"a": np.arange(5)}, ["j0", "j1"])
    assert {s["pid"] for s in states}.isdisjoint({os.getpid()}) and len(states) == 2
    assert all(s["threads"] == 1 and s["nice"] >= min(tune_workers.NICE, 19) for s in states)
    assert all(s["torch_ready"] for s in states)     # imported as the worker started
    assert [s["job"] for s in states] == ["j0", "j1"]
    assert all(s["arrays"] == {"a": "memmap"} for s in states)
    in_processes = adapt.adapt(load_model("default"), vol, 8, (64, 256))
    monkeypatch.setenv("VOXARC_TUNE_WORKERS", "0")
    in_threads = adapt.adapt(load_model("default"), vol, 8, (64, 256))
    assert adapt.embedded_bytes(in_processes) == adapt.embedded_bytes(in_threads)


def test_fine_tuning_falls_back_to_threads_when_processes_fail(monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    from models import tune_workers

    def broken(*args):
        raise BrokenProcessPool("a worker died")
    monkeypatch.setattr(tune_workers, "_in_processes", broken)
    monkeypatch.setattr(tune_workers, "_BROKEN", False)
    monkeypatch.setenv("VOXARC_TUNE_WORKERS", "1")
    states = tune_workers.map_runs(tune_workers.worker_state, {"a": np.arange(3)}, [1, 2])
    assert [s["pid"] for s in states] == [os.getpid()] * 2 and tune_workers._BROKEN
    assert [s["arrays"] for s in states] == [{"a": "ndarray"}] * 2


_ORPHANS = """
import time
from models import parallel, tune_workers
if __name__ == "__main__":
    print(" ".join(map(str, sorted(parallel.warm() | tune_workers.warm()))), flush=True)
    time.sleep(120)
"""


def test_worker_processes_exit_when_their_parent_is_killed(tmp_path):
    """A node killed outright (SIGKILL, a crash) must not leave its decoding and fine-tuning
    worker processes behind, idle but holding memory, one set per restart."""
    import signal
    import time
    script = tmp_path / "parent.py"
    script.write_text(_ORPHANS)
    search = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=search, VOXARC_DECODE_WORKERS="2",
               VOXARC_TUNE_WORKERS="1")
    parent = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert len(pids) == 4
    deadline = time.monotonic() + 15
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if _running(p)]
    assert not alive


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except FileNotFoundError:
        return False


def test_a_full_temporary_folder_tunes_in_threads_this_time_only(monkeypatch, caplog):
    """Samples that cannot be written for the worker processes (no space in TMPDIR) are tuned
    on in threads, and the next adaptation tries the processes again."""
    from models import tune_workers

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tune_workers.np, "save", full)
    monkeypatch.setattr(tune_workers, "_BROKEN", False)
    monkeypatch.setenv("VOXARC_TUNE_WORKERS", "1")
    states = tune_workers.map_runs(tune_workers.worker_state, {"a": np.arange(3)}, [1])
    assert states[0]["pid"] == os.getpid() and tune_workers.usable()
    assert "No space left" in caplog.text


def test_samples_go_to_the_next_folder_when_memory_is_full(monkeypatch, tmp_path):
    """A small /dev/shm (a container's) that cannot hold the samples: they are written to the
    next folder and the runs still go to the worker processes; no folder is left behind."""
    from models import tune_workers
    memory, disk = tmp_path / "shm", tmp_path / "disk"
    memory.mkdir()
    disk.mkdir()
    save = np.save

    def small(path, *args, **kwargs):
        if str(path).startswith(str(memory)):
            raise OSError(28, "No space left on device")
        return save(path, *args, **kwargs)
    monkeypatch.setattr(tune_workers.np, "save", small)
    monkeypatch.setattr(tune_workers, "SAMPLE_DIRS", (str(memory), str(disk)))
    monkeypatch.setattr(tune_workers, "_BROKEN", False)
    monkeypatch.setenv("VOXARC_TUNE_WORKERS", "1")
    states = tune_workers.map_runs(tune_workers.worker_state, {"a": np.arange(3)}, [1])
    assert states[0]["pid"] != os.getpid() and states[0]["arrays"] == {"a": "memmap"}
    assert list(memory.iterdir()) == [] and list(disk.iterdir()) == []


def test_samples_skip_a_folder_that_does_not_exist(monkeypatch, tmp_path):
    from models import tune_workers
    monkeypatch.setattr(tune_workers, "SAMPLE_DIRS", (str(tmp_path / "none"), str(tmp_path)))
    with tune_workers._samples_folder({"a": np.arange(4)}) as folder:
        assert os.path.dirname(folder) == str(tmp_path)
        assert np.array_equal(np.load(os.path.join(folder, "a.npy")), np.arange(4))
    assert list(tmp_path.iterdir()) == []


def test_samples_left_by_a_killed_process_are_removed(monkeypatch, tmp_path):
    """A node killed while fine-tuning leaves its samples folder behind (in /dev/shm: memory
    until a reboot); the next adaptation removes it once it is an hour old, and never a
    running process's folder."""
    from models import tune_workers
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f"voxarc-tune-{gone.stdout.strip()}-abc"
    live = tmp_path / f"voxarc-tune-{os.getppid()}-def"
    other = tmp_path / "voxarc-tuned-notes"
    recent = tmp_path / f"voxarc-tune-{gone.stdout.strip()}-ghi"   # another PID namespace's?
    for folder in (stale, live, other, recent):
        folder.mkdir()
        (folder / "x.npy").write_bytes(b"0" * 100)
    hours_ago = os.stat(stale).st_mtime - 2 * tune_workers.STALE_AFTER_S
    for folder in (stale, live, other):
        os.utime(folder, (hours_ago, hours_ago))
    monkeypatch.setattr(tune_workers, "SAMPLE_DIRS", (str(tmp_path),))
    with tune_workers._samples_folder({"a": np.arange(3)}) as folder:
        assert os.path.basename(folder).startswith(f"voxarc-tune-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name,
                                                                 recent.name])


def test_encoders_in_several_threads_share_one_fine_tuning_pool(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from models import tune_workers
    monkeypatch.setenv("VOXARC_TUNE_WORKERS", "1")
    with ThreadPoolExecutor(4) as threads:
        states = list(threads.map(
            lambda k: tune_workers.map_runs(tune_workers.worker_state, {"a": np.arange(2)},
                                            [k, k]), range(4)))
    assert sorted(s["job"] for pair in states for s in pair) == sorted([0, 1, 2, 3] * 2)
    assert len({s["pid"] for pair in states for s in pair}) <= 2


@pytest.mark.parametrize("threads", [1, 2])
def test_samples_are_the_picked_voxels_of_the_coders_contexts(monkeypatch, threads):
    """Training and adaptation samples: the voxels drawn from ``rng`` slice by slice, with the
    features of the contexts the coder itself sees (``slab_contexts``), in slab and slice
    order, whatever the number of threads computing them."""
    from models import samples as sampling
    from models.codec import slab_contexts
    from models.features import default_features
    from models.registry import load_model
    from models.value_range import ValueRange
    monkeypatch.setattr(sampling, "_SAMPLE_THREADS", threads)
    hood = load_model("default").neighbourhood
    vol = phantom((21, 30, 44), "int16", seed=5)
    got = sampling.collect_samples([vol], 8, 3, 0.3, np.random.default_rng(9), tile=(16, 32),
                                   hood=hood)
    rng, vrange, want = np.random.default_rng(9), ValueRange.of_dtype(vol.dtype), []
    for z0 in (0, 8):     # linspace(0, 13, 3) = 0, 6, 13 floored to whole slabs, once each
        block = vrange.mapped(vol[z0:z0 + 8])
        picks = [np.flatnonzero(rng.random(30 * 44) < 0.3) for _ in range(len(block))]
        for zl, values, valid in slab_contexts(hood, block, 8, (16, 32)):
            ref, s, lq, x = default_features(values[:, picks[zl]], valid[:, picks[zl]])
            want.append((x.T, ref, s, lq, block[zl].ravel()[picks[zl]]))
    for i, field in enumerate(("x", "ref", "s", "lq", "value")):
        assert np.array_equal(getattr(got, field), np.concatenate([w[i] for w in want]))
    assert got.x.dtype == np.float32 and got.value.dtype == np.int64
    assert (got.lo == vrange.lo).all() and (got.hi == vrange.hi).all()
