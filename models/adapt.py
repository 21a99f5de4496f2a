"""Per-volume adaptation: the encoder fine-tunes the predictor's float twin on the volume it
is about to code, and ships the quantised result inside the blob.

A shipped model meets scanners it never saw; a few hundred optimiser steps on a sample of the
volume itself recover part of what an oracle trained on that volume would gain (measured on an
unseen head CT: -5% bits for 200 steps, -7% for 400; on the train series, 400 steps beat 100
and 200 too). Large volumes run up to 800 steps (on the two 37 M-voxel train volumes 800 beat
400 by 0.3% and 4.4%), but the longer run can also fit its sample of slabs too closely, so the
state after 400 steps is kept when it codes a held-out sample of the volume's voxels in fewer
bits. The embedded model is a few kilobytes, so it is only used for volumes large enough to
repay it, and only when it pays on that held-out sample. Decoding stays exact: the embedded
network is an ordinary integer network, read from the blob instead of from the weights folder.
"""

from __future__ import annotations

import copy
import hashlib
import io
import zipfile
from functools import lru_cache

import numpy as np
import torch

from models import paper_table
from models.container import CorruptBlobError
from models.entropy import CodingTables

ADAPT_STEPS = (200, 800)   # optimiser steps: one per 20k voxels, within these bounds
ADAPT_CHECKPOINT = 400     # a longer run must beat its state at this step on the check sample
ADAPT_BATCH = 8192
ADAPT_SAMPLES = 400_000
CHECK_SAMPLES = 100_000    # held-out voxels on which the adapted model must beat the shipped one
_EMBEDDED_KEYS = ("head", "token_table", "class_table")


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


