"""Blob format 5 codes each token in two stages (models.entropy): a first stage of 14 symbols
and, for the few tokens beyond it, a second one in the tail stream. The split must be exact
(the same tokens back, the same probabilities), the compiled rows must equal numpy's, and it
must not cost bits."""

from __future__ import annotations

import numpy as np
import pytest

import models
from models import kernels
from models.codec import decode_slabs, encode_slab
from models.entropy import (BEYOND, ESC_NEG, ESC_POS, N_TOKENS, RANGE_EDGE, STAGE_RANGE,
                            STAGE_WIDTH, TAIL_WIDTH, TOKEN_RANGE, stage_rows, stage_symbols,
                            stage_tokens, tail_rows, truncate_rows)
from models.registry import load_model

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="compiled kernels not built")


def test_every_token_splits_into_two_stages_and_back():
    token = np.arange(N_TOKENS)
    first, beyond, above, second = stage_symbols(token)
    assert first.min() >= 0 and first.max() == STAGE_WIDTH - 1
    assert second.min() >= 0 and second.max() == BEYOND
    q = token[:2 * TOKEN_RANGE] - TOKEN_RANGE
    assert (beyond[:2 * TOKEN_RANGE] == ((q < -STAGE_RANGE) | (q >= STAGE_RANGE))).all()
    assert beyond[ESC_NEG] and beyond[ESC_POS] and above[-1] and not above[-2]
    np.testing.assert_array_equal(stage_tokens(first, second), token)


def test_a_second_stage_symbol_past_its_alphabet_is_refused():
    first = np.array([2 * STAGE_RANGE + 1])
    with pytest.raises(ValueError, match="corrupt"):
        stage_tokens(first, np.array([BEYOND + 1]))


def _random_rows(rng, n):
    rows = rng.integers(1, 5000, (n, N_TOKENS)).astype(np.float64)
    qmin = rng.integers(-40, 30, n)
    qmax = qmin + rng.integers(0, 60, n)
    wide = rng.random(n) < 0.3           # ends far away: untruncated rows
    qmin[wide], qmax[wide] = -1000, 1000
    return rows, qmin, qmax


def test_the_two_stages_multiply_to_the_whole_rows_probabilities():
    """P(first) * P(second | beyond) = P(token) for every token and truncation: the split
    codes the same information (the coder's rounding aside)."""
    rng = np.random.default_rng(0)
    rows, qmin, qmax = _random_rows(rng, 200)
    whole = truncate_rows(rows.copy(), qmin, qmax)
    p = whole / whole.sum(axis=1, keepdims=True)
    first_rows = stage_rows(whole)
    p1 = first_rows / first_rows.sum(axis=1, keepdims=True)
    for token in range(N_TOKENS):
        first, beyond, above, second = stage_symbols(np.full(len(rows), token))
        joint = p1[np.arange(len(rows)), first]
        if beyond.all():
            t = tail_rows(whole, above)
            with np.errstate(invalid="ignore"):
                joint = joint * t[np.arange(len(rows)), second] / t.sum(axis=1)
            joint = np.nan_to_num(joint)     # a side with no probability at all
        np.testing.assert_allclose(joint, p[:, token], rtol=1e-12, atol=1e-15)


@needs_kernels
def test_compiled_first_stage_rows_equal_numpy_exactly():
    rng = np.random.default_rng(1)
    table = rng.integers(1, 1 << 16, (40, N_TOKENS)).astype(np.float64)
    cum = np.zeros((40, 2 * TOKEN_RANGE + 1))
    cum[:, 1:] = np.cumsum(table[:, :2 * TOKEN_RANGE], axis=1)
    n = 3000
    row = rng.integers(0, 40, n)
    _, qmin, qmax = _random_rows(rng, n)
    expected = stage_rows(truncate_rows(table[row].copy(), qmin, qmax))
    out = np.empty((n, STAGE_WIDTH))
    kernels.bounded_rows(table, TOKEN_RANGE, row, qmin, qmax, RANGE_EDGE, out, STAGE_RANGE, cum)
    np.testing.assert_array_equal(out, expected)
    # the decoder's form: bounds from the predictions and a value range
    shifts = rng.integers(0, 5, 40)
    pred = rng.integers(0, 4096, n)
    lo, hi = 0, 4095
    qlo, qhi = (lo - pred) >> shifts[row], (hi - pred) >> shifts[row]
    expected = stage_rows(truncate_rows(table[row].copy(), qlo, qhi))
    sh = kernels.token_rows(table, TOKEN_RANGE, shifts, row, pred, (lo, hi), RANGE_EDGE, out,
                            STAGE_RANGE, cum)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(sh, shifts[row])
    with pytest.raises(ValueError, match="wrong type or shape"):     # no prefix sums
        kernels.token_rows(table, TOKEN_RANGE, shifts, row, pred, (lo, hi), RANGE_EDGE, out,
                           STAGE_RANGE)


