"""Where the bits go: the ideal code length of every voxel of a slice, as the codec codes it.

For a slice of a volume this runs what the encoder runs on the slab and column bands holding it
(same value range, slab and tile layout, the same predictor: the shipped model, or the one
adaptation fine-tunes on the volume) and, instead of range coding, charges each voxel
``-log2 p`` of its token in its (range-truncated) table row, its raw low bits, and for an escape
the escape class and its extra bits. Summed over a volume this is the payload size the range
coder reaches to within its small overhead (tested), so a map shows truthfully which voxels
cost what.
"""

from __future__ import annotations

import numpy as np

from models import adapt as adaptation
from models.api import SLAB_SLICES, TILE
from models.codec import slice_predictions
from models.container import band_spans
from models.entropy import ESC_NEG, N_TOKENS, split_residuals, token_bounds
from models.registry import load_model
from models.value_range import scan

CHUNK = 1 << 15      # voxels whose probability rows are built at once


def symbol_bits(tables, sym, j: np.ndarray, bounds) -> np.ndarray:
    """Ideal bits of each symbol: its token in its truncated row, low bits, escape fields."""
    n = len(j)
    bits = np.empty(n, np.float64)
    out = np.empty((min(n, CHUNK), N_TOKENS))
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        rows = tables.bounded_rows(j[a:b], bounds[0][a:b], bounds[1][a:b], out)
        p = rows[np.arange(b - a), sym.token[a:b]] / rows.sum(axis=1)
        bits[a:b] = -np.log2(p)
    bits += sym.low_bits
    esc = sym.token >= ESC_NEG
    if esc.any():
        classes = tables.classes / tables.classes.sum()
        bits[esc] += -np.log2(classes[sym.cls[esc]]) + sym.extra_bits[esc]
    return bits


def slab_bits(predictor, slab: np.ndarray, lo: int, hi: int, zs: int, tile) -> np.ndarray:
    """Ideal bits of every voxel of one slab's column band, coded within ``[lo, hi]``
    (``slab`` already mapped into that range, as the encoder maps it)."""
    out = np.empty(slab.shape, np.float64)
    shifts = predictor.tables.shifts
    for zl, pred, j in slice_predictions(predictor, slab, zs, tile, lo, hi):
        r = slab[zl].ravel().astype(np.int64) - pred
        sym = split_residuals(r, j, shifts)
        bounds = token_bounds(pred, shifts[j], lo, hi)
        out[zl] = symbol_bits(predictor.tables, sym, j, bounds).reshape(slab.shape[1:])
    return out


def predictor_for(volume: np.ndarray, model: str = "default", adapt: bool = False,
                  slab: int = SLAB_SLICES, tile=TILE):
    """(predictor, value range) the encoder would use on ``volume`` (adaptation only when
    ``adapt`` and it pays, as in :func:`models.encode_volume`)."""
    predictor = load_model(model)
    if predictor.kind.startswith("paper"):
        raise ValueError("bit maps are drawn for the production models only")
    values = scan(volume)
    tile = (min(tile[0], volume.shape[1]), min(tile[1], volume.shape[2]))
    if adapt and adaptation.can_adapt(predictor):
        adapted = adaptation.adapt(predictor, volume, slab, tile, values)
        predictor = adapted if adapted is not None else predictor
    return predictor, values


def slice_bits(volume: np.ndarray, z: int, predictor, values, slab: int = SLAB_SLICES,
               tile=TILE) -> np.ndarray:
    """Ideal bits of every voxel of slice ``z`` of ``volume`` as the encoder codes it: the
    slab holding ``z`` (its earlier slices are the context), band by band."""
    tile = (min(tile[0], volume.shape[1]), min(tile[1], volume.shape[2]))
    z0 = z - z % slab
    out = np.empty(volume.shape[1:], np.float64)
    for x0, x1 in band_spans(volume.shape[2], tile[1]):
        block = values.mapped(volume[z0:z + 1, :, x0:x1])
        out[:, x0:x1] = slab_bits(predictor, block, values.lo, values.hi, slab, tile)[-1]
    return out


def volume_bits(volume: np.ndarray, predictor, values, slab: int = SLAB_SLICES,
                tile=TILE) -> np.ndarray:
    """Ideal bits of every voxel of ``volume`` (what the encoder's payloads come to)."""
    tile = (min(tile[0], volume.shape[1]), min(tile[1], volume.shape[2]))
    out = np.empty(volume.shape, np.float64)
    for z0 in range(0, volume.shape[0], slab):
        for x0, x1 in band_spans(volume.shape[2], tile[1]):
            block = values.mapped(volume[z0:z0 + slab, :, x0:x1])
            out[z0:z0 + slab, :, x0:x1] = slab_bits(predictor, block, values.lo, values.hi,
                                                    slab, tile)
    return out
