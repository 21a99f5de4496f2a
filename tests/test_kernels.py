"""The compiled feature kernel (models/_kernels.c) equals the numpy features bit for bit, and
blobs and decoded volumes do not depend on which of the two ran."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models import decode_slices, encode_volume, entropy, kernels, train
from models.features import WIDE_NEIGHBOURHOOD, default_features, flat_contexts
from models.registry import load_model

# the kernel is an optional extension: built wherever the install found a C compiler
pytestmark = pytest.mark.skipif(
    not kernels.available() and shutil.which("cc") is None,
    reason="no C compiler at install time: voxarc runs the numpy features")


def test_kernel_is_built_where_a_compiler_is(monkeypatch):
    assert kernels.available(), "pip install built no models._kernels although cc exists"
    assert kernels.status() == "compiled"
    monkeypatch.setenv("VOXARC_KERNELS", "numpy")
    assert kernels.status().startswith("off")


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


@pytest.fixture
def network_on_cpu(monkeypatch):
    """The compiled step path, which plans and remembers a decoder's steps: the network on the
    CPU, also where a GPU would take it (models decoded with torch's layers plan step by step)."""
    monkeypatch.setenv("VOXARC_DEVICE", "cpu")
    monkeypatch.setattr(load_model("default"), "device", "cpu")


@pytest.mark.parametrize("cached_validity", [True, False])
def test_decoder_run_cache_stays_within_its_budget(monkeypatch, cached_validity, network_on_cpu):
    from models import codec, skew, step_plan
    monkeypatch.setattr(step_plan, "RUN_CACHE_BYTES", 6000)
    if not cached_validity:      # very large slices: validity computed per step
        monkeypatch.setattr(skew.SkewLayout, "MAX_CACHED_VALIDITY", 0)
    codec.skew_layout.cache_clear()
    rng = np.random.default_rng(4)
    vol = (rng.normal(0, 40, (6, 33, 50)).cumsum(axis=2) // 5).astype(np.int16)
    blob = encode_volume(vol, slab=3, tile=(16, 24))
    try:
        assert np.array_equal(decode_slices(blob, 0, 6), vol)
        # format 3: the slices decode as bands one tile wide
        layout = codec.skew_layout(load_model("default").neighbourhood, 33, 24, (16, 24))
        assert layout.validity_cached == cached_validity
        if cached_validity:       # a job's steps are planned together, without the run cache
            assert not layout.run_cache
        else:                     # step by step, each slice's runs from the run cache
            assert 0 < layout.run_cache_bytes <= 6000 and layout.run_cache
    finally:
        codec.skew_layout.cache_clear()


@pytest.mark.parametrize("shape, tile", [((7, 40, 50), (16, 24)), ((9, 64, 64), (64, 256))])
def test_decoder_plans_are_remembered_and_give_the_same_voxels(shape, tile, network_on_cpu):
    """A remembered plan (the steps of a lockstep: runs, segments, destinations) decodes the
    same voxels as a fresh one, with stream groups, phantom voxels and ghost rows (tiles of
    16 x 24 on 40 x 50 slices) and without (one 64 x 64 tile); corrupt blobs still fail."""
    from models import CorruptBlobError, step_plan
    rng = np.random.default_rng(7)
    vol = (rng.normal(0, 30, shape).cumsum(axis=2) // 4 + 900).astype(np.uint16)
    blob = encode_volume(vol, slab=4, tile=tile)
    step_plan.clear()
    assert np.array_equal(decode_slices(blob, 0, shape[0]), vol)       # plans made
    held = dict(step_plan._plans)
    assert held and 0 < step_plan._plan_bytes <= step_plan.PLAN_CACHE_BYTES
    grouped = [s for steps, _ in held.values() for s in steps if s.dest is not None]
    assert grouped and all(s.dest.dtype == np.int32 for s in grouped)
    assert np.array_equal(decode_slices(blob, 0, shape[0]), vol)       # plans reused
    assert np.array_equal(decode_slices(blob, 2, 5), vol[2:5])
    assert all(key in step_plan._plans for key in held)
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x20
    with pytest.raises(CorruptBlobError):
        decode_slices(bytes(bad), 0, shape[0])


@pytest.mark.parametrize("ny, nx, tile, group, counts, first", [
    (40, 50, (16, 24), 2, [4, 4, 3], 0),      # phantoms, ghost rows, stream groups
    (40, 50, (16, 24), 2, [4, 4, 3], 2),      # the slices after a first part
    (64, 64, (64, 256), 4, [8, 8, 5], 0),     # one tile
    (33, 70, (16, 24), 1, [3, 2], 0),         # a stream per slice
    (20, 300, (64, 256), 1, [5, 5, 2], 0)])   # column bands' width, one tile row
def test_a_jobs_steps_planned_together_equal_those_planned_one_by_one(ny, nx, tile, group,
                                                                      counts, first):
    """The whole-array plan of a lockstep job (models.step_plan.job_steps) gives every step the
    runs, segments, coded mask, destinations and ghost-row copies that planning it alone
    (the path of very large slices) gives."""
    from models import skew, step_plan
    L = skew.SkewLayout(load_model("default").neighbourhood, ny, nx, tile)
    counts = np.array(counts)
    zs, top = 8, int(counts.max())
    buf = np.zeros((zs + L.z0, len(counts), L.tiles) + L.plane_shape, np.int32)
    strides = tuple(st // buf.itemsize for st in buf.strides)
    bits = 1 << np.arange(L.hood.size, dtype=np.uint64)
    depth_bits = [np.uint64(np.sum(bits[(z + L.dz) >= 0])) for z in range(zs)]
    slabs_at = [int((counts > zl).sum()) for zl in range(top)]
    stream_of = np.cumsum([0] + [-(-int(c) // group) for c in counts]).tolist()
    together = step_plan.job_steps(L, buf.size, strides, depth_bits, first, top, slabs_at,
                               stream_of, group, True)
    alone = [step_plan.planned_alone(L, buf.size, strides, depth_bits, parts, stream_of, group)
             for _, parts in step_plan.steps(L, first, top, slabs_at)]
    alone = [step for step in alone if step.n]
    assert len(together) == len(alone) > 0

    def ghosts(step):
        to, source = step.ghost_to, step.ghost_from
        if step.dest is None and step.parts is not None:    # written part by part, with them
            to, source = step_plan._ghosts(L, strides, step.parts, np.int64)
        return [] if to is None else sorted(zip(to.tolist(), source.tolist()))

    for a, b in zip(alone, together):
        for field in ("origin", "length", "valid_at", "valid_stride", "depth"):
            assert np.array_equal(getattr(a.runs, field), getattr(b.runs, field)), field
        assert (a.n, a.streams, a.ends) == (b.n, b.streams, b.ends)
        assert (a.keep is None) == (b.keep is None)
        assert a.keep is None or np.array_equal(a.keep, b.keep)
        assert b.at == b.runs.addresses()
        cells = step_plan.expand(a.runs.origin, a.runs.length)
        assert np.array_equal(cells if a.dest is None else a.dest,
                              cells if b.dest is None else b.dest)
        assert ghosts(a) == ghosts(b)
    assert group == 1 or all(step.dest is not None for step in together)


def test_decoder_plans_stay_within_their_budget(monkeypatch, network_on_cpu):
    from models import step_plan
    rng = np.random.default_rng(8)
    vol = (rng.normal(0, 30, (8, 48, 48)).cumsum(axis=1) // 4).astype(np.int16)
    blob = encode_volume(vol, slab=4)
    step_plan.clear()
    monkeypatch.setattr(step_plan, "PLAN_CACHE_BYTES", 0)      # nothing fits: planned every time
    assert np.array_equal(decode_slices(blob, 0, 8), vol)
    assert not step_plan._plans and step_plan._plan_bytes == 0
    monkeypatch.setattr(step_plan, "PLAN_CACHE_BYTES", 1 << 30)
    assert np.array_equal(decode_slices(blob, 0, 8), vol)
    one = step_plan._plan_bytes
    assert one > 0
    monkeypatch.setattr(step_plan, "PLAN_CACHE_BYTES", one + one // 2)   # one plan and a half
    assert np.array_equal(decode_slices(blob, 0, 4), vol[:4])          # another lockstep
    assert 0 < step_plan._plan_bytes <= one + one // 2
    # slices too large for stream groups: their plans are not worth keeping
    step_plan.clear()
    big = (rng.normal(0, 30, (3, 160, 160)).cumsum(axis=1) // 4).astype(np.int16)
    assert np.array_equal(decode_slices(encode_volume(big), 0, 3), big)
    assert not step_plan._plans and step_plan._plan_bytes == 0


def test_decoder_plans_are_shared_by_threads_within_their_budget(monkeypatch, network_on_cpu):
    """A node's sender threads decode side by side in one process: the remembered plans
    (made, reused and forgotten to make room) stay correct and their accounting exact."""
    from concurrent.futures import ThreadPoolExecutor
    from models import step_plan
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "0")
    rng = np.random.default_rng(9)
    shapes = [(6, 40, 50), (5, 33, 64), (7, 64, 30), (4, 48, 48)]
    vols = [(rng.normal(0, 30, sh).cumsum(axis=2) // 4 + 500).astype(np.uint16) for sh in shapes]
    blobs = [encode_volume(v, slab=3) for v in vols]
    step_plan.clear()
    decode_slices(blobs[0], 0, 6)
    one = step_plan._plan_bytes
    monkeypatch.setattr(step_plan, "PLAN_CACHE_BYTES", 3 * one)     # room for a few only

    def check(i):
        k = i % len(vols)
        return np.array_equal(decode_slices(blobs[k], 0, len(vols[k])), vols[k])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, range(48)))
    held = sum(size for _, size in step_plan._plans.values())
    assert 0 < step_plan._plan_bytes == held <= 3 * one


def _random_network(rng, sizes, weight_max=127):
    from models.intnet import IntLayer, IntMLP
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        hidden = i < len(sizes) - 2
        layers.append(IntLayer(rng.integers(-weight_max, weight_max + 1, (b, a)),
                               rng.integers(-20000, 20000, b),
                               rng.integers(0, 12, b) if hidden else None))
    return IntMLP(layers)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 31), n=st.integers(0, 200),
       sizes=st.lists(st.integers(1, 70), min_size=2, max_size=4),
       vector=st.sampled_from([False, True, kernels.AVX2, kernels.AVX512, kernels.AVX2_INT,
                               kernels.PLAIN_INT]),
       layout=st.sampled_from(["columns", "rows", "wide rows"]))
def test_kernel_network_equals_the_int64_reference(seed, n, sizes, vector, layout):
    rng = np.random.default_rng(seed)
    net = _random_network(rng, sizes)
    assert net.kernel_network()._ints is not None   # True takes the VNNI layers where they are
    x = rng.integers(-1024, 1025, (n, sizes[0]))
    if layout == "columns":   # as the feature kernel hands them over: rows of a wider array
        wide = np.zeros((sizes[0] + 3, n + 5), np.float32)
        wide[1:sizes[0] + 1, 2:n + 2] = x.T
        xin = wide[1:sizes[0] + 1, 2:n + 2].T
    elif layout == "wide rows":   # voxel-major with a gap: the kernel packs each block
        wide = np.full((n + 5, sizes[0] + 3), 7.0, np.float32)
        wide[2:n + 2, 1:sizes[0] + 1] = x
        xin = wide[2:n + 2, 1:sizes[0] + 1]
    else:                     # voxel-major samples (training, quantisation)
        xin = x.astype(np.float32)
    acc = kernels.mlp(net.kernel_network(), xin, vector=vector)
    assert acc.dtype == np.float32 and acc.shape == (n, sizes[-1])
    ref = net.reference(x)
    assert np.array_equal(acc.astype(np.int64), ref)
    if len(sizes) > 2 and n:   # the hidden layers' clip is exercised at both ends
        h = net.layers[0]
        pre = (x @ h.weight.T + h.bias) >> h.shift
        assert (pre < 0).any() or (pre > 1023).any() or sizes[1] * n < 8


def test_kernel_network_equals_torch_and_falls_back_when_too_wide(monkeypatch):
    rng = np.random.default_rng(7)
    model = load_model("default")
    x = rng.integers(-300, 300, (5000, model.net.layers[0].weight.shape[1])).astype(np.float32)
    fast = model.net.float_accumulators(x)
    wide = _random_network(rng, [31, 300, 2], weight_max=1)   # wider than the kernel takes
    assert kernels.mlp(wide.kernel_network(), x) is None and not wide.kernel_network().fits
    assert model.net.kernel_network().fits
    wide_fast = wide.float_accumulators(x)
    monkeypatch.setenv("VOXARC_KERNELS", "numpy")
    assert np.array_equal(fast, model.net.float_accumulators(x))
    assert np.array_equal(wide_fast, wide.float_accumulators(x))
    assert np.array_equal(wide_fast.astype(np.int64), wide.reference(x.astype(np.int64)))


def _ten_bit_network(rng):
    """A 31-64-32-2 network with 10-bit weights whose second layer's sums pass 2**24 (so
    float32 layers would round them) while its last layer's stay below (its float32
    accumulators are exact)."""
    from models.intnet import IntLayer, IntMLP
    layers = [IntLayer(rng.integers(-511, 512, (64, 31)), rng.integers(2 ** 19, 2 ** 20, 64),
                       np.full(64, 10)),
              IntLayer(rng.integers(400, 512, (32, 64)), rng.integers(-2 ** 20, 2 ** 20, 32) | 1,
                       np.full(32, 15)),
              IntLayer(rng.integers(-511, 512, (2, 32)), rng.integers(-1000, 1000, 2), None)]
    return IntMLP(layers, exact="float64", weight_max=511)


def test_ten_bit_network_runs_exactly_on_the_integer_layers_only(monkeypatch):
    """An adapted network's 10-bit weights (models.adapt) are not exact in float32: the
    kernels run it on their integer layers whatever layers are asked for, and without
    kernels, or without integer layers, it is evaluated in float64; always the reference."""
    from models.intnet import IntMLP
    rng = np.random.default_rng(11)
    net = _ten_bit_network(rng)
    with pytest.raises(ValueError, match="2\\*\\*24"):
        IntMLP(net.layers, weight_max=511)               # float32 would not hold its sums
    assert net.integer_exact and not net.is_default
    x = rng.integers(-1024, 1025, (20000, 31))
    x[:50] = 1024
    ref = net.reference(x)
    xf = x.astype(np.float32)
    assert np.abs(ref).max() < 2 ** 24
    h = np.clip((x @ net.layers[0].weight.T + net.layers[0].bias) >> 10, 0, 1023)
    assert (h @ net.layers[1].weight.T).max() > 2 ** 24    # the sums float32 cannot hold
    for vector in (False, True, kernels.AVX2, kernels.AVX512, kernels.AVX2_INT,
                   kernels.PLAIN_INT):
        acc = kernels.mlp(net.kernel_network(), xf, vector=vector)
        if kernels.integer_vector() is None:
            assert acc is None and not net.kernel_network().fits
        else:
            assert np.array_equal(acc.astype(np.int64), ref)
    floats = kernels.Network(net.kernel_network().weights, net.kernel_network().biases)
    if floats.fits:      # the float layers, asked for by a network claiming float32 exactness
        assert not np.array_equal(kernels.mlp(floats, xf, vector=kernels.AVX2).astype(np.int64),
                                  ref)
    assert np.array_equal(net(x), ref)
    # on a CPU without vector integer layers the plain C ones run it
    plain = IntMLP(net.layers, exact="float64", weight_max=511)
    monkeypatch.setattr(kernels, "integer_vector", lambda: kernels.PLAIN_INT)
    assert plain.kernel_network().vector() == kernels.PLAIN_INT
    assert kernels.layers() and kernels._library().voxarc_layers(kernels.PLAIN_INT, 1) == 6
    assert np.array_equal(plain(x), ref)
    monkeypatch.setattr(kernels, "integer_vector", lambda: None)   # no compiled integer layers
    slow = IntMLP(net.layers, exact="float64", weight_max=511)
    assert not slow.kernel_network().fits and np.array_equal(slow(x), ref)
    monkeypatch.setenv("VOXARC_KERNELS", "numpy")
    assert np.array_equal(IntMLP(net.layers, exact="float64", weight_max=511)(x), ref)


def test_ten_bit_models_decode_on_the_plain_integer_layers(monkeypatch):
    """Where the CPU has no vector integer layers (ARM, x86 without AVX2) a blob of the
    shipped 10-bit model decodes on the plain C integer layers, to the same voxels."""
    from models.intnet import WIDE_WEIGHT_MAX
    assert load_model("default").net.weight_max == WIDE_WEIGHT_MAX
    rng = np.random.default_rng(5)
    vol = (rng.normal(0, 40, (6, 40, 52)).cumsum(axis=2) // 3).astype(np.int16)
    blob = encode_volume(vol, adapt=False)
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "1")          # decoded here, where the patch is
    monkeypatch.setattr(load_model("default"), "device", "cpu")   # not a GPU's torch layers
    used = []
    real = kernels.Network.vector
    monkeypatch.setattr(kernels, "integer_vector", lambda: kernels.PLAIN_INT)
    monkeypatch.setattr(kernels.Network, "vector",
                        lambda self, vector=True: used.append(real(self, vector)) or used[-1])
    assert np.array_equal(decode_slices(blob, 0, 6), vol)
    assert used and set(used) == {kernels.PLAIN_INT}


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags")
            for f in line.split(":", 1)[1].split()}


def test_the_widest_layers_the_cpu_has_are_used(monkeypatch):
    """Where the CPU has AVX-512 VNNI, a default network runs on the integer VNNI layers (the
    reference test above then checks them); ``VOXARC_KERNELS=avx512`` or ``avx2`` keeps the
    float layers, and a network without an integer form takes them too."""
    flags = _cpu_flags()
    if not {"avx512f", "avx512_vnni"} <= flags:
        pytest.skip("this CPU has no AVX-512 VNNI")   # the float layers are tested above
    assert kernels.layers() == "AVX-512 VNNI" and kernels.layers(integer=False) == "AVX-512"
    monkeypatch.setenv("VOXARC_KERNELS", "avx512")
    assert kernels.layers() == "AVX-512"
    monkeypatch.setenv("VOXARC_KERNELS", "avx2")
    assert kernels.layers() == "AVX2"


def test_cpus_with_avx2_and_without_avx512_take_the_avx2_integer_layers(monkeypatch):
    """Without AVX-512 a default network runs on the AVX2 integer layers (VPMADDWD);
    ``VOXARC_KERNELS=avx2-int`` picks them on any AVX2 CPU (the reference test above checks
    them there), ``avx2`` keeps the float layers, and a network without an integer form takes
    those."""
    flags = _cpu_flags()
    if not {"avx2", "fma"} <= flags:
        pytest.skip("this CPU has no AVX2")   # the plain C layers are tested above
    if "avx512f" not in flags:
        assert kernels.layers() == "AVX2 integer" and kernels.layers(integer=False) == "AVX2"
    monkeypatch.setenv("VOXARC_KERNELS", "avx2-int")
    assert kernels.layers() == "AVX2 integer" and kernels.layers(integer=False) == "AVX2"
    monkeypatch.setenv("VOXARC_KERNELS", "avx2")
    assert kernels.layers() == "AVX2"


def test_networks_without_an_exact_integer_form_take_the_float_layers():
    """The VNNI layers need integer weights (times a power of two per row) whose sums stay
    below 2**31; a network without them has no integer form and is still evaluated."""
    rng = np.random.default_rng(3)
    w = [rng.integers(-127, 128, (8, 5)).astype(np.float32), np.ones((2, 8), np.float32)]
    b = [np.zeros(8, np.float32), np.zeros(2, np.float32)]
    assert kernels.integer_form(w, b) is not None
    w_third = [w[0] / 3, w[1]]                      # no power of two makes 1/3 an integer
    assert kernels.integer_form(w_third, b) is None
    w_last = [w[0], w[1] / 2]                       # the last layer has no shift
    assert kernels.integer_form(w_last, b) is None
    big = [np.full((8, 5), 127, np.float32), w[1]]
    assert kernels.integer_form(big, [np.full(8, 2.0 ** 31 - 2 ** 10, np.float32), b[1]]) is None
    x = rng.integers(-1024, 1025, (100, 5)).astype(np.float32)
    net = kernels.Network(w_third, b)
    assert net._ints is None
    assert np.array_equal(kernels.mlp(net, x), kernels.mlp(net, x, vector=kernels.AVX512))


def test_a_kernel_built_for_another_version_is_not_called(monkeypatch):
    monkeypatch.setattr(kernels, "ABI", kernels.ABI + 1)   # as if the .so were stale
    kernels._library.cache_clear()
    try:
        assert not kernels.available() and kernels.status().startswith("not built")
        vol = np.arange(2 * 9 * 11, dtype=np.int16).reshape(2, 9, 11)
        assert np.array_equal(decode_slices(encode_volume(vol), 0, 2), vol)
    finally:
        kernels._library.cache_clear()
    monkeypatch.undo()
    assert kernels.available()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 31), lengths=st.lists(st.integers(0, 600), min_size=1,
                                                      max_size=8), compact=st.booleans())
def test_run_features_equal_features_of_the_gathered_neighbours(seed, lengths, compact):
    # runs shorter and longer than a block, straddling blocks, empty, some neighbours in no
    # earlier slice (depth bit clear)
    rng = np.random.default_rng(seed)
    k = 26
    buf = (rng.integers(-3, 4, 5500) + rng.integers(-2000, 2000)).astype(np.int32)
    buf[rng.random(5500) < 0.3] += rng.integers(-500, 500)   # origin + koff + n < 5500
    koff = rng.integers(0, 1000, k)
    valid_rows = [rng.random((k, max(n, 1))) < 0.9 for n in lengths]
    runs = kernels.Runs(
        origin=rng.integers(0, 3900, len(lengths)).astype(np.int64),
        length=np.array(lengths, np.int64),
        valid_at=np.array([v.ctypes.data for v in valid_rows], np.uint64),
        valid_stride=np.array([v.shape[1] for v in valid_rows], np.int64),
        depth=rng.integers(0, 2 ** k, len(lengths)).astype(np.uint64) | np.uint64(0x3ff))
    got = kernels.run_features(buf, runs, koff, compact)
    values = np.concatenate([buf[o + koff[:, None] + np.arange(n)]
                             for o, n in zip(runs.origin, lengths)], axis=1)
    bits = ((runs.depth[:, None] >> np.arange(k, dtype=np.uint64)) & np.uint64(1)).astype(bool)
    valid = np.concatenate([v[:, :n] & bits[r][:, None]
                            for r, (v, n) in enumerate(zip(valid_rows, lengths))], axis=1)
    want = kernels.features(values, valid, compact)
    assert len(got.ref) == sum(lengths)
    net = load_model("default").net.kernel_network()
    fused = kernels.run_features(buf, runs, koff, compact, net)   # the network in the same pass
    assert np.array_equal(fused.x, want.x) and fused.acc.shape == (len(want.s), 2)
    assert np.array_equal(fused.acc, kernels.mlp(net, want.x))
    for field in ("ref", "s", "lq", "ref_busy", "x"):
        assert np.array_equal(getattr(got, field), getattr(want, field)), field
    assert (got.busy is None) == (want.busy is None)
    assert got.busy is None or np.array_equal(got.busy, want.busy)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 31), n=st.integers(0, 1100), compact=st.booleans(),
       p_flat=st.sampled_from([0.0, 0.5, 0.97]))
def test_network_in_the_features_pass_equals_the_int64_reference(seed, n, compact, p_flat):
    rng = np.random.default_rng(seed)
    model = load_model("default")
    k = model.neighbourhood.size
    values = (rng.integers(-60, 60, (k, n)) + 900).astype(np.int32)
    values[:, rng.random(n) < p_flat] = 900          # flat contexts: left out when compact
    valid = rng.random((k, n)) < 0.95
    feats = kernels.features(values, valid, compact, model.net.kernel_network())
    assert feats.acc.dtype == np.float32 and feats.acc.shape == (len(feats.s), 2)
    ref = model.net.reference(np.asarray(feats.x, dtype=np.int64))
    assert np.array_equal(feats.acc.astype(np.int64), ref)


def test_a_network_wider_than_the_kernels_take_gets_their_features_and_torch(monkeypatch):
    from models.predictor import DefaultPredictor
    rng = np.random.default_rng(11)
    model = load_model("default")
    monkeypatch.setattr(model, "device", "cpu")        # the kernels' network runs on the CPU
    monkeypatch.setenv("VOXARC_DEVICE", "cpu")
    wide = DefaultPredictor("wide", _random_network(rng, [31, 300, 2], weight_max=1),
                            model.head, model.tables, neighbourhood=model.neighbourhood)
    assert wide.kernel_network() is None and model.kernel_network() is not None
    k = model.neighbourhood.size
    values = (rng.integers(-40, 40, (k, 2000)) + 500).astype(np.int32)
    valid = rng.random((k, 2000)) < 0.95
    fast = wide.predict(values, valid, -32768, 32767)
    monkeypatch.setenv("VOXARC_KERNELS", "numpy")
    slow = wide.predict(values, valid, -32768, 32767)
    assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 31), n=st.integers(0, 300),
       dtype=st.sampled_from(["uint8", "int8", "uint16", "int16", None]))
