"""Public codec API: ``encode_volume``, ``decode_volume``, ``decode_slices``, ``blob_info``."""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory

import numpy as np

from models.codec import decode_slabs, encode_slab
from models.container import (DTYPES, VERSION, CorruptBlobError, band_spans, codes_two_stage,
                              pack, slab_payload, unpack_header)
from models import adapt as adaptation
from models import parallel, value_range
from models.registry import load_model, model_by_id
from models.value_range import ValueRange

log = logging.getLogger(__name__)

SLAB_SLICES = 8      # slices per independently decodable slab
TILE = (64, 256)     # rows, columns of the independent tiles a slice is cut into
# voxels a decoding job advances together at most (bounds working memory): four 8-slice slabs
# of 512 x 512. On a Zen 3 (AVX2), whole train volumes decoded about 10% faster than with two
# (chest CT 48 and 100 slices, MR A; two workers, alternating rounds; 12 and 16 M voxels no
# better; one worker alone: 2.0 against 1.7 M voxels/s). On a Zen 5
# (AVX-512), two slabs were 5-16% faster than eight and three or four no better; a limit in
# slabs instead made the 128 x 128 Siemens MR 22% slower (its wavefront steps are short, their
# fixed cost wants many slabs together)
LOCKSTEP_VOXELS = 1 << 23
PARALLEL_VOXELS = 1 << 22  # code on several processes from this many voxels on,
WARM_PARALLEL_VOXELS = 1 << 19  # or from this many when the worker processes already run,
# encode_volume, decode_slices and decode_volume on running workers from this many voxels on,
# when they make two jobs or more (slabs, bands): small volumes of several slabs decode
# 1.1-1.5x faster on two warm workers than here (64 x 64 x 48: 0.055 -> 0.040 s, 128 x 128 x
# 31: 0.127 -> 0.085 s, one 512 x 512 slice decoded alone 0.060 -> 0.042 s) and encode
# 1.2-1.6x faster (the field map 0.057 -> 0.036 s); one job goes faster here
SMALL_PARALLEL_VOXELS = 1 << 16
SPLIT_PARALLEL_VOXELS = 1 << 17  # or from this many in bands of several widths (format 3),
EVEN_SPLIT_PARALLEL_VOXELS = 1 << 19  # or this many in bands of one width
ADAPT_VOXELS = 1 << 20     # adapt the model to volumes from this many voxels on
WRITE_FORMAT = VERSION     # the blob format encode_volume writes (tests set older ones, 3 on)
SMALL_SLICE_VOXELS = 1 << 14   # slice bands of at most this many voxels share streams,
STREAM_GROUP_VOXELS = 1 << 17  # as many slices as make this many (at most a slab)