def adapt(predictor, volume: np.ndarray, slab: int, tile, seed: int = 0):
    """A copy of ``predictor`` fine-tuned on ``volume`` (its tables refitted on the volume,
    smoothed toward the shipped ones), or None when it would not pay: on a fresh sample of
    the volume's voxels it must save more bits than the embedded model costs. Paper models
    only refit their one coding table (models.paper_table)."""
    if predictor.kind.startswith("paper"):
        return paper_table.fit_volume_table(predictor, volume, slab, tile, seed)
    from models import train

    n_slabs = -(-volume.shape[0] // slab)
    per_slab = min(slab, volume.shape[0]) * volume.shape[1] * volume.shape[2]
    picks = min(4, n_slabs)
    keep = min(1.0, ADAPT_SAMPLES / (picks * per_slab))
    rng = np.random.default_rng(seed)
    hood = predictor.neighbourhood
    samples = train.collect_samples([volume], slab, picks, keep, rng, tile=tile, hood=hood)
    check = train.collect_samples([volume], slab, min(8, n_slabs),
                                  min(1.0, CHECK_SAMPLES / volume.size), rng, tile=tile,
                                  hood=hood)
    model = train.float_model(predictor)
    tune_on = train.network_samples(samples, hood.size) if predictor.tables.flat else samples
    if len(tune_on.value) < ADAPT_BATCH:  # (nearly) all flat: nothing for the network to learn
        return None
    low, high = ADAPT_STEPS
    steps = min(high, max(low, volume.size // 20_000))
    stops = sorted({min(ADAPT_CHECKPOINT, steps), steps})
    candidates = [_quantised(model, samples, predictor)
                  for _ in _fine_tune(model, tune_on, seed, steps, stops)]
    candidates += [_with_shipped_tokens(c, predictor) for c in candidates]
    # bits of the volume (estimated on the check sample) and of the blob's model
    costs = [(train.evaluate(c, check) * volume.size + 8 * len(embedded_bytes(c)), i)
             for i, c in enumerate(candidates)]
    cost, best = min(costs)
    return candidates[best] if pays_off(predictor, cost, check, volume.size) else None


def _with_shipped_tokens(adapted, base):
    """``adapted`` coding with ``base``'s token tables, which the blob then need not carry
    (a small volume may not repay refitted ones)."""
    twin = copy.copy(adapted)
    twin.tables = CodingTables(base.tables.tokens, adapted.tables.classes)
    return twin


def _quantised(model, samples, predictor):
    """The exact predictor of the fine-tuned float ``model``, tables refitted on the samples
    (smoothed toward ``predictor``'s), under ``predictor``'s model id."""
    from models import train
    from models.tables import fitted_tables
    adapted = train.quantize(model, samples, predictor.name, predictor.neighbourhood,
                             predictor.tables.flat, predictor.tables.fraction_bins)
    r, j = train.integer_residuals(adapted, samples)
    adapted.tables = fitted_tables(r, j, prior=predictor.tables)
    adapted.table_base = predictor.tables.tokens   # the blob carries the difference
    adapted.model_id = predictor.model_id
    adapted.float_arrays = {}
    return adapted


def pays_off(base, cost: float, check, voxels: int) -> bool:
    """Whether an adapted model whose ``cost`` (bits of ``voxels`` voxels, estimated on the
    samples ``check``, plus the bits it takes in the blob) is below what ``base`` codes them
    in."""
    from models.train import evaluate
    return cost < evaluate(base, check) * voxels


def _fine_tune(model, samples, seed: int, steps: int, stops=()):
    """Adam steps on ``model``; yields (nothing) after each step count in ``stops``."""
    from models.train import laplace_bits
    torch.manual_seed(seed)
    n = len(samples.value)
    # one shuffle up front, then a window at a random offset per step: nearly the random
    # batches of a gather per step, at the cost of a slice
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen).numpy()
    tensors = [torch.from_numpy(np.ascontiguousarray(a[order], dtype=np.float32)) for a in
               (samples.x, samples.ref, samples.s, samples.lq, samples.value)]
    opt = _Adam(list(model.parameters()), lr=1e-3)
    batch = min(ADAPT_BATCH, n)
    starts = torch.randint(0, n - batch + 1, (steps,), generator=gen).tolist()
    for done, a in enumerate(starts, 1):
        x, ref, s, lq, v = (t[a:a + batch] for t in tensors)
        loss = laplace_bits(v, ref, s, lq, model(x)).mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if done in stops:
            yield


class _Adam:
    """Plain Adam (Kingma & Ba). torch.optim's first use imports TorchDynamo, which costs
    seconds per encoding process; this is all the fine-tuning needs."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


def embedded_bytes(predictor) -> bytes:
    """The arrays a blob must carry for an adapted predictor."""
    if predictor.kind.startswith("paper"):
        return paper_table.table_bytes(predictor)
    arrays = {k: v for k, v in predictor.to_arrays().items()
              if k.startswith("net_") or k in _EMBEDDED_KEYS}
    base = getattr(predictor, "table_base", None)
    if base is not None and base.shape == arrays["token_table"].shape:
        # rows the volume barely uses stay near the shipped ones: small differences pack well
        delta = arrays.pop("token_table") - base
        if delta.any():
            arrays["token_delta"] = delta
    arrays = {k: _narrowest(v) for k, v in arrays.items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _narrowest(values: np.ndarray) -> np.ndarray:
    """Integer arrays in the smallest type that holds them (readers widen them again)."""
    if values.dtype.kind not in "iu" or values.size == 0:
        return values
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= values.min() and values.max() <= info.max:
            return values.astype(dtype)
    return values


def with_embedded(base, data: bytes):
    """``base`` with the network, head and tables carried by a blob."""
    return _with_embedded(base, data, hashlib.sha256(data).digest())


@lru_cache(maxsize=16)
def _with_embedded(base, data: bytes, _digest: bytes):
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if paper_table.is_table(arrays):
            return paper_table.with_table(base, arrays)
        merged = {k: v for k, v in base.to_arrays().items() if not k.startswith("float_")}
        merged = {k: v for k, v in merged.items() if not k.startswith("net_")}
        merged.update(arrays)
        if "token_delta" in merged:
            delta = merged.pop("token_delta").astype(np.int64)
            if delta.shape != base.tables.tokens.shape:
                raise ValueError("its table difference does not fit the model's tables")
            merged["token_table"] = base.tables.tokens + delta
        predictor = type(base).from_arrays(base.name, merged, base.meta)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise CorruptBlobError(f"blob carries an unreadable adapted model: {exc}") from None
    predictor.model_id = base.model_id
    return predictor
