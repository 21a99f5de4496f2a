"""Blob format 4: volumes coded within their own value range, CT padding standing in just
below the air's floor (models.value_range)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import models
from models import api, value_range
from models.container import MAGIC, CorruptBlobError, unpack_header
from models.value_range import ValueRange, scan


def padded_ct(shape=(10, 48, 56), seed=0, pad=-2000, floor=0) -> np.ndarray:
    """int16 CT-like slices: air at ``floor`` with clipped noise, a brighter disc, ``pad``
    outside a circle (the field of view)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    body = np.where(x ** 2 + y ** 2 < 0.35, 1000.0, floor + 4.0)
    vol = np.maximum(np.round(body + rng.normal(0, 12, shape)), floor)
    vol[:, x[0] ** 2 + y[0] ** 2 > 0.9] = pad
    return vol.astype(np.int16)


def test_scan_finds_the_padding_below_the_floor():
    vol = padded_ct()
    assert scan(vol) == ValueRange(lo=-1, hi=int(vol.max()), pad=-2000, stand_in=-1)


@pytest.mark.parametrize("values, want", [
    ([5, 6, 9], ValueRange(5, 9, 5, 5)),              # no gap above the minimum
    ([7, 7], ValueRange(7, 7, 7, 7)),                  # constant
    ([0, 1000], ValueRange(999, 1000, 0, 999)),        # two values: the lower one stands in
    ([-128, 127], ValueRange(126, 127, -128, 126)),
])
def test_scan_of_small_volumes(values, want):
    dtype = np.int8 if min(values) < 0 else np.uint16
    vol = np.array(values, dtype).reshape(1, 1, -1)
    assert scan(vol) == want
    assert np.array_equal(want.restore(want.mapped(vol).copy()), vol)


def test_scan_reads_the_volume_in_pieces(monkeypatch):
    monkeypatch.setattr(value_range, "SCAN_VOXELS", 1)       # one slice at a time
    vol = padded_ct((5, 8, 9))
    vol[3, 2, 2] = -3000                                       # the minimum in one slice only
    vol[vol == -2000] = 5
    assert scan(vol) == ValueRange(-1, int(vol.max()), -3000, -1)


def test_padded_ct_round_trips_through_every_decoding_path(monkeypatch):
    vol = padded_ct((10, 40, 72), seed=1)
    blob = models.encode_volume(vol, slab=4, tile=(16, 32), adapt=False)
    header = unpack_header(blob)[0]
    assert header.version >= 4 and header.values.substitutes
    monkeypatch.setattr(api, "PARALLEL_VOXELS", 1)
    for workers in ("1", "2"):
        monkeypatch.setenv("VOXARC_DECODE_WORKERS", workers)
        np.testing.assert_array_equal(models.decode_volume(blob), vol)
        np.testing.assert_array_equal(models.decode_slices(blob, 5, 7), vol[5:7])
        pieces = list(models.decode_stream(blob, 1, 10, head=2))
        assert pieces[0][0] == 1 and len(pieces[0][1]) == 2
        np.testing.assert_array_equal(np.concatenate([p for _, p in pieces]), vol[1:])


def test_the_own_range_saves_bits_on_a_padded_ct(monkeypatch):
    vol = padded_ct((8, 64, 64), seed=2)
    own = len(models.encode_volume(vol, adapt=False))
    monkeypatch.setattr(value_range, "scan", lambda v: ValueRange.of_dtype(v.dtype))
    dtype_range = models.encode_volume(vol, adapt=False)
    assert unpack_header(dtype_range)[0].values == ValueRange.of_dtype(np.int16)
    np.testing.assert_array_equal(models.decode_volume(dtype_range), vol)
    assert own < 0.97 * len(dtype_range)


def test_an_adapted_padded_ct_round_trips():
    vol = padded_ct((10, 40, 48), seed=3)
    blob = models.encode_volume(vol, adapt=True)
    np.testing.assert_array_equal(models.decode_volume(blob), vol)


def _with_values(blob: bytes, values: tuple) -> bytes:
    """``blob`` with the header's value range replaced, its checksum made to match."""
    at = len(MAGIC)
    version, hlen = struct.unpack_from("<HI", blob, at)
    after = 2 if version >= 6 else 0      # format 6: the stream group follows the range
    head = blob[at + 6:at + 6 + hlen - 16 - after] + struct.pack("<4i", *values) \
        + blob[at + 6 + hlen - after:at + 6 + hlen]
    lead = blob[at:at + 6]
    rest = blob[at + 6 + hlen + 4:]
    return blob[:at] + lead + head + struct.pack("<I", zlib.crc32(lead + head)) + rest


@pytest.mark.parametrize("values", [
    (10, 5, 10, 10),            # lo above hi
    (-1, 70000, -1, -1),        # beyond the dtype
    (-1, 300, -1, 3),           # a stand-in that is not the floor
    (-1, 300, 0, -1),           # padding above its stand-in
])
def test_an_impossible_value_range_is_refused(values):
    vol = padded_ct((2, 16, 16))
    blob = models.encode_volume(vol, adapt=False)
    v = scan(vol)
    same = _with_values(blob, (v.lo, v.hi, v.pad, v.stand_in))     # the helper itself is sound
    np.testing.assert_array_equal(models.decode_volume(same), vol)
    with pytest.raises(CorruptBlobError, match="value range|padding"):
        models.decode_volume(_with_values(blob, values))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 16), pad=st.integers(-32768, -200), floor=st.integers(-150, 50),
       dtype=st.sampled_from(["int16", "int8"]), shape=st.tuples(
           st.integers(1, 4), st.integers(1, 12), st.integers(1, 12)))
def test_padded_volumes_round_trip(seed, pad, floor, dtype, shape):
    info = np.iinfo(dtype)
    vol = padded_ct(shape, seed, max(pad, int(info.min)), floor)
    vol = np.clip(vol, info.min, info.max).astype(dtype)
    blob = models.encode_volume(vol, slab=2, tile=(4, 5))
    np.testing.assert_array_equal(models.decode_volume(blob), vol)