def encode_volume(volume: np.ndarray, model: str = "default", slab: int | None = None,
                  tile: tuple[int, int] = TILE, adapt: bool | None = None,
                  max_group: int | None = None) -> bytes:
    """Losslessly encode a ``(z, y, x)`` integer volume.

    Parameters
    ----------
    volume : ndarray of uint8, int8, uint16 or int16, shape (z, y, x), every dimension >= 1
    model : name of a shipped model (``models.registry.known_models()``)
    slab : slices per independently decodable slab; default: the model's ``preferred_slab``
        (64 for the paper models, which lean on many previous slices), else SLAB_SLICES
    tile : (rows, columns) of the independent tiles each slice is cut into; smaller tiles
        decode in fewer wavefront steps at a small cost in compression
    adapt : fine-tune the model on this volume and carry it in the blob (see models.adapt);
        default: for volumes of at least ADAPT_VOXELS voxels, when the model can; the paper
        models fit their one residual distribution to every volume (models.paper_table)
    max_group : at most this many slices per stream group (:func:`stream_group`; decoding a
        slice decodes its group): for a caller that reads single slices of every slab

    Returns
    -------
    bytes : a self-describing blob (see models.container)
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise ValueError(f"need a (z, y, x) volume with every dimension >= 1, got {vol.shape}")
    if vol.dtype.name not in DTYPES:
        raise ValueError(f"unsupported dtype {vol.dtype}; supported: {', '.join(DTYPES)}")
    predictor = load_model(model)
    if slab is None:
        slab = getattr(predictor, "preferred_slab", SLAB_SLICES)
    if not 1 <= slab <= 65535 or not all(1 <= t <= 65535 for t in tile):
        raise ValueError("slab and tile sizes must be between 1 and 65535")
    tile = (min(tile[0], vol.shape[1]), min(tile[1], vol.shape[2]))
    if adapt is None:
        adapt = adaptation.wants_adaptation(predictor, vol.size, ADAPT_VOXELS)
    # the paper models code within the dtype's range, as the paper's coder does
    values = ValueRange.of_dtype(vol.dtype) if predictor.kind.startswith("paper") \
        else value_range.scan(vol)
    embedded = b""
    adapted = adaptation.adapt(predictor, vol, slab, tile, values) \
        if adapt and adaptation.can_adapt(predictor) else None
    if adapted is not None:
        predictor, embedded = adapted, adaptation.embedded_bytes(adapted)
    two_stage = codes_two_stage(WRITE_FORMAT)
    group = stream_group(vol.shape[1], tile[1], min(slab, vol.shape[0], max_group or slab)) \
        if WRITE_FORMAT >= 6 else 1
    spans = band_spans(vol.shape[2], tile[1], WRITE_FORMAT)
    jobs = ((model, embedded, values, vol[z:z + slab, :, x0:x1], slab, tile, two_stage, group)
            for z in range(0, vol.shape[0], slab) for x0, x1 in spans)
    # payloads go into the blob as they come: a few slabs' in flight, not the whole volume's
    facts = (predictor.model_id, predictor.name, vol.dtype.name, vol.shape, slab, tile)
    several = -(-vol.shape[0] // slab) * len(spans) > 1
    if _parallel(vol.size) or (several and _parallel(vol.size, SMALL_PARALLEL_VOXELS)):
        # compaction is background work: a retrieval's decoding goes first
        payloads = parallel.imap(_encode_job, jobs, window=2 * parallel.worker_count(),
                                 first_rank=parallel.BACKGROUND)
        return pack(*facts, payloads, embedded, values=values, version=WRITE_FORMAT,
                    group=group)
    with parallel.one_thread():
        return pack(*facts, (_encode_band(predictor, *job[2:]) for job in jobs), embedded,
                    values=values, version=WRITE_FORMAT, group=group)


def stream_group(ny: int, band_columns: int, slab: int) -> int:
    """Slices per stream group for slices of ``ny`` rows in bands of ``band_columns``: small
    slices (bands of at most SMALL_SLICE_VOXELS: 128 x 128) share streams, as many as make
    STREAM_GROUP_VOXELS, at most ``slab`` (the decoder's range-decoder calls per wavefront
    step fall with the groups; decoding one slice decodes its group). Larger ones keep a
    stream each: at 256 x 256 groups of two decoded slower (the reordering of a step's
    voxels over several tile rows costs more than the calls it saves)."""
    band = ny * band_columns
    if band > SMALL_SLICE_VOXELS:
        return 1
    return max(1, min(slab, STREAM_GROUP_VOXELS // band))


def _encode_band(predictor, values: ValueRange, block: np.ndarray, slab: int, tile,
                 two_stage: bool, group: int = 1) -> bytes:
    """The payload of one slab's column band, coded within ``values`` (``two_stage``: blob
    format 5's tokens; ``group``: slices per stream group, format 6)."""
    return encode_slab(predictor, values.mapped(block), values.lo, values.hi, slab, tile,
                       two_stage=two_stage, group=group)


