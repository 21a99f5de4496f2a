"""Training samples: the exact integer features of picked voxels of a volume's slabs, and what
the integer predictor makes of them (residuals, ideal bits).

Numpy only (and the compiled kernels): the encoder's per-volume adaptation draws and scores its
samples here without importing torch in the coding process; only the fine-tuning runs
(models.train, in their worker processes) need torch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from models import kernels
from models.codec import geometry
from models.context import Neighbourhood
from models.features import DEFAULT_NEIGHBOURHOOD, default_features, flat_contexts
from models.predictor import DefaultPredictor
from models.tables import table_bits
from models.value_range import ValueRange


@dataclass
class Samples:
    x: np.ndarray      # float32 (n, F)
    ref: np.ndarray    # int64 (n,)
    s: np.ndarray
    lq: np.ndarray
    value: np.ndarray  # int64 (n,)
    lo: np.ndarray     # value range each sample's volume is coded within
    hi: np.ndarray

    def where(self, keep: np.ndarray) -> "Samples":
        """The samples at ``keep`` (a mask or indices)."""
        return Samples(*(getattr(self, f)[keep] for f in Samples.__dataclass_fields__))


def network_samples(samples: Samples, hood_size: int) -> Samples:
    """The samples whose code length the network decides: all but flat contexts (those
    code with their own table row, see models.features.flat_contexts)."""
    index = network_index(samples, hood_size)
    return samples if index is None else samples.where(index)


def network_index(samples: Samples, hood_size: int) -> np.ndarray | None:
    """Indices of :func:`network_samples` in ``samples`` (None: all of them)."""
    flat = flat_contexts(samples.s, samples.x[:, :hood_size])
    return np.flatnonzero(~flat) if flat.any() else None


def collect_samples(volumes, slab: int, slabs_per_volume: int, keep: float,
                    rng: np.random.Generator, tile=(128, 256), progress=None,
                    hood: Neighbourhood = DEFAULT_NEIGHBOURHOOD,
                    values: ValueRange | None = None, space=None) -> Samples:
    """Features of every ``1/keep``-th voxel of evenly spaced slabs of each volume, for a
    predictor with the neighbourhood ``hood``; ``values``: the range they are coded within
    (one volume; default each volume's dtype range); ``space``: where the result's arrays
    go (its ``array(name, shape, dtype)``; default fresh memory).

    The voxels are picked first, in one pass of ``rng``; the slices' features are then
    computed on two threads (the compiled kernel and numpy's gathers release the interpreter
    lock) straight into the result's arrays: the same samples as one thread would give."""
    plan = _sample_plan(volumes, slab, slabs_per_volume, keep, rng)
    total = sum(len(pick) for _, _, picks in plan for pick in picks)
    out: Samples | None = None
    at = 0
    with ThreadPoolExecutor(_SAMPLE_THREADS) as pool:
        for vi, z0, picks in plan:
            vrange = values or ValueRange.of_dtype(volumes[vi].dtype)
            block = vrange.mapped(volumes[vi][z0:z0 + slab])
            # gather the picked voxels' neighbours only (the contexts slab_contexts gives)
            geo = geometry(hood, slab, block.shape[1], block.shape[2], tuple(tile))
            flat = geo.padded(block).ravel()

            def features(zl: int):
                pick = picks[zl]
                return _features(geo.neighbours(flat, zl, pick), geo.validity(zl)[:, pick])

            def fill(zl: int, start: int, feats=None) -> None:
                # each thread writes its slice's rows (numpy's copies release the interpreter
                # lock): the features' transpose is the one copy of them
                ref, s, lq, x = feats or features(zl)
                part = slice(start, start + len(ref))
                out.x[part], out.ref[part], out.s[part], out.lq[part] = x, ref, s, lq
                out.value[part] = block[zl].ravel()[picks[zl]]
                out.lo[part], out.hi[part] = vrange.lo, vrange.hi

            starts = np.cumsum([at] + [len(p) for p in picks]).tolist()
            if out is None:      # the first slice's features give the arrays' types
                first = features(0)
                out = _allocated(space, total, first[3], first[:3])
                fill(0, at, first)
                list(pool.map(fill, range(1, len(picks)), starts[1:-1]))
            else:
                list(pool.map(fill, range(len(picks)), starts[:-1]))
            at = starts[-1]
            if progress:
                progress(f"volume {vi + 1}/{len(volumes)} slab at z={z0}")
    if out is None:
        raise ValueError("no slab to sample")
    return out


_SAMPLE_THREADS = 2


def _allocated(space, total: int, x: np.ndarray, columns) -> Samples:
    """Uninitialised :class:`Samples` of ``total`` rows, typed as the first slice's
    features ``x`` and ``columns`` (ref, s, lq), in ``space`` (None: fresh memory)."""
    def array(name, shape, dtype):
        return np.empty(shape, dtype) if space is None else space.array(name, shape, dtype)
    names = list(Samples.__dataclass_fields__)
    dtypes = [a.dtype for a in columns] + [np.int64] * 3
    return Samples(array("x", (total, x.shape[1]), x.dtype),
                   *(array(n, (total,), d) for n, d in zip(names[1:], dtypes)))


def _sample_plan(volumes, slab: int, slabs_per_volume: int, keep: float,
                 rng: np.random.Generator) -> list[tuple[int, int, list[np.ndarray]]]:
    """(volume, first slice, the picked pixels of each of its slices) of every sampled slab,
    drawn from ``rng`` slice by slice in that order."""
    plan = []
    for vi, vol in enumerate(volumes):
        starts = np.unique(np.linspace(0, max(vol.shape[0] - slab, 0), slabs_per_volume)
                           .astype(int) // slab * slab)
        plane = vol.shape[1] * vol.shape[2]
        for z0 in starts:
            depth = min(slab, vol.shape[0] - z0)
            plan.append((vi, int(z0), [np.flatnonzero(rng.random(plane) < keep)
                                       for _ in range(depth)]))
    return plan


def _features(values: np.ndarray, valid: np.ndarray):
    """:func:`default_features` with the inputs as an ``(n, F)`` array (a transposed view of
    the kernel's), by the compiled kernel when there is one (the same values)."""
    feats = kernels.features(values, valid, compact=False)
    if feats is None:
        ref, s, lq, x = default_features(values, valid)
        return ref, s, lq, x.T
    return feats.ref, feats.s, feats.lq, feats.x


def gather_rows(values: np.ndarray, rows: np.ndarray, out: np.ndarray, scale=None,
                chunk: int = 1 << 14) -> np.ndarray:
    """``values[rows]`` (times ``scale``, when given) cast into ``out`` (its leading columns,
    for 2-D ``values``), gathered in pieces through a small buffer: ``np.take`` gathers rows
    about three times faster than indexing, and no array of the whole gather is made."""
    part = np.empty((min(chunk, len(rows)),) + values.shape[1:], values.dtype)
    target = out if values.ndim == 1 else out[:, :values.shape[1]]
    for a in range(0, len(rows), chunk):
        piece = rows[a:a + chunk]
        got = part[:len(piece)]
        np.take(values, piece, axis=0, out=got)
        if scale is None:
            target[a:a + len(piece)] = got
        else:
            np.multiply(got, scale, out=target[a:a + len(piece)], casting="unsafe")
    return out


def integer_residuals(predictor: DefaultPredictor, samples: Samples, chunk: int = 1 << 18):
    """Residuals and table indices of the exact integer model on the samples."""
    rs, js = [], []
    for a in range(0, len(samples.value), chunk):
        sl = slice(a, a + chunk)
        pred, j = predictor.outputs(samples.ref[sl], samples.s[sl], samples.lq[sl],
                                    samples.x[sl], samples.lo[sl], samples.hi[sl])
        rs.append(samples.value[sl] - pred)
        js.append(j)
    return np.concatenate(rs), np.concatenate(js)


def evaluate(predictor: DefaultPredictor, samples: Samples) -> float:
    """Ideal bits per voxel of the integer model and its tables on the samples."""
    r, j = integer_residuals(predictor, samples)
    return table_bits(predictor.tables, r, j) / len(r)