@needs_kernels
def test_compiled_second_stage_rows_and_tokens_equal_numpy_exactly():
    rng = np.random.default_rng(2)
    table = rng.integers(1, 1 << 16, (40, N_TOKENS)).astype(np.float64)
    shifts = rng.integers(0, 5, 40)
    n = 3000
    row = rng.integers(0, 40, n)
    pred = np.concatenate([rng.integers(0, 4096, n - 100), np.full(50, 2), np.full(50, 4090)])
    above = rng.random(n) < 0.5
    near_the_ends = ((0 - pred) >> shifts[row], (4095 - pred) >> shifts[row])
    for qmin, qmax in (near_the_ends, _random_rows(rng, n)[1:]):
        whole = truncate_rows(table[row].copy(), qmin, qmax)
        got = kernels.tail_rows(table, TOKEN_RANGE, STAGE_RANGE, row, qmin, qmax, above,
                                RANGE_EDGE, TAIL_WIDTH)
        np.testing.assert_array_equal(got, tail_rows(whole, above))
    token = rng.integers(0, N_TOKENS, n)
    first, beyond, _, second = stage_symbols(token)
    np.testing.assert_array_equal(kernels.stage_tokens(first, second, TOKEN_RANGE, STAGE_RANGE),
                                  token)
    bad = second.copy()
    bad[0] = BEYOND + 1
    assert kernels.stage_tokens(first, bad, TOKEN_RANGE, STAGE_RANGE) is None
    assert kernels.stage_tokens(first, second[:-1], TOKEN_RANGE, STAGE_RANGE) is None


def _phantom(shape, seed):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    vol = 1000 + 800 * (x ** 2 + y ** 2 < 0.4) + 300 * np.sin(6 * x + 2 * z)
    return np.round(vol + rng.normal(0, 25, shape)).astype(np.int16)


def test_two_stages_cost_no_bits_and_decode_exactly():
    """The same slab in one and two stages: the same volume back, and the two-stage payload
    larger only by its third stream per slice (a length and at most two words of flush)."""
    predictor = load_model("default")
    vol = _phantom((6, 64, 72), 2)
    vol[:, :, :4] = -2000                          # jumps: escapes on both sides
    args = (predictor, vol, -2048, 4095, 8, (64, 72))
    one, two = encode_slab(*args, two_stage=False), encode_slab(*args, two_stage=True)
    assert len(one) - 16 <= len(two) <= len(one) + 6 * (4 + 8)
    for payload, flag in ((one, False), (two, True)):
        (back,) = decode_slabs(predictor, [payload], [6], 64, 72, -2048, 4095, 8, (64, 72),
                               two_stage=flag)
        np.testing.assert_array_equal(back, vol)


def test_blobs_decode_the_same_without_the_compiled_kernels(monkeypatch):
    vol = _phantom((5, 40, 50), 3)
    blob = models.encode_volume(vol, adapt=False)
    assert models.blob_info(blob)["format"] == 6 and models.blob_info(blob)["stream_group"] > 1
    monkeypatch.setenv("VOXARC_KERNELS", "numpy")
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "1")
    np.testing.assert_array_equal(models.decode_volume(blob), vol)
    assert models.encode_volume(vol, adapt=False) == blob


def test_two_stage_decoding_needs_the_value_range():
    from models.entropy import StepDecoder
    with pytest.raises(ValueError, match="within the range"):
        StepDecoder(load_model("default").tables, [], None, two_stage=True)


def _segment_starts(ends: list[int]) -> list[int]:
    return [0, *ends[:-1]]


