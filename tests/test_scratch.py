"""Memory: the fine-tuning's reused working memory (models.scratch) and sample files, room
left and reserved in shared memory, and the neighbour validity of slab slices
(models.context) built without large temporaries; faster, and the same results."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from models import adapt, scratch, train
from models.context import tiling
from models.features import NEIGHBOURHOODS
from models.registry import load_model
from test_codec import phantom


def test_buffers_reuse_their_memory_while_it_is_large_enough():
    buffers = scratch.Buffers()
    first = buffers.array("x", (100, 8), np.float32)
    smaller = buffers.array("x", (10, 4), np.float64)
    assert smaller.shape == (10, 4) and smaller.dtype == np.float64
    assert smaller.flags.c_contiguous and np.shares_memory(first, smaller)
    larger = buffers.array("x", (200, 8), np.float32)
    assert not np.shares_memory(first, larger)
    other = buffers.array("y", (10,), np.float32)
    assert not np.shares_memory(larger, other)
    assert buffers.nbytes == larger.nbytes + other.nbytes


def test_a_lease_gets_an_idle_set_back_and_concurrent_leases_get_their_own():
    pool = scratch.Pool(keep_s=3600)
    with pool.lease() as first:
        with pool.lease() as second:
            assert second is not first
        first.array("x", (1000,), np.float32)
    with pool.lease() as again:
        assert again is first or again is second
    assert pool.idle_bytes() == 4000
    pool.trim()
    assert pool.idle_bytes() == 4000       # not idle long enough yet


def test_idle_sets_are_released_after_keep_s_but_not_one_in_use():
    pool = scratch.Pool(keep_s=0.05)
    with pool.lease() as one, pool.lease() as two:
        one.array("x", (1000,), np.float32)
        two.array("x", (500,), np.float32)
    assert pool.idle_bytes() == 6000
    with pool.lease() as held:
        size = held.nbytes
        for _ in range(300):                # the timer releases the other, idle set meanwhile
            if pool.idle_bytes() == 0:
                break
            threading.Event().wait(0.01)
        assert pool.idle_bytes() == 0
        assert held.nbytes == size          # the set in use keeps its memory
    assert pool.idle_bytes() == size        # given back, it is kept a while
    pool.trim(now=float("inf"))
    assert pool.idle_bytes() == 0


@pytest.mark.parametrize("compiled", [True, False])
def test_fine_tuning_in_dirty_reused_buffers_gives_the_same_network(monkeypatch, compiled):
    """A run that fills buffers a previous run left full of other numbers (NaN here: they
    would spread through the network) gives the same weights as one in fresh memory, with
    the compiled step and with torch's (which reads the inputs' padding column too)."""
    import torch

    from models import kernels
    if compiled and not kernels.available():
        pytest.skip("no compiled kernels here")
    if not compiled:
        monkeypatch.setattr(adapt, "_compiled_step", lambda model: None)
    predictor = load_model("default")
    vol = phantom((10, 40, 48), "int16", seed=5)
    samples = train.collect_samples([vol], 8, 2, 1.0, np.random.default_rng(0),
                                    tile=(64, 256), hood=predictor.neighbourhood)

    def tuned(pool):
        monkeypatch.setattr(scratch, "POOL", pool)
        model = train.float_model(predictor)
        for _ in adapt._fine_tune(model, samples, 0, 12, [12]):
            pass
        return model.state_dict()

    fresh = tuned(scratch.Pool(keep_s=3600))
    dirty = scratch.Pool(keep_s=3600)
    with dirty.lease() as buffers:
        for name, width in (("x", 40), ("ref", 1), ("s", 1), ("lq", 1), ("value", 1)):
            buffers.array(name, (len(samples.value) + 7, width), np.float32)[:] = np.nan
    reused = tuned(dirty)
    assert dirty.idle_bytes() > 0
    for key, value in fresh.items():
        assert torch.equal(value, reused[key]), key
    assert any(not torch.equal(v, train.float_model(predictor).state_dict()[k])
               for k, v in fresh.items())


def _validity_by_pixel(hood, z, ny, nx, th, tw):
    """Whether each neighbour of each pixel lies in the slab, not above the pixel's tile and
    within its columns, pixel by pixel (a row below the tile, which only the previous slice's
    window reaches, counts as valid: padding the encoder and decoder read alike)."""
    out = np.zeros((hood.size, ny * nx), bool)
    for p in range(ny * nx):
        y, x = divmod(p, nx)
        y0, x0 = y // th * th, x // tw * tw
        for k, (dz, dy, dx) in enumerate(hood.offsets):
            out[k, p] = (z + dz >= 0 and y0 <= y + dy
                         and x0 <= x + dx < min(x0 + tw, nx))
    return out


@pytest.mark.parametrize("name", sorted(NEIGHBOURHOODS))
@pytest.mark.parametrize("dims", [(9, 13, 4, 5), (6, 7, 6, 7), (1, 5, 1, 2)])
def test_neighbour_validity_matches_its_definition(name, dims):
    hood = NEIGHBOURHOODS[name]
    ny, nx, th, tw = dims
    for z in range(hood.pad[0] + 1):
        got = hood.validity(z, tiling(*dims))
        assert got.shape == (hood.size, ny * nx)
        assert (got == _validity_by_pixel(hood, z, *dims)).all()


def test_sample_files_refill_the_same_mapping_and_are_removed_when_closed(monkeypatch, tmp_path):
    from models import tune_workers
    monkeypatch.setattr(tune_workers, "SAMPLE_DIRS", (str(tmp_path),))
    files = tune_workers.SampleFiles()
    first = files.array("x", (100, 3), np.float32)
    first[:] = 7
    folder = files.folder
    assert os.path.basename(folder).startswith(f"voxarc-tune-{os.getpid()}-")
    again = files.array("x", (50, 2), np.float64)
    assert np.shares_memory(first, again) and files.describe(first) is None
    assert files.describe(again) == (os.path.join(folder, "x"), again.dtype.str, (50, 2))
    again[:] = np.arange(100).reshape(50, 2)
    mapped = np.memmap(os.path.join(folder, "x"), again.dtype, "r", shape=again.shape)
    assert np.array_equal(mapped, again)       # what a worker process maps is the array
    larger = files.array("x", (200, 3), np.float32)
    assert not np.shares_memory(first, larger) and files.nbytes == larger.nbytes
    assert files.describe(np.zeros(3)) is None
    files.close()
    assert not os.path.exists(folder) and files.nbytes == 0


def test_sample_files_without_room_give_ordinary_arrays(monkeypatch, tmp_path):
    """A full /dev/shm: posix_fallocate fails up front (no SIGBUS on a later write), and the
    array is an ordinary one, which map_runs then writes out."""
    from models import tune_workers

    def full(fd, offset, size):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tune_workers, "SAMPLE_DIRS", (str(tmp_path),))
    monkeypatch.setattr(tune_workers.os, "posix_fallocate", full)
    files = tune_workers.SampleFiles()
    array = files.array("x", (10,), np.int64)
    assert type(array) is np.ndarray and files.describe(array) is None
    files.close()


def test_sample_files_leave_room_for_others(monkeypatch, tmp_path):
    """A small /dev/shm (Docker's 64 MB): the files, kept a while, never take the last
    KEEP_FREE bytes that the decoders' shared memory may need."""
    from models import tune_workers
    monkeypatch.setattr(tune_workers, "SAMPLE_DIRS", (str(tmp_path),))
    room = os.statvfs(tmp_path)
    free = room.f_bavail * room.f_frsize
    monkeypatch.setattr(tune_workers, "KEEP_FREE", free - (64 << 20))
    files = tune_workers.SampleFiles()
    small = files.array("a", (1000,), np.uint8)
    large = files.array("b", (128 << 20,), np.uint8)    # refused: not allocated
    assert files.describe(small) is not None and files.describe(large) is None
    files.close()


def test_runs_map_the_sample_files_as_they_are_and_write_only_the_others(monkeypatch, tmp_path):
    from models import tune_workers
    monkeypatch.setattr(tune_workers, "SAMPLE_DIRS", (str(tmp_path),))
    monkeypatch.setattr(tune_workers, "_BROKEN", False)
    monkeypatch.setenv("VOXARC_TUNE_WORKERS", "1")
    saved = []
    save = np.save
    monkeypatch.setattr(tune_workers.np, "save",
                        lambda path, a, *r, **k: (saved.append(os.path.basename(path)),
                                                  save(path, a, *r, **k)))
    with tune_workers.sample_space() as space:
        assert isinstance(space, tune_workers.SampleFiles)
        shared = space.array("a", (5,), np.int32)
        shared[:] = np.arange(5)
        arrays = {"a": shared, "b": np.arange(3)}
        sums = tune_workers.map_runs(_sums, arrays, [1, 2], space)
        states = tune_workers.map_runs(tune_workers.worker_state, arrays, [1], space)
    assert sums == [(10, 3), (20, 6)]
    assert saved == ["b.npy", "b.npy"]
    assert states[0]["pid"] != os.getpid() and states[0]["arrays"] == {"a": "memmap",
                                                                       "b": "memmap"}
    tune_workers.SAMPLE_FILES.trim(now=float("inf"))
    assert list(tmp_path.iterdir()) == []


def _sums(arrays, job):
    return int(arrays["a"].sum()) * job, int(arrays["b"].sum()) * job


@pytest.mark.parametrize("full", [False, True])
def test_a_full_shared_memory_sends_the_first_slice_with_its_slab(monkeypatch, caplog, full):
    """The shared memory a stream's first slices travel in is reserved up front: where
    /dev/shm is full, the stream still gives every slice once, in order (the first with its
    slab), instead of a worker dying of SIGBUS on its write."""
    import models
    from models import api
    vol = phantom((12, 12, 10), "uint16", seed=8)
    blob = models.encode_volume(vol, slab=4)
    monkeypatch.setattr(api, "PARALLEL_VOXELS", 1)
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "2")
    if full:
        def no_room(fd, offset, size):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(api.os, "posix_fallocate", no_room)
    pieces = list(models.decode_stream(blob, 0, 12, head=1))
    assert len(pieces[0][1]) == (4 if full else 1)
    assert [z0 for z0, _ in pieces] == list(np.cumsum([0] + [len(p) for _, p in pieces[:-1]]))
    np.testing.assert_array_equal(np.concatenate([p for _, p in pieces]), vol)
    assert ("no room in shared memory" in caplog.text) == full
