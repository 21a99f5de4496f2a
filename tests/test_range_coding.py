"""Blob format 2 codes residuals within the dtype's range: tokens that would put a voxel outside
it get no probability. Format 1 blobs (without it) still decode."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import models
from models.codec import decode_slabs, encode_slab
from models.container import MAGIC, VERSION, CorruptBlobError, unpack_header
from models.entropy import (ESC_NEG, ESC_POS, RANGE_EDGE, TOKEN_RANGE, join_residuals,
                            split_residuals, token_bounds, truncate_rows)
from models.registry import load_model


def mr_background(shape=(6, 48, 40), seed=0) -> np.ndarray:
    """A uint16 MR-like volume: tissue in the middle, a noisy background just above 0."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, shape[1]), np.linspace(-1, 1, shape[2]), indexing="ij")
    vol = 3 * np.abs(rng.normal(0, 1, shape)) + 600 * (x ** 2 + y ** 2 < 0.3)
    return np.round(vol).astype(np.uint16)


def test_truncated_rows_keep_only_the_tokens_inside_the_bounds():
    rows = np.ones((5, 2 * TOKEN_RANGE + 2))
    qmin = np.array([-100, -2, -RANGE_EDGE, -100, -RANGE_EDGE - 1])
    qmax = np.array([100, 3, 100, RANGE_EDGE - 1, RANGE_EDGE])
    truncate_rows(rows, qmin, qmax)
    q = np.arange(-TOKEN_RANGE, TOKEN_RANGE)
    assert rows[0].all() and rows[4].all()     # ends further than RANGE_EDGE: untouched
    assert rows[1, :2 * TOKEN_RANGE].tolist() == ((q >= -2) & (q <= 3)).tolist()
    assert rows[1, ESC_NEG] == 0 and rows[1, ESC_POS] == 0
    assert rows[2, :2 * TOKEN_RANGE].tolist() == (q >= -RANGE_EDGE).tolist()
    assert rows[2, ESC_NEG] == 0 and rows[2, ESC_POS] == 1
    assert rows[3, :2 * TOKEN_RANGE].tolist() == (q < RANGE_EDGE).tolist()
    assert rows[3, ESC_POS] == 0 and rows[3, ESC_NEG] == 1


def test_bounds_hold_the_residual_of_every_value_in_range():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 65536, 5000)
    value = rng.integers(0, 65536, 5000)
    shifts = rng.integers(0, 6, 5000)
    qmin, qmax = token_bounds(pred, shifts, 0, 65535)
    q = (value - pred) >> shifts
    assert ((qmin <= q) & (q <= qmax)).all()


def test_coding_within_range_saves_bits_near_the_dtype_floor_and_stays_exact():
    predictor = load_model("default")
    vol = mr_background()
    args = (predictor, vol, 0, 65535, 8, (48, 40))
    inside, plain = encode_slab(*args), encode_slab(*args, within_range=False)
    assert len(inside) < 0.97 * len(plain)
    for payload, flag in ((inside, True), (plain, False)):
        (back,) = decode_slabs(predictor, [payload], [6], 48, 40, 0, 65535, 8, (48, 40),
                               within_range=flag)
        np.testing.assert_array_equal(back, vol)