@needs_kernels
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compiled_step_fields_equal_numpy_per_segment(seed):
    """The decoder's compiled step between its range decoders' calls (models.kernels.
    StepFields): the tail rows of the symbols beyond their first stage, in order, each
    segment's share of every field, the tokens, the uniform stream's sizes and the decoded
    values are those of the separate kernels and numpy; fields that do not fit and values
    outside the range are refused."""
    rng = np.random.default_rng(seed)
    table = np.ascontiguousarray(rng.integers(1, 1 << 16, (40, N_TOKENS)).astype(np.float64))
    shifts = rng.integers(0, 5, 40)
    lo, hi = -2048, 4095
    fields = kernels.StepFields(table, TOKEN_RANGE, STAGE_RANGE, lo, hi, RANGE_EDGE, TAIL_WIDTH)
    for n in (1, 7, 700, 3000):      # past the first buffers: they grow
        row = rng.integers(0, 40, n)
        sh = shifts[row]
        pred = np.concatenate([rng.integers(lo, hi + 1, n - n // 4), np.full(n // 8, lo + 2),
                               np.full(n // 4 - n // 8, hi - 1)])
        token = rng.integers(0, N_TOKENS, n)
        first, beyond, above, second = stage_symbols(token)
        cuts = np.sort(rng.choice(np.arange(1, n), min(n - 1, rng.integers(0, 9)), replace=False))
        ends = np.append(cuts, n).tolist()
        fields.reserve(n, ends)
        fields.first[:n] = first
        m = fields.tail_rows(n, len(ends), row.ctypes.data, pred.ctypes.data, sh.ctypes.data)
        assert m == beyond.sum()
        qmin, qmax = (lo - pred) >> sh, (hi - pred) >> sh
        np.testing.assert_array_equal(fields.tail[:m], kernels.tail_rows(
            table, TOKEN_RANGE, STAGE_RANGE, row[beyond], qmin[beyond], qmax[beyond],
            above, RANGE_EDGE, TAIL_WIDTH))
        starts = _segment_starts(ends)
        per_segment = np.concatenate([[0], np.cumsum(beyond)])
        np.testing.assert_array_equal(fields.beyond[:len(ends) + 1],
                                      per_segment[[*starts, n]])
        fields.second[:m] = second
        n_esc, n_low = fields.tokens(n, m, len(ends), sh.ctypes.data)
        np.testing.assert_array_equal(fields.token[:n], token)
        esc, has_low = token >= ESC_NEG, sh > 0
        assert (n_esc, n_low) == (esc.sum(), has_low.sum())
        for counts, mask in ((fields.escapes, esc), (fields.lows, has_low)):
            np.testing.assert_array_equal(counts[:len(ends) + 1],
                                          np.concatenate([[0], np.cumsum(mask)])[[*starts, n]])
        np.testing.assert_array_equal(fields.sizes[:n_low], 1 << sh[has_low])
        low = rng.integers(0, 1 << sh[has_low])
        cls = rng.integers(0, 6, n_esc)
        extra = rng.integers(0, 1 << np.maximum(cls[cls > 1] - 1, 0))
        fields.low[:n_low], fields.cls[:n_esc], fields.extra[:len(extra)] = low, cls, extra
        residual = kernels.join(token, sh, low, cls, extra, TOKEN_RANGE)
        got = fields.join(n, n_low, n_esc, len(extra), pred.ctypes.data, sh.ctypes.data)
        if ((pred + residual < lo) | (pred + residual > hi)).any():
            assert got is None
        else:
            np.testing.assert_array_equal(got, pred + residual)
        if n_low:
            with pytest.raises(ValueError, match="do not match"):
                fields.join(n, n_low - 1, n_esc, len(extra), pred.ctypes.data, sh.ctypes.data)
    with pytest.raises(ValueError, match="corrupt"):      # counts that do not fit
        fields.tokens(n, m + 1, len(ends), sh.ctypes.data)
    fields.first[0] = STAGE_WIDTH                           # outside the first-stage alphabet
    with pytest.raises(ValueError, match="corrupt"):
        fields.tail_rows(n, len(ends), row.ctypes.data, pred.ctypes.data, sh.ctypes.data)


@needs_kernels
@pytest.mark.parametrize("dtype, shape, tile", [("uint16", (5, 37, 50), (16, 24)),
                                                ("int16", (3, 64, 72), (64, 256)),
                                                ("uint8", (4, 9, 200), (8, 16))])
def test_blobs_decode_the_same_with_the_compiled_step_fields(dtype, shape, tile):
    """Volumes with escapes of every class on both sides (jumps across the whole range),
    flat runs and noise decode to themselves with the compiled step fields and without
    them (the step-by-step path), slices and partial slabs included."""
    from models.entropy import StepDecoder
    rng = np.random.default_rng(len(shape) + shape[1])
    info = np.iinfo(dtype)
    vol = np.clip(rng.normal(0, 30, shape).cumsum(axis=2) + (info.min + info.max) // 2,
                  info.min, info.max).astype(dtype)
    jumps = rng.random(shape) < 0.02
    vol[jumps] = rng.choice([info.min, info.max], jumps.sum())
    vol[:, :3] = info.min
    blob = models.encode_volume(vol, slab=3, tile=tile, adapt=False)
    calls = []
    real = StepDecoder.decode_fields
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VOXARC_DECODE_WORKERS", "1")
        patch.setattr(load_model("default"), "device", "cpu")   # the step fields are the CPU's
        patch.setattr(StepDecoder, "decode_fields",
                      lambda self, *a: calls.append(1) or real(self, *a))
        with_fields = models.decode_volume(blob), models.decode_slices(blob, 1, 2)
        assert calls, "the decoder did not use the compiled step fields"
        patch.setattr(kernels, "StepFields", lambda *a: None)
        calls.clear()
        without = models.decode_volume(blob), models.decode_slices(blob, 1, 2)
        assert not calls
    for got in (with_fields, without):
        np.testing.assert_array_equal(got[0], vol)
        np.testing.assert_array_equal(got[1], vol[1:2])


@needs_kernels
@pytest.mark.parametrize("seed, spread", [(0, 1), (1, 8), (2, 20)])
def test_compiled_slice_symbols_code_the_same_streams(seed, spread):
    """The encoder's compiled symbols of a slice (models.entropy.encode_residuals) give the
    streams split_residuals and encode_slice give, byte for byte: residuals near and far
    (escapes of every class, most symbols beyond their first stage when ``spread`` is wide,
    past the first guess of the tail's length), rows with and without low bits, predictions
    at the ends of the range, several symbols a step."""
    from models.entropy import encode_residuals, encode_slice, split_residuals, token_bounds
    tables = load_model("default").tables
    rng = np.random.default_rng(seed)
    n = 6000
    j = rng.integers(0, len(tables.tokens), n)
    lo, hi = -2048, 4095
    pred = np.concatenate([rng.integers(lo, hi + 1, n - 200), np.full(100, lo),
                           np.full(100, hi)])
    r = (rng.laplace(0, 1, n) * 2.0 ** rng.integers(0, spread + 1, n)).astype(np.int64)
    r = np.clip(pred + r, lo, hi) - pred           # residuals the range holds
    step_of = np.sort(rng.integers(0, 400, n))
    sym = split_residuals(r, j, tables.shifts)
    if spread >= 20:
        assert (sym.cls > 3).any() and (sym.token >= ESC_NEG).mean() < 0.5
        assert (stage_symbols(sym.token)[1]).mean() > 1 / 8
    expected = encode_slice(tables, sym, j, step_of,
                            token_bounds(pred, tables.shifts[j], lo, hi), two_stage=True)
    got = encode_residuals(tables, r, j, pred, step_of, (lo, hi))
    assert len(got) == len(expected) == 3
    for stream, reference in zip(got, expected):
        np.testing.assert_array_equal(stream, reference)


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 64, 72), (3, 37, 50)])   # whole tiles; phantom voxels
def test_a_step_decoded_outside_the_range_is_a_corrupt_blob(monkeypatch, shape):
    """Decoded values outside the volume's range (what a corrupt stream that passed its CRC
    would give) raise CorruptBlobError from the compiled step fields, never wrong voxels."""
    from models.container import CorruptBlobError
    vol = _phantom(shape, 4)
    blob = models.encode_volume(vol, slab=3, tile=(16, 24), adapt=False)
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "1")
    monkeypatch.setattr(load_model("default"), "device", "cpu")   # not a GPU's torch layers
    np.testing.assert_array_equal(models.decode_volume(blob), vol)
    monkeypatch.setattr(kernels.StepFields, "join", lambda self, *a: None)
    with pytest.raises(CorruptBlobError, match="outside the volume's value range"):
        models.decode_volume(blob)
