"""Per-volume adaptation: the encoder fine-tunes the predictor's float twin on the volume it
is about to code, and ships the quantised result inside the blob.

A shipped model meets scanners it never saw; a few hundred optimiser steps on a sample of the
volume itself recover part of what an oracle trained on that volume would gain (measured on an
unseen head CT: -5% bits for 200 steps, -7% for 400; on the train series, 400 steps beat 100
and 200 too). Every volume runs at least 400 steps (200 before: on 96 x 128 x 128 crops of
the four train volumes, 1.6 M voxels, 400 gave -0.33%, on every one, for 20% more encoding
time), large ones up to 1600, one per 8k voxels (on the train volumes:
800 beat 400 by 0.3% and 4.4% on the two of 37 M voxels; 1600 beat 800 by 0.15-0.73% on three
whole volumes, 3200 lost 0.2% on two of them; on 28-slice crops, 800 beat 367 by 0.2-1.2%),
on 1.6 M samples from 8 slabs (0.4 M from 4 before: -0.1% each; a learning rate decaying over
the run lost 0.1-0.4%; Adam at 3e-3 on batches of 4096 instead of 1e-3 on 8192: -0.70% on
28-slice crops of the four train volumes, +0.01% on the whole volumes, 20-30% less encoding
time; 3e-3 on 8192 gave -0.75% and -0.15% at the old cost, 2e-3 -0.53% and -0.14%, 4e-3 and
5e-4 less), but the longer run can also fit its sample of slabs too closely, so the state at a
checkpoint (400 steps then) is kept when the float model codes a held-out sample of the
volume's voxels in fewer bits with it (only the kept state is quantised). At both stops the
moving average of the weights (decay 0.995) is a candidate too: at a constant step size the
weights wander about the minimum and their average sits closer to it (on the four whole train
volumes, three seeds each: -0.23% to -0.27% of their bytes, phantom S2020 -1.0% to -1.4%). With
the average, twice the steps on batches of half the size pay (the step counts above are those
of batches of 4096; since 2026-12-03 a run takes 800-3200 steps of 2048, one per 4k voxels, and
its checkpoint is at 800: the same samples seen, about as much arithmetic; whole train volumes
-0.26% and -0.31% more over two seeds, 28-slice and 96 x 128 x 128 crops -0.27% and -0.29% over
three, nearly every volume smaller). Since 2026-12-04 the step size is not constant but
warms up to a peak eight times the old 3e-3 and falls linearly over the second half
(:func:`step_size`), and a run takes 800-1920 steps, one per 6.7k voxels: float bits of the
held-out sample against the constant step size over the old 800-3200 steps, on seven train
volumes and crops, two seeds, -0.12% to -0.55% at 0.6 of the steps (peaks of 1.5e-2 and
3e-2 to 3.6e-2 did a little worse, 4.8e-2 worse again); the coded train volumes and crops
-0.23% of their bytes in all, 16% less encoding time (docs/codec-log.md, "2026-12-04, morning"). With
that schedule Adam's second-moment decay of 0.95 instead of 0.999 and a moving average
decaying by 0.99 a step instead of 0.995 took another -0.10% to -0.46% of those float bits
(a decay of 0.9 less, 0.98 and 0.99 less again). Two runs with different batch orders
fine-tune side by side, one per core, and the held-out sample picks the better (on three
train crops: 0.0, -0.1 and -0.7%, in the same wall time). The embedded model is a few
kilobytes, so it is only used for volumes large enough to repay it, and only when it pays on
that held-out sample. Decoding
stays exact: the embedded network is an ordinary integer network, read from the blob instead of
from the weights folder. Its weights are quantised to 10 bits (+-511) instead of 8, as the
shipped network's are since model c529efcb (models.intnet: the compiled kernels' integer
layers run both at the same speed): they place the network's outputs finer, for about 2.3 kB
more of embedded model (whole train volumes, two seeds: -0.30% and -0.26% of their bytes;
phantom S2020 -1.1%). The embedded model travels packed (models.array_pack).
"""

from __future__ import annotations

import copy
import hashlib
import io
import zipfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from models import array_pack, kernels, paper_table, scratch, tune_workers
from models.container import CorruptBlobError
from models.entropy import CodingTables
from models.features import SCALE_STEPS, UNIT
from models.intnet import WIDE_WEIGHT_MAX
from models.samples import (Samples, collect_samples, evaluate, gather_rows, integer_residuals,
                            network_index, network_samples)
from models.tables import table_bits
from models.value_range import ValueRange

