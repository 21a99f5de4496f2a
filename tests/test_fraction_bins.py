"""Fraction bins: the coding tables keep one row per quarter of the predicted mean's fraction,
so that a mean that fell just below or above the rounded prediction shifts the residual's
distribution; and adapted blobs carry their token tables as a difference, or not at all."""

from __future__ import annotations

import copy
import io
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import models
from models import adapt
from models.container import unpack_header
from models.entropy import TOKEN_RANGE, CodingTables, row_shifts
from models.features import N_SCALES, SCALE_ZERO, fraction_bin, prediction
from models.registry import load_model


@settings(max_examples=200, deadline=None)
@given(st.integers(-2 ** 20, 2 ** 20), st.integers(1, 2 ** 17), st.integers(1, 2 ** 17),
       st.integers(1, 12))
def test_the_bin_is_where_the_exact_mean_fell_before_rounding(acc, s, mult, shift):
    """``pred = round(ref + mean)`` with ``mean = acc * mult * s / 2**(shift + 6)``; the bin
    is ``floor(4 * (mean + 1/2 - (pred - ref)))``, in exact rational arithmetic."""
    mean = Fraction(acc * mult * s, 2 ** (shift + 6))
    pred = prediction(np.array([0]), np.array([s]), np.array([acc]), mult, shift, -2 ** 62,
                      2 ** 62)[0]
    assert pred == math.floor(mean + Fraction(1, 2))
    want = math.floor(4 * (mean + Fraction(1, 2) - pred))
    assert fraction_bin(np.array([s]), np.array([acc]), mult, shift, 4)[0] == want


def test_table_layouts_follow_their_row_count():
    t = CodingTables(np.ones((4 * N_SCALES + 1, 50)), np.ones(24))
    assert (t.fraction_bins, t.flat, t.flat_index) == (4, True, 4 * N_SCALES)
    np.testing.assert_array_equal(t.shifts[:8], np.repeat(row_shifts(1)[:2], 4))
    assert len(t.shifts) == 4 * N_SCALES + 1 and t.shifts[-1] == 0
    plain = CodingTables(np.ones((N_SCALES, 50)), np.ones(24))
    assert (plain.fraction_bins, plain.flat) == (1, False)
    with pytest.raises(ValueError, match="wrong shape"):
        CodingTables(np.ones((2 * N_SCALES, 50)), np.ones(24))


def test_shipped_rows_lean_toward_the_side_the_mean_fell_on():
    tables = load_model("default").tables
    assert tables.fraction_bins == 4
    p = tables.tokens / tables.tokens.sum(axis=1, keepdims=True)
    row = SCALE_ZERO * 4           # scale 1: one residual per token
    below, above = p[row + 0], p[row + 3]   # the mean just above pred - 1/2, just below pred + 1/2
    minus, plus = TOKEN_RANGE - 1, TOKEN_RANGE + 1
    assert below[minus] > 1.5 * below[plus] and above[plus] > 1.5 * above[minus]


def _adapted(monkeypatch, vol):
    monkeypatch.setattr(adapt, "ADAPT_STEPS", (5, 5))
    monkeypatch.setattr(adapt, "pays_off", lambda *args: True)
    return adapt.adapt(load_model("default"), vol, 8, (40, 48))


def _volume(seed=21):
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, 40), np.linspace(-1, 1, 48), indexing="ij")
    vol = 500 + 400 * (x ** 2 + y ** 2 < 0.4) + rng.normal(0, 6, (10, 40, 48))
    return np.round(vol).astype(np.int16)


def test_adapted_token_tables_travel_as_a_difference_or_stay_home(monkeypatch):
    base = load_model("default")
    adapted = _adapted(monkeypatch, _volume())
    refit = copy.copy(adapted)
    refit.tables = CodingTables(base.tables.tokens + 3, adapted.tables.classes)
    refit.table_base = base.tables.tokens
    shipped = adapt._with_tokens(refit, base.tables.tokens)
    for predictor, key in ((refit, "token_delta"), (shipped, None)):
        data = adapt.embedded_bytes(predictor)
        files = adapt.embedded_arrays(data)
        assert "token_table" not in files
        assert (key in files) if key else "token_delta" not in files
        back = adapt.with_embedded(base, data)
        np.testing.assert_array_equal(back.tables.tokens, predictor.tables.tokens)
    assert len(adapt.embedded_bytes(shipped)) < len(adapt.embedded_bytes(refit))


