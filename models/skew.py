"""A decoder buffer in wavefront coordinates, so that a decoding step reads its neighbours as
contiguous slices instead of gathering them voxel by voxel.

Each tile of each slice is stored sheared: position ``(tau, y)`` holds the voxel at tile-local
column ``x = tau - a*y``. The voxels of one wavefront step ``tau`` are then one run of rows of
that plane, and the neighbour at ``(dz, dy, dx)`` of all of them is the same run shifted by
``(dz, tau + dx + a*dy, dy)``. Layout: ``buf[z, slab, tile, tau, y]``.

Tiles are all stored at the largest tile's size; the missing voxels of narrower or shorter edge
tiles are "phantoms": predicted along (cheaper than splitting the batch) but never coded and
left at zero. Earlier slices may look below a tile's last row (into the next tile down, or past
the image, where the flat layout reads zero padding); those rows are kept as "ghost" rows: a copy
of the first rows of the tile below, written when they are decoded.

The order of the symbols is exactly the one of :func:`models.context.slice_schedule`
(step, then tile, then row), so this decoder reads the streams that ``encode_slab`` wrote.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import cached_property, lru_cache
from typing import NamedTuple

import numpy as np

from models import kernels
from models.context import Neighbourhood
from models.entropy import RANGE_EDGE, TOKEN_RANGE


class SkewLayout:
    """Index arithmetic of the sheared buffer for ``ny x nx`` slices cut into ``tile`` tiles."""

    MAX_CACHED_VALIDITY = 1 << 26  # bools; wider neighbourhoods compute validity per step

    def __init__(self, hood: Neighbourhood, ny: int, nx: int, tile: tuple[int, int]):
        self.hood, self.ny, self.nx = hood, ny, nx
        self.th, self.tw = min(tile[0], ny), min(tile[1], nx)
        self.nty, self.ntx = -(-ny // self.th), -(-nx // self.tw)
        self.tiles = self.nty * self.ntx
        self.a, self.b = hood.slopes
        o = np.array(hood.offsets, dtype=np.int64)
        self.dz, self.dy, self.dx = o[:, 0], o[:, 1], o[:, 2]
        self.dtau = self.dx + self.a * self.dy
        earlier = self.dz < 0
        self.ghost_rows = int(max(0, self.dy[earlier].max(initial=0)))
        self.steps = self.tw - 1 + self.a * (self.th - 1) + 1
        self.z0 = hood.pad[0]
        self.y0 = int(max(0, -self.dy.min()))
        self.t0 = int(max(0, -self.dtau.min()))
        last_ghost = self.tw - 1 + self.a * (self.th + self.ghost_rows - 1)
        last = max(self.steps - 1 + int(max(0, self.dtau.max())), last_ghost)
        self.plane_shape = (self.t0 + last + 1, self.y0 + self.th + self.ghost_rows)
        self.gather_cache: dict = {}
        self.run_cache: dict = {}     # (strides, tau, slabs) -> runs of a step (models.kernels)
        self.run_cache_bytes = 0

    @property
    def supported(self) -> bool:
        """Ghost rows reach one tile down at most (always so for the shipped models)."""
        return self.ghost_rows <= self.th

    def rows(self, tau: int) -> tuple[int, int]:
        """Rows ``[r0, r1)`` of the largest tile that hold a voxel at step ``tau``."""
        r0 = max(0, -(-(tau - self.tw + 1) // self.a))
        return r0, min(self.th - 1, tau // self.a) + 1

    @cached_property
    def row_ranges(self) -> list[tuple[int, int]]:
        return [self.rows(t) for t in range(self.steps)]

    @cached_property
    def _tile_size(self) -> tuple[np.ndarray, np.ndarray]:
        """Width and height of every tile (edge tiles may be smaller than the largest)."""
        ty, tx = np.divmod(np.arange(self.tiles), self.ntx)
        return (np.minimum(self.tw, self.nx - tx * self.tw),
                np.minimum(self.th, self.ny - ty * self.th))

    def _step_grid(self, tau: int):
        """Rows ``r`` (1, rows), columns ``x`` and tile widths (tiles, 1) of step ``tau``."""
        r0, r1 = self.rows(tau)
        r = np.arange(r0, r1)[None, :]
        width, _ = self._tile_size
        return r, tau - self.a * r, width[:, None]

    @cached_property
    def has_phantoms(self) -> bool:
        return self.ny % self.th != 0 or self.nx % self.tw != 0

    @cached_property
    def _step_reals(self) -> list[np.ndarray]:
        _, height = self._tile_size
        out = []
        for tau in range(self.steps):
            r, x, width = self._step_grid(tau)
            out.append(((x < width) & (r < height[:, None])).ravel())
        return out

    def step_real(self, tau: int) -> np.ndarray:
        """``(tiles * rows)``: which positions of step ``tau`` are voxels (not phantoms)."""
        return self._step_reals[tau]

    def _compute_step_validity(self, tau: int) -> np.ndarray:
        r, x, width = self._step_grid(tau)
        xx = x[None] + self.dx[:, None, None]                      # (K, 1, rows)
        ok = (r[None] + self.dy[:, None, None] >= 0) & (xx >= 0) & (xx < width[None])
        ok &= self.step_real(tau).reshape(1, self.tiles, -1)
        return ok.reshape(self.hood.size, -1)

    @cached_property
    def _step_validity(self) -> list[np.ndarray] | None:
        cells = self.hood.size * self.tiles * self.th * self.steps
        if cells > self.MAX_CACHED_VALIDITY:
            return None
        return [self._compute_step_validity(t) for t in range(self.steps)]

    @property
    def validity_cached(self) -> bool:
        return self._step_validity is not None

    def step_validity(self, tau: int) -> np.ndarray:
        """``(K, tiles * rows)``: neighbours inside the tile (the slab's first slices are
        checked apart), for the positions of step ``tau``; False for phantoms."""
        cached = self._step_validity
        return cached[tau] if cached is not None else self._compute_step_validity(tau)

    @cached_property
    def image_index(self) -> np.ndarray:
        """For each slice pixel, its flat index in one ``(tiles, *plane_shape)`` block."""
        y, x = np.divmod(np.arange(self.ny * self.nx, dtype=np.int64), self.nx)
        ty, ly = np.divmod(y, self.th)
        tx, lx = np.divmod(x, self.tw)
        tile = ty * self.ntx + tx
        return (tile * self.plane_shape[0] + lx + self.a * ly + self.t0) * self.plane_shape[1] \
            + ly + self.y0


GATHER_CACHE_ENTRIES = 16


def _gather_index(L: SkewLayout, strides: tuple, m: int) -> tuple[np.ndarray, int]:
    """Flat indices ``(K, m, tiles, th)`` of the neighbours of ``m`` slabs' rows at one step in
    a buffer with element ``strides``, relative to the position of the part's first voxel plus
    the returned (negative) offset."""
    key = (strides, m)
    cached = L.gather_cache.get(key)
    if cached is None:
        if len(L.gather_cache) >= GATHER_CACHE_ENTRIES:     # bounded: a few MB each
            L.gather_cache.clear()
        koff = L.dz * strides[0] + L.dtau * strides[3] + L.dy
        g, t, r = np.meshgrid(np.arange(m), np.arange(L.tiles), np.arange(L.th), indexing="ij")
        pattern = g * strides[1] + t * strides[2] + r
        lowest = int(koff.min())
        cached = L.gather_cache[key] = ((koff - lowest)[:, None, None, None] + pattern[None],
                                        lowest)
    return cached


def decode_sheared(layout: SkewLayout, predictor, decoder, stream_of, counts, lo, hi, zs,
                   corrupt, split: int = 0, on_split=None, group: int = 1) -> np.ndarray:
    """Decode slabs (``counts`` non-increasing) in lockstep into ``(zs + z0, slabs, ny*nx)``.

    ``decoder`` is a :class:`models.entropy.StepDecoder` over all wanted stream groups'
    streams (``group`` slices each), ``stream_of[g]`` the stream of slab ``g``'s first group;
    ``corrupt`` the error to raise. With ``split`` > 0 (a multiple of ``group``), slices
    ``[0, split)`` are decoded first, on their own, and handed to ``on_split`` as
    ``(split, slabs, ny*nx)`` before the others start (every stream group has its own
    streams, so any order that decodes a slice after the ones it reads gives the same voxels).
    """
    L = layout
    slabs = len(counts)
    buf = np.zeros((zs + L.z0, slabs, L.tiles) + L.plane_shape, dtype=np.int32)
    top = int(counts.max())
    split = min(split, top) if on_split is not None else 0
    if split:
        _lockstep(L, predictor, decoder, stream_of, counts, lo, hi, zs, corrupt, buf, 0, split,
                  group)
        on_split(np.take(buf[L.z0:L.z0 + split].reshape(split, slabs, -1), L.image_index, axis=2))
    _lockstep(L, predictor, decoder, stream_of, counts, lo, hi, zs, corrupt, buf, split, top,
              group)
    # np.take gathers the pixels out of the sheared planes several times faster than the
    # equivalent fancy index (75 M voxels: 0.14-0.25 against 1.1 s)
    return np.take(buf.reshape(zs + L.z0, slabs, -1)[L.z0:], L.image_index, axis=2)


def _lockstep(L: SkewLayout, predictor, decoder, stream_of, counts, lo, hi, zs, corrupt, buf,
              first: int, top: int, group: int = 1) -> None:
    """Decode slices ``[first, top)`` of the slabs into ``buf`` along the wavefront
    (``first`` a multiple of ``group``, the slices per stream group)."""
    flat = buf.reshape(-1)
    strides = tuple(st // buf.itemsize for st in buf.strides)    # in elements
    depth_ok = (np.arange(zs)[None, :] + L.dz[:, None]) >= 0          # (K, zs)
    bits = 1 << np.arange(L.hood.size, dtype=np.uint64)
    depth = depth_ok, [np.uint64(np.sum(bits[ok])) for ok in depth_ok.T]   # and as bit masks
    slabs_at = [int((counts > zl).sum()) for zl in range(top)]         # slabs with slice zl
    step_kernel = kernels.StepKernel.create(flat, _neighbour_offsets(L, strides), predictor,
                                            lo, hi, decoder, TOKEN_RANGE, RANGE_EDGE)
    # a step's coding work between the range decoders' calls in compiled calls too (format 5)
    fields = step_kernel is not None and decoder.fields is not None
    stream_of = [int(s) for s in stream_of]
    if fields:
        for step in _step_plan(L, flat.size, strides, depth[1], first, top, slabs_at,
                               stream_of, group):
            decoded = _decode_fields(step_kernel, decoder, step.runs, step.n, step.streams,
                                     step.ends, step.keep, corrupt, step.at)
            if step.dest is None and step.parts is not None:   # large slices, step by step
                _write_blocks(L, buf, step.parts, decoded)
                continue
            flat[_expand(step.runs.origin, step.runs.length) if step.dest is None
                 else step.dest] = decoded
            if step.ghost_to is not None:
                flat[step.ghost_to] = flat[step.ghost_from]
        return
    for _, parts in _steps(L, first, top, slabs_at):
        sizes = [m * L.tiles * (r1 - r0) for _, _, r0, r1, m in parts]
        streams, ends, keep, order = _segments(L, parts, sizes, stream_of, group)
        decoded = _decode_step(L, predictor, decoder, step_kernel, flat, strides, depth,
                               parts, sizes, sum(sizes), streams, ends, keep, lo, hi, [],
                               corrupt, order)
        _write_blocks(L, buf, parts, decoded)


def _write_blocks(L: SkewLayout, buf: np.ndarray, parts, decoded: np.ndarray) -> None:
    """A step's decoded values (in the lockstep's order) into ``buf``, part by part, with
    the copies into the ghost rows of the tiles above."""
    above = L.tiles - L.ntx     # tiles ntx.. have one above: tile k's is k - ntx (a slice)
    pos = 0
    for zl, tau, r0, r1, m in parts:
        size = m * L.tiles * (r1 - r0)
        block = decoded[pos:pos + size].reshape(m, L.tiles, r1 - r0)
        z = zl + L.z0
        buf[z, :m, :, tau + L.t0, r0 + L.y0:r1 + L.y0] = block
        if L.ghost_rows and r0 < L.ghost_rows and L.nty > 1:
            for r in range(r0, min(r1, L.ghost_rows)):
                buf[z, :m, :above, tau + L.a * L.th + L.t0, L.y0 + L.th + r] = \
                    block[:, L.ntx:, r - r0]
        pos += size


def _steps(L: SkewLayout, first: int, top: int, slabs_at: list[int]):
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


def _segments(L: SkewLayout, parts, sizes, stream_of, group: int):
    """A step's segments (each one stream's symbols: ``streams``, and where they end:
    ``ends``), which of its voxels are coded (``keep``: a list of masks, None without
    phantoms) and, for stream groups, its :class:`_GroupOrder` (else None)."""
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
        order = _GroupOrder(parts, sizes, reals, stream_of, group, L.tiles)
        streams, ends = order.streams, order.ends
    return streams, ends, keep, order


class _PlannedStep(NamedTuple):
    """One wavefront step of a compiled decoding, its voxels in symbol order: their runs and
    count, segments and coded mask (None: all). Stream groups put the symbols in an order of
    their own; then ``dest`` says where each voxel goes in the flat buffer, and ``ghost_to``
    and ``ghost_from`` which are copied into ghost rows (None: none). Otherwise (``dest``
    None) the values, in the lockstep's order, are written part by part
    (:func:`_write_blocks`), which costs less for large slices than an index per voxel."""

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


def _step_plan(L: SkewLayout, size: int, strides, depth_bits, first: int, top: int,
               slabs_at: list[int], stream_of: list[int], group: int):
    """The steps of decoding slices ``[first, top)`` (``slabs_at[zl]``: slabs holding slice
    ``zl``) in a buffer of ``size`` elements, ``strides``. Plans of slices in stream groups
    (small slices: a step of a few hundred to a few thousand voxels costs little more than
    its planning) are remembered within PLAN_CACHE_BYTES, since a node decodes many blobs of
    the same geometry; those of larger slices would save a few percent at most."""
    global _plan_bytes
    key = (L, size, strides, first, top, tuple(slabs_at[first:top]), tuple(stream_of), group)
    cached = _plans.get(key)
    if cached is not None:
        _plans.move_to_end(key)
        yield from cached[0]
        return
    voxels = sum(slabs_at[first:top]) * L.tiles * L.th * L.tw
    count = L.steps + L.b * (top - first - 1)
    remember = group > 1 and 5 * voxels + 2048 * count <= PLAN_CACHE_BYTES    # about its size
    if L.validity_cached:
        planned = _job_steps(L, size, strides, depth_bits, first, top, slabs_at, stream_of,
                             group, remember)
    else:       # very large slices: each step's validity made when it comes
        planned = (_planned(L, size, strides, depth_bits, parts, stream_of, group)
                   for _, parts in _steps(L, first, top, slabs_at))
    steps, held = [], 0
    for step in planned:
        if remember:
            held += step.nbytes
            remember = held <= PLAN_CACHE_BYTES
            steps.append(step)
        yield step
    if remember:
        while _plans and _plan_bytes + held > PLAN_CACHE_BYTES:
            _plan_bytes -= _plans.popitem(last=False)[1][1]
        _plans[key] = steps, held
        _plan_bytes += held


def _job_steps(L: SkewLayout, size: int, strides, depth_bits, first: int, top: int,
               slabs_at: list[int], stream_of: list[int], group: int, with_dest: bool
               ) -> list[_PlannedStep]:
    """:func:`_planned` for every step of a lockstep job at once, in whole-array operations
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
        keep = np.concatenate(reals)[_expand(at[tau] + tile * rows, rows)]
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
    dest = _expand(origin, rows).astype(np.int32 if size < 1 << 31 else np.int64) \
        if with_dest and group > 1 else None
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
        out.append(_PlannedStep(
            step_runs, at_, vb - va, stream[sa:sb].tolist(), (ends[sa:sb] - base).tolist(),
            None if keep is None else keep[va:vb], None, step_dest, ghost_to, ghost_from,
            hold))
    return out