ADAPT_STEPS = (800, 1920)  # optimiser steps: one per STEP_VOXELS voxels, within these bounds
STEP_VOXELS = 6_667
TUNE_RUNS = 2             # fine-tuning runs with different batch orders, side by side
ADAPT_CHECKPOINT = 800     # a longer run must beat its state at this step on the check sample
ADAPT_BATCH = 2048
ADAPT_LR = 2.4e-2          # peak step size (see step_size)
ADAPT_WARMUP = 0.1         # share of the steps over which the step size rises to its peak
ADAPT_DECAY_FROM = 0.5     # share of the steps after which it falls linearly
ADAPT_LR_FLOOR = 0.1       # the step size at the first and last steps, times the peak
ADAPT_SAMPLES = 1_600_000
ADAPT_SLABS = 8           # slabs the samples are drawn from
CHECK_SAMPLES = 100_000    # held-out voxels on which the adapted model must beat the shipped one
_EMBEDDED_KEYS = ("head", "token_table", "class_table")
COARSE_SHIFTS = (2, 3, 4, 5, 6)   # carried token tables may be rounded to base/4 .. base/64
ADAPT_BF16 = None          # fine-tuning's products in bfloat16 (None: see bf16_step)
ADAPT_AVERAGE = 0.99       # decay per step of the weights' moving average, a stop's candidate
ADAPT_BETAS = (0.9, 0.95)  # Adam's decays of its gradient moments
AVERAGE_EVERY = 4          # steps between updates of the average (each by the decay's power)
ADAPT_WEIGHT_MAX = WIDE_WEIGHT_MAX   # the adapted network's weights in 10 bits


def can_adapt(predictor) -> bool:
    kind = getattr(predictor, "kind", "")
    return kind.startswith("paper") or (kind == "default" and bool(predictor.float_arrays))


def wants_adaptation(predictor, voxels: int, default_min: int) -> bool:
    """Whether ``encode_volume`` adapts by default: the paper models always fit their one
    residual distribution to the volume (their coder's distribution follows the data); the
    default model only from ``default_min`` voxels on."""
    if getattr(predictor, "kind", "").startswith("paper"):
        return voxels >= paper_table.MIN_VOXELS
    return voxels >= default_min


def adapt(predictor, volume: np.ndarray, slab: int, tile, values: ValueRange | None = None,
          seed: int = 0):
    """A copy of ``predictor`` fine-tuned on ``volume`` (its tables refitted on the volume,
    smoothed toward the shipped ones), or None when it would not pay: on a fresh sample of
    the volume's voxels it must save more bits than the embedded model costs. ``values``:
    the range the volume is coded within (models.value_range; default its dtype's). Paper
    models only refit their one coding table (models.paper_table)."""
    if predictor.kind.startswith("paper"):
        return paper_table.fit_volume_table(predictor, volume, slab, tile, seed)
    tune_workers.start(TUNE_RUNS)     # the runs' processes start while the samples are drawn
    with tune_workers.sample_space() as space:   # memory the last adaptation filled
        return _adapted(predictor, volume, slab, tile, values, seed, space)


