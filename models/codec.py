"""Slab coding: a volume is cut into slabs of slices that decode independently; inside a slab
every slice (from blob format 6 on: every group of ``group`` consecutive slices) has its own
streams, and a decoder advances all slices of several slabs together along the wavefront
``t = x + a*y + b*z`` (see models.context).

A stream group's symbols are ordered as the decoder meets them: by the group's wavefront step
(slice ``k`` of the group at its step ``tau`` is at group step ``tau + b*k``), then by slice,
then as in one slice. A group decodes as a whole, so decoding the first slices of a slab
decodes up to the end of their group.

Slab payload: u32 slice count, then per stream group (per slice before format 6) u32
token-stream words and u32 uniform-stream words (and u32 tail-stream words from format 5
on), then the streams' words.
"""

from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np

from models import kernels
from models.context import Neighbourhood, slice_schedule, tiling
from models.skew import SkewLayout, decode_sheared
from models.entropy import (StepDecoder, encode_residuals, encode_slice, split_residuals,
                            token_bounds)
from models.container import CorruptBlobError

ENCODE_CHUNK = 1 << 14  # voxels per predictor call when encoding (keeps the work in cache)


class SlabGeometry:
    """Index arithmetic for slabs of ``zs`` slices of ``ny x nx``, cut into ``tile`` tiles, with
    a neighbourhood."""

    def __init__(self, hood: Neighbourhood, zs: int, ny: int, nx: int, tile: tuple[int, int]):
        self.hood, self.zs, self.ny, self.nx = hood, zs, ny, nx
        pz, py, px0, _ = hood.pad
        self.shape = hood.padded_shape(zs, ny, nx)
        self.plane = self.shape[1] * self.shape[2]
        self.size = self.shape[0] * self.plane
        y, x = np.divmod(np.arange(ny * nx, dtype=np.int64), nx)
        self.pixel_base = pz * self.plane + (y + py) * self.shape[2] + x + px0
        self.flat_offsets = hood.flat_offsets(ny, nx)
        a, self.b = hood.slopes
        tiles = tiling(ny, nx, *tile)
        self.schedule = slice_schedule(tiles, a)
        sched = self.schedule
        self.step_of = np.repeat(np.arange(sched.steps), np.diff(sched.bounds))
        depth = hood.pad[0]
        self.valid = [hood.validity(z, tiles) for z in range(depth + 1)]  # (K, pixels)
        self.depth = depth

    def validity(self, zl: int) -> np.ndarray:
        return self.valid[min(zl, self.depth)]

    def neighbours(self, flat: np.ndarray, zl, pixels: np.ndarray | None = None) -> np.ndarray:
        """Neighbour values ``(K, n)`` of slab slice(s) ``zl`` at pixel indices ``pixels`` (all
        pixels when None), gathered from ``flat``, the raveled :meth:`padded` slab."""
        base = self.pixel_base if pixels is None else self.pixel_base[pixels]
        return flat[self.flat_offsets[:, None] + (base + zl * self.plane)[None, :]]

    def padded(self, slab: np.ndarray) -> np.ndarray:
        pz, py, px0, _ = self.hood.pad
        buf = np.zeros(self.shape, dtype=np.int32)
        buf[pz:pz + slab.shape[0], py:py + self.ny, px0:px0 + self.nx] = slab
        return buf


@lru_cache(maxsize=8)
def geometry(hood: Neighbourhood, zs: int, ny: int, nx: int, tile: tuple[int, int]
             ) -> SlabGeometry:
    return SlabGeometry(hood, zs, ny, nx, tile)


