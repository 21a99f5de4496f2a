"""The paper models' residual distribution, fitted to each volume.

The paper codes its residuals with an arithmetic coder whose single distribution follows the
data. A table fitted once on the training volume fits other scanners badly (a head CT whose
residuals are mostly a few HU pays for the chest CT's 35-50 HU spread), so the encoder fits the
one distribution to the volume it codes, from the residuals of a sample of its voxels, and
carries it in the blob: the table index, one 50-entry token row and the 24 escape classes, a
few hundred bytes. It stays one distribution per volume (``j_mode`` 0), as in the paper.
"""

from __future__ import annotations

import io

import numpy as np

from models.codec import geometry
from models.paper import P_JCONST, P_JMODE
from models.entropy import N_CLASSES, N_TOKENS, CodingTables
from models.tables import table_bits

TABLE_SAMPLES = 16_384   # voxels whose residuals the volume's table is fitted on
MIN_VOXELS = 4_096       # smaller volumes keep the shipped table
_KEY = "paper_table"


def sample_contexts(hood, volume: np.ndarray, slab: int, tile, count: int,
                    rng: np.random.Generator):
    """``(values (K, n), valid (K, n), target (n,))`` of about ``count`` random voxels, with the
    neighbours the codec gives them (slab and tile borders included)."""
    nz, ny, nx = volume.shape
    geo = geometry(hood, slab, ny, nx, tuple(tile))
    starts = np.arange(0, nz, slab)
    picks = rng.choice(starts, min(len(starts), 8), replace=False)
    per = -(-count // len(picks))
    vs, oks, ts = [], [], []
    for z0 in picks:
        block = volume[z0:z0 + slab]
        flat = geo.padded(block).ravel()
        zl = rng.integers(0, block.shape[0], per)
        pix = rng.integers(0, ny * nx, per)
        vs.append(geo.neighbours(flat, zl, pix))
        ok = np.empty((hood.size, per), dtype=bool)
        for z in np.unique(zl):
            ok[:, zl == z] = geo.validity(int(z))[:, pix[zl == z]]
        oks.append(ok)
        ts.append(block.reshape(block.shape[0], -1)[zl, pix].astype(np.int64))
    return np.concatenate(vs, axis=1), np.concatenate(oks, axis=1), np.concatenate(ts)


def fit_volume_table(predictor, volume: np.ndarray, slab: int, tile, seed: int = 0):
    """A copy of the paper ``predictor`` whose one coding table is fitted on ``volume``, or
    None when carrying it would cost more bits than it saves."""
    from models.paper_train import fit_constant_table  # training code, only when encoding

    if volume.size < MIN_VOXELS:
        return None
    rng = np.random.default_rng(seed)
    values, valid, target = sample_contexts(predictor.neighbourhood, volume, slab, tile,
                                            min(TABLE_SAMPLES, volume.size), rng)
    info = np.iinfo(volume.dtype)
    pred, j = predictor.predict(values, valid, int(info.min), int(info.max))
    r = target - pred
    twin = predictor.with_table(predictor.params.copy(), predictor.tables)
    new_bits = fit_constant_table(twin, r)
    old_bits = table_bits(predictor.tables, r, j) / len(r)
    saved = (old_bits - new_bits) * volume.size
    return twin if saved > 8 * len(table_bytes(twin)) else None


def table_bytes(predictor) -> bytes:
    """What a blob carries for a volume-fitted table: params, token row and classes."""
    jc = int(predictor.params[P_JCONST])
    packed = np.concatenate([predictor.params, predictor.tables.tokens[jc],
                             predictor.tables.classes]).astype(np.int32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **{_KEY: packed})
    return buf.getvalue()


def is_table(arrays: dict) -> bool:
    return _KEY in arrays


def with_table(base, arrays: dict):
    """``base`` with the volume-fitted table read back from :func:`table_bytes`' arrays."""
    if not getattr(base, "kind", "").startswith("paper"):
        raise ValueError(f"a volume table needs a paper model, not {base.kind!r}")
    packed = np.asarray(arrays[_KEY], dtype=np.int64)
    n_params = len(base.params)
    if packed.shape != (n_params + N_TOKENS + N_CLASSES,):
        raise ValueError(f"volume table has {packed.size} entries")
    params = packed[:n_params]
    row, classes = packed[n_params:n_params + N_TOKENS], packed[n_params + N_TOKENS:]
    jc = int(params[P_JCONST])
    if not 0 <= jc < len(base.tables.tokens) or row.min() < 1 or classes.min() < 1:
        raise ValueError("volume table out of range")
    table_params = [P_JMODE, P_JCONST]
    if not np.array_equal(np.delete(params, table_params), np.delete(base.params, table_params)):
        raise ValueError("volume table changes the network's constants")
    tokens = base.tables.tokens.copy()
    tokens[jc] = row
    return base.with_table(params, CodingTables(tokens, classes))