def test_decoder_token_rows_equal_numpy(seed, n, dtype):
    """The decoder's probability rows (gathered and, near the dtype's range ends, truncated)
    equal the numpy path's, and so do the rows' low-bit counts."""
    tables = load_model("default").tables
    rng = np.random.default_rng(seed)
    bounds = None if dtype is None else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    lo, hi = bounds or (-3000, 3000)
    rows = rng.integers(0, len(tables.tokens), n)
    # predictions crowd the range's ends, where rows are truncated
    pred = np.clip(rng.choice([lo, hi], n) + rng.integers(-70, 71, n), lo, hi)
    expect_sh = tables.shifts[rows]
    expect = tables.rows(rows)
    if bounds is not None:
        entropy.truncate_rows(expect, *entropy.token_bounds(pred, expect_sh, *bounds))
    out = np.full((n + 3, entropy.N_TOKENS), -1.0)
    sh = kernels.token_rows(tables.token_rows, entropy.TOKEN_RANGE, tables.shifts, rows, pred,
                            bounds, entropy.RANGE_EDGE, out)
    assert np.array_equal(sh, expect_sh)
    assert np.array_equal(out[:n], expect)
    assert (out[n:] == -1).all()          # nothing written past the step's rows
    with pytest.raises(ValueError):
        kernels.token_rows(tables.token_rows, entropy.TOKEN_RANGE, tables.shifts,
                           np.array([len(tables.tokens)]), np.zeros(1, np.int64), bounds,
                           entropy.RANGE_EDGE, out)