def _adapted(predictor, volume: np.ndarray, slab: int, tile, values: ValueRange | None,
             seed: int, space):
    """:func:`adapt` of the default model, its samples drawn into ``space``."""
    n_slabs = -(-volume.shape[0] // slab)
    per_slab = min(slab, volume.shape[0]) * volume.shape[1] * volume.shape[2]
    picks = min(ADAPT_SLABS, n_slabs)
    keep = min(1.0, ADAPT_SAMPLES / (picks * per_slab))
    rng = np.random.default_rng(seed)
    hood = predictor.neighbourhood
    samples = collect_samples([volume], slab, picks, keep, rng, tile=tile, hood=hood,
                              values=values, space=space)
    check = collect_samples([volume], slab, min(8, n_slabs), min(1.0, CHECK_SAMPLES / volume.size),
                            rng, tile=tile, hood=hood, values=values)
    tune_index = network_index(samples, hood.size) if predictor.tables.flat else None
    if (len(samples.value) if tune_index is None else len(tune_index)) < ADAPT_BATCH:
        return None    # (nearly) all flat: nothing for the network to learn
    low, high = ADAPT_STEPS
    steps = min(high, max(low, volume.size // STEP_VOXELS))
    stops = sorted({min(ADAPT_CHECKPOINT, steps), steps})
    # each run on one torch thread, in a process of its own (models.tune_workers): the second
    # core runs a second fine-tuning (its own batch order) in about the same wall time, and
    # the check sample picks the better. The number of runs does not follow the machine's
    # cores, so a volume codes to the same blob wherever the compiled step runs (a 1.6 M-voxel
    # train crop: the same bytes with the AVX-512 and the AVX2 layers on a Zen 4)
    check_net = network_samples(check, hood.size) if predictor.tables.flat else check
    arrays = {f: getattr(samples, f) for f in Samples.__dataclass_fields__}
    if tune_index is not None:
        arrays["tune_index"] = space.array("tune_index", tune_index.shape, tune_index.dtype)
        arrays["tune_index"][:] = tune_index
    jobs = [(predictor, check_net, seed + k, steps, stops, default_settings())
            for k in range(TUNE_RUNS)]
    networks = tune_workers.map_runs(tune_run, arrays, jobs, space)
    # each network with its refitted tables carried exactly, coarser, or not at all: the
    # one whose bits of the volume (estimated on the check sample) and of its embedded
    # model in the blob are fewest
    variants, bits = [], []
    for net in networks:
        r, j = integer_residuals(net, check)
        for c in _table_variants(net, predictor):
            variants.append(c)
            bits.append(check_bits(c, r, j) * volume.size)
    # packing each variant is an LZMA run (about 9 ms), which releases the interpreter lock
    with ThreadPoolExecutor(2) as pool:
        sizes = list(pool.map(lambda c: len(embedded_bytes(c)), variants))
    costs = [(b + 8 * size, k, c) for k, (b, size, c) in enumerate(zip(bits, sizes, variants))]
    cost, _, best = min(costs, key=lambda t: t[:2])
    return best if pays_off(predictor, cost, check, volume.size) else None


class Settings(NamedTuple):
    """How a fine-tuning run steps (handed to its worker process, which would not see a
    patched module constant)."""
    lr: float        # peak step size
    batch: int
    bf16: bool
    average: float   # decay per step of the weights' moving average
    weight_max: int  # bound of the quantised network's weights (models.intnet.quantize_mlp)
    betas: tuple[float, float]   # Adam's decays of its moments
    warmup: float    # the step-size schedule (see step_size)
    decay_from: float
    floor: float


def default_settings() -> Settings:
    """The module's step-size schedule, batch, average, weight bound and Adam's decays;
    bfloat16 products as :func:`bf16_step` says."""
    return Settings(ADAPT_LR, ADAPT_BATCH, bf16_step() if ADAPT_BF16 is None else ADAPT_BF16,
                    ADAPT_AVERAGE, ADAPT_WEIGHT_MAX, ADAPT_BETAS, ADAPT_WARMUP,
                    ADAPT_DECAY_FROM, ADAPT_LR_FLOOR)


def tune_run(arrays: dict, job):
    """One fine-tuning run (in a worker process): the quantised predictor of the float twin
    tuned on the samples in ``arrays``. ``job`` is (predictor, check sample, seed, steps,
    stops, Settings)."""
    from models import train
    predictor, check, seed, steps, stops, settings = job
    samples = Samples(**{f: arrays[f] for f in Samples.__dataclass_fields__})
    model = tuned(train.float_model(predictor), samples, check, seed, steps, stops, settings,
                  arrays.get("tune_index"))
    return _quantised(model, samples, predictor, settings.weight_max)


def tuned(model, samples, check, seed: int, steps: int, stops,
          settings: Settings | None = None, index: np.ndarray | None = None):
    """``model`` fine-tuned for ``steps`` Adam steps on ``samples`` (those at ``index``, when
    given), in whichever state codes ``check`` in the fewest float bits: at each of the
    ``stops``, the weights or their moving average (a later stop, then the average, on a tie).
    Only that state is quantised: one quantisation per run instead of one per candidate (each
    costs about a second); at the earlier step size the four train volumes and their crops
    coded to the same blobs as when the quantised models were compared."""
    candidates = []
    for i, average in enumerate(_fine_tune(model, samples, seed, steps, stops, settings, index)):
        for k, state in enumerate((model, average)):
            if state is not None:
                candidates.append((_float_bits(state, check), -2 * i - k,
                                   copy.deepcopy(state.state_dict())))
    model.load_state_dict(min(candidates, key=lambda c: c[:2])[2])
    return model


def _float_bits(model, samples) -> float:
    """Mean bits of the float ``model``'s discretised Laplace on the samples (0 for none)."""
    import torch
    from models.train import laplace_bits
    if not len(samples.value):
        return 0.0
    t = [torch.from_numpy(np.asarray(a, np.float32)) for a in
         (samples.value, samples.ref, samples.s, samples.lq)]
    with torch.no_grad():
        return float(laplace_bits(*t, model(torch.from_numpy(samples.x))).mean())


def check_bits(predictor, residuals: np.ndarray, rows: np.ndarray) -> float:
    """Ideal bits per voxel of ``predictor``'s tables on the check sample's residuals."""
    return table_bits(predictor.tables, residuals, rows) / len(residuals)


def _table_variants(adapted, base):
    """``adapted`` with its refitted token tables, with those rounded to coarser steps
    (cheaper to carry), and with ``base``'s (nothing to carry)."""
    yield adapted
    for shift in COARSE_SHIFTS:
        yield _with_tokens(adapted, coarse_tokens(adapted.tables.tokens, base.tables.tokens, shift))
    yield _with_tokens(adapted, base.tables.tokens)


def coarse_tokens(tokens: np.ndarray, base: np.ndarray, shift: int) -> np.ndarray:
    """``tokens`` rounded to the nearest ``base + q * step``, step = max(1, base >> shift):
    a table the blob carries as small integers ``q`` (see :func:`embedded_bytes`)."""
    step = token_steps(base, shift)
    q = np.round((tokens - base) / step).astype(np.int64)
    q = np.maximum(q, -((base - 1) // step))   # frequencies stay positive
    return base + q * step


def token_steps(base: np.ndarray, shift: int) -> np.ndarray:
    """Step of each table entry when a blob carries its tokens at ``shift``."""
    return np.maximum(1, np.asarray(base, np.int64) >> shift)


def _with_tokens(adapted, tokens: np.ndarray):
    """``adapted`` coding with the token table ``tokens``."""
    twin = copy.copy(adapted)
    twin.tables = CodingTables(tokens, adapted.tables.classes)
    return twin


def _quantised(model, samples, predictor, weight_max: int = ADAPT_WEIGHT_MAX):
    """The exact predictor of the fine-tuned float ``model``, its weights within
    +-``weight_max``, tables refitted on the samples (smoothed toward ``predictor``'s), under
    ``predictor``'s model id."""
    from models import train
    adapted = train.quantize(model, samples, predictor.name, predictor.neighbourhood,
                             predictor.tables.flat, predictor.tables.fraction_bins,
                             prior=predictor.tables, weight_max=weight_max)
    adapted.table_base = predictor.tables.tokens   # the blob carries the difference
    adapted.model_id = predictor.model_id
    adapted.float_arrays = {}
    return adapted


def pays_off(base, cost: float, check, voxels: int) -> bool:
    """Whether an adapted model whose ``cost`` (bits of ``voxels`` voxels, estimated on the
    samples ``check``, plus the bits it takes in the blob) is below what ``base`` codes them
    in."""
    return cost < evaluate(base, check) * voxels


def _fine_tune(model, samples, seed: int, steps: int, stops=(),
               settings: Settings | None = None, index: np.ndarray | None = None):
    """Adam steps on ``model`` over ``samples`` (those at ``index``, when given); yields after
    each step count in ``stops`` a twin of ``model`` holding the exponential moving average of
    its weights (decay ``settings.average``, from the starting weights). At a constant step
    size the weights keep wandering about the minimum and their average sits closer to it.
    With ``settings.bf16`` the network's products are bfloat16 (autocast), the loss float32."""
    import torch
    settings = settings or default_settings()
    torch.manual_seed(seed)
    n = len(samples.value) if index is None else len(index)
    # one shuffle up front, then a window at a random offset per step: nearly the random
    # batches of a gather per step, at the cost of a slice. The shuffle gathers straight from
    # the samples (no copy of the picked ones first: fresh memory is slow to touch)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen).numpy()
    if index is not None:
        order = index[order]
    with scratch.POOL.lease() as buffers:   # memory the previous run filled (models.scratch)
        inputs = buffers.array("x", (n, model.input_width(samples.x.shape[1])), np.float32)
        arrays = [model.training_inputs(samples.x, order, out=inputs).numpy()] + [
            gather_rows(getattr(samples, name), order, buffers.array(name, (n,), np.float32))
            for name in ("ref", "s", "lq", "value")]
        yield from _steps(model, arrays, gen, steps, stops, settings)


def _steps(model, arrays: list[np.ndarray], gen, steps: int, stops, settings: Settings):
    """The Adam steps of :func:`_fine_tune` on its shuffled ``arrays`` (inputs, ref, s, lq,
    value), batch offsets drawn from the torch generator ``gen``."""
    import torch
    from models.train import mean_laplace_bits
    n = len(arrays[0])
    tensors = [torch.from_numpy(a) for a in arrays]
    opt = _Adam(list(model.parameters()), lr=settings.lr, betas=settings.betas)
    batch = min(settings.batch, n)
    starts = torch.randint(0, n - batch + 1, (steps,), generator=gen).tolist()
    compiled = None if settings.bf16 else _compiled_step(model)
    average = copy.deepcopy(model)
    pairs = [(a, p.detach()) for a, p in zip(average.parameters(), model.parameters())]
    averaged = 0
    for done, a in enumerate(starts, 1):
        x, ref, s, lq, v = (t[a:a + batch] for t in arrays)
        if compiled is not None and compiled.step(x, v, ref, s, lq, UNIT, SCALE_STEPS) \
                is not None:
            compiled.adam(step_size(settings, done, steps), settings.betas)
        else:
            x, ref, s, lq, v = (t[a:a + batch] for t in tensors)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
                out = model.forward_training(x)
            loss = mean_laplace_bits(v, ref, s, lq, out.float())
            model.zero_grad(set_to_none=True)
            loss.backward()
            opt.lr = step_size(settings, done, steps)
            opt.step()
            compiled = None
        if done % AVERAGE_EVERY == 0 or done in stops:
            with torch.no_grad():
                rate = 1 - settings.average ** (done - averaged)
                for mean, weight in pairs:
                    mean.lerp_(weight, rate)
            averaged = done
        if done in stops:
            yield average


def step_size(settings: Settings, done: int, steps: int) -> float:
    """Step size of step ``done`` (from 1) of ``steps``: up from ``settings.floor`` times the
    peak ``settings.lr`` over the first ``settings.warmup`` of the steps, the peak until
    ``settings.decay_from`` of them, then down linearly to the floor at the last. Against a
    constant 3e-3 over as many steps, this fits 0.6 of them better on the train volumes (the
    warm-up matters: without it a phantom ended 1.6% worse, its first large steps throwing
    the shipped network off; docs/codec-log.md, "2026-12-04")."""
    u, peak, floor = done / steps, settings.lr, settings.floor
    if u < settings.warmup:
        return peak * (floor + (1 - floor) * u / settings.warmup)
    if u <= settings.decay_from:
        return peak
    return peak * (1 - (1 - floor) * (u - settings.decay_from) / (1 - settings.decay_from))


class _CompiledStep(NamedTuple):
    step: kernels.TrainStep
    adam: kernels.AdamStep


def _compiled_step(model) -> _CompiledStep | None:
    """The float32 step of ``model`` in one compiled call (models.kernels.TrainStep), writing
    the gradients into its parameters' ``grad``, and Adam's update in another
    (models.kernels.AdamStep); None without the kernels. Torch's step writes
    each layer's activations for the whole batch (a megabyte) and reads them back; the kernel
    takes the batch in blocks that stay in cache: an Adam step on 4096 samples took 2.17-2.51
    against 4.78-4.97 ms on a Zen 3 (three alternating runs of 400 steps each); Adam's update
    took 4 against torch's 258 us there. It is faster than torch's bfloat16 step too (see
    :func:`bf16_step`)."""
    import torch
    if not kernels.available():
        return None
    layers = model.linear_layers()
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    for p in params:
        p.grad = torch.zeros_like(p)
    arrays = [[p.detach().numpy() for p in group] for group in (
        [layer.weight for layer in layers], [layer.bias for layer in layers],
        [layer.weight.grad for layer in layers], [layer.bias.grad for layer in layers])]
    return _CompiledStep(kernels.TrainStep(*arrays),
                         kernels.AdamStep(arrays[0] + arrays[1], arrays[2] + arrays[3]))


def bf16_step() -> bool:
    """Whether fine-tuning steps in torch with bfloat16 products: only where the compiled
    float32 step (models.kernels.TrainStep) is missing and the CPU multiplies bfloat16. Where
    both are there the compiled step is faster: on a Zen 4 (AVX-512 BF16), 32-slice crops of
    the four train volumes encoded with adaptation in 12.4 against 18.2 s and the whole
    volumes in 22.0 against 29.5 s (medians of two alternating rounds), in +0.01% and +0.06%
    bytes, within the spread of the runs' batch orders (README, Benchmark)."""
    return bf16_products() and not kernels.available()


@lru_cache(maxsize=1)
def bf16_products() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX): there torch's
    fine-tuning step may run its products in bfloat16 (oneDNN); elsewhere they would be
    emulated, slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class _Adam:
    """Plain Adam (Kingma & Ba). torch.optim's first use imports TorchDynamo, which costs
    seconds per encoding process; this is all the fine-tuning needs."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self) -> None:
        import torch
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        m, v = [self.m[i] for i in live], [self.v[i] for i in live]
        # whole-list (foreach) kernels: a few calls per step instead of a few per tensor
        with torch.no_grad():
            torch._foreach_mul_(m, b1)
            torch._foreach_add_(m, grads, alpha=1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
            denom = torch._foreach_div(v, c2)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(params, m, denom, value=-self.lr / c1)


def embedded_bytes(predictor) -> bytes:
    """The arrays a blob must carry for an adapted predictor."""
    if predictor.kind.startswith("paper"):
        return paper_table.table_bytes(predictor)
    arrays = {k: v for k, v in predictor.to_arrays().items()
              if k.startswith("net_") or k in _EMBEDDED_KEYS}
    base = getattr(predictor, "table_base", None)
    if base is not None and base.shape == arrays["token_table"].shape:
        # rows the volume barely uses stay near the shipped ones: small differences pack well,
        # in the coarsest steps that hold them exactly
        delta = arrays.pop("token_table") - base
        shift = _coarsest_shift(delta, base)
        if shift is not None:
            arrays["token_steps"] = delta // token_steps(base, shift)
            arrays["token_shift"] = np.array(shift, np.int8)
        elif delta.any():
            arrays["token_delta"] = delta
    return array_pack.pack_arrays({k: _narrowest(v) for k, v in arrays.items()})


def _coarsest_shift(delta: np.ndarray, base: np.ndarray) -> int | None:
    """The least of COARSE_SHIFTS at whose steps ``delta`` is exact (None: at none of them,
    or ``delta`` is zero)."""
    if not delta.any():
        return None
    for shift in sorted(COARSE_SHIFTS):
        if not (delta % token_steps(base, shift)).any():
            return shift
    return None


def _narrowest(values: np.ndarray) -> np.ndarray:
    """Integer arrays in the smallest type that holds them (readers widen them again)."""
    if values.dtype.kind not in "iu" or values.size == 0:
        return values
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= values.min() and values.max() <= info.max:
            return values.astype(dtype)
    return values


def embedded_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an embedded model: packed (models.array_pack, since 2026-12-03) or, as
    blobs written before carry them, an npz (the paper models' tables still are)."""
    if array_pack.is_packed(data):
        return array_pack.unpack_arrays(data)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def with_embedded(base, data: bytes):
    """``base`` with the network, head and tables carried by a blob."""
    return _with_embedded(base, data, hashlib.sha256(data).digest())


def _carried_delta(arrays: dict, base: np.ndarray) -> np.ndarray | None:
    """The token table difference an embedded model carries (popped from ``arrays``): exact
    (``token_delta``), in steps (``token_steps`` at ``token_shift``), or None."""
    if "token_delta" in arrays:
        delta = arrays.pop("token_delta").astype(np.int64)
    elif "token_steps" in arrays:
        shift = np.asarray(arrays.pop("token_shift", -1))
        if shift.shape != () or shift.dtype.kind not in "iu" or not 0 <= int(shift) <= 16:
            raise ValueError("its token table steps are missing or out of range")
        delta = arrays.pop("token_steps").astype(np.int64)
        if delta.shape == base.shape:
            delta = delta * token_steps(base, shift)
    else:
        return None
    if delta.shape != base.shape:
        raise ValueError("its table difference does not fit the model's tables")
    return delta


@lru_cache(maxsize=16)
def _with_embedded(base, data: bytes, _digest: bytes):
    try:
        arrays = embedded_arrays(data)
        if paper_table.is_table(arrays):
            return paper_table.with_table(base, arrays)
        merged = {k: v for k, v in base.to_arrays().items() if not k.startswith("float_")}
        merged = {k: v for k, v in merged.items() if not k.startswith("net_")}
        merged.update(arrays)
        delta = _carried_delta(merged, base.tables.tokens)
        if delta is not None:
            merged["token_table"] = base.tables.tokens + delta
        predictor = type(base).from_arrays(base.name, merged, base.meta)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise CorruptBlobError(f"blob carries an unreadable adapted model: {exc}") from None
    predictor.model_id = base.model_id
    return predictor
