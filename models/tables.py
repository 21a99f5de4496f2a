"""Building the integer coding tables: from a Laplace prior, and from observed residuals."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from models.entropy import (ESC_NEG, ESC_POS, N_CLASSES, N_TOKENS, SHIFTS, TOKEN_RANGE,
                            CodingTables, split_residuals)
from models.features import N_SCALES, SCALE_STEPS, SCALE_ZERO

TABLE_TOTAL = 1 << 16


def _quantise(p: np.ndarray) -> np.ndarray:
    """Positive integer frequencies summing to about TABLE_TOTAL per row."""
    p = p / p.sum(axis=-1, keepdims=True)
    return np.maximum(np.round(p * TABLE_TOTAL), 1).astype(np.int64)


def _laplace_cdf(v: np.ndarray, b: float) -> np.ndarray:
    return np.where(v < 0, 0.5 * np.exp(np.minimum(v, 0) / b), 1 - 0.5 * np.exp(-np.maximum(v, 0) / b))


@lru_cache(maxsize=1)
def _laplace_token_probs() -> np.ndarray:
    probs = np.zeros((N_SCALES, N_TOKENS))
    q = np.arange(-TOKEN_RANGE, TOKEN_RANGE)
    for j in range(N_SCALES):
        b = 2.0 ** ((j - SCALE_ZERO) / SCALE_STEPS)
        width = float(1 << SHIFTS[j])
        # token q holds residuals q*width .. (q+1)*width - 1
        edges = np.concatenate([q, [TOKEN_RANGE]]) * width - 0.5
        cdf = _laplace_cdf(edges, b)
        probs[j, :2 * TOKEN_RANGE] = np.diff(cdf)
        probs[j, ESC_NEG] = cdf[0]
        probs[j, ESC_POS] = 1 - cdf[-1]
    return probs + 1e-9


def laplace_token_probs() -> np.ndarray:
    """Token probabilities of a zero-mean discretised Laplace at each scale index (floats)."""
    return _laplace_token_probs().copy()


def prior_tables(flat: bool = False) -> CodingTables:
    """Tables that assume Laplace residuals (used before any data is seen), with a row for
    flat contexts when ``flat``."""
    classes = 0.5 ** np.arange(N_CLASSES)
    probs = laplace_token_probs()
    if flat:  # flat contexts start as the narrowest scale
        probs = np.concatenate([probs, probs[:1]])
    return CodingTables(_quantise(probs), _quantise(classes))


def fitted_tables(residuals: np.ndarray, scale_idx: np.ndarray, prior_weight: float = 200.0,
                  prior: CodingTables | None = None, flat: bool | None = None) -> CodingTables:
    """Tables from observed residuals and their scale indices, smoothed toward a prior
    (``prior_weight`` pseudo-counts per scale index): the given tables, else a Laplace.
    ``flat``: give flat contexts (``FLAT_INDEX``) their own row; default: as the prior has."""
    flat = (prior is not None and prior.flat) if flat is None else flat
    rows = N_SCALES + 1 if flat else N_SCALES
    sym = split_residuals(residuals.astype(np.int64), scale_idx.astype(np.int64))
    counts = np.zeros((rows, N_TOKENS))
    np.add.at(counts, (scale_idx, sym.token), 1.0)
    shape = _prior_shape(prior, rows)
    tokens = counts + prior_weight * shape
    esc = sym.token >= N_TOKENS - 2
    classes = np.bincount(sym.cls[esc], minlength=N_CLASSES)[:N_CLASSES] + 0.5 ** np.arange(N_CLASSES)
    return CodingTables(_quantise(tokens), _quantise(classes))


def _prior_shape(prior: CodingTables | None, rows: int) -> np.ndarray:
    """Token distribution per row toward which fitted tables are smoothed; a flat-context
    row the prior lacks starts as its narrowest scale (index 0)."""
    shape = laplace_token_probs() if prior is None else prior.tokens.astype(np.float64)
    if len(shape) < rows:
        shape = np.concatenate([shape, shape[:1]])
    shape = shape[:rows]
    return shape / shape.sum(axis=1, keepdims=True)


def table_bits(tables: CodingTables, residuals: np.ndarray, scale_idx: np.ndarray) -> float:
    """Ideal code length in bits of residuals under the tables (tokens + classes + raw bits)."""
    sym = split_residuals(residuals.astype(np.int64), scale_idx.astype(np.int64))
    tok = tables.tokens / tables.tokens.sum(axis=1, keepdims=True)
    cls = tables.classes / tables.classes.sum()
    esc = sym.token >= N_TOKENS - 2
    bits = -np.log2(tok[scale_idx, sym.token]).sum() - np.log2(cls[sym.cls[esc]]).sum()
    return float(bits + sym.low_bits.sum() + sym.extra_bits.sum())