@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 31), n=st.integers(0, 300), spread=st.integers(0, 60))
def test_encoder_bounded_rows_equal_numpy(seed, n, spread):
    """The encoder's probability rows (token rows and the escape classes' row, truncated to
    each symbol's token bounds near the range's ends) equal the numpy path's."""
    tables = load_model("default").tables
    rng = np.random.default_rng(seed)
    index = rng.integers(0, tables.class_row + 1, n)
    qmin = rng.integers(-2 * spread - 1, spread + 1, n)
    qmax = qmin + rng.integers(0, 2 * spread + 1, n)
    expect = entropy.truncate_rows(tables.rows(index), qmin, qmax)
    out = np.full((n + 3, entropy.N_TOKENS), -1.0)
    assert np.array_equal(kernels.bounded_rows(tables._rows, entropy.TOKEN_RANGE, index, qmin,
                                               qmax, entropy.RANGE_EDGE, out), expect)
    assert (out[n:] == -1).all()
    with pytest.raises(ValueError):
        kernels.bounded_rows(tables._rows, entropy.TOKEN_RANGE, np.array([tables.class_row + 1]),
                             np.zeros(1), np.zeros(1), entropy.RANGE_EDGE, out)

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 31), n=st.integers(0, 400), spread=st.integers(0, 40))
def test_decoder_join_equals_numpy(seed, n, spread):
    """Residuals joined from decoded fields (only those the streams hold) equal
    join_residuals', escapes of every class included; fields that do not fit the tokens are
    refused, never read past."""
    tables = load_model("default").tables
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(tables.tokens), n)
    residual = (rng.laplace(0, 1, n) * 2.0 ** rng.integers(0, spread + 1, n)).astype(np.int64)
    sym = entropy.split_residuals(residual, rows, tables.shifts)
    esc = sym.token >= entropy.ESC_NEG
    low, cls = sym.low[sym.low_bits > 0], sym.cls[esc]
    extra = sym.extra[esc][cls > 1]
    got = kernels.join(sym.token, sym.low_bits, low, cls, extra, entropy.TOKEN_RANGE)
    assert np.array_equal(got, residual)
    assert np.array_equal(got, entropy.join_residuals(sym.token, sym.low, rows, sym.cls,
                                                      sym.extra, tables.shifts))
    if len(low):
        assert kernels.join(sym.token, sym.low_bits, low[:-1], cls, extra,
                            entropy.TOKEN_RANGE) is None
    if len(cls):
        assert kernels.join(sym.token, sym.low_bits, low, cls[:-1], extra,
                            entropy.TOKEN_RANGE) is None
    assert kernels.join(sym.token, sym.low_bits, low, cls, np.append(extra, 0),
                        entropy.TOKEN_RANGE) is None


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2 ** 31), dtype=st.sampled_from(["uint8", "int8", "uint16", "int16"]),
       shape=st.tuples(st.integers(1, 5), st.integers(1, 40), st.integers(1, 45)),
       tile=st.sampled_from([(8, 16), (16, 24), (64, 256)]), version=st.sampled_from([1, 3]))
