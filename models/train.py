"""Training the production predictor on the code length itself.

1. contexts: every voxel of evenly spaced slabs of the training volumes, with exactly the
   integer features the codec computes (models.codec.slab_contexts, models.features);
2. a float MLP learns a mean and a log-scale per voxel by minimising the bits of the
   discretised Laplace that they define;
3. the MLP is quantised to the exact integer network (models.intnet), the head constants are
   derived, and the coding tables are fitted on the integer model's own residuals.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from models import kernels
from models.context import Neighbourhood
from models.entropy import CodingTables
from models.features import DEFAULT_NEIGHBOURHOOD, SCALE_STEPS, UNIT, n_features
from models.intnet import WEIGHT_MAX, WIDE_WEIGHT_MAX, quantize_mlp
from models.predictor import DefaultPredictor
from models.samples import (Samples, collect_samples, evaluate, gather_rows,
                            integer_residuals, network_samples)
from models.tables import fitted_tables, prior_tables


log = logging.getLogger(__name__)
LN2 = float(np.log(2.0))


class FloatPredictor(nn.Module):
    """The float twin of the integer network: integer features in, (mean, log-scale) out."""

    def __init__(self, hidden=(32, 32), inputs: int = n_features(DEFAULT_NEIGHBOURHOOD)):
        super().__init__()
        sizes = (inputs, *hidden, 2)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.input_scale = 1.0 / UNIT

    def forward(self, x):
        return self.forward_training(x * self.input_scale)

    INPUT_ALIGN = 8

    def input_width(self, features: int) -> int:
        """Columns of :meth:`training_inputs` for ``features`` input features."""
        return features + -features % self.INPUT_ALIGN

    def training_inputs(self, x: np.ndarray, rows: np.ndarray, chunk: int = 1 << 14,
                        out: np.ndarray | None = None) -> torch.Tensor:
        """Rows ``rows`` of ``x`` as :meth:`forward_training` takes them: scaled by
        ``input_scale`` (a power of two: exact) and zero-padded to a multiple of INPUT_ALIGN
        columns (models.samples.gather_rows); into ``out`` (float32,
        ``(len(rows), input_width)``) when given."""
        n, f = len(rows), x.shape[1]
        if out is None:
            out = np.zeros((n, self.input_width(f)), np.float32)
        elif out.shape != (n, self.input_width(f)) or out.dtype != np.float32:
            raise ValueError("training inputs buffer of the wrong shape or type")
        else:
            out[:, f:] = 0
        return torch.from_numpy(gather_rows(x, rows, out, self.input_scale, chunk))

    def forward_training(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` of inputs already scaled, such as :meth:`training_inputs`: the first
        layer's weight padded with zero columns like its inputs, if they are (its gradient is
        cut back to the real ones). In float32
        the weight gradient's product over 32 columns took half the time of one over 31 here
        (MKL, Zen 5): a tenth of a fine-tuning step."""
        first, *rest = self.net
        weight = nn.functional.pad(first.weight, (0, x.shape[1] - first.in_features))
        h = nn.functional.linear(x, weight, first.bias)
        for layer in rest:
            h = layer(h)
        return h

    def linear_layers(self):
        return [m for m in self.net if isinstance(m, nn.Linear)]


def laplace_bits(value, ref, s, lq, out):
    """Bits of integer ``value`` under a discretised Laplace with the predicted mean and scale."""
    mu = ref + out[:, 0] * s / UNIT
    log2b = (out[:, 1] + lq) / SCALE_STEPS
    b = torch.exp2(log2b.clamp(-3.0, 18.0))
    e = (value - mu).abs()
    tail = torch.clamp(e - 0.5, min=0.0)
    # |e| >= 0.5: P = 0.5 exp(-(|e|-0.5)/b) (1 - exp(-1/b)); near the mode: 1 - two tails
    log_p_tail = np.log(0.5) - tail / b + torch.log(-torch.expm1(-1.0 / b))
    central = 1 - 0.5 * torch.exp(-(0.5 - e).clamp(min=0) / b) - 0.5 * torch.exp(-(0.5 + e) / b)
    log_p = torch.where(e < 0.5, torch.log(central.clamp(min=1e-12)), log_p_tail)
    return -log_p / LN2


