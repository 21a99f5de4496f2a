"""Training the seed paper's predictors (models.paper) the paper's way, then making them exact.

1. samples: every voxel of ten whole slices taken with a fixed stride from ONE training volume
   (only slices with all their previous slices inside the volume, so that the padding is the
   paper's: the volume minimum beyond the volume's borders), shuffled; the padded integer
   contexts of all samples are gathered once before training (int16 when they fit: 3.5 GB for
   the cube, 1 GB for the pyramid) and each batch is a row gather + one float conversion, which
   gives the same float32 inputs as gathering per batch;
2. a float MLP 1024-512-256-128-1 with LeakyReLU (slope 2**-7) on inputs normalised to [-1, 1]
   by the training volume's minimum and maximum, loss MAE + lambda (1 - |PCC|), lambda = 1,
   SGD with momentum 0.9 (cube: batch 256, lr 2e-4; pyramid: batch 32, lr 3e-5), for a bounded
   time, with progress and checkpoints;
3. quantisation to the exact integer network (models.intnet float64 path) and one coding table
   fitted on the integer model's residuals on the training slices.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.context import Neighbourhood
from models.features import N_SCALES, SCALE_STEPS, SCALE_ZERO
from models.intnet import quantize_wide_mlp
from models.paper import LEAKY_SHIFT, P_JCONST, P_JMODE, PREDICTORS, PaperPredictor
from models.entropy import N_CLASSES, N_TOKENS, CodingTables, split_residuals
from models.tables import _quantise, laplace_token_probs, prior_tables, table_bits

log = logging.getLogger(__name__)

HIDDEN = (1024, 512, 256, 128)
#: the paper's optimiser settings per model
PAPER_SETTINGS = {"paper-cube": {"batch": 256, "lr": 2e-4},
                  "paper-pyramid": {"batch": 32, "lr": 3e-5}}
N_SLICES = 10
INPUT_MAX = 65535            # neighbour - center of any 16-bit volume
ACT_MAX = 32767
WEIGHT_BITS = (16, 16, 16, 16, 16)  # int8 hidden weights lost a linear path (11 HU)
LINEAR_INIT_SAMPLES = 100_000


# ---------------------------------------------------------------------------------- samples
def normalisation(volume: np.ndarray) -> tuple[int, float, int]:
    """``(center, half, pad)``: ``(v - center) / half`` maps the volume into [-1, 1]; ``pad`` is
    its minimum."""
    lo, hi = int(volume.min()), int(volume.max())
    center = (lo + hi) // 2
    half = float(max(hi - center, center - lo, 1))
    return center, half, lo


def stride_slices(nz: int, depth: int, count: int = N_SLICES) -> list[int]:
    """``count`` slices with a fixed stride among those with ``depth`` previous slices."""
    first = min(depth, nz - 1)
    avail = nz - first
    if avail <= count:
        return list(range(first, nz))
    stride = avail // count
    return [first + stride // 2 + i * stride for i in range(count)]


class ContextSampler:
    """Causal contexts of voxels of whole slices of one volume, gathered on demand.

    A voxel's neighbours outside the volume are invalid (and become the model's ``pad``), as
    the codec marks neighbours outside a slab; whole-volume slices are what the paper trains on.
    """

    def __init__(self, hood: Neighbourhood, volume: np.ndarray, slices: list[int]):
        self.hood = hood
        self.slices = list(slices)
        nz, self.ny, self.nx = volume.shape
        pz, py, px0, px1 = hood.pad
        self.shape = (pz + 1, self.ny + py, self.nx + px0 + px1)
        plane = self.shape[1] * self.shape[2]
        blocks = []
        for z in self.slices:
            buf = np.zeros(self.shape, np.int32)
            z0 = max(z - pz, 0)
            buf[pz - (z - z0):, py:, px0:px0 + self.nx] = volume[z0:z + 1]
            blocks.append(buf.ravel())
        self.flat = np.concatenate(blocks)
        self.block_size = blocks[0].size
        self.zvalid = np.array([[z + dz >= 0 for dz, _, _ in hood.offsets] for z in self.slices])
        y, x = np.divmod(np.arange(self.ny * self.nx, dtype=np.int64), self.nx)
        self.y, self.x = y, x
        self.base = pz * plane + (y + py) * self.shape[2] + x + px0
        o = np.array(hood.offsets, dtype=np.int64)
        self.off = o[:, 0] * plane + o[:, 1] * self.shape[2] + o[:, 2]
        self.oy, self.ox = o[:, 1], o[:, 2]
        self.targets = np.stack([volume[z].ravel() for z in self.slices]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.slices) * self.ny * self.nx

    def rows(self, idx: np.ndarray, pad: int, dtype=np.int32) -> np.ndarray:
        """Padded contexts ``(m, K)`` of samples ``idx`` (invalid neighbours = ``pad``)."""
        s, p = np.divmod(np.asarray(idx, dtype=np.int64), self.ny * self.nx)
        values = self.flat[(s * self.block_size + self.base[p])[:, None] + self.off[None, :]]
        yy = self.y[p][:, None] + self.oy[None, :]
        xx = self.x[p][:, None] + self.ox[None, :]
        valid = (yy >= 0) & (xx >= 0) & (xx < self.nx) & self.zvalid[s]
        return np.where(valid, values, pad).astype(dtype)

    def precompute(self, norm: tuple[int, float, int], chunk: int = 8192):
        """Gather every sample's padded context once: ``self.ctx`` ``(n, K)`` (int16 when the
        volume and ``pad`` fit) and the normalised float32 targets ``self.target_norm``."""
        center, half, pad = norm
        lo, hi = min(int(self.flat.min()), pad), max(int(self.flat.max()), pad)
        dtype = np.int16 if -32768 <= lo and hi <= 32767 else np.int32
        n = len(self)
        self.ctx = np.empty((n, self.hood.size), dtype)
        for a in range(0, n, chunk):
            self.ctx[a:a + chunk] = self.rows(np.arange(a, min(a + chunk, n)), pad, dtype)
        self.target_norm = ((self.targets.ravel() - center) / half).astype(np.float32)
        self.norm = norm

    def batch(self, idx: np.ndarray):
        """Float32 network inputs and targets of samples ``idx`` (after :meth:`precompute`):
        ``(v - center) * (1 / half)`` in float32, the same numbers as ``_float_inputs``."""
        center, half, _ = self.norm
        x = torch.from_numpy(self.ctx[idx]).to(torch.float32)
        x.sub_(float(center)).mul_(float(np.float32(1.0 / half)))
        return x, torch.from_numpy(self.target_norm[idx])

    def gather(self, idx: np.ndarray):
        """``values (K, m)`` int32, ``valid (K, m)`` bool and ``target (m,)`` of samples ``idx``."""
        s, p = np.divmod(np.asarray(idx, dtype=np.int64), self.ny * self.nx)
        values = self.flat[self.off[:, None] + (s * self.block_size + self.base[p])[None, :]]
        yy = self.y[p][None, :] + self.oy[:, None]
        xx = self.x[p][None, :] + self.ox[:, None]
        valid = (yy >= 0) & (xx >= 0) & (xx < self.nx) & self.zvalid[s].T
        return values, valid, self.targets[s, p]


# ---------------------------------------------------------------------------------- float model
class PaperMLP(nn.Module):
    """The paper's network: K -> 1024 -> 512 -> 256 -> 128 -> 1, LeakyReLU, linear output."""

    def __init__(self, n_inputs: int, hidden=HIDDEN, slope: float = 2.0 ** -LEAKY_SHIFT):
        super().__init__()
        sizes = (n_inputs, *hidden, 1)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(slope)]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x):
        return self.net(x)[:, 0]

    def linear_layers(self):
        return [m for m in self.net if isinstance(m, nn.Linear)]