def test_a_table_difference_of_the_wrong_shape_is_refused():
    base = load_model("default")
    buf = io.BytesIO()
    np.savez_compressed(buf, head=base.head, token_delta=np.zeros((3, 50), np.int8))
    with pytest.raises(models.CorruptBlobError, match="table difference"):
        adapt.with_embedded(base, buf.getvalue())


def test_adapted_blobs_decode_exactly_whichever_tables_they_chose(monkeypatch):
    monkeypatch.setattr(adapt, "ADAPT_STEPS", (5, 5))
    monkeypatch.setattr(adapt, "pays_off", lambda *args: True)
    vol = _volume(22)
    blob = models.encode_volume(vol, adapt=True)
    assert unpack_header(blob)[0].embedded
    np.testing.assert_array_equal(models.decode_volume(blob), vol)
    np.testing.assert_array_equal(models.decode_slices(blob, 6, 9), vol[6:9])


@pytest.mark.parametrize("gain_bits", [0.0001, 0.002, 10.0])
def test_adaptation_weighs_refitted_tables_against_their_bytes(monkeypatch, gain_bits):
    """Refitted token tables travel exactly, rounded to coarser steps, or not at all: whichever
    costs least in bits of the volume (estimated) plus bytes in the blob."""
    monkeypatch.setattr(adapt, "ADAPT_STEPS", (5, 5))
    monkeypatch.setattr(adapt, "TUNE_RUNS", 1)
    monkeypatch.setattr(adapt, "pays_off", lambda *args: True)
    base = load_model("default")
    seen = []
    real = adapt._table_variants

    def variants(adapted, shipped):
        seen.extend(real(adapted, shipped))
        return iter(seen)
    monkeypatch.setattr(adapt, "_table_variants", variants)

    def bits(p, r, j):   # the shipped tables (last) cost gain_bits, coarser ones a little
        return 2.0 + (gain_bits if p is seen[-1] else gain_bits * 1e-3 * seen.index(p))
    monkeypatch.setattr(adapt, "check_bits", bits)
    vol = _volume(23)
    best = adapt.adapt(base, vol, 8, (40, 48))
    assert len(seen) == 2 + len(adapt.COARSE_SHIFTS)
    cost = [bits(p, None, None) * vol.size + 8 * len(adapt.embedded_bytes(p)) for p in seen]
    assert best is seen[int(np.argmin(cost))]
    sizes = [len(adapt.embedded_bytes(p)) for p in seen]
    assert sizes[-1] < min(sizes[:-1]) and min(sizes[1:-1]) < sizes[0]


def test_coarse_token_tables_are_positive_near_and_travel_exactly(monkeypatch):
    base = load_model("default")
    adapted = _adapted(monkeypatch, _volume())
    rng = np.random.default_rng(3)
    refit = base.tables.tokens * rng.uniform(0.3, 3.0, base.tables.tokens.shape)
    refit = np.maximum(1, np.round(refit)).astype(np.int64)
    for shift in adapt.COARSE_SHIFTS:
        coarse = adapt.coarse_tokens(refit, base.tables.tokens, shift)
        step = adapt.token_steps(base.tables.tokens, shift)
        assert (coarse > 0).all() and not ((coarse - base.tables.tokens) % step).any()
        # nearest step, or the least positive one
        assert (np.abs(coarse - refit) <= np.where(coarse > step, step // 2, step - 1)).all()
        twin = copy.copy(adapted)
        twin.tables = CodingTables(coarse, adapted.tables.classes)
        twin.table_base = base.tables.tokens
        data = adapt.embedded_bytes(twin)
        files = adapt.embedded_arrays(data)
        assert {"token_steps", "token_shift"} <= set(files)
        assert "token_delta" not in files and int(files["token_shift"]) <= shift
        back = adapt.with_embedded(base, data)
        np.testing.assert_array_equal(back.tables.tokens, coarse)


@pytest.mark.parametrize("shift", [None, -1, 40, [3, 3], 3.0])
def test_token_steps_without_a_valid_shift_are_refused(shift):
    base = load_model("default")
    arrays = {"head": base.head, "token_steps": np.zeros(base.tables.tokens.shape, np.int8)}
    if shift is not None:
        arrays["token_shift"] = np.array(shift, np.float32 if shift == 3.0 else np.int8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with pytest.raises(models.CorruptBlobError, match="steps"):
        adapt.with_embedded(base, buf.getvalue())
