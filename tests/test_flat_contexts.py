"""Flat contexts: a voxel whose causal neighbours all equal their reference (constant
background) is predicted as that value and coded with its own table row."""

from __future__ import annotations

import numpy as np
import pytest

import models
from models import predictor as predictor_module
from models.codec import slab_contexts
from models.entropy import CodingTables
from models.features import N_SCALES, default_features, flat_contexts
from models.registry import load_model, model_by_id
from models.tables import fitted_tables, prior_tables

PREVIOUS_DEFAULT = bytes.fromhex("7125ed7a214ca2c182d8d24d4be3fa0f")


def padded_phantom(shape=(6, 40, 48), seed=0) -> np.ndarray:
    """Noisy tissue inside a circle, a constant -2000 outside it (CT padding)."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, shape[1]), np.linspace(-1, 1, shape[2]), indexing="ij")
    vol = 40 + 300 * (x ** 2 + y ** 2 < 0.3) + rng.normal(0, 20, shape)
    vol[:, x ** 2 + y ** 2 > 0.8] = -2000
    return np.round(vol).astype(np.int16)


def _contexts(values, valid):
    ref, s, _, x = default_features(np.asarray(values, np.int32), np.asarray(valid, bool))
    return ref, flat_contexts(s, x[:len(values)].T)


def test_flat_means_every_valid_neighbour_equals_the_reference():
    k = 26
    values = np.full((k, 4), 7)
    values[5, 1] = 8                 # one neighbour differs: not flat
    values[20, 2] = 9                # differs, but is not valid (outside the slab): flat
    values[:, 3] = 1000 + np.arange(k) % 2   # a texture: not flat
    valid = np.ones((k, 4), bool)
    valid[20, 2] = False
    ref, flat = _contexts(values, valid)
    assert flat.tolist() == [True, False, True, False]
    assert ref[0] == 7 and ref[2] == 7


def test_flat_contexts_predict_their_reference_with_the_flat_row():
    shipped = load_model("default")
    flat_row = shipped.tables.flat_index
    assert shipped.tables.flat and shipped.tables.tokens.shape[0] == flat_row + 1
    k = shipped.neighbourhood.size
    values = np.full((k, 3), -2000, np.int32)
    values[:, 2] = np.arange(k) * 3        # a busy context
    pred, j = shipped.predict(values, np.ones((k, 3), bool), -32768, 32767)
    assert pred[:2].tolist() == [-2000, -2000] and j[:2].tolist() == [flat_row] * 2
    assert j[2] < flat_row
    # the flat row is far more certain of a zero residual than any scale row
    p0 = shipped.tables.tokens[:, 24] / shipped.tables.tokens.sum(axis=1)
    assert p0[flat_row] > 0.99 and p0[flat_row] > p0[:flat_row].max()


def test_sparing_the_network_on_flat_contexts_changes_no_output(monkeypatch):
    shipped = load_model("default")
    vol = padded_phantom()
    for _, values, valid in slab_contexts(shipped.neighbourhood, vol, 6, (16, 24)):
        monkeypatch.setattr(predictor_module, "SPARE_NETWORK", 0.0)
        spared = shipped.predict(values, valid, -32768, 32767)
        monkeypatch.setattr(predictor_module, "SPARE_NETWORK", 2.0)
        full = shipped.predict(values, valid, -32768, 32767)
        np.testing.assert_array_equal(spared[0], full[0])
        np.testing.assert_array_equal(spared[1], full[1])
        assert (spared[1] == shipped.tables.flat_index).mean() > 0.2


def test_the_flat_row_codes_constant_background_in_fewer_bytes():
    """The same network with and without the flat row, tables fitted on the same samples."""
    from models import train
    vol = padded_phantom((8, 64, 64), seed=1)
    rng = np.random.default_rng(0)
    shipped = load_model("default")
    samples = train.collect_samples([vol], 8, 1, 1.0, rng, tile=(64, 64),
                                    hood=shipped.neighbourhood)
    with_flat = train.refit_tables(shipped, samples, True)
    without = train.refit_tables(shipped, samples, False)
    assert with_flat.tables.flat and not without.tables.flat
    assert train.evaluate(with_flat, samples) < train.evaluate(without, samples)
    flat = flat_contexts(samples.s, samples.x[:, :shipped.neighbourhood.size])
    background = samples.where(flat)
    assert len(background.value) > 0.2 * len(samples.value)
    assert train.evaluate(with_flat, background) < 0.25 * train.evaluate(without, background)


def test_fitted_tables_keep_the_flat_row_of_their_prior():
    r = np.zeros(50, np.int64)
    j = np.full(50, prior_tables(flat=True).flat_index)
    assert fitted_tables(r, j, prior=prior_tables(flat=True)).flat
    assert not fitted_tables(r[:0], j[:0], prior=prior_tables()).flat
    with pytest.raises(IndexError):
        fitted_tables(r, j, flat=False)     # flat indices need the flat row
    with pytest.raises(ValueError, match="wrong shape"):
        CodingTables(np.ones((N_SCALES + 2, 50)), np.ones(24))


def test_previous_default_model_still_codes_without_the_flat_row():
    old = model_by_id(PREVIOUS_DEFAULT)
    assert not old.tables.flat
    vol = padded_phantom()
    _, values, valid = next(slab_contexts(old.neighbourhood, vol, 6, (16, 24)))
    _, j = old.predict(values, valid, -32768, 32767)
    assert j.max() < N_SCALES and old.tables.fraction_bins == 1


def test_padded_volumes_round_trip_with_flat_contexts():
    vol = padded_phantom((5, 37, 45))
    for options in ({}, {"slab": 2, "tile": (9, 13)}):
        blob = models.encode_volume(vol, **options)
        np.testing.assert_array_equal(models.decode_volume(blob), vol)
        np.testing.assert_array_equal(models.decode_slices(blob, 3, 5), vol[3:5])