def paper_loss(pred: torch.Tensor, target: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """MAE + lambda (1 - |PCC|) of a batch (normalised units)."""
    mae = (pred - target).abs().mean()
    pc, tc = pred - pred.mean(), target - target.mean()
    pcc = (pc * tc).sum() / torch.sqrt((pc * pc).sum() * (tc * tc).sum() + 1e-12)
    return mae + lam * (1 - pcc.abs())


@dataclass
class FloatResult:
    model: PaperMLP
    center: int
    half: float
    pad: int
    samples_seen: int
    steps: int
    seconds: float
    epochs: float
    final_loss: float


def _float_inputs(values, valid, center, half, pad) -> torch.Tensor:
    v = np.where(valid, values, pad).astype(np.float32) - np.float32(center)
    return torch.from_numpy(np.ascontiguousarray(v.T)) * np.float32(1.0 / half)


def _fix_output_sign(model: PaperMLP, sampler: ContextSampler, norm, idx) -> float:
    """Negate the output layer of the freshly initialised network when its predictions
    correlate negatively with the targets.

    The paper's loss has ``1 - |PCC|``: PCC is blind to the output's scale, so a network that
    starts anticorrelated settles at a tiny anticorrelated output (measured: std 10 HU against
    1067 HU for the targets, PCC -0.996, MAE no better than the median) because reaching a
    positive correlation would cross PCC = 0, the loss's maximum. The paper does not say how it
    initialised; this choice of sign keeps the start on the right side of that barrier.
    """
    center, half, pad = norm
    values, valid, target = sampler.gather(idx)
    with torch.no_grad():
        pred = model(_float_inputs(values, valid, center, half, pad)).double().numpy()
    pcc = float(np.corrcoef(pred, target)[0, 1]) if pred.std() > 0 else 0.0
    if pcc < 0:
        last = model.linear_layers()[-1]
        with torch.no_grad():
            last.weight.neg_()
            last.bias.neg_()
    log.info("initial PCC %.3f%s", pcc, " (output layer negated)" if pcc < 0 else "")
    return pcc


def _linear_init(model: PaperMLP, sampler: ContextSampler, idx: np.ndarray,
                 ridge: float = 1e-4) -> float:
    """Start the network at the least-squares linear predictor of the targets.

    The paper does not state its initialisation. Two units per hidden layer form an exact linear
    path through the LeakyReLUs (``lrelu(z) - lrelu(-z) = (1 + slope) z``) that carries the ridge
    least-squares fit ``w . x + b`` of samples ``idx`` to the output; every other unit keeps
    PyTorch's random initialisation and starts with output weight zero, so SGD begins at the
    linear predictor and learns the non-linear part. Returns the fit's mean absolute error in
    normalised units.
    """
    x, y = sampler.batch(idx)
    a = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    gram = a.T @ a + ridge * torch.eye(a.shape[1], dtype=torch.float64)
    coef = torch.linalg.solve(gram, a.T @ y.double())
    mae = float((a @ coef - y.double()).abs().mean())
    w, b = coef[:-1].float(), float(coef[-1])
    gain = 1.0 / (1.0 + 2.0 ** -LEAKY_SHIFT)
    layers = model.linear_layers()
    with torch.no_grad():
        first = layers[0]
        first.weight[0], first.weight[1] = w, -w
        first.bias[0], first.bias[1] = b, -b
        for layer in layers[1:]:
            layer.weight[:2] = 0.0
            layer.bias[:2] = 0.0
            layer.weight[0, 0], layer.weight[0, 1] = gain, -gain
            if layer.out_features > 1:
                layer.weight[1, 0], layer.weight[1, 1] = -gain, gain
    log.info("linear initialisation: mean absolute error %.5f (normalised units)", mae)
    return mae


def fit_float(kind: str, sampler: ContextSampler, norm: tuple[int, float, int],
              minutes: float = 5.0, max_epochs: float = 1.0, batch: int | None = None,
              lr: float | None = None, seed: int = 0, checkpoint: Path | None = None,
              checkpoint_every_s: float = 60.0, progress=None, resume: Path | None = None,
              optimizer: str = "sgd", sign_fix: bool = True, init: str = "linear"
              ) -> FloatResult:
    """SGD (momentum 0.9) on MAE + (1 - |PCC|) over the shuffled samples, until ``minutes`` of
    wall time or ``max_epochs`` epochs have passed, whichever comes first. ``optimizer="adam"``
    is a documented deviation from the paper (for time-bounded ablations only). ``init``:
    ``"linear"`` starts at the least-squares linear predictor (:func:`_linear_init`),
    ``"random"`` at PyTorch's default (with the output sign fixed when ``sign_fix``)."""
    center, half, pad = norm
    batch = batch or PAPER_SETTINGS[kind]["batch"]
    lr = lr or PAPER_SETTINGS[kind]["lr"]
    torch.manual_seed(seed)
    model = PaperMLP(sampler.hood.size)
    if optimizer == "sgd":  # foreach: the same per-element update, fewer kernel calls
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, foreach=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    seen = steps = 0
    seconds_before = 0.0  # training time of the runs a resumed checkpoint continues
    resumed = resume is not None and Path(resume).exists()
    if resumed:
        state = torch.load(resume, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        for group in opt.param_groups:  # load_state_dict restores the saved options
            group["foreach"] = optimizer == "sgd" or None
        seen, steps = state["seen"], state["steps"]
        seconds_before = float(state.get("seconds", 0.0))
        log.info("resumed from %s at %d samples", resume, seen)
    rng = np.random.default_rng(seed)
    n = len(sampler)
    epoch = seen // n
    for _ in range(epoch + 1):  # every epoch its own permutation, also after a resume
        order = rng.permutation(n)
    if getattr(sampler, "norm", None) != norm:
        t_pre = time.time()
        sampler.precompute(norm)
        if progress:
            progress(f"{kind}: contexts of {n} samples gathered once ({sampler.ctx.nbytes / 1e9:.2f}"
                     f" GB, {time.time() - t_pre:.0f} s)")
    if not resumed and init == "linear":
        _linear_init(model, sampler, order[:LINEAR_INIT_SAMPLES])
    elif not resumed and sign_fix:
        _fix_output_sign(model, sampler, norm, order[:4096])
    t0 = last_report = last_ckpt = time.time()
    running, loss_v = None, float("nan")
    if resumed:  # a resume that trains no further step still reports the loss it ended at
        running = state.get("loss")

    def save():  # write then rename: a stop while saving keeps the previous checkpoint
        if checkpoint is not None:
            tmp = Path(str(checkpoint) + ".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "seen": seen,
                        "steps": steps, "norm": norm, "kind": kind,
                        "seconds": seconds_before + time.time() - t0, "loss": running}, tmp)
            tmp.replace(checkpoint)

    while time.time() - t0 < minutes * 60 and seen < max_epochs * n:
        pos = seen % n
        if pos + batch > n:  # an epoch's last partial batch is dropped
            seen += n - pos
            continue
        if seen // n != epoch:  # new epoch: reshuffle
            epoch = seen // n
            order = rng.permutation(n)
        x, y = sampler.batch(order[pos:pos + batch])
        loss = paper_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += batch
        steps += 1
        loss_v = float(loss.detach())
        running = loss_v if running is None else 0.99 * running + 0.01 * loss_v
        now = time.time()
        if now - last_report > 15:
            msg = (f"{kind}: {seen} samples ({seen / n:.3f} epochs), {steps} steps, "
                   f"loss {running:.4f}, {now - t0:.0f} s")
            log.info(msg)
            if progress:
                progress(msg)
            last_report = now
        if now - last_ckpt > checkpoint_every_s:
            save()
            last_ckpt = now
    save()
    return FloatResult(model, center, half, pad, seen, steps,
                       seconds_before + time.time() - t0, seen / n,
                       running if running is not None else loss_v)


# ---------------------------------------------------------------------------------- tables
_PRIOR = []


def fitted_tables(residuals: np.ndarray, scale_idx: np.ndarray, prior_weight: float = 200.0
                  ) -> CodingTables:
    """models.tables.fitted_tables with its Laplace prior computed once per process (the same
    tables; the prior takes many seconds and the paper models fit tables several times)."""
    if not _PRIOR:
        prior = laplace_token_probs()
        _PRIOR.append(prior / prior.sum(axis=1, keepdims=True))
    sym = split_residuals(residuals.astype(np.int64), scale_idx.astype(np.int64))
    counts = np.zeros((N_SCALES, N_TOKENS))
    np.add.at(counts, (scale_idx, sym.token), 1.0)
    tokens = counts + prior_weight * _PRIOR[0]
    esc = sym.token >= N_TOKENS - 2
    classes = np.bincount(sym.cls[esc], minlength=N_CLASSES)[:N_CLASSES] \
        + 0.5 ** np.arange(N_CLASSES)
    return CodingTables(_quantise(tokens), _quantise(classes))


# ---------------------------------------------------------------------------------- exact model
def _mult_shift(scale: float, acc_bound: float) -> tuple[int, int]:
    """``m / 2**k ~= scale`` with ``acc_bound * m < 2**62`` and ``m`` as precise as that allows."""
    mbits = min(40, int(np.floor(62 - np.log2(max(acc_bound, 1.0)))))
    k = max(int(np.floor(mbits - np.log2(abs(scale)) - 1)), 1)
    return int(round(scale * 2.0 ** k)), k


def float_predictions(res: FloatResult, values, valid) -> np.ndarray:
    """The float network's prediction in intensity units (not rounded)."""
    with torch.no_grad():
        out = res.model(_float_inputs(values, valid, res.center, res.half, res.pad)).double()
    return res.center + out.numpy() * res.half


def quantize(kind: str, res: FloatResult, sampler: ContextSampler, name: str | None = None,
             weight_bits=WEIGHT_BITS, calib_size: int = 20000, seed: int = 1) -> PaperPredictor:
    """The exact integer predictor of a trained float model (coding tables still the prior)."""
    rng = np.random.default_rng(seed)
    values, valid, _ = sampler.gather(rng.choice(len(sampler), min(calib_size, len(sampler)),
                                                 replace=False))
    layers = res.model.linear_layers()
    weights = [l.weight.detach().double().numpy() for l in layers]
    biases = [l.bias.detach().double().numpy() for l in layers]
    calib = np.where(valid, values, res.pad).astype(np.int64).T - res.center
    net, out_scale = quantize_wide_mlp(weights, biases, calib, 1.0 / res.half, INPUT_MAX,
                                       weight_bits, ACT_MAX, LEAKY_SHIFT)
    last = net.layers[-1]
    acc_bound = float(np.abs(last.weight).sum() * (ACT_MAX + 1) + np.abs(last.bias).max())
    mult, shift = _mult_shift(float(out_scale[0]) * res.half, acc_bound)
    params = np.array([res.center, round(res.half), res.pad, mult, shift, 0, SCALE_ZERO, 0],
                      dtype=np.int64)
    return PREDICTORS[kind](name or kind, net, params, prior_tables())


def residuals(predictor: PaperPredictor, sampler: ContextSampler, idx: np.ndarray,
              lo: int, hi: int, chunk: int = 16384):
    """Residuals and activity measure inputs of the integer model on samples ``idx``."""
    rs, js = [], []
    for a in range(0, len(idx), chunk):
        values, valid, target = sampler.gather(idx[a:a + chunk])
        pred, j = predictor.predict(values, valid, lo, hi)
        rs.append(target - pred)
        js.append(j)
    return np.concatenate(rs), np.concatenate(js)


def fit_constant_table(predictor: PaperPredictor, r: np.ndarray, candidates=None) -> float:
    """Fit the single coding table (the paper's one distribution) on residuals ``r``, choosing the
    table index whose low-bit split codes them best; returns bits per voxel."""
    mean_abs = max(float(np.abs(r).mean()), 0.25)
    j0 = SCALE_ZERO + int(round(SCALE_STEPS * np.log2(mean_abs)))
    if candidates is None:
        candidates = range(max(j0 - 6, 0), min(j0 + 3, N_SCALES - 1) + 1, 2)
    best = None
    for j in candidates:
        jj = np.full(len(r), j)
        tables = fitted_tables(r, jj)
        bits = table_bits(tables, r, jj) / len(r)
        if best is None or bits < best[0]:
            best = (bits, j, tables)
    bits, j, tables = best
    predictor.params[P_JMODE], predictor.params[P_JCONST] = 0, j
    predictor.tables = tables
    return bits


def activity_variant(predictor: PaperPredictor, sampler: ContextSampler, idx: np.ndarray,
                     lo: int, hi: int, offset: int = 0) -> PaperPredictor:
    """A copy that picks its coding table from the local activity (``j_mode`` 1), with tables
    fitted on the samples ``idx``: the ablation of the paper's single distribution."""
    params = predictor.params.copy()
    params[5], params[7] = 1, offset
    twin = type(predictor)(predictor.name + "-activity", predictor.net, params,
                           predictor.tables, dict(predictor.meta))
    r, j = residuals(twin, sampler, idx, lo, hi)
    twin.tables = fitted_tables(r, j)
    return twin


def train_paper(kind: str, volume: np.ndarray, minutes: float = 5.0, max_epochs: float = 1.0,
                n_slices: int = N_SLICES, seed: int = 0, checkpoint: Path | None = None,
                progress=None, table_samples: int = 50_000, resume: Path | None = None,
                name: str | None = None, batch: int | None = None, lr: float | None = None,
                optimizer: str = "sgd", sign_fix: bool = True, init: str = "linear"):
    """Train ``kind`` (``paper-cube`` or ``paper-pyramid``) on ONE volume, the paper's way.

    Returns ``(predictor, report)``: the exact integer predictor with its coding table fitted on
    the training slices, and a dict of what happened (samples, time, bits of the float and the
    integer model on the same training samples).
    """
    cls = PREDICTORS[kind]
    hood = cls.neighbourhood
    slices = stride_slices(volume.shape[0], hood.pad[0], n_slices)
    sampler = ContextSampler(hood, volume, slices)
    norm = normalisation(volume)
    if progress:
        progress(f"{kind}: {len(sampler)} samples from slices {slices}, normalisation "
                 f"center {norm[0]} half {norm[1]:.0f}, pad {norm[2]}")
    res = fit_float(kind, sampler, norm, minutes, max_epochs, batch, lr, seed=seed,
                    checkpoint=checkpoint, progress=progress, resume=resume, optimizer=optimizer,
                    sign_fix=sign_fix, init=init)
    predictor = quantize(kind, res, sampler, name)
    info = np.iinfo(volume.dtype)
    idx = np.random.default_rng(seed + 7).choice(len(sampler), min(table_samples, len(sampler)),
                                                 replace=False)
    r, _ = residuals(predictor, sampler, idx, int(info.min), int(info.max))
    int_bits = fit_constant_table(predictor, r)
    float_bits = float_model_bits(res, predictor, sampler, idx, int(info.min), int(info.max))
    report = {"kind": kind, "train_slices": slices, "samples_per_epoch": len(sampler),
              "samples_seen": res.samples_seen, "steps": res.steps, "epochs": res.epochs,
              "train_seconds": round(res.seconds, 1), "final_loss": res.final_loss,
              "center": norm[0], "half": norm[1], "pad": norm[2],
              "batch": batch or PAPER_SETTINGS[kind]["batch"],
              "lr": lr or PAPER_SETTINGS[kind]["lr"], "optimizer": optimizer, "sign_fix": sign_fix,
              "init": init,
              "train_bits_int": int_bits, "train_bits_float": float_bits,
              "train_mae_int": float(np.abs(r).mean()),
              "table_index": int(predictor.params[P_JCONST])}
    predictor.meta = dict(report)
    predictor.float_result = res
    return predictor, report


def float_model_bits(res: FloatResult, predictor: PaperPredictor, sampler: ContextSampler,
                     idx: np.ndarray, lo: int, hi: int, chunk: int = 16384) -> float:
    """Bits per voxel of the float model's rounded predictions, coded with a table fitted the
    same way as the integer model's: the reference for the quantisation's cost."""
    rs = []
    for a in range(0, len(idx), chunk):
        values, valid, target = sampler.gather(idx[a:a + chunk])
        pred = np.clip(np.round(float_predictions(res, values, valid)), lo, hi).astype(np.int64)
        rs.append(target - pred)
    r = np.concatenate(rs)
    twin = type(predictor)("float", predictor.net, predictor.params.copy(), predictor.tables)
    return fit_constant_table(twin, r, [int(predictor.params[P_JCONST])])