def test_blobs_are_written_in_format_6_and_formats_1_to_5_still_read():
    from models.container import pack
    vol = mr_background((4, 20, 24), seed=2)
    blob = models.encode_volume(vol)
    header, base = unpack_header(blob)
    assert VERSION == 6 and header.version == 6 and header.within_range and header.two_stage
    assert header.group == 4            # small slices: one stream group for the slab
    assert (header.values.lo, header.values.hi) == (int(vol.min()), int(vol.max()))
    np.testing.assert_array_equal(models.decode_volume(blob), vol)
    # format 5: a slice a stream group, and no group in the header
    v = header.values
    five = pack(header.model_id, header.model_name, header.dtype, header.shape, header.slab,
                header.tile, [encode_slab(load_model("default"), v.mapped(vol), v.lo, v.hi,
                                          header.slab, header.tile)], version=5, values=v)
    assert unpack_header(five)[0].group == 1 and len(five) > len(blob)
    np.testing.assert_array_equal(models.decode_volume(five), vol)
    with pytest.raises(ValueError, match="stream groups"):
        pack(header.model_id, header.model_name, header.dtype, header.shape, header.slab,
             header.tile, [], version=5, values=v, group=2)
    # formats 2 to 4: coded within the dtype's range (one band: the slab's payload), tokens
    # in one stage
    payloads = [encode_slab(load_model("default"), vol, 0, 65535, header.slab, header.tile,
                            two_stage=False)]
    facts = (header.model_id, header.model_name, header.dtype, header.shape, header.slab,
             header.tile, payloads)
    for version in (2, 3, 4):
        old = unpack_header(pack(*facts, version=version))[0]
        assert old.within_range and not old.two_stage
        np.testing.assert_array_equal(models.decode_volume(pack(*facts, version=version)), vol)
    assert not unpack_header(pack(*facts, version=1))[0].within_range   # another coding
    with pytest.raises(ValueError, match="dtype's range only"):
        pack(*facts, version=3, values=header.values)
    with pytest.raises(CorruptBlobError, match="version 7"):
        unpack_header(_with_version(blob, 7))


def _with_version(blob: bytes, version: int) -> bytes:
    at = len(MAGIC)
    return blob[:at] + struct.pack("<H", version) + blob[at + 2:]


def test_format_1_blobs_decode_without_range_coding():
    """A format 1 blob of today's model (slabs coded without the range) decodes exactly."""
    from models.container import pack
    predictor = load_model("default")
    vol = mr_background((5, 24, 20), seed=3)
    payload = encode_slab(predictor, vol, 0, 65535, 8, (24, 20), within_range=False)
    blob = pack(predictor.model_id, "default", "uint16", vol.shape, 8, (24, 20), [payload],
                version=1)
    np.testing.assert_array_equal(models.decode_volume(blob), vol)


def test_residuals_split_into_tokens_low_bits_and_escapes_and_join_back():
    """split_residuals works the escape fields out on the escaped symbols only: they must be
    those of the definition (class = bit length of the overflow, extra = the bits below its
    top bit) and join back to every residual, at every row's low-bit count."""
    T = TOKEN_RANGE
    r = np.array([0, T - 1, T, T + 5, -T, -T - 1, -T - 6, 1 << 20, -(1 << 20)], np.int64)
    sym = split_residuals(r, np.zeros(len(r), np.int64), np.zeros(1, np.int64))
    assert sym.token.tolist() == [T, 2 * T - 1, ESC_POS, ESC_POS, 0, ESC_NEG, ESC_NEG,
                                  ESC_POS, ESC_NEG]
    overflow = [0, 0, 0, 5, 0, 0, 5, (1 << 20) - T, (1 << 20) - T - 1]
    assert sym.cls.tolist() == [int(e).bit_length() for e in overflow]
    assert sym.extra.tolist() == [e - (1 << (e.bit_length() - 1)) if e else 0 for e in overflow]
    assert sym.extra_bits.tolist() == [max(e.bit_length() - 1, 0) for e in overflow]
    rng = np.random.default_rng(3)
    shifts = np.arange(8, dtype=np.int64)
    r = np.round(rng.laplace(0, 300, 20000)).astype(np.int64)
    j = rng.integers(0, len(shifts), len(r))
    sym = split_residuals(r, j, shifts)
    assert (sym.token >= ESC_NEG).any() and (sym.token < ESC_NEG).any()
    assert ((sym.cls == 0) | (sym.token >= ESC_NEG)).all()
    np.testing.assert_array_equal(
        join_residuals(sym.token, sym.low, j, sym.cls, sym.extra, shifts), r)
