"""The seed paper's models (paper-cube, paper-pyramid): exact round trips, causal contexts, and
the float64 exact path of the integer network."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from models import decode_slices, decode_volume, encode_volume
from models.codec import slab_contexts
from models.intnet import IntLayer, IntMLP, quantize_wide_mlp
from models.paper import CUBE_NEIGHBOURHOOD, PYRAMID_NEIGHBOURHOOD
from models.registry import load_model

PAPER_MODELS = ("paper-cube", "paper-pyramid")


def phantom(rng, shape, dtype):
    """A smooth blob with noise and a flat background, in the dtype's range."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    info = np.iinfo(dtype)
    base = 0 if info.min == 0 else -1000 if info.bits > 8 else -100
    amp = 1500 if info.bits > 8 else 100
    v = base + amp * np.exp(-2 * (x ** 2 + y ** 2 + z ** 2)) + rng.normal(0, amp / 50, shape)
    return np.clip(np.round(v), info.min, info.max).astype(dtype)


# ------------------------------------------------------------------ neighbourhoods
def test_paper_neighbourhoods_are_the_papers():
    cube = set(CUBE_NEIGHBOURHOOD.offsets)
    assert len(cube) == CUBE_NEIGHBOURHOOD.size == 5 * 121 + 5 * 11 + 5
    assert all(-5 <= dy <= 5 and -5 <= dx <= 5 and -5 <= dz <= 0 for dz, dy, dx in cube)
    pyr = set(PYRAMID_NEIGHBOURHOOD.offsets)
    assert len(pyr) == PYRAMID_NEIGHBOURHOOD.size == 84 + 81 + 25 + 1
    radius = {0: 6, -1: 4, -2: 2, -3: 0}
    assert all(max(abs(dy), abs(dx)) <= radius[dz] for dz, dy, dx in pyr)
    assert sum(dz == -1 for dz, _, _ in pyr) == 81 and (-3, 0, 0) in pyr


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", PAPER_MODELS)
@pytest.mark.parametrize("dtype,shape", [("int16", (7, 12, 13)), ("uint16", (3, 9, 17)),
                                         ("uint8", (2, 5, 4)), ("int16", (1, 1, 1)),
                                         ("uint16", (2, 1, 6))])
def test_paper_model_round_trips_bit_exactly(name, dtype, shape):
    rng = np.random.default_rng(hash((name, dtype, shape)) % 2 ** 32)
    vol = phantom(rng, shape, np.dtype(dtype))
    blob = encode_volume(vol, model=name, slab=4)
    out = decode_volume(blob)
    assert out.dtype == vol.dtype and out.shape == vol.shape
    np.testing.assert_array_equal(out, vol)
    if shape[0] > 4:
        np.testing.assert_array_equal(decode_slices(blob, 4, shape[0]), vol[4:])


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_paper_model_round_trips_extremes(name):
    rng = np.random.default_rng(5)
    vol = rng.choice(np.array([-32768, 32767, 0, -1], np.int16), (3, 6, 7))
    np.testing.assert_array_equal(decode_volume(encode_volume(vol, model=name)), vol)


# ------------------------------------------------------------------ causality
def _contexts(hood, slab, zs, tile):
    if "tile" in inspect.signature(slab_contexts).parameters:
        return list(slab_contexts(hood, slab, zs, tile))
    return list(slab_contexts(hood, slab, zs))


def _tile_supported() -> bool:
    return "tile" in inspect.signature(slab_contexts).parameters