class _CompiledLaplaceBits(torch.autograd.Function):
    """The mean of :func:`laplace_bits` and its gradient by the compiled kernel."""

    @staticmethod
    def forward(ctx, out, value, ref, s, lq):
        total, grad = kernels.laplace_bits(*(t.detach().numpy() for t in (value, ref, s, lq, out)),
                                           UNIT, SCALE_STEPS)
        ctx.save_for_backward(torch.from_numpy(grad))
        return out.new_tensor(total / len(value))

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return g * grad / len(grad), None, None, None, None


def mean_laplace_bits(value, ref, s, lq, out):
    """``laplace_bits(value, ref, s, lq, out).mean()``: with the compiled kernels, one call
    for the loss and its gradient instead of some sixty torch operations (a quarter of a
    fine-tuning step's time; float32 like the torch expression, not bit for bit)."""
    if kernels.available() and out.dtype == torch.float32 and not out.is_cuda:
        return _CompiledLaplaceBits.apply(out, value, ref, s, lq)
    return laplace_bits(value, ref, s, lq, out).mean()


def fit_float(samples: Samples, hidden=(32, 32), epochs: int = 6, batch: int = 8192,
              lr: float = 2e-3, seed: int = 0, progress=None) -> FloatPredictor:
    """Minimise the mean code length (bits per voxel) of the samples."""
    torch.manual_seed(seed)
    model = FloatPredictor(hidden, samples.x.shape[1])
    with torch.no_grad():  # start at the reference with a scale near the activity
        last = model.linear_layers()[-1]
        last.weight.mul_(0.01)
        last.bias.copy_(torch.tensor([0.0, -4.0]))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(samples.value)
    steps = epochs * (n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    tensors = [torch.from_numpy(a) for a in
               (samples.x, samples.ref.astype(np.float32), samples.s.astype(np.float32),
                samples.lq.astype(np.float32), samples.value.astype(np.float32))]
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        total, t0 = 0.0, time.time()
        for k in range(n // batch):
            idx = order[k * batch:(k + 1) * batch]
            x, ref, s, lq, v = (t[idx] for t in tensors)
            loss = laplace_bits(v, ref, s, lq, model(x)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        msg = f"epoch {epoch + 1}/{epochs}: {total / max(n // batch, 1):.4f} bits/voxel " \
              f"({time.time() - t0:.0f} s)"
        log.info(msg)
        if progress:
            progress(msg)
    return model


def _mult_shift(scale: float, limit_bits: int = 18) -> tuple[int, int]:
    """Integer ``m`` and ``k`` with ``m / 2**k ~= scale`` and ``m < 2**limit_bits``."""
    k = int(np.floor(limit_bits - np.log2(abs(scale)) - 1))
    k = max(k, 1)
    return int(round(scale * 2.0 ** k)), k


def quantize(model: FloatPredictor, samples: Samples, name: str = "default",
             hood: Neighbourhood = DEFAULT_NEIGHBOURHOOD, flat: bool = False,
             fraction_bins: int = 1, prior: CodingTables | None = None,
             weight_max: int = WEIGHT_MAX) -> DefaultPredictor:
    """Exact integer predictor from the float model, its weights within +-``weight_max`` (see
    models.intnet.quantize_mlp); tables fitted on its residuals (with a row for flat contexts
    when ``flat``, ``fraction_bins`` rows per scale index), smoothed toward ``prior`` when
    given, else toward a Laplace."""
    layers = model.linear_layers()
    weights = [l.weight.detach().double().numpy() for l in layers]
    biases = [l.bias.detach().double().numpy() for l in layers]
    calib = samples.x[:: max(1, len(samples.x) // 200_000)]
    net, out_scale = quantize_mlp(weights, biases, calib, model.input_scale, weight_max)
    head = np.array([*_mult_shift(out_scale[0]), *_mult_shift(out_scale[1])])
    predictor = DefaultPredictor(name, net, head, prior_tables(flat, fraction_bins),
                                 neighbourhood=hood)
    r, j = integer_residuals(predictor, samples)
    predictor.tables = fitted_tables(r, j, prior=prior, flat=flat, fraction_bins=fraction_bins)
    predictor.float_arrays = {f"float_{k}": v.detach().numpy().astype(np.float32)
                              for k, v in model.state_dict().items()}
    return predictor


def float_model(predictor: DefaultPredictor) -> FloatPredictor:
    """The float twin stored with a predictor (to continue training it)."""
    state = {k[len("float_"):]: torch.from_numpy(v) for k, v in predictor.float_arrays.items()}
    hidden = tuple(state[f"net.{2 * i}.weight"].shape[0] for i in range(len(state) // 2 - 1))
    model = FloatPredictor(hidden, state["net.0.weight"].shape[1])
    model.load_state_dict(state)
    return model


def train_default(volumes, hidden=(64, 32), epochs: int = 10, slab: int = 8,
                  slabs_per_volume: int = 3, keep: float = 0.2, seed: int = 0,
                  name: str = "default", progress=None,
                  hood: Neighbourhood = DEFAULT_NEIGHBOURHOOD, flat: bool = False,
                  network_from: DefaultPredictor | None = None, fraction_bins: int = 1,
                  weight_max: int | None = None):
    """Train the production predictor on ``volumes`` (a list of (z, y, x) integer arrays),
    with the causal neighbourhood ``hood`` (see models.features.NEIGHBOURHOODS); ``flat``
    gives flat contexts their own table row (the network then trains on the others only);
    ``fraction_bins`` rows per scale index follow the fraction of the predicted mean; the
    network's weights within +-``weight_max`` (default WIDE_WEIGHT_MAX, 10 bits).
    With ``network_from``, that model's network is kept and only the tables are fitted, or
    with ``weight_max``, its float twin is quantised afresh (calibrated on the samples).

    Returns
    -------
    predictor : DefaultPredictor, ready for ``models.registry.save_model``
    report : dict with the sample count, training time and bits per voxel (integer model, on
        the training samples)
    """
    t0 = time.time()
    if network_from is not None:
        hood = network_from.neighbourhood
    rng = np.random.default_rng(seed)
    samples = collect_samples(volumes, slab, slabs_per_volume, keep, rng, progress=progress,
                              hood=hood)
    if network_from is not None and weight_max is None:
        predictor = refit_tables(network_from, samples, flat, name, fraction_bins)
        hidden, epochs = [layer.weight.shape[0] for layer in predictor.net.layers[:-1]], 0
    elif network_from is not None:
        predictor = quantize(float_model(network_from), samples, name, hood, flat,
                             fraction_bins, weight_max=weight_max)
        hidden, epochs = [layer.weight.shape[0] for layer in predictor.net.layers[:-1]], 0
    else:
        fit_on = network_samples(samples, hood.size) if flat else samples
        model = fit_float(fit_on, hidden=hidden, epochs=epochs, seed=seed, progress=progress)
        predictor = quantize(model, samples, name, hood, flat, fraction_bins,
                             weight_max=weight_max or WIDE_WEIGHT_MAX)
    report = {"samples": int(len(samples.value)), "hidden": list(hidden), "epochs": epochs,
              "weight_max": predictor.net.weight_max,
              "flat_contexts": flat, "fraction_bins": fraction_bins,
              "train_bits_per_voxel": round(evaluate(predictor, samples), 4),
              "seconds": round(time.time() - t0, 1)}
    return predictor, report


def refit_tables(predictor: DefaultPredictor, samples: Samples, flat: bool,
                 name: str | None = None, fraction_bins: int = 1) -> DefaultPredictor:
    """``predictor``'s network, head and float twin with coding tables fitted on its residuals
    on the samples (with a flat-context row when ``flat``, ``fraction_bins`` rows per scale)."""
    out = DefaultPredictor(name or predictor.name, predictor.net, predictor.head,
                           prior_tables(flat, fraction_bins), predictor.meta,
                           predictor.neighbourhood)
    r, j = integer_residuals(out, samples)
    out.tables = fitted_tables(r, j, flat=flat, fraction_bins=fraction_bins)
    out.float_arrays = dict(predictor.float_arrays)
    return out
