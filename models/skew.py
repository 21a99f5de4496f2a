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
What each step reads, decodes and writes is planned by :mod:`models.step_plan`.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from models import kernels, step_plan
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
        for step in step_plan.plan(L, flat.size, strides, depth[1], first, top, slabs_at,
                                   stream_of, group):
            decoded = _decode_fields(step_kernel, decoder, step.runs, step.n, step.streams,
                                     step.ends, step.keep, corrupt, step.at)
            if step.dest is None and step.parts is not None:   # large slices, step by step
                _write_blocks(L, buf, step.parts, decoded)
                continue
            flat[step_plan.expand(step.runs.origin, step.runs.length) if step.dest is None
                 else step.dest] = decoded
            if step.ghost_to is not None:
                flat[step.ghost_to] = flat[step.ghost_from]
        return
    for _, parts in step_plan.steps(L, first, top, slabs_at):
        sizes = [m * L.tiles * (r1 - r0) for _, _, r0, r1, m in parts]
        streams, ends, keep, order = step_plan.segments(L, parts, sizes, stream_of, group)
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


def _decode_fields(step_kernel, decoder, runs, n, streams, ends, keep, corrupt, at
                   ) -> np.ndarray:
    """A step's decoded values by the step kernel and the decoder's compiled fields
    (:meth:`StepDecoder.decode_fields`); phantom voxels (``keep`` False) are not coded and
    stay 0. ``at``: the runs' addresses (models.kernels.Runs.addresses)."""
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
    before 5, no compiled kernels); ``order``: the step's
    :class:`models.step_plan.GroupOrder` (format 6)."""
    segments = list(zip(streams, [0, *ends[:-1]], ends))
    rows_sh = None
    if step_kernel is not None:
        runs = step_plan.step_runs(L, strides, depth[1], parts, hold)
        pred, j, *rows_sh = step_kernel.predict(runs, n)
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
        runs = step_plan.step_runs(L, strides, depth_bits, parts, hold)
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
