"""Building the integer coding tables: from a Laplace prior, and from observed residuals."""

from __future__ import annotations

import numpy as np

from models.entropy import (N_CLASSES, N_TOKENS, SHIFTS, CodingTables, split_residuals)
from models.features import N_SCALES, SCALE_STEPS, SCALE_ZERO

TABLE_TOTAL = 1 << 16


def _quantise(p: np.ndarray) -> np.ndarray:
    """Positive integer frequencies summing to about TABLE_TOTAL per row."""
    p = p / p.sum(axis=-1, keepdims=True)
    return np.maximum(np.round(p * TABLE_TOTAL), 1).astype(np.int64)


def laplace_token_probs() -> np.ndarray:
    """Token probabilities of a zero-mean discretised Laplace at each scale index (floats)."""
    probs = np.zeros((N_SCALES, N_TOKENS))
    r = np.arange(-(1 << 19), 1 << 19)
    for j in range(N_SCALES):
        b = 2.0 ** ((j - SCALE_ZERO) / SCALE_STEPS)
        cdf = lambda v: np.where(v < 0, 0.5 * np.exp(v / b), 1 - 0.5 * np.exp(-v / b))
        p = cdf(r + 0.5) - cdf(r - 0.5)
        tokens = split_residuals(r, np.full(r.shape, j)).token
        probs[j] = np.bincount(tokens, weights=p, minlength=N_TOKENS)
    return probs + 1e-9


def prior_tables() -> CodingTables:
    """Tables that assume Laplace residuals (used before any data is seen)."""
    classes = 0.5 ** np.arange(N_CLASSES)
    return CodingTables(_quantise(laplace_token_probs()), _quantise(classes))


def fitted_tables(residuals: np.ndarray, scale_idx: np.ndarray, prior_weight: float = 200.0
                  ) -> CodingTables:
    """Tables from observed residuals and their scale indices, smoothed toward the Laplace prior
    (``prior_weight`` pseudo-counts per scale index)."""
    sym = split_residuals(residuals.astype(np.int64), scale_idx.astype(np.int64))
    counts = np.zeros((N_SCALES, N_TOKENS))
    np.add.at(counts, (scale_idx, sym.token), 1.0)
    prior = laplace_token_probs()
    prior /= prior.sum(axis=1, keepdims=True)
    tokens = counts + prior_weight * prior
    esc = sym.token >= N_TOKENS - 2
    classes = np.bincount(sym.cls[esc], minlength=N_CLASSES)[:N_CLASSES] + 0.5 ** np.arange(N_CLASSES)
    return CodingTables(_quantise(tokens), _quantise(classes))


def table_bits(tables: CodingTables, residuals: np.ndarray, scale_idx: np.ndarray) -> float:
    """Ideal code length in bits of residuals under the tables (tokens + classes + raw bits)."""
    sym = split_residuals(residuals.astype(np.int64), scale_idx.astype(np.int64))
    tok = tables.tokens / tables.tokens.sum(axis=1, keepdims=True)
    cls = tables.classes / tables.classes.sum()
    esc = sym.token >= N_TOKENS - 2
    bits = -np.log2(tok[scale_idx, sym.token]).sum() - np.log2(cls[sym.cls[esc]]).sum()
    return float(bits + sym.low_bits.sum() + sym.extra_bits.sum())