def _parallel(voxels: int, warm: int | None = None) -> bool:
    """Whether to code this many voxels on the worker processes: from PARALLEL_VOXELS on (worth
    starting them), or from ``warm`` (WARM_PARALLEL_VOXELS) on when they already run (a
    server's do)."""
    warm = WARM_PARALLEL_VOXELS if warm is None else warm
    return voxels >= PARALLEL_VOXELS or (voxels >= warm and parallel.running())


def _encode_job(job) -> bytes:
    model, embedded, *args = job
    predictor = load_model(model)
    if embedded:
        predictor = adaptation.with_embedded(predictor, embedded)
    return _encode_band(predictor, *args)


def _predictor(header):
    predictor = model_by_id(header.model_id, header.model_name)
    if header.embedded:
        predictor = adaptation.with_embedded(predictor, header.embedded)
    return predictor


def _open(blob: bytes):
    header, base = unpack_header(blob)
    return header, base, _predictor(header)


def decode_slices(blob: bytes, start: int, stop: int) -> np.ndarray:
    """Slices ``[start, stop)`` of the encoded volume, decoding only the slabs (and, in the first
    slabs, only the leading slices) that hold them. Equals ``decode_volume(blob)[start:stop]``."""
    header, base, predictor = _open(blob)
    nz, ny, nx = header.shape
    start, stop, _ = slice(start, stop).indices(nz)
    out = np.empty((max(stop - start, 0), ny, nx), dtype=header.dtype)
    if stop <= start:
        return out
    zs = header.slab
    counts = {i: min(zs, stop - i * zs) for i in range(start // zs, (stop - 1) // zs + 1)}
    for i, (x0, x1), part in _decoded_prefixes(blob, header, base, predictor, counts, out.size):
        z0 = max(start, i * zs)
        out[z0 - start:i * zs + len(part) - start, :, x0:x1] = part[z0 - i * zs:]
    return out


def decode_slab_slices(blob: bytes, k: int) -> np.ndarray:
    """Slice ``k`` of every slab that has one, in slab order, each slab decoded only up to
    it: ``decode_volume(blob)[k::slab]``. A volume coded a slab per position of a time
    series (time points position-major) gives one time point so."""
    header, base, predictor, with_k = _open_at_slab_slice(blob, k)
    _, ny, nx = header.shape
    counts = {i: k + 1 for i in range(with_k)}
    out = np.empty((len(counts), ny, nx), dtype=header.dtype)
    if not counts:          # a volume shorter than k + 1 slices
        return out
    work = sum(counts.values()) * ny * nx
    for i, (x0, x1), part in _decoded_prefixes(blob, header, base, predictor, counts, work):
        out[i, :, x0:x1] = part[k]
    return out


def _open_at_slab_slice(blob: bytes, k: int):
    """:func:`_open`, for slice ``k`` of the slabs (a ValueError when a slab has no such
    slice), and how many slabs have one."""
    header, base, predictor = _open(blob)
    if not 0 <= k < header.slab:
        raise ValueError(f"slice {k} of a slab of {header.slab}")
    return header, base, predictor, -(-(header.shape[0] - k) // header.slab)


def decode_with_slab_slices(blob: bytes, k: int):
    """Yield :func:`decode_slab_slices` ``(blob, k)``, then :func:`decode_volume` ``(blob)``,
    decoding every slice once. On the worker processes each slab's slices up to ``k`` (to the
    end of its stream group) are decoded first, and each job hands its slabs' ones over
    through shared memory before it goes on with the rest; decoded in this process (or
    without shared memory), slice ``k`` of every slab comes with the whole volume."""
    header, base, predictor, with_k = _open_at_slab_slice(blob, k)
    nz, ny, nx = header.shape
    zs = header.slab
    counts = {i: min(zs, nz - i * zs) for i in range(header.slabs)}
    workers = parallel.worker_count() if _parallel(nz * ny * nx) else 1
    plan = _decode_plan(sorted(counts), counts, header.bands, workers,
                        lockstep_slabs(zs, ny, nx))
    jobs = [_units_job(blob, header, base, counts, units) for units in plan]
    handed = False
    if workers > 1:
        parts, handed = yield from _points_first(jobs, plan, k, header, with_k)
    else:
        parts = [_decode_group(job, predictor) for job in jobs]
    out = np.empty(header.shape, dtype=header.dtype)
    for units, job_parts in zip(plan, parts):
        for (i, band), part in zip(units, job_parts):
            out[i * zs:i * zs + len(part), :, slice(*header.bands[band])] = part
    if not handed:
        yield out[k::zs]
    yield out


def _points_first(jobs: list, plan: list, k: int, header, with_k: int):
    """:func:`decode_with_slab_slices` on the worker processes: yields slice ``k`` of every
    slab that has one (the first ``with_k``) as soon as every job has published its slabs'
    first ``k + 1`` slices; returns the jobs' decoded slabs and whether it yielded."""
    _, ny, nx = header.shape
    slabs, split = header.slabs, k + 1
    flags = 8 * -(-len(jobs) // 8)      # a byte per job says its first slices are there
    shm = _shared_memory(flags + slabs * split * ny * nx * 4)
    futures = []
    try:
        if shm is not None:
            shm.buf[:flags] = bytes(flags)
            futures = [parallel.submit(_decode_publishing, (
                job, [(u, i) for u, (i, _) in enumerate(units)], slabs, j, shm.name, split, flags))
                for j, (job, units) in enumerate(zip(jobs, plan))]
        else:
            futures = [parallel.submit(_decode_group, job) for job in jobs]
        while shm is not None and not all(shm.buf[:len(jobs)]) \
                and not all(f is None or f.done() for f in futures):
            time.sleep(0.002)
        handed = shm is not None and all(shm.buf[:len(jobs)])
        if handed:
            firsts = np.ndarray((slabs, split, ny, nx), np.int32, shm.buf, flags)
            yield firsts[:with_k, k].astype(header.dtype)
            del firsts                  # the shared memory closes only without views on it
        return _collected(futures, jobs), handed
    finally:
        _abandon(futures, shm)


def _decoded_prefixes(blob: bytes, header, base: int, predictor, counts: dict, voxels: int):
    """``(slab, (x0, x1), slices)``: the first ``counts[slab]`` slices of the slabs' column
    bands, decoded on the worker processes when ``voxels`` are enough to be worth it."""
    zs, spans = header.slab, header.bands
    _, ny, nx = header.shape
    slabs = sorted(counts)
    workers = parallel.worker_count() if _parallel(voxels, SMALL_PARALLEL_VOXELS) or _split_bands(
        sum(counts.values()) * ny * nx, spans) else 1
    plan = _decode_plan(slabs, counts, spans, workers, lockstep_slabs(zs, ny, nx))
    if workers > 1 and len(plan) < 2:       # one job: here, without the round trip
        workers, plan = 1, _decode_plan(slabs, counts, spans, 1, lockstep_slabs(zs, ny, nx))
    # each job's payloads are copied (and CRC-checked) and its slices handed over as the
    # workers get to it: beside the caller's output, a few jobs' slices in memory
    jobs = (_units_job(blob, header, base, counts, units) for units in plan)
    if workers > 1:
        results = parallel.imap(_decode_group, jobs, window=2 * workers)
    else:
        results = (_decode_group(job, predictor) for job in jobs)
    for units, parts in zip(plan, results):
        for (i, band), part in zip(units, parts):
            yield i, spans[band], part


def _units_job(blob: bytes, header, base: int, counts: dict, units: list) -> tuple:
    """The job of :func:`_decode_group` for ``(slab, band)`` units of one band width: their
    payloads (copied and CRC-checked), slices wanted, the header and a band of that width."""
    return ([slab_payload(blob, header, base, i, band) for i, band in units],
            [counts[i] for i, _ in units], header, units[0][1])


def _split_bands(work: int, spans: list) -> bool:
    """Whether running workers should take a slab's bands apart, for ``work`` voxels to
    decode: bands of one width decode in one wavefront here, which is as fast as two
    processes for one 512 x 512 slice, and slower from two on (head CT, workers running:
    1 slice 0.23-0.36 s here against 0.24-0.27 s on two; 7 slices 1.19 against 0.75; in
    three alternating rounds, slices 2 and 3 of a slab 0.458 and 0.564 s with the threshold
    at four slices, 0.337 and 0.425 at two); bands of several widths take a wavefront each
    here."""
    if len(spans) < 2 or not parallel.running():
        return False
    uneven = len({x1 - x0 for x0, x1 in spans}) > 1
    return work >= (SPLIT_PARALLEL_VOXELS if uneven else EVEN_SPLIT_PARALLEL_VOXELS)


def lockstep_slabs(zs: int, ny: int, nx: int) -> int:
    """Slabs of ``zs`` slices of ``ny x nx`` that a job decodes together at most (per band,
    the same share of LOCKSTEP_VOXELS)."""
    return max(1, LOCKSTEP_VOXELS // (zs * ny * nx))


def _decode_plan(slabs: list[int], counts: dict, spans: list, workers: int,
                 cap: int) -> list[list]:
    """Decoding jobs, each a list of ``(slab, band)`` units of one band width decoded in
    lockstep: with several workers, a group of slabs' band per job (:func:`_lockstep_groups`),
    so that even one slab's bands share the workers; in this process, the bands of equal width
    of a group together (one wavefront for all, as a whole slab in formats 1 and 2)."""
    weights = [counts[i] for i in slabs]
    if workers > 1:
        groups = _lockstep_groups(slabs, weights, workers, cap, len(spans))
        return [[(i, band) for i in group] for group in groups for band in range(len(spans))]
    widths: dict[int, list[int]] = {}
    for band, (x0, x1) in enumerate(spans):
        widths.setdefault(x1 - x0, []).append(band)
    return [[(i, band) for band in bands for i in group] for bands in widths.values()
            for group in _lockstep_groups(slabs, weights, 1, cap, len(spans) // len(bands))]


def balanced_runs(items: list, weights: list[int], runs: int) -> list[list]:
    """Cut ``items`` into at most ``runs`` consecutive non-empty runs of about equal total
    weight (each cut where the running total is nearest its share)."""
    total, cuts, acc = sum(weights), [0], 0
    for i, w in enumerate(weights):
        share = total * len(cuts) / runs
        if len(cuts) < runs and acc > 0 and abs(acc - share) <= abs(acc + w - share):
            cuts.append(i)
        acc += w
    cuts.append(len(items))
    return [items[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def _lockstep_groups(slabs: list[int], counts: list[int], workers: int, cap: int,
                     bands: int = 1) -> list[list[int]]:
    """Slab groups, each decoded band by band in lockstep, balanced by slices (a partial last
    slab weighs less): as few as keep every worker busy (groups times ``bands`` a multiple of
    ``workers``) with at most ``cap`` slabs' worth of voxels in a group's band, so that
    the workers finish together."""
    step = workers // math.gcd(workers, bands)
    largest = cap * bands
    runs = step * -(-len(slabs) // (step * largest))
    while True:
        groups = balanced_runs(slabs, counts, runs)
        if max(map(len, groups)) <= largest:
            return groups
        runs += step


def decode_stream(blob: bytes, start: int, stop: int, head: int = 0):
    """Slices ``[start, stop)`` as a stream of ``(z0, slices)`` pieces in order, for a consumer
    that uses the first slices while the later ones decode (a C-GET sending instances).

    The pieces are slab groups (:func:`_stream_groups`): the first slab alone, then
    :func:`decode_slices`' lockstep groups, the last of them halved. A group's column bands
    (format 3) are decoded apart, so that the bands of the first slab share the workers. The
    worker processes decode the groups in parallel, a few ahead of the consumer.
    Concatenated, the pieces equal ``decode_slices(blob, start, stop)``. With ``head`` > 0,
    the first piece holds only slices ``[start, start + head)`` (at most the rest of the first
    slab): the workers decoding the first slab decode the slices up to there first, on their
    own, and hand them over before they go on with the rest of that slab (no slice is decoded
    twice); where shared memory has no room for them, they come with their slab.
    """
    header, base, predictor = _open(blob)
    nz, ny, nx = header.shape
    start, stop, _ = slice(start, stop).indices(nz)
    if stop <= start:
        return
    zs, spans = header.slab, header.bands
    left = [(i, min(zs, stop - i * zs)) for i in range(start // zs, (stop - 1) // zs + 1)]
    counts = dict(left)                                         # slices wanted of each slab
    workers = parallel.worker_count() if _parallel(4 * (stop - start) * ny * nx) else 1
    head = max(0, min(head, (start // zs + 1) * zs - start, stop - start))
    cap = lockstep_slabs(zs, ny, nx)
    groups = _stream_groups(left, workers, cap, len(spans))

    def job(units):     # built when needed
        return _units_job(blob, header, base, counts, units)

    split = start - groups[0][0][0] * zs + head if head else 0
    if workers > 1:
        jobs = (job([(i, band) for i, _ in group]) for group in groups
                for band in range(len(spans)))
        results = _parallel_results(jobs, split, (ny, nx), 2 * workers, len(spans))
    else:
        results = _local_results(groups, job, split, predictor, spans, cap)
    z_next = start
    for g, pixels in results:
        first = groups[g][0][0] * zs
        if first + len(pixels) > z_next:
            yield z_next, pixels[z_next - first:].astype(header.dtype, copy=False)
            z_next = first + len(pixels)


def _stream_groups(left: list[tuple[int, int]], workers: int, cap: int, bands: int
                   ) -> list[list[tuple[int, int]]]:
    """:func:`decode_stream`'s slab groups of ``(slab, slices wanted)``. With worker
    processes: the first slab alone (it arrives first), the rest in :func:`decode_slices`'
    lockstep groups (the fewest that keep every worker busy: each job pays a wavefront's
    per-step work however few slabs it holds), the last of them halved (the consumer's work on
    the last group is not overlapped with decoding); groups that grew from one slab per worker
    took 8% more of the workers' time (100-slice chest CT, six alternating rounds). Decoded in
    this process, groups still grow from one slab (:func:`_growing_groups`): its memory holds
    a group at a time, and a short stream's largest group stays small."""
    if workers <= 1:
        return _growing_groups(left, cap * bands)
    if len(left) < 2:
        return [left]
    counts = dict(left)
    rest = [i for i, _ in left[1:]]
    groups = [left[:1]] + [[(i, counts[i]) for i in group] for group in _lockstep_groups(
        rest, [counts[i] for i in rest], workers, cap, bands)]
    if len(groups[-1]) > 1:
        last = groups.pop()
        groups += balanced_runs(last, [n for _, n in last], 2)
    return groups


def _growing_groups(left: list[tuple[int, int]], largest: int) -> list[list[tuple[int, int]]]:
    """Groups growing from one slab to ``largest`` (doubling); what is left once it fits in the
    next group goes in two groups instead, balanced by slices."""
    groups, size = [], 1
    while len(left) > size:
        groups.append(left[:size])
        left = left[size:]
        size = min(2 * size, largest)
    return groups + balanced_runs(left, [n for _, n in left], 2) if left else groups


def _stitched(band_parts: list[list[np.ndarray]]) -> np.ndarray:
    """A group's slabs as one array (``band_parts[band][slab]``): each slab's bands side by
    side, the slabs one after the other, every voxel copied once (a C-GET's sender spent a
    sixth of its CPU joining bands and then slabs in two copies)."""
    first = band_parts[0]
    if len(band_parts) == 1 and len(first) == 1:
        return first[0]
    out = np.empty((sum(len(p) for p in first), first[0].shape[1],
                    sum(parts[0].shape[2] for parts in band_parts)), first[0].dtype)
    x0 = 0
    for parts in band_parts:
        z0, x1 = 0, x0 + parts[0].shape[2]
        for part in parts:
            out[z0:z0 + len(part), :, x0:x1] = part
            z0 += len(part)
        x0 = x1
    return out


def _by_group(results, bands: int, first: int = 0):
    """``(group, its slices)`` from the results of consecutive band jobs, ``bands`` per
    group, numbered from ``first``."""
    results = iter(results)
    for g in itertools.count(first):
        band_parts = list(itertools.islice(results, bands))
        if not band_parts:
            return
        yield g, _stitched(band_parts)


def _local_results(groups, job, split: int, predictor, spans, cap: int):
    """(group, its slices) in order, decoded here, a group's bands of one width in one
    wavefront (:func:`_decode_plan`); the first group's first slices come first."""
    for g, group in enumerate(groups):
        slabs = [i for i, _ in group]
        decoded = {}
        for units in _decode_plan(slabs, dict(group), spans, 1, cap):
            decoded.update(zip(units, _decode_group(job(units), predictor)))
        pixels = _stitched([[decoded[i, band] for i in slabs] for band in range(len(spans))])
        if g == 0 and split:
            yield 0, pixels[:split]
        yield g, pixels


def _parallel_results(jobs, split: int, plane: tuple[int, int], window: int, bands: int):
    """:func:`_local_results` on the worker processes (``jobs`` an iterator: the first jobs
    are submitted before the others are built). The workers decoding the first group's bands
    write their first ``split`` slices to shared memory as soon as they are decoded."""
    flags = 8 * -(-bands // 8)    # a byte per band says its slices are there
    shm = _shared_memory(flags + split * plane[0] * plane[1] * 4) if split else None
    if shm is None:     # the first slices then come with their whole group
        yield from _by_group(parallel.imap(_decode_group, jobs, window=window), bands)
        return
    futures, rest = [], None
    try:
        shm.buf[:flags] = bytes(flags)
        firsts = list(itertools.islice(jobs, bands))
        futures = [parallel.submit(_decode_publishing, (job, [(0, 0)], 1, band, shm.name,
                                                        split, flags))
                   for band, job in enumerate(firsts)]
        rest = parallel.imap(_decode_group, jobs, window=max(1, window - bands),
                             first_rank=bands)

        def published() -> bool:
            return all(shm.buf[b] for b in range(bands))

        while not published() and not all(f is None or f.done() for f in futures):
            time.sleep(0.002)
        handed = published()
        if handed:
            yield 0, np.ndarray((split,) + plane, np.int32, shm.buf, flags).copy()
        whole = _stitched(_collected(futures, firsts))
        if not handed:   # not published (decoded here, or by the flat fallback decoder)
            yield 0, whole[:split]
        yield 0, whole
        yield from _by_group(rest, bands, 1)
    finally:
        if rest is not None:
            rest.close()
        _abandon(futures, shm)


def _collected(futures: list, jobs: list) -> list:
    """Each job's decoded slabs from its future, or decoded here where no worker ran it (no
    pool, or a broken one)."""
    out = []
    for future, job in zip(futures, jobs):
        try:
            part = future.result() if future is not None else None
        except BrokenProcessPool:
            part = None
        out.append(part if part is not None else _decode_group(job))
    return out


def _abandon(futures: list, shm: shared_memory.SharedMemory | None) -> None:
    """Cancel the jobs not started yet and release the shared memory (a consumer that stopped
    early, or the end)."""
    for future in futures:
        if future is not None:
            future.cancel()
    if shm is not None:
        shm.close()
        shm.unlink()


def _shared_memory(size: int) -> shared_memory.SharedMemory | None:
    """New shared memory of ``size`` bytes with its room reserved (a write into a full
    ``/dev/shm`` would kill the writing process with SIGBUS), or None where there is none."""
    try:
        shm = shared_memory.SharedMemory(create=True, size=size)
    except OSError as exc:
        log.warning("no shared memory for a first slice (%s): it comes with its slab", exc)
        return None
    try:
        os.posix_fallocate(shm._fd, 0, size)
    except AttributeError:       # no descriptor to reserve with (not POSIX)
        pass
    except OSError as exc:
        log.warning("no room in shared memory for a first slice (%s): it comes with its slab",
                    exc)
        shm.close()
        shm.unlink()
        return None
    return shm


def _decode_publishing(args) -> list[np.ndarray]:
    """Worker side of :func:`_parallel_results` and :func:`_points_first`: decode the job's
    slabs (one band), writing the first ``split`` slices of some of them on the way into rows
    of the shared memory ``name`` (an int32 array ``(rows, split, ny, nx)`` after ``flags``
    bytes): ``places`` pairs a slab's place in the job with its row. Then byte ``flag`` says
    they are there."""
    job, places, rows, flag, name, split, flags = args
    shm = shared_memory.SharedMemory(name=name)   # the pool's processes share one tracker
    header, band = job[2], job[3]
    _, ny, nx = header.shape
    x0, x1 = header.bands[band]

    def publish(firsts):
        view = np.ndarray((rows, split, ny, nx), np.int32, shm.buf, flags)
        for slab, row in places:
            first = firsts[slab][:split]
            view[row, :len(first), :, x0:x1] = first
        del view                   # the shared memory closes only without views on it
        shm.buf[flag] = 1

    try:
        return _decode_group(job, split=split, on_split=publish)
    finally:
        shm.close()


def _decode_group(job, predictor=None, split: int = 0, on_split=None) -> list[np.ndarray]:
    """Decode one band of a group of slabs (runs in a worker process or in the caller)."""
    payloads, counts, header, band = job
    predictor = predictor or _predictor(header)
    values = header.values
    x0, x1 = header.bands[band]
    ny, nx = header.shape[1], x1 - x0
    if on_split is not None and values.substitutes:
        publish = on_split

        def on_split(firsts):
            publish([values.restore(first.copy()) for first in firsts])
    # in the volume's dtype (the decoder checked the range): half the bytes back from a worker
    with parallel.one_thread():
        return [values.restore(part.astype(header.dtype)) for part in decode_slabs(
            predictor, payloads, counts, ny, nx, values.lo, values.hi, header.slab,
            header.tile, split, on_split, header.within_range, header.two_stage,
            header.group)]


def decode_volume(blob: bytes) -> np.ndarray:
    """Decode a whole blob: the same dtype, shape and values that were encoded."""
    header, _ = unpack_header(blob)
    return decode_slices(blob, 0, header.shape[0])


def blob_info(blob: bytes) -> dict:
    """Header facts of a blob without decoding voxels."""
    header, _ = unpack_header(blob)
    return {"dtype": header.dtype, "shape": header.shape, "model": header.model_name,
            "model_id": header.model_id.hex(), "slab": header.slab, "tile": header.tile,
            "slabs": header.slabs, "bands": len(header.bands), "format": header.version,
            "stream_group": header.group}


def adapts_by_default(voxels: int, model: str = "default") -> bool:
    """Whether :func:`encode_volume` (``adapt`` None) fine-tunes ``model`` on a volume of
    ``voxels`` voxels."""
    predictor = load_model(model)
    return adaptation.can_adapt(predictor) and adaptation.wants_adaptation(predictor, voxels,
                                                                           ADAPT_VOXELS)


__all__ = ["encode_volume", "decode_volume", "decode_slices", "decode_slab_slices",
           "decode_with_slab_slices", "decode_stream", "blob_info", "CorruptBlobError"]