def slab_contexts(hood: Neighbourhood, slab: np.ndarray, zs: int, tile: tuple[int, int]):
    """Yield ``(zl, values (K, pixels), valid (K, pixels))`` for each slice of a slab: the
    causal neighbours every voxel of the slice sees (what encoder and training both use)."""
    geo = geometry(hood, zs, slab.shape[1], slab.shape[2], tile)
    window = _SlabWindow.of(geo, slab)
    if window is None:
        flat = geo.padded(slab).ravel()
        for zl in range(slab.shape[0]):
            yield zl, geo.neighbours(flat, zl), geo.validity(zl)
        return
    for zl in range(slab.shape[0]):
        yield zl, window.values(zl), geo.validity(zl)


class _SlabWindow:
    """A slab in a zero-padded int32 buffer, rows past its last one included, so that every
    neighbour of a whole slice is one shifted window of it (what the flat layout's padding
    reads too), and a run of a row's neighbours is a run of the buffer."""

    def __init__(self, geo: SlabGeometry, slab: np.ndarray, below: int):
        pz, py, px0, _ = geo.hood.pad
        self.geo, self.ny, self.nx = geo, slab.shape[1], slab.shape[2]
        self.buf = np.zeros((geo.shape[0], geo.shape[1] + below, geo.shape[2]), dtype=np.int32)
        self.buf[pz:pz + slab.shape[0], py:py + self.ny, px0:px0 + self.nx] = slab
        rows, cols = self.buf.shape[1:]
        self.koff = np.array([dz * rows * cols + dy * cols + dx
                              for dz, dy, dx in geo.hood.offsets], np.int64)

    @classmethod
    def of(cls, geo: SlabGeometry, slab: np.ndarray) -> "_SlabWindow | None":
        """The window of ``slab``, or None where the neighbourhood reaches more rows below a
        voxel than the padding above holds (those rows would come from the next plane)."""
        below = max(0, max(dy for _, dy, _ in geo.hood.offsets))
        return None if below > geo.hood.pad[1] else cls(geo, slab, below)

    def values(self, zl: int) -> np.ndarray:
        """Neighbour values ``(K, pixels)`` of slice ``zl``."""
        pz, py, px0, _ = self.geo.hood.pad
        ny, nx = self.ny, self.nx
        out = np.empty((len(self.koff), ny, nx), dtype=np.int32)
        for k, (dz, dy, dx) in enumerate(self.geo.hood.offsets):
            out[k] = self.buf[pz + zl + dz, py + dy:py + dy + ny, px0 + dx:px0 + dx + nx]
        return out.reshape(len(self.koff), ny * nx)

    def runs(self, zl: int, y0: int, y1: int) -> "kernels.Runs":
        """Rows ``y0:y1`` of slice ``zl`` as runs of the buffer (models.kernels.Runs)."""
        pz, py, px0, _ = self.geo.hood.pad
        rows, cols = self.buf.shape[1:]
        valid = self.geo.validity(zl)
        ys = np.arange(y0, y1, dtype=np.int64)
        n = len(ys)
        return kernels.Runs(((pz + zl) * rows + py + ys) * cols + px0,
                            np.full(n, self.nx, np.int64),
                            (valid.ctypes.data + ys * self.nx).astype(np.uint64),
                            np.full(n, valid.strides[0], np.int64),
                            np.full(n, (1 << len(self.koff)) - 1, np.uint64))