def test_the_fused_decoder_step_equals_the_step_by_step_path(seed, dtype, shape, tile,
                                                              version):
    """The decoder's one-call wavefront step (models.kernels.StepKernel) gives the volume the
    separate kernels give, near the dtype's range ends, with flat padding, in partial tiles
    and for blobs coded without the range bounds (format 1)."""
    from models.codec import encode_slab
    from models.container import pack
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    vol = np.clip(rng.normal(0, 20, shape).cumsum(axis=2) + rng.choice([info.min, info.max]),
                  info.min, info.max).astype(dtype)
    vol[:, :shape[1] // 3] = info.min                   # flat contexts at the range's end
    if version == 1:     # one slab coded without the range bounds
        model = load_model("default")
        tile = (min(tile[0], shape[1]), min(tile[1], shape[2]))
        payload = encode_slab(model, vol, int(info.min), int(info.max), 8, tile,
                              within_range=False)
        blob = pack(model.model_id, "default", dtype, vol.shape, 8, tile, [payload], version=1)
    else:
        blob = encode_volume(vol, slab=2, tile=tile, adapt=False)
    calls = []
    real = kernels.StepKernel.predict
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(load_model("default"), "device", "cpu")   # the fused step is the CPU's
        patch.setattr(kernels.StepKernel, "predict",
                      lambda self, *a: calls.append(1) or real(self, *a))
        fused = decode_slices(blob, 0, shape[0])
        assert calls, "the decoder did not use the fused step"
        patch.setattr(kernels.StepKernel, "create", staticmethod(lambda *a, **k: None))
        assert np.array_equal(decode_slices(blob, 0, shape[0]), fused)
    assert np.array_equal(fused, vol)


def test_a_pickled_network_points_at_its_own_weights():
    """The compiled network keeps raw pointers to its weight arrays; a copy that travels by
    pickle (to a worker process) must take its own, not the sender's (a crash, or wrong
    values once the sender's arrays are gone). A pickled integer network leaves its caches."""
    import pickle

    intnet = load_model("default").net
    net = intnet.kernel_network()
    copy = pickle.loads(pickle.dumps(net))
    assert [int(p) for p in copy._w] == [w.ctypes.data for w in copy.weights]
    assert [int(p) for p in copy._b] == [b.ctypes.data for b in copy.biases]
    x = np.random.default_rng(0).integers(-50, 50, (7, copy.weights[0].shape[1]))
    np.testing.assert_array_equal(kernels.mlp(copy, x), kernels.mlp(net, x))
    again = pickle.loads(pickle.dumps(intnet))
    assert again._kernel is None and again._torch is None
    np.testing.assert_array_equal(again.float_accumulators(x.astype(np.float32)),
                                  intnet.float_accumulators(x.astype(np.float32)))


@pytest.mark.parametrize("seed, spread, scale", [(0, 5.0, 1.0), (1, 0.3, 1.0), (2, 50.0, 30.0)])
def test_kernel_loss_and_gradient_equal_the_torch_expression(monkeypatch, seed, spread, scale):
    """The fine-tuning loss by the kernel: the same bits and gradient as train.laplace_bits,
    through both branches (the rounded mean, |e| < 0.5, and the tails) and the clamped log
    scale (``scale`` 30 puts many outside [-3, 18]); the torch path when the kernels are off."""
    import torch
    rng = np.random.default_rng(seed)
    n = 3000
    ref = torch.tensor(rng.integers(-1000, 3000, n), dtype=torch.float32)
    s = torch.tensor(rng.integers(1, 4000, n), dtype=torch.float32)
    lq = torch.tensor(rng.integers(-12, 72, n), dtype=torch.float32)
    out = torch.tensor(rng.normal(0, 2, (n, 2)) * [1.0, scale], dtype=torch.float32)
    mu = ref + out[:, 0] * s / 64
    value = (mu + torch.tensor(rng.laplace(0, spread, n), dtype=torch.float32)).round()
    grads = []
    for mode in ("auto", "numpy"):
        monkeypatch.setenv("VOXARC_KERNELS", mode)
        o = out.clone().requires_grad_()
        loss = train.mean_laplace_bits(value, ref, s, lq, o)
        loss.backward()
        grads.append((loss.item(), o.grad))
    o = out.clone().requires_grad_()
    want = train.laplace_bits(value, ref, s, lq, o).mean()
    want.backward()
    assert (value - mu).abs().lt(0.5).sum() > 20                 # the central branch is run
    for got, grad in grads:       # float32 both, in other orders: close to the largest's 1e-3
        assert got == pytest.approx(want.item(), rel=1e-5)
        torch.testing.assert_close(grad, o.grad, rtol=1e-3, atol=1e-3 * o.grad.abs().max())


@pytest.mark.parametrize("layers", ["avx2", "avx512", "avx2-int"])
def test_narrower_layers_on_request_decode_the_same(monkeypatch, layers):
    """``VOXARC_KERNELS=avx2`` (or ``avx512``, ``avx2-int``) keeps the decoder's network to
    the AVX2 (or AVX-512 float, AVX2 integer) layers, to compare speeds: the same voxels as the
    widest layers give."""
    from models import decode_volume, encode_volume
    vol = np.random.default_rng(4).integers(0, 4000, (3, 40, 50)).astype(np.uint16)
    blob = encode_volume(vol)
    monkeypatch.setenv("VOXARC_KERNELS", layers)
    assert kernels._vector() == kernels._VECTORS[layers] and kernels.available()
    assert np.array_equal(decode_volume(blob), vol)


@pytest.mark.parametrize("hidden, n, vector", [((64, 32), 4096, True), ((7,), 50, True),
                                               ((5, 9, 3), 97, kernels.AVX2), ((6,), 13, False),
                                               ((20, 4), 48, kernels.AVX512)])
def test_compiled_training_step_equals_torch_autograd(monkeypatch, hidden, n, vector):
    """The float twin's step in one compiled call: the mean bits and every weight's and bias's
    gradient of torch's autograd through ``train.laplace_bits`` (float32 in another order of
    summation: within 1e-5 of the largest), for batches that are not whole blocks and for each
    layer kind; the padded input columns of the fine-tuning are skipped."""
    import torch
    from models.features import SCALE_STEPS, UNIT
    if vector == kernels.AVX512 and "avx512f" not in _cpu_flags():
        vector = True
    monkeypatch.setenv("VOXARC_KERNELS", {True: "auto", kernels.AVX2: "avx2",
                                          kernels.AVX512: "avx512", False: "auto"}[vector])
    rng = np.random.default_rng(n)
    torch.manual_seed(n)
    model = train.FloatPredictor(hidden, 31)
    x = model.training_inputs(rng.integers(-300, 300, (n, 31)).astype(np.float32), np.arange(n))
    assert x.shape[1] == 32        # padded: the kernel reads the first 31 of each row
    x[:, 31] = 1e6                 # (which must not count)
    value = rng.integers(0, 2000, n).astype(np.float32)
    ref = (value + rng.laplace(0, 10, n)).round().astype(np.float32)
    s = rng.integers(1, 200, n).astype(np.float32)
    lq = rng.integers(-10, 60, n).astype(np.float32)
    layers = model.linear_layers()
    loss = train.laplace_bits(*map(torch.from_numpy, (value, ref, s, lq)),
                              nn_forward(model, x)).mean()
    loss.backward()
    weights = [layer.weight.detach().numpy() for layer in layers]
    biases = [layer.bias.detach().numpy() for layer in layers]
    grads = [np.full_like(a, np.nan) for a in weights + biases]
    step = kernels.TrainStep(weights, biases, grads[:len(layers)], grads[len(layers):])
    if vector is False:
        monkeypatch.setattr(kernels, "_vector", lambda: 0)     # the plain C layers
    got = step(x.numpy(), value, ref, s, lq, UNIT, SCALE_STEPS)
    assert got == pytest.approx(loss.item(), rel=1e-5)
    want = [layer.weight.grad for layer in layers] + [layer.bias.grad for layer in layers]
    for g, w in zip(grads, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=0, atol=1e-5 * float(w.abs().max()))


def nn_forward(model, x):
    """The float twin's outputs on padded inputs whose padding is not zero (torch's own
    padded first layer would read it): its first layer applied to the real columns."""
    import torch
    first, *rest = model.net
    h = torch.nn.functional.linear(x[:, :first.in_features], first.weight, first.bias)
    for layer in rest:
        h = layer(h)
    return h


def test_compiled_training_step_reuses_its_workspace():
    """The step keeps one workspace on a cache-line boundary from call to call, cleared each
    time: a step after another batch gives the gradients a fresh step gives."""
    from models.features import SCALE_STEPS, UNIT
    rng = np.random.default_rng(3)
    sizes = [31, 16, 8, 2]
    w = [rng.normal(0, 0.3, (b, a)).astype(np.float32) for a, b in zip(sizes, sizes[1:])]
    b = [rng.normal(0, 0.1, len(x)).astype(np.float32) for x in w]

    def batch(n):
        v = rng.integers(0, 500, n).astype(np.float32)
        return (rng.normal(0, 1, (n, 32)).astype(np.float32), v,
                (v + rng.laplace(0, 5, n)).round().astype(np.float32),
                rng.integers(1, 50, n).astype(np.float32),
                rng.integers(0, 40, n).astype(np.float32))

    def step():
        grads = [np.zeros_like(x) for x in w + b]
        return kernels.TrainStep(w, b, grads[:3], grads[3:]), grads
    first, second = batch(300), batch(130)
    reused, got = step()
    assert reused._work.ctypes.data % 64 == 0
    reused(*first, UNIT, SCALE_STEPS)
    loss = reused(*second, UNIT, SCALE_STEPS)
    fresh, want = step()
    assert fresh(*second, UNIT, SCALE_STEPS) == loss
    for g, h in zip(got, want):
        assert np.array_equal(g, h)


def test_compiled_training_step_refuses_what_it_cannot_take():
    """Not two outputs, or a layer wider than the kernels take: None, so the fine-tuning
    keeps torch's step; arrays of another type are an error."""
    from models.features import SCALE_STEPS, UNIT
    rng = np.random.default_rng(0)

    def step_of(sizes):
        w = [rng.normal(0, 0.1, (b, a)).astype(np.float32) for a, b in zip(sizes, sizes[1:])]
        b = [np.zeros(len(x), np.float32) for x in w]
        return kernels.TrainStep(w, b, [np.zeros_like(x) for x in w],
                                 [np.zeros_like(x) for x in b])
    x = rng.normal(0, 1, (10, 31)).astype(np.float32)
    v = np.zeros(10, np.float32)
    assert step_of([31, 8, 3])(x, v, v, v + 1, v, UNIT, SCALE_STEPS) is None
    assert step_of([31, 300, 2])(x, v, v, v + 1, v, UNIT, SCALE_STEPS) is None
    assert step_of([31, 8, 2])(x, v, v, v + 1, v, UNIT, SCALE_STEPS) is not None
    with pytest.raises(ValueError):
        kernels.TrainStep([np.zeros((2, 3))], [np.zeros(2)], [np.zeros((2, 3))], [np.zeros(2)])
    with pytest.raises(ValueError):          # float64 values would be read as float32
        step_of([31, 8, 2])(x, v.astype(np.float64), v, v + 1, v, UNIT, SCALE_STEPS)
    with pytest.raises(ValueError):          # an empty batch has no mean
        step_of([31, 8, 2])(x[:0], v[:0], v[:0], v[:0], v[:0], UNIT, SCALE_STEPS)


def test_compiled_adam_step_equals_the_torch_one():
    """kernels.AdamStep: the update of models.adapt._Adam (torch), within float32 rounding
    after hundreds of steps of large and small gradients, on arrays of lengths with and
    without a vector tail; its parameters are updated in place."""
    import torch
    from models import adapt
    rng = np.random.default_rng(5)
    shapes = [(64, 31), (64,), (2, 32), (3,), (1,)]
    mine = [torch.from_numpy(rng.normal(0, 1, s).astype(np.float32)) for s in shapes]
    ref = [p.clone() for p in mine]
    for p in mine + ref:
        p.grad = torch.zeros_like(p)
    torch_adam = adapt._Adam(ref, lr=3e-3)
    compiled = kernels.AdamStep([p.numpy() for p in mine], [p.grad.numpy() for p in mine])
    start = [p.clone() for p in mine]
    for k in range(300):
        for a, b in zip(mine, ref):
            g = rng.normal(0, 3.0 if k % 2 else 0.01, a.shape).astype(np.float32)
            a.grad.copy_(torch.from_numpy(g))
            b.grad.copy_(torch.from_numpy(g))
        torch_adam.step()
        compiled(3e-3)
    for a, b, s in zip(mine, ref, start):
        assert float((b - s).abs().max()) > 0.01         # they moved
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=2e-6)


