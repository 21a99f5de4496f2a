"""The compiled feature kernel (models/_kernels.c) equals the numpy features bit for bit, and
blobs and decoded volumes do not depend on which of the two ran."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models import decode_slices, encode_volume, kernels, train
from models.features import WIDE_NEIGHBOURHOOD, default_features, flat_contexts
from models.registry import load_model

# the kernel is an optional extension: built wherever the install found a C compiler
pytestmark = pytest.mark.skipif(
    not kernels.available() and shutil.which("cc") is None,
    reason="no C compiler at install time: voxarc runs the numpy features")


def test_kernel_is_built_where_a_compiler_is():
    assert kernels.available(), "pip install built no models._kernels although cc exists"


def _numpy_features(values, valid, compact):
    ref, s, lq, x = default_features(values, valid)
    keep = np.arange(values.shape[1])
    if compact:
        keep = np.flatnonzero(~flat_contexts(s, x.T[:, :len(values)]))
    return ref, keep, s[keep], lq[keep], x.T[keep]


def _assert_same(values, valid, compact):
    ref, keep, s, lq, x = _numpy_features(values, valid, compact)
    got = kernels.features(values, valid, compact)
    busy = np.arange(values.shape[1]) if got.busy is None else got.busy
    assert np.array_equal(got.ref, ref)
    assert np.array_equal(busy, keep)
    assert np.array_equal(got.s, s) and np.array_equal(got.lq, lq)
    assert np.array_equal(got.ref_busy, ref[keep])
    assert got.x.dtype == np.float32 and np.array_equal(got.x, x)


@settings(max_examples=60, deadline=None)
@given(k=st.sampled_from([19, 26]), n=st.integers(1, 700), seed=st.integers(0, 2 ** 31),
       kind=st.sampled_from(["int16", "uint16", "near", "flat"]),
       p_valid=st.sampled_from([0.2, 0.9, 1.0]), compact=st.booleans())
def test_kernel_features_equal_numpy(k, n, seed, kind, p_valid, compact):
    rng = np.random.default_rng(seed)
    if kind == "int16":
        values = rng.integers(-32768, 32768, (k, n))
    elif kind == "uint16":
        values = rng.integers(0, 65536, (k, n))
    elif kind == "near":      # small differences: every rounding of d * 64 / s matters
        values = rng.integers(-4, 5, (k, n)) + int(rng.integers(-3000, 3000))
    else:                     # mostly flat contexts, some one step off
        values = np.full((k, n), -2000)
        values[:, ::5] += rng.integers(-1, 2, (k, len(range(0, n, 5))))
    valid = rng.random((k, n)) < p_valid
    _assert_same(values.astype(np.int32), valid, compact)


def test_kernel_reads_strided_views_and_other_dtypes():
    rng = np.random.default_rng(3)
    big = rng.integers(-1200, 1500, (26, 900)).astype(np.int32)
    valid = rng.random((26, 900)) < 0.95
    _assert_same(big[:, 100:700], valid[:, 100:700], True)        # rows 900 apart
    _assert_same(big[:, ::2].astype(np.int64), valid[:, ::2], False)   # copied to int32


def test_extreme_activity_is_clipped_like_numpy():
    k = WIDE_NEIGHBOURHOOD.size
    values = np.zeros((k, 4), np.int32)
    values[:, 0] = np.where(np.arange(k) % 2, 32767, -32768)   # largest activity
    values[:, 1] = 65535 * (np.arange(k) % 3 == 0)
    values[3, 2] = 1                                           # one step: s == 1
    _assert_same(values, np.ones((k, 4), bool), True)


@pytest.mark.parametrize("shape,tile", [((5, 37, 41), (16, 24)), ((3, 64, 80), (64, 256))])
def test_blobs_and_volumes_do_not_depend_on_the_kernel(monkeypatch, shape, tile):
    rng = np.random.default_rng(1)
    vol = (rng.normal(0, 30, shape).cumsum(axis=2) // 4).astype(np.int16)
    vol[:, :4] = -2000                                 # flat padding rows
    blob = encode_volume(vol, slab=2, tile=tile)
    assert np.array_equal(decode_slices(blob, 0, shape[0]), vol)
    assert np.array_equal(decode_slices(blob, 1, 4), vol[1:4])
    monkeypatch.setenv("VOXARC_KERNELS", "numpy")
    assert not kernels.available()
    assert encode_volume(vol, slab=2, tile=tile) == blob
    assert np.array_equal(decode_slices(blob, 0, shape[0]), vol)


@pytest.mark.parametrize("lo,hi,centre", [(-32768, 32767, 0), (0, 255, 2), (0, 65535, 65530),
                                           (-128, 127, -120)])
def test_predictions_from_the_kernel_equal_numpy(monkeypatch, lo, hi, centre):
    model = load_model("default")
    k = model.neighbourhood.size
    rng = np.random.default_rng(5)
    values = np.clip(rng.integers(-50, 50, (k, 3000)) + centre, lo, hi).astype(np.int32)
    values[:, :1000] = centre                          # flat: the network skips them
    valid = rng.random((k, 3000)) < 0.97
    fast = model.predict(values, valid, lo, hi)
    monkeypatch.setenv("VOXARC_KERNELS", "numpy")
    slow = model.predict(values, valid, lo, hi)
    assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])
    assert fast[0].min() >= lo and fast[0].max() <= hi


def test_training_samples_do_not_depend_on_the_kernel(monkeypatch):
    rng = np.random.default_rng(2)
    vol = (rng.normal(0, 25, (6, 40, 44)).cumsum(axis=1) // 3).astype(np.int16)
    hood = load_model("default").neighbourhood

    def samples():
        return train.collect_samples([vol], 4, 2, 0.5, np.random.default_rng(0), hood=hood)

    fast = samples()
    monkeypatch.setenv("VOXARC_KERNELS", "numpy")
    slow = samples()
    for field in train.Samples.__dataclass_fields__:
        a, b = getattr(fast, field), getattr(slow, field)
        assert a.dtype == b.dtype and a.flags.c_contiguous and np.array_equal(a, b), field


@pytest.mark.parametrize("cached_validity", [True, False])
def test_decoder_run_cache_stays_within_its_budget(monkeypatch, cached_validity):
    from models import codec, skew
    monkeypatch.setattr(skew, "RUN_CACHE_BYTES", 6000)
    if not cached_validity:      # very large slices: validity computed per step
        monkeypatch.setattr(skew.SkewLayout, "MAX_CACHED_VALIDITY", 0)
    codec.skew_layout.cache_clear()
    rng = np.random.default_rng(4)
    vol = (rng.normal(0, 40, (6, 33, 50)).cumsum(axis=2) // 5).astype(np.int16)
    blob = encode_volume(vol, slab=3, tile=(16, 24))
    try:
        assert np.array_equal(decode_slices(blob, 0, 6), vol)
        layout = codec.skew_layout(load_model("default").neighbourhood, 33, 50, (16, 24))
        assert layout.validity_cached == cached_validity
        assert 0 < layout.run_cache_bytes <= 6000 and layout.run_cache
    finally:
        codec.skew_layout.cache_clear()
