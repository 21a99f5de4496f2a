"""Building the integer coding tables: from a Laplace prior, and from observed residuals."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from models.entropy import (ESC_NEG, ESC_POS, N_CLASSES, N_TOKENS, SHIFTS, TOKEN_RANGE,
                            CodingTables, row_shifts, split_residuals)
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


def prior_tables(flat: bool = False, fraction_bins: int = 1) -> CodingTables:
    """Tables that assume Laplace residuals (used before any data is seen), in the layout of
    ``fraction_bins`` rows per scale index, with a row for flat contexts when ``flat``."""
    classes = 0.5 ** np.arange(N_CLASSES)
    probs = np.repeat(laplace_token_probs(), fraction_bins, axis=0)
    if flat:  # flat contexts start as the narrowest scale
        probs = np.concatenate([probs, probs[:1]])
    return CodingTables(_quantise(probs), _quantise(classes))


def fitted_tables(residuals: np.ndarray, rows: np.ndarray, prior_weight: float = 200.0,
                  prior: CodingTables | None = None, flat: bool | None = None,
                  fraction_bins: int | None = None) -> CodingTables:
    """Tables from observed residuals and their table rows, smoothed toward a prior
    (``prior_weight`` pseudo-counts per row): the given tables, else a Laplace. ``flat`` (a
    flat-context row) and ``fraction_bins`` (rows per scale index) give the layout; by
    default the prior's."""
    flat = (prior is not None and prior.flat) if flat is None else flat
    bins = (prior.fraction_bins if prior is not None else 1) if fraction_bins is None \
        else fraction_bins
    shifts = row_shifts(bins, flat)
    sym = split_residuals(residuals.astype(np.int64), rows.astype(np.int64), shifts)
    counts = np.zeros((len(shifts), N_TOKENS))
    np.add.at(counts, (rows, sym.token), 1.0)
    tokens = counts + prior_weight * _prior_shape(prior, bins, flat)
    esc = sym.token >= N_TOKENS - 2
    classes = np.bincount(sym.cls[esc], minlength=N_CLASSES)[:N_CLASSES] + 0.5 ** np.arange(N_CLASSES)
    return CodingTables(_quantise(tokens), _quantise(classes))


def _prior_shape(prior: CodingTables | None, bins: int, flat: bool) -> np.ndarray:
    """Token distribution of each row of the layout toward which fitted tables are smoothed:
    the prior's rows (its rows of a scale averaged when it has another number of fraction
    bins), else a Laplace; a flat-context row the prior lacks starts as its narrowest scale."""
    flat_row = None
    if prior is None:
        scale = np.repeat(laplace_token_probs(), bins, axis=0)
    else:
        p = prior.tokens / prior.tokens.sum(axis=1, keepdims=True)
        pb = prior.fraction_bins
        scale = p[:N_SCALES * pb]
        if pb != bins:
            scale = np.repeat(scale.reshape(N_SCALES, pb, N_TOKENS).mean(axis=1), bins, axis=0)
        flat_row = p[-1] if prior.flat else None
    if flat:
        scale = np.concatenate([scale, scale[:1] if flat_row is None else flat_row[None]])
    return scale / scale.sum(axis=1, keepdims=True)


def table_bits(tables: CodingTables, residuals: np.ndarray, scale_idx: np.ndarray) -> float:
    """Ideal code length in bits of residuals under the tables (tokens + classes + raw bits)."""
    sym = split_residuals(residuals.astype(np.int64), scale_idx.astype(np.int64), tables.shifts)
    tok = tables.tokens / tables.tokens.sum(axis=1, keepdims=True)
    cls = tables.classes / tables.classes.sum()
    esc = sym.token >= N_TOKENS - 2
    bits = -np.log2(tok[scale_idx, sym.token]).sum() - np.log2(cls[sym.cls[esc]]).sum()
    return float(bits + sym.low_bits.sum() + sym.extra_bits.sum())
