"""The integer network and the features are exact: fast paths equal plain int64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.context import Neighbourhood, is_causal, wavefront_slopes
from models.features import DEFAULT_NEIGHBOURHOOD, default_features, log2_quarters
from models.intnet import ACT_MAX, INPUT_MAX, IntLayer, IntMLP, quantize_mlp
from models.registry import load_model


def random_net(rng, sizes=(23, 32, 32, 2)):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = rng.integers(-127, 128, (b, a))
        bias = rng.integers(-50_000, 50_000, b)
        shift = None if i == len(sizes) - 2 else rng.integers(3, 12, b)
        layers.append(IntLayer(w, bias, shift))
    return IntMLP(layers)


def test_integer_network_equals_int64_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(5):
        net = random_net(rng)
        assert net.is_default and net.integer_exact    # the default settings imply it
        x = rng.integers(-INPUT_MAX, INPUT_MAX + 1, (5000, 23))
        np.testing.assert_array_equal(net(x), net.reference(x))


def test_shipped_model_equals_reference_and_is_batch_and_thread_invariant():
    net = load_model("default").net
    rng = np.random.default_rng(1)
    x = rng.integers(-INPUT_MAX, INPUT_MAX + 1, (20000, net.layers[0].weight.shape[1]))
    ref = net.reference(x)
    np.testing.assert_array_equal(net(x), ref)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        parts = [net(x[a:a + 777]) for a in range(0, len(x), 777)]
        np.testing.assert_array_equal(np.concatenate(parts), ref)
    finally:
        torch.set_num_threads(threads)


def test_overflowing_network_is_refused():
    w = np.full((4, 300), 127)
    try:
        IntMLP([IntLayer(w, np.zeros(4, np.int64), None)])
    except ValueError as exc:
        assert "2**24" in str(exc)
    else:
        raise AssertionError("a network that can exceed float32's exact range was accepted")


def test_quantised_network_tracks_the_float_network():
    rng = np.random.default_rng(2)
    ws = [rng.normal(0, 0.3, (16, 8)), rng.normal(0, 0.3, (2, 16))]
    bs = [rng.normal(0, 0.1, 16), rng.normal(0, 0.1, 2)]
    x = rng.integers(-500, 500, (4000, 8))
    net, scale = quantize_mlp(ws, bs, x, input_scale=1 / 64)
    h = np.maximum(x / 64 @ ws[0].T + bs[0], 0)
    want = h @ ws[1].T + bs[1]
    got = net(x) * scale
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert net(x)[:, 0].dtype == np.int64 and net.layers[0].shift.max() >= 0 and ACT_MAX == 1023


def test_ten_bit_quantisation_tracks_the_float_network_closer_and_is_stored_as_such():
    """Weights within +-511 (the adapted networks') instead of +-127: an integer network the
    kernels' integer layers run exactly (float64 elsewhere), nearer the float one, and read
    back from its arrays with the same settings and outputs."""
    rng = np.random.default_rng(4)
    ws = [rng.normal(0, 0.3, (64, 31)), rng.normal(0, 0.2, (32, 64)), rng.normal(0, 0.2, (2, 32))]
    bs = [rng.normal(0, 0.1, 64), rng.normal(0, 0.1, 32), rng.normal(0, 0.1, 2)]
    x = rng.integers(-INPUT_MAX, INPUT_MAX + 1, (20000, 31))
    want = x / 64
    for w, b in zip(ws, bs):
        want = want @ w.T + b
        want = np.maximum(want, 0) if w is not ws[-1] else want
    errors = {}
    for weight_max in (127, 511):
        net, scale = quantize_mlp(ws, bs, x, input_scale=1 / 64, weight_max=weight_max)
        assert max(np.abs(layer.weight).max() for layer in net.layers) == weight_max
        assert net.integer_exact and net.is_default == (weight_max == 127)
        got = net(x)
        np.testing.assert_array_equal(got, net.reference(x))
        errors[weight_max] = np.abs(got * scale - want).mean()
        again = IntMLP.from_arrays(net.to_arrays("net_"), "net_")
        assert (again.weight_max, again.exact, again.is_default) == \
            (net.weight_max, net.exact, net.is_default)
        np.testing.assert_array_equal(again(x), got)
    assert errors[511] < 0.5 * errors[127]


@pytest.mark.parametrize("calib", ["int64", "float32"])
def test_quantisation_shifts_are_those_of_int64_arithmetic(calib):
    """quantize_mlp computes in float32 or float64 (BLAS) for speed: its per-channel shifts
    must be the ones that exact int64 activations of the calibration inputs give."""
    rng = np.random.default_rng(3)
    ws = [rng.normal(0, 0.5, (32, 12)), rng.normal(0, 0.5, (16, 32)), rng.normal(0, 0.3, (2, 16))]
    bs = [rng.normal(0, 0.2, 32), rng.normal(0, 0.2, 16), rng.normal(0, 0.1, 2)]
    x = rng.integers(-INPUT_MAX, INPUT_MAX + 1, (20000, 12)).astype(calib)
    net, _ = quantize_mlp(ws, bs, x, input_scale=1 / 16)
    h = x.astype(np.int64)
    for layer in net.layers[:-1]:
        acc = h @ layer.weight.T + layer.bias - np.where(layer.shift > 0, 1 << np.maximum(layer.shift - 1, 0), 0)
        top = np.maximum(np.quantile(np.maximum(acc, 0), 0.9999, axis=0), 1.0)
        np.testing.assert_array_equal(layer.shift, np.maximum(np.ceil(np.log2(top / ACT_MAX)), 0))
        h = np.clip((h @ layer.weight.T + layer.bias) >> layer.shift, 0, ACT_MAX)
    assert net.layers[-2].shift.max() > 0          # the shifts are not trivially zero


@pytest.mark.parametrize("bias", [(0.2, 0.2), (1e4, 0.2), (0.2, 1e8)])
def test_quantisation_in_float32_equals_float64(monkeypatch, bias):
    """Where a layer's sums fit float32 (``_exact_dtype``), the quantiser computes in it and
    gets the network it gets in float64; a layer with biases far beyond its weights (clipped
    in the network, not in the quantiles) takes float64."""
    from models import intnet
    rng = np.random.default_rng(5)
    ws = [rng.normal(0, 0.5, (32, 31)), rng.normal(0, 0.5, (16, 32)), rng.normal(0, 0.3, (2, 16))]
    bs = [rng.normal(0, bias[0], 32), rng.normal(0, bias[1], 16), rng.normal(0, 0.1, 2)]
    x = rng.integers(-INPUT_MAX, INPUT_MAX + 1, (30000, 31)).astype(np.float32)
    dtypes = []
    real = intnet._exact_dtype
    monkeypatch.setattr(intnet, "_exact_dtype", lambda *a: dtypes.append(real(*a)) or dtypes[-1])
    fast, fast_scale = quantize_mlp(ws, bs, x, input_scale=1 / 16)
    monkeypatch.setattr(intnet, "_exact_dtype", lambda *a: np.float64)
    slow, slow_scale = quantize_mlp(ws, bs, x, input_scale=1 / 16)
    assert dtypes == [np.float64 if b > 1 else np.float32 for b in bias]
    np.testing.assert_array_equal(fast_scale, slow_scale)
    for a, b in zip(fast.layers, slow.layers):
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.bias, b.bias)
        assert (a.shift is None) == (b.shift is None)
        if a.shift is not None:
            np.testing.assert_array_equal(a.shift, b.shift)


def test_log2_quarters_is_exact():
    s = np.arange(1, 1 << 17)
    want = np.array([max(k for k in range(80) if 2 ** k <= v ** 4) for v in s[:3000]])
    np.testing.assert_array_equal(log2_quarters(s[:3000]), want)
    assert (np.diff(log2_quarters(s)) >= 0).all()


def test_features_do_not_depend_on_invalid_neighbours():
    rng = np.random.default_rng(3)
    values = rng.integers(-3000, 3000, (DEFAULT_NEIGHBOURHOOD.size, 500)).astype(np.int32)
    valid = rng.random(values.shape) < 0.7
    other = np.where(valid, values, rng.integers(-3000, 3000, values.shape)).astype(np.int32)
    for a, b in zip(default_features(values, valid), default_features(other, valid)):
        np.testing.assert_array_equal(a, b)


def test_default_neighbourhood_is_causal_and_its_wavefront_is_consistent():
    assert all(is_causal(o) for o in DEFAULT_NEIGHBOURHOOD.offsets)
    a, b = wavefront_slopes(DEFAULT_NEIGHBOURHOOD.offsets)
    for dz, dy, dx in DEFAULT_NEIGHBOURHOOD.offsets:
        assert dx + a * dy + b * dz < 0
    try:
        Neighbourhood(((0, 0, 1),))
    except ValueError:
        pass
    else:
        raise AssertionError("a non-causal offset was accepted")


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2 ** 31), rows=st.integers(1, 5), n=st.integers(1, 300),
       q=st.sampled_from([0.0, 0.25, 0.5, 0.9999, 1.0]) | st.floats(0, 1),
       decimals=st.integers(0, 2), clipped=st.booleans())
def test_row_quantile_equals_numpys_to_the_bit(seed, rows, n, q, decimals, clipped):
    """The quantiser's in-place per-row quantile gives np.quantile's values exactly (a
    different activation shift would change the network, and so the blobs)."""
    from models.intnet import row_quantile
    rng = np.random.default_rng(seed)
    a = np.round(rng.standard_normal((rows, n)) * 1000, decimals)
    if clipped:
        a = np.maximum(a, 0)
    want = np.quantile(a, q, axis=1)
    np.testing.assert_array_equal(row_quantile(a.copy(), q), want)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 31), n=st.integers(3000, 60000),
       q=st.sampled_from([0.999, 0.9999, 0.99999]), zeros=st.floats(0, 1))
def test_row_quantile_near_the_top_of_long_rows(seed, n, q, zeros):
    """The quantiser's case: long rows of ReLU activations (many ties at zero), the quantile
    near the top; one row holds its largest values exactly where the strided sample looks,
    which leaves too few values above the sample's threshold (the whole row is partitioned
    then)."""
    from models.intnet import row_quantile
    rng = np.random.default_rng(seed)
    a = np.round(rng.standard_normal((4, n)) * 300)
    a[rng.random((4, n)) < zeros] = 0
    a = np.maximum(a, 0)
    stride = max(1, n // max(256, 32 * (n - int(np.floor((n - 1) * q)))))
    a[3] = 0
    a[3, ::stride] = 1000 + np.arange(len(a[3, ::stride]))
    want = np.quantile(a, q, axis=1)
    np.testing.assert_array_equal(row_quantile(a.copy(), q), want)
