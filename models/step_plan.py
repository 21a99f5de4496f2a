"""The plan of a sheared decoder's lockstep (models.skew): for each wavefront step, the runs
of voxels the step kernel reads, the segments of the range decoder's streams they are coded in
(in stream-group order, blob format 6), which voxels are coded (not phantoms), where each
decoded value goes in the buffer, and the copies into ghost rows.

A job's steps are planned together in whole arrays (:func:`job_steps`), or one by one where
the layout does not keep every step's validity (:func:`planned_alone`); plans of small slices
are remembered (:func:`plan`), since a node decodes many blobs of one geometry.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from models import kernels

if TYPE_CHECKING:
    from models.skew import SkewLayout


def steps(L: SkewLayout, first: int, top: int, slabs_at: list[int]):
    """The lockstep's wavefront steps with voxels: ``(t, parts)``, a part ``(zl, tau, r0, r1,
    slabs)`` per slice in flight."""
    for t in range(L.steps + L.b * (top - first - 1)):
        parts = []
        for zl in range(first, top):
            tau = t - L.b * (zl - first)
            if 0 <= tau < L.steps and L.row_ranges[tau][1] > L.row_ranges[tau][0]:
                parts.append((zl, tau, *L.row_ranges[tau], slabs_at[zl]))
        if parts:
            yield t, parts


def segments(L: SkewLayout, parts, sizes, stream_of, group: int):
    """A step's segments (each one stream's symbols: ``streams``, and where they end:
    ``ends``), which of its voxels are coded (``keep``: a list of masks, None without
    phantoms) and, for stream groups, its :class:`GroupOrder` (else None)."""
    streams, ends, sym = [], [], 0
    keep = [] if L.has_phantoms else None
    reals = []
    for zl, tau, r0, r1, m in parts:
        real = L.tiles * (r1 - r0)
        if keep is not None:
            mask = L.step_real(tau)
            keep.append(np.tile(mask, m))
            real = int(mask.sum())
        reals.append(real)
        if group == 1:
            for g in range(m):
                streams.append(stream_of[g] + zl)
                sym += real
                ends.append(sym)
    order = None
    if group > 1:
        order = GroupOrder(parts, sizes, reals, stream_of, group, L.tiles)
        streams, ends = order.streams, order.ends
    return streams, ends, keep, order


class PlannedStep(NamedTuple):
    """One wavefront step of a compiled decoding, its voxels in symbol order: their runs (and
    the runs' addresses), count, segments and coded mask (None: all). ``dest``: where each
    voxel goes in the flat buffer, where made in advance (else taken from the runs when the
    step is decoded); ``ghost_to`` and ``ghost_from``: the copies into ghost rows (None:
    none). A step planned alone without stream groups has instead its slices in flight,
    ``parts``: its values, in the lockstep's order, are written part by part with their ghost
    rows (models.skew)."""

    runs: "kernels.Runs"
    at: tuple           # runs.addresses()
    n: int
    streams: list
    ends: list
    keep: np.ndarray | None
    parts: list
    dest: np.ndarray | None
    ghost_to: np.ndarray | None
    ghost_from: np.ndarray | None
    hold: list          # the validity arrays the runs point into

    @property
    def nbytes(self) -> int:
        """About what the step holds: its arrays, its lists and their numbers."""
        r = self.runs
        arrays = [r.origin, r.length, r.valid_at, r.valid_stride, r.depth, self.keep,
                  self.dest, self.ghost_to, self.ghost_from]
        return sum(a.nbytes + 112 for a in arrays if a is not None) + 600 \
            + 40 * (len(self.streams) + len(self.ends) + len(self.parts or ()))


PLAN_CACHE_BYTES = 24 << 20   # in each process: the plans of a few lockstep jobs
_plans: OrderedDict = OrderedDict()       # key -> (steps, bytes), least recently used first
_plan_bytes = 0
_plans_lock = threading.Lock()            # a node's sender threads decode side by side


def plan(L: SkewLayout, size: int, strides, depth_bits, first: int, top: int,
         slabs_at: list[int], stream_of: list[int], group: int):
    """The steps of decoding slices ``[first, top)`` (``slabs_at[zl]``: slabs holding slice
    ``zl``) in a buffer of ``size`` elements, ``strides``. Plans of slices in stream groups
    (small slices: a step of a few hundred to a few thousand voxels costs little more than
    its planning) are remembered within PLAN_CACHE_BYTES, since a node decodes many blobs of
    the same geometry; those of larger slices would save a few percent at most."""
    key = (L, size, strides, first, top, tuple(slabs_at[first:top]), tuple(stream_of), group)
    cached = _recalled(key)
    if cached is not None:
        yield from cached
        return
    voxels = sum(slabs_at[first:top]) * L.tiles * L.th * L.tw
    count = L.steps + L.b * (top - first - 1)
    remember = group > 1 and 5 * voxels + 2048 * count <= PLAN_CACHE_BYTES    # about its size
    if L.validity_cached:
        planned = job_steps(L, size, strides, depth_bits, first, top, slabs_at, stream_of,
                            group, remember)
    else:       # very large slices: each step's validity made when it comes
        planned = (planned_alone(L, size, strides, depth_bits, parts, stream_of, group)
                   for _, parts in steps(L, first, top, slabs_at))
    kept, held = [], 0
    for step in planned:
        if remember:
            held += step.nbytes
            remember = held <= PLAN_CACHE_BYTES
            kept.append(step)
        yield step
    if remember:
        _keep(key, kept, held)


def _recalled(key) -> list | None:
    with _plans_lock:
        cached = _plans.get(key)
        if cached is None:
            return None
        _plans.move_to_end(key)
        return cached[0]


def _keep(key, steps: list, held: int) -> None:
    """Remember a plan of ``held`` bytes, forgetting the least recently used ones to make
    room (a plan another thread made meanwhile stays)."""
    global _plan_bytes
    with _plans_lock:
        if key in _plans:
            return
        while _plans and _plan_bytes + held > PLAN_CACHE_BYTES:
            _plan_bytes -= _plans.popitem(last=False)[1][1]
        _plans[key] = steps, held
        _plan_bytes += held


def job_steps(L: SkewLayout, size: int, strides, depth_bits, first: int, top: int,
              slabs_at: list[int], stream_of: list[int], group: int, with_dest: bool
              ) -> list[PlannedStep]:
    """:func:`planned_alone` for every step of a lockstep job at once, in whole-array operations
    (the same runs, segments, masks and destinations; ``with_dest``: destinations of every
    step made now, else each step's when it is used, for stream groups only)."""
    taus = np.array([tau for tau, (r0, r1) in enumerate(L.row_ranges) if r1 > r0], np.int64)
    ranges = np.array(L.row_ranges, np.int64).reshape(-1, 2)
    zl = np.repeat(np.arange(first, top, dtype=np.int64), len(taus))       # one per part
    tau = np.tile(taus, top - first)
    m = np.asarray(slabs_at, np.int64)[zl]
    per = m * L.tiles                                                       # runs a part
    part = np.repeat(np.arange(len(zl)), per)
    g, tile = np.divmod(np.arange(len(part)) - np.repeat(np.cumsum(per) - per, per), L.tiles)
    if not len(part):
        return []
    zl, tau = zl[part], tau[part]
    t = tau + L.b * (zl - first)
    o = np.lexsort((tile, zl, g, zl // group, t))    # a step's runs as its symbols are coded
    zl, tau, g, tile, t = zl[o], tau[o], g[o], tile[o], t[o]
    r0, r1 = ranges[tau, 0], ranges[tau, 1]
    rows = r1 - r0
    origin = ((zl + L.z0) * strides[0] + g * strides[1] + tile * strides[2]
              + (tau + L.t0) * strides[3] + r0 + L.y0)
    hold = [np.ascontiguousarray(L.step_validity(int(k))) for k in taus]
    where = np.zeros(L.steps, np.int64)
    where[taus] = [v.ctypes.data for v in hold]
    runs = kernels.Runs(origin, rows, (where[tau] + tile * rows).astype(np.uint64),
                        L.tiles * rows, np.asarray(depth_bits, np.uint64)[zl])
    addresses = runs.addresses()[1:]
    cells = np.cumsum(rows) - rows           # each run's first voxel among the job's
    keep = real = None
    if L.has_phantoms:
        reals = [L.step_real(int(k)) for k in taus]
        at = np.zeros(L.steps, np.int64)
        at[taus] = np.cumsum([len(r) for r in reals]) - [len(r) for r in reals]
        keep = np.concatenate(reals)[expand(at[tau] + tile * rows, rows)]
        real = np.add.reduceat(keep.astype(np.int64), cells)
    real = rows if real is None else real
    # segments: a run's stream group of one slab; a step's symbols segment by segment
    grp = zl // group
    head = np.flatnonzero(np.r_[True, (t[1:] != t[:-1]) | (grp[1:] != grp[:-1])
                                | (g[1:] != g[:-1])])
    stream = np.asarray(stream_of, np.int64)[g[head]] + grp[head]
    symbols = np.add.reduceat(real, head)
    steps_at = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])         # each step's first run
    run_end = np.r_[steps_at[1:], len(t)]
    seg_at = np.searchsorted(head, steps_at)
    seg_end = np.r_[seg_at[1:], len(head)]
    ends = np.cumsum(symbols)
    dest = expand(origin, rows).astype(_index_kind(size)) if with_dest and group > 1 else None
    ghost = _job_ghosts(L, strides, origin, tile, r0, r1)
    out = []
    for a, b, sa, sb in zip(steps_at.tolist(), run_end.tolist(), seg_at.tolist(),
                            seg_end.tolist()):
        va, vb = int(cells[a]), int(cells[b - 1] + rows[b - 1])
        step_runs = kernels.Runs(*(x[a:b] for x in (runs.origin, runs.length, runs.valid_at,
                                                     runs.valid_stride, runs.depth)))
        at_ = (b - a,) + tuple(x + 8 * a for x in addresses)
        base = int(ends[sa - 1]) if sa else 0
        step_dest = None if dest is None else dest[va:vb]
        ghost_to, ghost_from = (None, None) if ghost is None else ghost(a, b)
        out.append(PlannedStep(
            step_runs, at_, vb - va, stream[sa:sb].tolist(), (ends[sa:sb] - base).tolist(),
            None if keep is None else keep[va:vb], None, step_dest, ghost_to, ghost_from,
            hold))
    return out


def expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``starts[i], starts[i] + 1, ..., starts[i] + lengths[i] - 1`` for each ``i``, in
    order."""
    firsts = np.cumsum(lengths) - lengths
    return np.repeat(starts - firsts, lengths) + np.arange(int(lengths.sum()))


def _job_ghosts(L: SkewLayout, strides, origin, tile, r0, r1):
    """The ghost rows' copies of a job's runs (tiles ``ntx..``, rows below ``ghost_rows``):
    a function of a step's runs ``[a, b)`` giving its copies (to, from), or None."""
    if not (L.ghost_rows and L.nty > 1):
        return None
    count = np.where(tile >= L.ntx, np.clip(np.minimum(r1, L.ghost_rows) - r0, 0, None), 0)
    source = expand(origin, count)
    shift = _ghost_shift(L, strides)
    bounds = np.r_[0, np.cumsum(count)]

    def copies(a: int, b: int):
        lo, hi = int(bounds[a]), int(bounds[b])
        if lo == hi:
            return None, None
        return source[lo:hi] + shift, source[lo:hi]
    return copies


def _ghost_shift(L: SkewLayout, strides) -> int:
    """From a voxel of one of a tile's first rows to its copy in the ghost rows of the tile
    above, in the flat buffer of element ``strides``."""
    return -L.ntx * strides[2] + L.a * L.th * strides[3] + L.th


def _index_kind(size: int):
    """Indices into a buffer of ``size`` elements: int32 where they fit (half the memory of
    a remembered plan)."""
    return np.int32 if size < 1 << 31 else np.int64


def planned_alone(L: SkewLayout, size: int, strides, depth_bits, parts, stream_of,
                  group: int) -> PlannedStep:
    """One step planned alone, from its ``parts`` (slices so large that the layout does not
    keep every step's validity; :func:`job_steps` plans a job's steps together otherwise).
    Without stream groups its values are written part by part (``parts``)."""
    sizes = [m * L.tiles * (r1 - r0) for _, _, r0, r1, m in parts]
    streams, ends, keep, order = segments(L, parts, sizes, stream_of, group)
    hold = []
    runs = step_runs(L, strides, depth_bits, parts, hold)
    keep = None if keep is None else np.concatenate(keep)
    dest = ghost_to = ghost_from = None
    if order is not None:
        runs = order.runs(runs)
        keep = None if keep is None else keep[order.voxel_order]
        kind = _index_kind(size)
        dest = expand(runs.origin, runs.length).astype(kind)
        if L.ghost_rows and L.nty > 1:
            ghost_to, ghost_from = _ghosts(L, strides, parts, kind)
    return PlannedStep(runs, runs.addresses(), sum(sizes), streams, ends, keep, parts, dest,
                        ghost_to, ghost_from, hold)


def _ghosts(L: SkewLayout, strides, parts, kind):
    """The copies a step makes into the ghost rows of the tiles above (rows below
    ``L.ghost_rows`` of tiles ``ntx..``): to where and from where in the flat buffer, or
    Nones."""
    to, source = [], []
    for zl, tau, r0, r1, m in parts:
        if r0 >= L.ghost_rows:
            continue
        rows = np.arange(r0, min(r1, L.ghost_rows))
        at = ((zl + L.z0) * strides[0] + (tau + L.t0) * strides[3] + L.y0
              + np.arange(m)[:, None, None] * strides[1]
              + np.arange(L.ntx, L.tiles)[None, :, None] * strides[2] + rows[None, None, :])
        source.append(at.ravel())
        to.append((at + _ghost_shift(L, strides)).ravel())
    if not to:
        return None, None
    return np.concatenate(to).astype(kind), np.concatenate(source).astype(kind)


class GroupOrder:
    """A wavefront step's voxels in stream-group order (format 6): the lockstep lays them out
    slice by slice, each slice's slabs one after the other, in runs (models.kernels.Runs: a
    tile's rows of one slice of one slab); a stream group reads those of its slices, slab by
    slab, one after the other, so that each is one segment of its stream.

    ``parts`` are the slices in flight ``(zl, tau, r0, r1, slabs)`` (slabs non-increasing),
    ``sizes`` their voxels, ``reals`` their coded voxels per slab; :attr:`streams` and
    :attr:`ends` the segments' streams and where their symbols end, in group order."""

    def __init__(self, parts, sizes, reals, stream_of, group: int, tiles: int):
        self.slabs = tuple(p[4] for p in parts)
        self.piece_order, self.part, self.slab, grp, heads = _pieces(
            tuple(p[0] for p in parts), self.slabs, group)
        self.sizes, self.tiles = sizes, tiles
        self.ends = np.cumsum(np.add.reduceat(np.array(reals)[self.part], heads)).tolist()
        self.streams = (np.asarray(stream_of)[self.slab[heads]] + grp[heads]).tolist()

    @cached_property
    def run_order(self) -> np.ndarray:
        if self.tiles == 1:
            return self.piece_order
        return (self.piece_order[:, None] * self.tiles + np.arange(self.tiles)).ravel()

    @cached_property
    def voxel_order(self) -> np.ndarray:
        """Where each voxel of the group order lies in the lockstep's (needed where a step's
        values go through the lockstep's order: several tiles, or no compiled fields)."""
        sizes = np.array(self.sizes)
        block = sizes // np.array(self.slabs)       # a slab's voxels of a part
        lengths = block[self.part]
        starts = (np.cumsum(sizes) - sizes)[self.part] + self.slab * lengths
        return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) \
            + np.arange(int(sizes.sum()))

    def voxels(self, a: np.ndarray) -> np.ndarray:
        return a[self.voxel_order]

    def keep(self, keep: list | None) -> list | None:
        return None if keep is None else [np.concatenate(keep)[self.voxel_order]]

    def runs(self, runs: "kernels.Runs") -> "kernels.Runs":
        o = self.run_order
        return kernels.Runs(runs.origin[o], runs.length[o], runs.valid_at[o],
                            runs.valid_stride[o], runs.depth[o])

    def restored(self, decoded: np.ndarray) -> np.ndarray:
        """Values in group order back in the lockstep's."""
        out = np.empty_like(decoded)
        out[self.voxel_order] = decoded
        return out


@lru_cache(maxsize=256)
def _pieces(zls: tuple, slabs: tuple, group: int):
    """A step's pieces (a slice in flight of one slab) in group order, for slices ``zls`` in
    flight in ``slabs`` slabs each: their order among the lockstep's pieces, their part
    (slice in flight) and slab, their stream group, and where each segment (a group of one
    slab) starts. The same slices stay in flight for most of a lockstep's steps, so a few
    entries serve a decode."""
    m = np.array(slabs)
    part = np.repeat(np.arange(len(zls)), m)
    slab = np.arange(len(part)) - np.repeat(np.cumsum(m) - m, m)
    grp = np.array(zls)[part] // group
    o = np.lexsort((slab, grp))           # stable: slices in order within a (group, slab)
    part, slab, grp = part[o], slab[o], grp[o]
    key = grp * (int(m.max()) + 1) + slab
    heads = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    for a in (o, part, slab, grp, heads):
        a.flags.writeable = False         # shared between steps
    return o, part, slab, grp, heads


RUN_CACHE_BYTES = 32 << 20   # per layout: the runs of every step of a few lockstep widths


def step_runs(L: SkewLayout, strides, depth_bits, parts, hold: list) -> "kernels.Runs":
    """The runs of one wavefront step's voxels: one per part (slice in flight), slab and tile
    (its rows); ``depth_bits[zl]``: which neighbours lie in the slab at slab slice ``zl``."""
    cols = [[], [], [], [], []]
    for zl, tau, r0, r1, m in parts:
        key = (strides, tau, m)
        cached = L.run_cache.get(key)
        if cached is None:
            cached = _relative_runs(L, strides, tau, r0, r1, m)
            _remember(L, key, cached)
        origin, length, valid_at, valid_stride, vt = cached
        hold.append(vt)
        cols[0].append(origin + (zl + L.z0) * strides[0])
        cols[1].append(length)
        cols[2].append(valid_at)
        cols[3].append(valid_stride)
        cols[4].append(_filled(len(origin), int(depth_bits[zl])))
    return kernels.Runs(*(np.concatenate(c) for c in cols))


@lru_cache(maxsize=64)
def _filled(n: int, bits: int) -> np.ndarray:
    """``n`` copies of the neighbour bit mask ``bits`` (read-only: shared between steps)."""
    out = np.full(n, bits, np.uint64)
    out.flags.writeable = False
    return out


def _relative_runs(L: SkewLayout, strides, tau, r0, r1, m):
    """Runs of one slice's voxels at step ``tau`` for ``m`` slabs, origins relative to the
    slice's plane."""
    rows = r1 - r0
    g, t = np.divmod(np.arange(m * L.tiles, dtype=np.int64), L.tiles)
    origin = (tau + L.t0) * strides[3] + r0 + L.y0 + g * strides[1] + t * strides[2]
    vt = np.ascontiguousarray(L.step_validity(tau))    # (K, tiles * rows)
    count = m * L.tiles
    return (origin, np.full(count, rows, np.int64), (vt.ctypes.data + t * rows).astype(np.uint64),
            np.full(count, vt.shape[1], np.int64), vt)


def _remember(L: SkewLayout, key, runs) -> None:
    """Cache a step's runs on the layout within RUN_CACHE_BYTES (the validity array counts
    when the layout does not keep it anyway: very large slices)."""
    size = sum(a.nbytes for a in runs[:4])
    if not L.validity_cached:
        size += runs[4].nbytes
    if L.run_cache_bytes + size > RUN_CACHE_BYTES:
        L.run_cache.clear()
        L.run_cache_bytes = 0
    if size <= RUN_CACHE_BYTES:
        L.run_cache[key] = runs
        L.run_cache_bytes += size


def clear() -> None:
    """Forget every remembered plan."""
    global _plan_bytes
    with _plans_lock:
        _plans.clear()
        _plan_bytes = 0