def _expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
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
    source = _expand(origin, count)
    shift = -L.ntx * strides[2] + L.a * L.th * strides[3] + L.th
    bounds = np.r_[0, np.cumsum(count)]

    def copies(a: int, b: int):
        lo, hi = int(bounds[a]), int(bounds[b])
        if lo == hi:
            return None, None
        return source[lo:hi] + shift, source[lo:hi]
    return copies


def _planned(L: SkewLayout, size: int, strides, depth_bits, parts, stream_of, group: int
             ) -> _PlannedStep:
    """One step planned alone, from its ``parts`` (slices so large that the layout does not
    keep every step's validity; :func:`_job_steps` plans a job's steps together otherwise).
    Without stream groups its values are written part by part (``parts``)."""
    sizes = [m * L.tiles * (r1 - r0) for _, _, r0, r1, m in parts]
    streams, ends, keep, order = _segments(L, parts, sizes, stream_of, group)
    hold = []
    runs = _step_runs(L, strides, depth_bits, parts, hold)
    keep = None if keep is None else np.concatenate(keep)
    dest = ghost_to = ghost_from = None
    if order is not None:
        runs = order.runs(runs)
        keep = None if keep is None else keep[order.voxel_order]
        kind = np.int32 if size < 1 << 31 else np.int64    # half the memory of a kept plan
        dest = _expand(runs.origin, runs.length).astype(kind)
        if L.ghost_rows and L.nty > 1:
            ghost_to, ghost_from = _ghosts(L, strides, parts, kind)
    return _PlannedStep(runs, runs.addresses(), sum(sizes), streams, ends, keep, parts, dest,
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
        to.append((at - L.ntx * strides[2] + L.a * L.th * strides[3] + L.th).ravel())
    if not to:
        return None, None
    return np.concatenate(to).astype(kind), np.concatenate(source).astype(kind)


class _GroupOrder:
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


def _decode_fields(step_kernel, decoder, runs, n, streams, ends, keep, corrupt, at=None
                   ) -> np.ndarray:
    """A step's decoded values by the step kernel and the decoder's compiled fields
    (:meth:`StepDecoder.decode_fields`); phantom voxels (``keep`` False) are not coded and
    stay 0. ``at``: the runs' addresses, when known."""
    pred, j, rows, sh = step_kernel.predict(runs, n, at)
    if keep is None:
        decoded = decoder.decode_fields(streams, ends, rows, step_kernel.addresses)
    else:
        kept = [np.ascontiguousarray(a[keep]) for a in (pred, j, sh)]
        got = decoder.decode_fields(streams, ends, rows[keep], tuple(a.ctypes.data for a in kept))
        decoded = None
        if got is not None:
            decoded = np.zeros(n, np.int64)
            decoded[keep] = got
    if decoded is None:
        raise corrupt("decoded value outside the volume's value range: corrupt stream")
    return decoded


def _decode_step(L: SkewLayout, predictor, decoder, step_kernel, flat, strides, depth, parts,
                 sizes, n, streams, ends, keep, lo, hi, hold, corrupt, order=None
                 ) -> np.ndarray:
    """A step's decoded values where :meth:`StepDecoder.decode_fields` does not run (formats
    before 5, no compiled kernels); ``order``: the step's :class:`_GroupOrder` (format 6)."""
    segments = list(zip(streams, [0, *ends[:-1]], ends))
    rows_sh = None
    if step_kernel is not None:
        pred, j, *rows_sh = step_kernel.predict(_step_runs(L, strides, depth[1], parts, hold),
                                                n)
        if keep is not None or order is not None:  # phantoms are not coded: rows for the others
            rows_sh = None
    else:
        pred, j = _predict_step(L, predictor, flat, strides, depth, parts, sizes, lo, hi)
    if order is not None:
        decoded = _decode_step_values(decoder, segments, order.voxels(pred), order.voxels(j),
                                      order.keep(keep), n, None, lo, hi, corrupt)
        return order.restored(decoded)
    return _decode_step_values(decoder, segments, pred, j, keep, n, rows_sh, lo, hi, corrupt)


def _decode_step_values(decoder, segments, pred, j, keep, n, rows_sh, lo, hi, corrupt
                        ) -> np.ndarray:
    """Predictions plus decoded residuals of a step's voxels in symbol order (phantoms,
    ``keep`` False, stay 0)."""
    if keep is not None:
        keep = np.concatenate(keep)
        decoded = np.zeros(n, dtype=np.int64)
        if keep.any():
            decoded[keep] = pred[keep] + decoder.decode_step(segments, j[keep], pred[keep])
        coded = decoded[keep]     # (phantom voxels stay 0, which may lie outside the range)
    else:
        decoded = coded = pred + decoder.decode_step(segments, j, pred, rows_sh)
    if coded.min(initial=lo) < lo or coded.max(initial=hi) > hi:
        raise corrupt("decoded value outside the volume's value range: corrupt stream")
    return decoded


def _predict_step(L: SkewLayout, predictor, flat, strides, depth, parts, sizes, lo, hi):
    """Predictions and table rows of one wavefront step's voxels (``parts`` of slices in
    flight), in the order of the symbols: from the buffer's runs by the compiled kernel when
    there is one, else through a gathered ``(K, n)`` copy of the neighbours. ``depth``: which
    neighbours lie inside the slab at each slab slice, ``(K, zs)`` and as bit masks."""
    depth_ok, depth_bits = depth
    if hasattr(predictor, "uses_kernels") and predictor.uses_kernels(lo, hi):
        hold = []          # the validity arrays the runs point into
        runs = _step_runs(L, strides, depth_bits, parts, hold)
        feats = kernels.run_features(flat, runs, _neighbour_offsets(L, strides),
                                     predictor.tables.flat, predictor.kernel_network())
        if feats is not None:
            return predictor.kernel_outputs(feats, lo, hi)
    K = L.hood.size
    n = sum(sizes)
    values = np.empty((K, n), dtype=np.int32)
    valid = np.empty((K, n), dtype=bool)
    pos = 0
    for (zl, tau, r0, r1, m), size in zip(parts, sizes):
        z = zl + L.z0
        # one indexed read of all K neighbours (K sliced copies cost more in calls)
        index, lowest = _gather_index(L, strides, m)
        base = z * strides[0] + (tau + L.t0) * strides[3] + r0 + L.y0 + lowest
        values[:, pos:pos + size].reshape(K, m, L.tiles, r1 - r0)[...] = \
            flat[base:].take(index[..., :r1 - r0])
        vt = L.step_validity(tau)
        valid[:, pos:pos + size].reshape(K, m, -1)[...] = (vt & depth_ok[:, zl, None])[:, None]
        pos += size
    return predictor.predict(values, valid, lo, hi)


def _neighbour_offsets(L: SkewLayout, strides: tuple) -> np.ndarray:
    return L.dz * strides[0] + L.dtau * strides[3] + L.dy


RUN_CACHE_BYTES = 32 << 20   # per layout: the runs of every step of a few lockstep widths


def _step_runs(L: SkewLayout, strides, depth_bits, parts, hold: list) -> "kernels.Runs":
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