def slice_predictions(predictor, slab: np.ndarray, zs: int, tile: tuple[int, int],
                      lo: int, hi: int):
    """Yield ``(zl, pred, j)`` for each slice of a slab: the predictor's rounded predictions
    and table rows on the contexts :func:`slab_contexts` gives. Where the compiled kernels
    run the predictor, they read each row's neighbours as runs of the padded slab instead of
    from a copy per neighbour (26 of each slice): the same outputs, 10-20% less time."""
    geo = geometry(predictor.neighbourhood, zs, slab.shape[1], slab.shape[2], tile)
    predict_runs = getattr(predictor, "predict_runs", None)
    window = _SlabWindow.of(geo, slab) if predict_runs is not None \
        and predictor.uses_kernels(lo, hi) else None
    if window is None:
        for zl, values, valid in slab_contexts(predictor.neighbourhood, slab, zs, tile):
            yield (zl, *_predict_chunked(predictor, values, valid, lo, hi))
        return
    flat, (ny, nx) = window.buf.ravel(), slab.shape[1:]
    rows = max(1, ENCODE_CHUNK // nx)
    for zl in range(slab.shape[0]):
        pred, j = np.empty(ny * nx, np.int64), np.empty(ny * nx, np.int64)
        for y0 in range(0, ny, rows):
            y1 = min(ny, y0 + rows)
            pred[y0 * nx:y1 * nx], j[y0 * nx:y1 * nx] = predict_runs(
                flat, window.runs(zl, y0, y1), window.koff, lo, hi)
        yield zl, pred, j


def encode_slab(predictor, slab: np.ndarray, lo: int, hi: int, zs: int,
                tile: tuple[int, int], within_range: bool = True,
                two_stage: bool | None = None, group: int = 1) -> bytes:
    """Code one slab (``slab.shape[0] <= zs`` slices) into its payload; ``within_range``:
    no probability for residuals outside ``[lo, hi]`` (blob format 2; format 1 had it off);
    ``two_stage``: tokens in two stages, three streams per slice (format 5, which codes
    within the range; by default with ``within_range``); ``group``: slices per stream group
    (format 6, two-stage only)."""
    if two_stage is None:
        two_stage = within_range
    elif two_stage and not within_range:
        raise ValueError("two-stage tokens are coded within the range (format 5)")
    if group < 1 or (group > 1 and not two_stage):
        raise ValueError("stream groups are coded with two-stage tokens (format 6)")
    geo = geometry(predictor.neighbourhood, zs, slab.shape[1], slab.shape[2], tile)
    perm = geo.schedule.perm
    lengths, words, pending = [], [], []
    for zl, pred, j in slice_predictions(predictor, slab, zs, tile, lo, hi):
        r = slab[zl].ravel().astype(np.int64) - pred
        pending.append([np.take(a, perm) for a in (r, j, pred)])   # faster than a[perm]
        if len(pending) < group and zl + 1 < slab.shape[0]:
            continue
        r, j, pred, step_of = _stream_group(pending, geo.step_of, geo.b)
        pending = []
        if two_stage and kernels.available():
            streams = encode_residuals(predictor.tables, r, j, pred, step_of, (lo, hi))
        else:
            shifts = predictor.tables.shifts
            sym = split_residuals(r, j, shifts)
            bounds = token_bounds(pred, shifts[j], lo, hi) if within_range else None
            streams = encode_slice(predictor.tables, sym, j, step_of, bounds, two_stage)
        lengths += [len(s) for s in streams]
        words += streams
    head = struct.pack(f"<I{len(lengths)}I", slab.shape[0], *lengths)
    return head + b"".join(w.tobytes() for w in words)


def _stream_group(slices: list, step_of: np.ndarray, b: int):
    """``(r, j, pred, step)`` of a stream group from its slices' ``(r, j, pred)`` (each in
    wavefront order): ordered by group step (slice ``k``'s steps shifted by ``b*k``), then
    slice, then place."""
    if len(slices) == 1:
        return (*slices[0], step_of)
    steps = np.concatenate([step_of + b * k for k in range(len(slices))])
    order = np.argsort(steps, kind="stable")
    return tuple(np.concatenate(col)[order] for col in zip(*slices)) + (steps[order],)


def _predict_chunked(predictor, values, valid, lo, hi, chunk: int = ENCODE_CHUNK):
    """``predictor.predict`` in cache-sized pieces (rows are independent: same result)."""
    n = values.shape[1]
    if n <= chunk:
        return predictor.predict(values, valid, lo, hi)
    pred, j = np.empty(n, np.int64), np.empty(n, np.int64)
    for a in range(0, n, chunk):
        pred[a:a + chunk], j[a:a + chunk] = predictor.predict(
            values[:, a:a + chunk], valid[:, a:a + chunk], lo, hi)
    return pred, j


def _slice_streams(payload: bytes, count: int, per: int = 2, group: int = 1):
    """The streams of the stream groups (``group`` slices each; the last may hold fewer)
    that the first ``count`` slices of a payload lie in, ``per`` streams a group."""
    n = slab_slices(payload)
    if n < count:
        raise CorruptBlobError("slab holds fewer slices than its header says")
    groups = -(-n // group)
    try:
        lengths = struct.unpack_from(f"<{per * groups}I", payload, 4)
    except struct.error:
        raise CorruptBlobError("slab payload truncated") from None
    words = np.frombuffer(payload, dtype="<u4", offset=4 + 4 * per * groups)
    if len(words) != sum(lengths):
        raise CorruptBlobError("slab payload length does not match its stream table")
    ends = np.cumsum(lengths)
    starts = ends - np.array(lengths)
    return [tuple(words[starts[k]:ends[k]] for k in range(per * i, per * (i + 1)))
            for i in range(-(-count // group))]


def slab_slices(payload: bytes) -> int:
    """How many slices a slab payload holds."""
    try:
        return struct.unpack_from("<I", payload, 0)[0]
    except struct.error:
        raise CorruptBlobError("slab payload truncated") from None


def _step_decoder(predictor, payloads, counts, lo: int, hi: int, within_range: bool,
                  two_stage: bool | None, group: int = 1) -> StepDecoder:
    """The range decoder over the wanted slices' streams of ``payloads``, in order, coded as
    :func:`encode_slab` says (``two_stage`` None: with ``within_range``)."""
    two_stage = within_range if two_stage is None else two_stage
    per = 3 if two_stage else 2
    streams = [s for p, c in zip(payloads, counts)
               for s in _slice_streams(p, int(c), per, group)]
    return StepDecoder(predictor.tables, streams, (lo, hi) if within_range else None,
                       two_stage)


@lru_cache(maxsize=8)
def skew_layout(hood: Neighbourhood, ny: int, nx: int, tile: tuple[int, int]) -> SkewLayout:
    return SkewLayout(hood, ny, nx, tile)


def decode_slabs(predictor, payloads: list[bytes], counts: list[int], ny: int, nx: int,
                 lo: int, hi: int, zs: int, tile: tuple[int, int], split: int = 0,
                 on_split=None, within_range: bool = True, two_stage: bool | None = None,
                 group: int = 1) -> list[np.ndarray]:
    """Decode several slabs in lockstep; ``counts[g]`` is how many leading slices of slab
    ``g`` are wanted (slices after their stream group are never touched). With ``split`` > 0
    and ``on_split``, the first ``split`` slices of every slab are decoded first (up to the
    end of their stream group) and handed to ``on_split`` (a list, one ``(split, ny, nx)``
    int32 array per slab) before the rest. ``within_range``, ``two_stage`` and ``group`` as
    the slabs were encoded (see :func:`encode_slab`)."""
    layout = skew_layout(predictor.neighbourhood, ny, nx, tuple(tile))
    wanted = [int(c) for c in counts]
    counts = _group_counts(payloads, wanted, group, zs)
    if not layout.supported:
        parts = decode_slabs_flat(predictor, payloads, counts, ny, nx, lo, hi, zs, tile,
                                  within_range, two_stage, group)
        return [part[:c] for part, c in zip(parts, wanted)]
    counts = np.asarray(counts)
    order = np.argsort(-counts, kind="stable")  # the lockstep wants non-increasing counts
    stream_of = np.cumsum([0] + [-(-int(counts[g]) // group) for g in order])
    decoder = _step_decoder(predictor, [payloads[g] for g in order], counts[order], lo, hi,
                            within_range, two_stage, group)
    hand = None
    if on_split is not None:
        where, handed = np.argsort(order), split

        def hand(first):     # (split, slabs in lockstep order, ny*nx) -> per slab, given order
            on_split([first[:handed, i].reshape(-1, ny, nx) for i in where])
        split = -(-split // group) * group     # to the end of a stream group
    vol = decode_sheared(layout, predictor, decoder, stream_of, counts[order], lo, hi, zs,
                         CorruptBlobError, split, hand, group)
    out = [None] * len(payloads)
    for i, g in enumerate(order):
        out[g] = vol[:wanted[g], i].reshape(-1, ny, nx)
    return out


def _group_counts(payloads: list[bytes], counts: list[int], group: int, zs: int) -> list[int]:
    """Slices to decode of each slab (of at most ``zs``) for its first ``counts`` slices: to
    the end of their stream group (where a payload holds fewer slices than wanted,
    :func:`_slice_streams` says so)."""
    if group == 1:
        return counts
    held = [slab_slices(p) for p in payloads]
    if max(held, default=0) > zs:
        raise CorruptBlobError("a slab holds more slices than the blob's slab size")
    return [max(c, min(n, -(-c // group) * group)) for n, c in zip(held, counts)]


def decode_slabs_flat(predictor, payloads: list[bytes], counts: list[int], ny: int, nx: int,
                      lo: int, hi: int, zs: int, tile: tuple[int, int],
                      within_range: bool = True, two_stage: bool | None = None,
                      group: int = 1) -> list[np.ndarray]:
    """:func:`decode_slabs` by gathering neighbours from a padded volume: the reference the
    sheared decoder is tested against, and the fallback for geometries it does not cover
    (``counts`` whole stream groups, or up to a slab's end)."""
    geo = geometry(predictor.neighbourhood, zs, ny, nx, tile)
    decoder = _step_decoder(predictor, payloads, counts, lo, hi, within_range, two_stage,
                            group)
    # stream index of (slab g, group 0)
    stream_of = np.cumsum([0] + [-(-int(c) // group) for c in counts])
    buf = np.zeros((len(payloads), geo.size), dtype=np.int32)
    flat = buf.ravel()
    sched = geo.schedule
    counts = np.asarray(counts)
    slab_base = np.arange(len(payloads), dtype=np.int64) * geo.size
    for t in range(sched.steps + geo.b * (int(counts.max()) - 1)):
        pieces = []     # (stream, slice, slab): a stream's pieces one after the other
        for zl in range(int(counts.max())):
            tau = t - geo.b * zl
            if tau < 0 or tau >= sched.steps:
                continue
            pix = sched.perm[sched.bounds[tau]:sched.bounds[tau + 1]]
            if len(pix):
                pieces += [(stream_of[g] + zl // group, zl, g, pix)
                           for g in np.flatnonzero(counts > zl)]
        if not pieces:
            continue
        pieces.sort(key=lambda p: p[:2])
        idx = np.concatenate([geo.pixel_base[pix] + zl * geo.plane + slab_base[g]
                              for _, zl, g, pix in pieces])
        valid = np.concatenate([geo.validity(zl)[:, pix] for _, zl, _, pix in pieces], axis=1)
        segments, n = [], 0
        for stream, _, _, pix in pieces:
            if segments and segments[-1][0] == stream:
                segments[-1] = (stream, segments[-1][1], n + len(pix))
            else:
                segments.append((stream, n, n + len(pix)))
            n += len(pix)
        values = flat[geo.flat_offsets[:, None] + idx[None, :]]
        pred, j = predictor.predict(values, valid, lo, hi)
        decoded = pred + decoder.decode_step(segments, j, pred)
        if decoded.min(initial=lo) < lo or decoded.max(initial=hi) > hi:
            raise CorruptBlobError("decoded value outside the volume's value range: corrupt stream")
        flat[idx] = decoded
    pz, py, px0, _ = predictor.neighbourhood.pad
    out = buf.reshape((len(payloads),) + geo.shape)
    return [out[g, pz:pz + c, py:py + ny, px0:px0 + nx] for g, c in enumerate(counts)]
