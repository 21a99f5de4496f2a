"""The paper models' per-volume residual distribution (models.paper_table) and their
least-squares starting point (models.paper_train._linear_init)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from models import CorruptBlobError, decode_volume, encode_volume
from models.adapt import embedded_bytes, with_embedded
from models.container import unpack_header
from models.paper import PREDICTORS
from models.registry import load_model
from tests.test_paper_models import phantom


def quiet_phantom(shape, seed=3):
    """Smooth, nearly noiseless int16 data: residuals far below the chest CT's spread that the
    shipped table was fitted on."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (200 + 3 * z + 2 * y + x + rng.integers(-2, 3, shape)).astype(np.int16)


def test_volume_table_is_fitted_carried_and_pays():
    vol = quiet_phantom((12, 20, 20))
    fitted = encode_volume(vol, model="paper-pyramid")
    shipped = encode_volume(vol, model="paper-pyramid", adapt=False)
    header, _ = unpack_header(fitted)
    assert header.embedded and len(header.embedded) < 1000
    assert not unpack_header(shipped)[0].embedded
    np.testing.assert_array_equal(decode_volume(fitted), vol)
    assert len(fitted) < 0.95 * len(shipped)


def test_volume_table_keeps_the_shipped_network():
    base = load_model("paper-pyramid")
    twin = type(base)(base.name, base.net, base.params.copy(), base.tables, base.meta)
    twin.params[6] = 3
    twin.tables = type(base.tables)(base.tables.tokens + 1, base.tables.classes + 2)
    back = with_embedded(base, embedded_bytes(twin))
    assert back.net is base.net and back.model_id == base.model_id
    np.testing.assert_array_equal(back.tables.tokens[3], base.tables.tokens[3] + 1)
    np.testing.assert_array_equal(back.tables.tokens[4], base.tables.tokens[4])
    np.testing.assert_array_equal(back.tables.classes, base.tables.classes + 2)


def _packed(arrays):
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("damage", ["center", "index", "zero", "short"])
def test_damaged_volume_table_is_a_corrupt_blob(damage):
    base = load_model("paper-cube")
    with np.load(io.BytesIO(embedded_bytes(base))) as npz:
        packed = npz["paper_table"].copy()
    if damage == "center":
        packed[0] += 1          # the network's normalisation may not change
    elif damage == "index":
        packed[6] = 10 ** 6     # no such table
    elif damage == "zero":
        packed[10] = 0          # a zero frequency could not code its symbol
    else:
        packed = packed[:-1]
    with pytest.raises(CorruptBlobError):
        with_embedded(base, _packed({"paper_table": packed}))


def test_volume_table_on_the_default_model_is_a_corrupt_blob():
    cube = load_model("paper-cube")
    with pytest.raises(CorruptBlobError):
        with_embedded(load_model("default"), embedded_bytes(cube))


def _sampler(kind, shape=(10, 24, 24)):
    from models.paper_train import ContextSampler, normalisation, stride_slices
    vol = phantom(np.random.default_rng(11), shape, np.dtype("int16"))
    hood = PREDICTORS[kind].neighbourhood
    sampler = ContextSampler(hood, vol, stride_slices(shape[0], hood.pad[0], 4))
    norm = normalisation(vol)
    sampler.precompute(norm)
    return sampler, norm


def test_linear_init_starts_at_the_least_squares_predictor():
    from models.paper_train import PaperMLP, _linear_init
    sampler, _ = _sampler("paper-pyramid")
    torch.manual_seed(0)
    model = PaperMLP(sampler.hood.size)
    idx = np.arange(len(sampler))
    mae = _linear_init(model, sampler, idx)
    x, y = sampler.batch(idx)
    a = np.hstack([x.double().numpy(), np.ones((len(x), 1))])
    coef = np.linalg.lstsq(a, y.double().numpy(), rcond=None)[0]
    with torch.no_grad():
        out = model(x).double().numpy()
    np.testing.assert_allclose(out, a @ coef, atol=2e-3)
    assert abs(mae - np.abs(a @ coef - y.numpy()).mean()) < 1e-3
    assert mae < 0.2 * np.abs(y.numpy() - y.numpy().mean()).mean()


def test_quantised_linear_start_tracks_the_float_network():
    """The exact integer network keeps the linear path's precision (int8 hidden weights lost
    it: their per-row scale was set by the other units' weights)."""
    from models.paper_train import (FloatResult, PaperMLP, _linear_init, float_predictions,
                                    quantize)
    sampler, norm = _sampler("paper-pyramid")
    torch.manual_seed(1)
    model = PaperMLP(sampler.hood.size)
    _linear_init(model, sampler, np.arange(len(sampler)))
    with torch.no_grad():  # as after some training: the other units matter a little
        for layer in model.linear_layers()[1:]:
            layer.weight[:2, 2:] += 0.01 * torch.randn_like(layer.weight[:2, 2:])
    res = FloatResult(model, *norm, 0, 0, 0.0, 0.0, 0.0)
    predictor = quantize("paper-pyramid", res, sampler, calib_size=len(sampler))
    values, valid, _ = sampler.gather(np.arange(len(sampler)))
    want = float_predictions(res, values, valid)
    got, _ = predictor.predict(values, valid, -32768, 32767)
    assert np.abs(got - want).mean() < 1.0


def test_paper_models_code_long_slabs_by_default():
    """The paper codes whole volumes; its models lean on five previous slices, so they get
    64-slice slabs unless the caller asks otherwise (the default model keeps 8)."""
    from models import blob_info
    vol = quiet_phantom((3, 5, 6))
    assert blob_info(encode_volume(vol, model="paper-pyramid"))["slab"] == 64
    assert blob_info(encode_volume(vol, model="paper-pyramid", slab=2))["slab"] == 2
    assert blob_info(encode_volume(vol))["slab"] == 8