@pytest.mark.parametrize("name", ("default",) + PAPER_MODELS)
@pytest.mark.parametrize("tile", [None, (4, 6)])
def test_contexts_never_read_a_voxel_not_yet_decoded(name, tile):
    """Change every voxel the decoder has not produced when it reaches the target, and
    separately every voxel the paper calls unknown (the target, later voxels of its slice and of
    later slices, other tiles of its slice): the target's context (its valid values), prediction
    and table index do not change."""
    if tile is not None and not _tile_supported():
        pytest.skip("this codec has no tiles")
    predictor = load_model(name)
    hood = predictor.neighbourhood
    a, b = hood.slopes
    rng = np.random.default_rng(11)
    zs, ny, nx = 7, 11, 13
    slab = phantom(rng, (zs, ny, nx), np.dtype("int16"))
    th, tw = tile or (ny, nx)
    zz, yy, xx = np.meshgrid(np.arange(zs), np.arange(ny), np.arange(nx), indexing="ij")
    # the decoder's clock: all tiles advance together in tile-local coordinates
    clock = xx % tw + a * (yy % th) + b * zz
    targets = [(6, 10, 12), (6, 5, 6), (5, 0, 0), (4, 7, 0), (6, 4, 5), (3, 8, 12), (0, 3, 3)]
    for z, y, x in targets:
        same_tile = (yy // th == y // th) & (xx // tw == x // tw)
        raster_before = (zz < z) | ((zz == z) & same_tile & ((yy < y) | ((yy == y) & (xx < x))))
        not_decoded = clock >= clock[z, y, x]
        for unknown in (not_decoded, ~raster_before):
            other = slab.copy()
            noise = rng.integers(-32768, 32768, slab.shape).astype(np.int16)
            other[unknown] = noise[unknown]
            results = []
            for vol in (slab, other):
                zl, values, valid = _contexts(hood, vol, zs, (th, tw))[z]
                p = y * nx + x
                v, ok = values[:, p:p + 1], valid[:, p:p + 1]
                pred, j = predictor.predict(v, ok, -32768, 32767)
                results.append((np.where(ok, v, 0), ok, pred, j))
            for r0, r1 in zip(*results):
                np.testing.assert_array_equal(r0, r1, err_msg=f"{name} target {(z, y, x)}")


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_paper_predict_ignores_invalid_neighbours(name):
    predictor = load_model(name)
    rng = np.random.default_rng(4)
    k = predictor.neighbourhood.size
    values = rng.integers(-2000, 3000, (k, 64)).astype(np.int32)
    valid = rng.random(values.shape) < 0.6
    other = np.where(valid, values, rng.integers(-32768, 32767, values.shape)).astype(np.int32)
    for a, b in zip(predictor.predict(values, valid, -32768, 32767),
                    predictor.predict(other, valid, -32768, 32767)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ exact float64 path
def _wide_net(rng, sizes=(191, 64, 32, 1), wmax=32767, act_max=32767, leaky=7):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = rng.integers(-wmax, wmax + 1, (b, a))
        bias = rng.integers(-2 ** 30, 2 ** 30, b)
        shift = None if i == len(sizes) - 2 else rng.integers(14, 24, b)
        layers.append(IntLayer(w, bias, shift))
    return IntMLP(layers, "leaky", leaky, "float64", act_max, 65535, wmax)


def test_float64_path_equals_int64_reference_for_any_batch_and_threads():
    rng = np.random.default_rng(0)
    for _ in range(3):
        net = _wide_net(rng)
        x = rng.integers(-65535, 65536, (3000, 191))
        ref = net.reference(x)
        assert np.abs(ref).max() > 2 ** 24  # beyond what float32 could hold exactly
        np.testing.assert_array_equal(net(x), ref)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            parts = [net(x[a:a + 257]) for a in range(0, len(x), 257)]
        finally:
            torch.set_num_threads(threads)
        np.testing.assert_array_equal(np.concatenate(parts), ref)
    # hidden activations really take both signs (the LeakyReLU branch is exercised)
    h = x @ net.layers[0].weight.T + net.layers[0].bias
    assert (h < 0).any() and (h > 0).any()


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_shipped_paper_networks_equal_their_reference(name):
    predictor = load_model(name)
    net = predictor.net
    assert net.exact == "float64" and net.activation == "leaky"
    rng = np.random.default_rng(2)
    x = rng.integers(-3000, 5000, (400, net.layers[0].weight.shape[1]))
    x[:50] = rng.integers(-65535, 65536, (50, x.shape[1]))
    np.testing.assert_array_equal(net(x), net.reference(x))


def test_wide_network_file_round_trip_and_default_format_unchanged():
    rng = np.random.default_rng(3)
    net = _wide_net(rng, (20, 8, 1))
    arrays = net.to_arrays("n_")
    assert "n_cfg" in arrays and arrays["n_w0"].dtype == np.int16
    back = IntMLP.from_arrays(arrays, "n_")
    x = rng.integers(-65535, 65536, (100, 20))
    np.testing.assert_array_equal(back(x), net(x))
    from models.registry import model_by_id
    default = model_by_id(bytes.fromhex("a96a0bc83834532eef8eaaa8c90e2322")).net  # 8-bit
    arrays = default.to_arrays("net_")
    assert "net_cfg" not in arrays and all(
        arrays[k].dtype == np.int8 for k in arrays if k.startswith("net_w"))
    assert default.is_default
    shipped = load_model("default").net        # 10-bit weights (c529efcb): a configuration
    assert shipped.to_arrays("net_")["net_cfg"].tolist() == [1, 0, 0, 64, 1023, 1024, 511]
    assert not shipped.is_default and shipped.integer_exact


def test_wide_quantisation_tracks_the_float_leaky_network():
    rng = np.random.default_rng(6)
    ws = [rng.normal(0, 0.2, (32, 40)), rng.normal(0, 0.2, (16, 32)), rng.normal(0, 0.2, (1, 16))]
    bs = [rng.normal(0, 0.1, 32), rng.normal(0, 0.1, 16), rng.normal(0, 0.1, 1)]
    x = rng.integers(-3000, 3000, (2000, 40))
    net, scale = quantize_wide_mlp(ws, bs, x, 1 / 3000, 65535, (16, 8, 16), 32767, 7)
    h = x / 3000
    for w, b in zip(ws[:-1], bs[:-1]):
        h = h @ w.T + b
        h = np.where(h >= 0, h, h / 128)
    want = (h @ ws[-1].T + bs[-1])[:, 0]
    got = net(x)[:, 0] * scale[0]
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()


# ------------------------------------------------------------------ training inputs
@pytest.mark.parametrize("name", PAPER_MODELS)
def test_precomputed_training_batches_equal_per_batch_gathering(name):
    """The contexts gathered once before training give bit for bit the float32 inputs and
    targets that gathering every batch gave (same padding, normalisation and order)."""
    from models.paper import PREDICTORS
    from models.paper_train import ContextSampler, _float_inputs, normalisation, stride_slices
    rng = np.random.default_rng(8)
    vol = phantom(rng, (9, 14, 15), np.dtype("int16"))
    vol[0, 0, 0] = -1200
    hood = PREDICTORS[name].neighbourhood
    sampler = ContextSampler(hood, vol, stride_slices(9, 2, 4))
    norm = normalisation(vol)
    sampler.precompute(norm, chunk=37)
    assert sampler.ctx.dtype == np.int16
    idx = rng.permutation(len(sampler))[:300]
    values, valid, target = sampler.gather(idx)
    x, y = sampler.batch(idx)
    want = _float_inputs(values, valid, *norm)
    assert (valid == False).any()  # noqa: E712  (padding is exercised)
    np.testing.assert_array_equal(x.numpy(), want.numpy())
    np.testing.assert_array_equal(
        y.numpy(), ((target - norm[0]) / norm[1]).astype(np.float32))


# ------------------------------------------------------------------ retired weights
def test_blobs_of_retired_paper_weights_still_decode(monkeypatch):
    """Retrained paper models keep their predecessors in models/weights/archive/<model id>.npz:
    a blob written with a retired model decodes with the archived weights, not the new ones."""
    import models.api as api
    from models.registry import ARCHIVE_DIR, _read, model_by_id
    archived = sorted(ARCHIVE_DIR.glob("*.npz"))
    kinds = {}
    for path in archived:
        old = _read(path)
        assert old.model_id.hex() == path.stem  # named by its own id
        kinds.setdefault(old.kind, old)
    assert set(PAPER_MODELS) <= set(kinds)
    for name in PAPER_MODELS:
        old = kinds[name]
        assert load_model(name).model_id != old.model_id  # really retired
        vol = phantom(np.random.default_rng(9), (3, 6, 7), np.dtype("int16"))
        with monkeypatch.context() as m:
            m.setattr(api, "load_model", lambda _name, _old=old: _old)
            blob = encode_volume(vol, model=name, adapt=False)
        assert model_by_id(old.model_id, name) is not load_model(name)
        np.testing.assert_array_equal(decode_volume(blob), vol)