def test_compiled_adam_step_refuses_other_arrays():
    ok = np.zeros(4, np.float32)
    for params, grads in (([ok.astype(np.float64)], [ok]), ([ok], [np.zeros(5, np.float32)]),
                          ([ok], [])):
        with pytest.raises(ValueError):
            kernels.AdamStep(params, grads)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2 ** 31), shape=st.tuples(st.integers(1, 6), st.integers(1, 70),
                                                      st.integers(1, 300)),
       tile=st.sampled_from([(8, 16), (16, 24), (64, 256)]), flat=st.booleans())
def test_the_encoders_runs_give_the_predictions_of_the_neighbour_copies(seed, shape, tile,
                                                                         flat):
    """The encoder reads each row's neighbours as runs of the padded slab
    (models.codec.slice_predictions); every slice's predictions and table rows equal those
    of the per-neighbour copies (slab_contexts), in partial tiles, in row chunks that end
    mid-slice (300 columns: 54 rows a chunk) and with flat padding."""
    from models.codec import ENCODE_CHUNK, _predict_chunked, slab_contexts, slice_predictions
    rng = np.random.default_rng(seed)
    vol = rng.normal(0, 30, shape).cumsum(axis=2).astype(np.int64) + 1000
    if flat:
        vol[:, :shape[1] // 2] = 0
    lo, hi = int(vol.min()), int(vol.max())
    model = load_model("default")
    calls = []
    real = type(model).predict_runs
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model), "predict_runs",
                      lambda self, *a: calls.append(1) or real(self, *a))
        runs = list(slice_predictions(model, vol, 8, tile, lo, hi))
    assert len(calls) == shape[0] * -(-shape[1] // max(1, ENCODE_CHUNK // shape[2]))
    copies = slab_contexts(model.neighbourhood, vol, 8, tile)
    for (zl, pred, j), (z2, values, valid) in zip(runs, copies, strict=True):
        want = _predict_chunked(model, values, valid, lo, hi)
        assert zl == z2 and np.array_equal(pred, want[0]) and np.array_equal(j, want[1])


@pytest.mark.parametrize("n", [8, 61, 3000])
def test_vector_loss_equals_the_scalar_expressions(n):
    """The fine-tuning step's loss eight samples at a time, by the kernel's own exp, expm1 and
    log (models.kernels.laplace_bits_planar): the bits and both gradients of the scalar C
    library expressions, near the mode (|e| < 0.5) and in the tails, with the clamped log
    scales' gradient cut to zero, and the last n % 8 samples by the scalar path."""
    from models.features import SCALE_STEPS, UNIT
    rng = np.random.default_rng(n)
    s = rng.integers(1, 4000, n).astype(np.float32)
    ref = rng.integers(-1000, 3000, n).astype(np.float32)
    out0 = rng.normal(0, 2, n).astype(np.float32)
    # log scales from -3 to 10 bits, and a few clamped beyond -3 and 18
    out1 = (rng.uniform(-3, 10, n) * SCALE_STEPS).astype(np.float32)
    lq = np.zeros(n, np.float32)
    block = np.arange(n) // 8           # whole blocks of eight in one regime (checked below)
    clamped = block % 7 == 1
    out1[clamped] = rng.choice([-200.0, 400.0], clamped.sum()) * SCALE_STEPS
    mu = ref + out0 * s / UNIT
    near = block % 3 == 0                                     # |e| < 0.5: the central branch
    value = np.where(near, mu.round(), (mu + rng.laplace(0, 30, n)).round()).astype(np.float32)
    want, grad = kernels.laplace_bits(value, ref, s, lq, np.stack([out0, out1], 1), UNIT,
                                      SCALE_STEPS)
    got, g0, g1 = kernels.laplace_bits_planar(value, ref, s, lq, out0, out1, UNIT, SCALE_STEPS)
    assert np.abs(value - mu)[near].max() < 0.5 and near.sum() > 2
    assert got == pytest.approx(want, rel=1e-6)
    # in the tails: g0 is a product; g1 the sum of t / b and a term near -1 (over the scale
    # steps), a few float32 roundings of each apart
    e = np.abs(value - mu)
    tails = (e > 0.51) & ~clamped
    np.testing.assert_allclose(g0[tails], grad[tails, 0], rtol=2e-5, atol=1e-9)
    t_over_b = (e - 0.5) * 2.0 ** -(out1.astype(np.float64) / SCALE_STEPS)
    slack = 2e-5 * (1 + np.abs(t_over_b[tails])) / SCALE_STEPS
    assert (np.abs(g1 - grad[:, 1])[tails] <= slack).all()
    # near the mode 1 - a/2 - c/2 cancels where the scale is wide, in both
    for g, w in ((g0, grad[:, 0]), (g1, grad[:, 1])):
        np.testing.assert_allclose(g[e < 0.5], w[e < 0.5], rtol=1e-3,
                                   atol=1e-6 * np.abs(w).max())
    assert not g1[clamped].any()
    for a in range(0, n - 7, 8):     # the bits of each eight samples in the tails
        if not tails[a:a + 8].all():
            continue
        part = [v[a:a + 8] for v in (value, ref, s, lq)]
        one = kernels.laplace_bits_planar(*part, out0[a:a + 8], out1[a:a + 8], UNIT,
                                          SCALE_STEPS)[0]
        assert one == pytest.approx(kernels.laplace_bits(
            *part, np.stack([out0[a:a + 8], out1[a:a + 8]], 1), UNIT, SCALE_STEPS)[0],
            rel=1e-6)
    scalar = kernels.laplace_bits_planar(value, ref, s, lq, out0, out1, UNIT, SCALE_STEPS,
                                         vector=False)
    assert scalar[0] == pytest.approx(want, rel=1e-12)
    assert np.array_equal(scalar[1], grad[:, 0]) and np.array_equal(scalar[2], grad[:, 1])
