"""The compaction worker: stable staged series -> coded stacks, verified, committed, unstaged.

For each series whose last instance arrived at least ``stable_age`` seconds ago: assemble stacks,
encode each with the volume codec, decode it again and check every instance rebuilds to its ingest
SHA-256, write the blobs durably, then commit blob rows and per-instance header bytes in one
transaction, and only then delete the staged files. Any failure leaves the series staged, deletes
the blobs written so far and marks the job failed with its reason and a retry time (backoff).
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select

import models
from models.api import SLAB_SLICES, adapts_by_default
from storage import header_pack
from storage.assembly import Stack, assemble, stack_order
from storage.blobstore import BlobStore, new_key
from storage.dataset_parts import (PIXEL_KEYWORDS, header_elements, parse_fields, pixel_layout,
                                   split)
from storage.errors import CommitOutcomeUnknown, UnparseableDatasetError
from storage.frame_order import FrameCycle, frame_cycle, instance_major, position_major
from storage.index import Blob, Index, Instance, Job, Series
from storage.instance_facts import MULTIFRAME, frame_places
from storage.removals import finish_removals, record_removals

log = logging.getLogger(__name__)


class VerificationError(RuntimeError):
    """A freshly written blob does not give back the staged bytes."""


@dataclass
class _Plan:
    """Blobs written for one series and the instance updates to commit with them."""

    blobs: list = field(default_factory=list)       # Blob rows (not yet added)
    updates: dict = field(default_factory=dict)     # instance id -> (blob key, fields)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


DEFERRED = "adaptation deferred"   # in codec_info: coded without adaptation to keep up
#: codec_info of an instance stored one by one because the volume codec did worse on its stack
CODEC_TRIED = "the volume codec did worse"
NOISE_CHECK_BYTES = 1 << 16   # stacks of this many bytes of pixels must code smaller to be kept
#: a stack whose middle image deflates (zlib level 1) to less than this share of the codec's
#: bytes per pixel byte is deflated in full too, and stored one instance at a time when that
#: is smaller (screenshots, dose reports: text on a flat ground, which LZ77 matches)
DEFLATE_GATE = 1.25
_MARK = f" {DEFERRED}"


def _deflated_smaller(volume: np.ndarray, pieces: list[np.ndarray], coded: int) -> str:
    """What deflating the pixels of each instance (``pieces``, zlib level 6, as they would be
    stored one by one: a repeat across instances is not found then) gives in all when that is
    less than ``coded`` bytes; "" otherwise. The volume's middle image deflated at level 1
    first rules out, in milliseconds, what deflates as poorly as CT and MR (about 0.45 of
    their bytes, the codec 0.3)."""
    middle = np.ascontiguousarray(volume[len(volume) // 2])
    if len(zlib.compress(middle, 1)) * volume.nbytes >= DEFLATE_GATE * coded * middle.nbytes:
        return ""
    deflated = sum(len(zlib.compress(np.ascontiguousarray(p), 6)) for p in pieces)
    return f"the {deflated} bytes its pixels deflate to" if deflated < coded else ""


def codec_info(info: dict, deferred: bool = False) -> str:
    """A blob row's description of a codec blob from its :func:`models.blob_info`: model
    name, model id and blob format (the rows of compactions before 2026-12-01 say only the
    model name, then "v"); with ``deferred``, that it was coded without the adaptation it
    would have had (see :meth:`Compactor.run_once`)."""
    text = f"{info['model']} {info['model_id'][:8]} format {info['format']}"
    return text + _MARK if deferred else text


def is_deferred(described: str | None) -> bool:
    """Whether a blob row's ``codec_info`` says its adaptation was deferred."""
    return _MARK in (described or "")


def undeferred(described: str) -> str:
    """A blob row's ``codec_info`` without the deferred mark."""
    return described.replace(_MARK, "")


def deferred_rows():
    """The SQL condition on :class:`Blob` rows whose adaptation was deferred."""
    return Blob.codec_info.contains(_MARK)


def _decoded_pieces(blob, slices: int, interleave: int):
    """The decoded slices of ``blob`` in instance order, piece by piece: streamed, or decoded
    whole and reordered for a position-major stack (a few small time points)."""
    if interleave > 1:
        return [instance_major(models.decode_volume(blob), interleave)]
    return (piece for _, piece in models.decode_stream(blob, 0, slices))


def _check_rebuilds(blob, parts: list, dtype, interleave: int = 1) -> None:
    """Decode ``blob`` and check that every instance of ``parts`` ((row, before, pixels,
    after), in stack order) rebuilds to its ingest SHA-256: piece by piece, the decoded volume
    never held whole (a multi-frame instance of a thousand frames is one stack), unless it is
    a position-major stack of ``interleave`` time points."""
    members = iter(parts)
    inst = hasher = None
    left = 0
    for piece in _decoded_pieces(blob, sum(p[2].shape[0] for p in parts), interleave):
        if piece.dtype != dtype:
            raise VerificationError("decoded volume differs from the staged pixels")
        while len(piece):
            if left == 0:
                inst, before, pixels, after = next(members)
                hasher, left = hashlib.sha256(before), pixels.shape[0]
            take, piece = piece[:left], piece[left:]
            hasher.update(np.ascontiguousarray(take, dtype=take.dtype.newbyteorder("<")))
            left -= len(take)
            if left == 0:
                hasher.update(after)
                if hasher.hexdigest() != inst.sha256:
                    raise VerificationError(f"instance {inst.sop_uid} does not rebuild exactly")
    if left or next(members, None) is not None:
        raise VerificationError("decoded volume differs from the staged pixels")


class Compactor:
    """Compress staged series of an archive.

    Parameters
    ----------
    index, blobs
        The archive's index and blob store.
    model : str
        Codec model name passed to :func:`models.encode_volume`.
    max_slices : int
        Largest stack coded as one blob.
    slab : int
        Slices per independently decodable slab (passed to :func:`models.encode_volume`).
    adapt : bool
        Let the codec fine-tune its model on large stacks (its default); False: never.
    """

    def __init__(self, index: Index, blobs: BlobStore, model: str = "default",
                 max_slices: int = 256, slab: int = SLAB_SLICES, adapt: bool = True):
        if not 1 <= slab <= 256:
            raise ValueError("codec slab must be between 1 and 256 slices")
        self.index, self.blobs, self.model, self.max_slices = index, blobs, model, max_slices
        self.slab, self.adapt = slab, adapt

    def ready_series(self, stable_age: float, now: float | None = None) -> list[int]:
        """Return ids of series with staged instances, stable for ``stable_age`` seconds and not
        waiting for a failed job's retry time."""
        now = time.time() if now is None else now
        with self.index.read() as s:
            staged = set(s.scalars(select(Instance.series_fk).where(
                Instance.staged_key.is_not(None)).distinct()))
            stable = set(s.scalars(select(Series.id).where(
                Series.last_received <= now - stable_age)))
            waiting = set(s.scalars(select(Job.series_fk).where(
                Job.state == "failed", Job.next_attempt > now)))
        return sorted((staged & stable) - waiting)

    def run_once(self, stable_age: float, now: float | None = None,
                 fast_backlog: int = 0) -> tuple[int, int]:
        """Compact every ready series once; return (series compacted, series failed).

        With ``fast_backlog`` > 0, a series coded while at least that many more wait is coded
        without the codec's per-volume adaptation (about three times faster), so that a burst
        of studies does not pile up behind it; its blobs are marked (:data:`DEFERRED`) for
        :meth:`storage.recode.Recoder.adapt_deferred` to code again when the node is idle."""
        done = failed = 0
        ready = self.ready_series(stable_age, now)
        for i, series_id in enumerate(ready):
            waiting = len(ready) - i - 1
            if self.compact_series(series_id, fast=0 < fast_backlog <= waiting):
                done += 1
            else:
                failed += 1
        return done, failed

    def compact_series(self, series_id: int, fast: bool = False) -> bool:
        """Compact the staged instances of one series; return True on success. ``fast``:
        without adaptation, the blobs marked for a later recode (see :meth:`run_once`)."""
        with self.index.read() as s:
            members = list(s.scalars(select(Instance).where(
                Instance.series_fk == series_id, Instance.staged_key.is_not(None))))
            series = s.get(Series, series_id)
        if not members or series is None:
            return True
        series_uid = series.series_uid
        job_id = self._start_job(series_id)
        if job_id is None:                  # the series was deleted meanwhile
            return True
        log.info("compacting series %s: %d staged instances", series_uid, len(members))
        plan = _Plan()
        try:
            stacks, singles = assemble(members, self.max_slices,
                                       cycles=self._frame_cycles(members))
            kept, tried = 0, set()  # stacks coded as volumes; the others go one by one
            for stack in stacks:
                if self._code_stack(stack, plan, fast):
                    kept += 1
                else:
                    singles = singles + list(stack.members)
                    tried.update(inst.id for inst in stack.members)
            for inst in singles:
                self._code_single(inst, plan, CODEC_TRIED if inst.id in tried else "")
            self._commit(plan, members, job_id)
        except CommitOutcomeUnknown as exc:   # the new blobs and the staged files both stay
            log.error("compaction of series %s: %s; its files stay for the next start", series_uid,
                      exc)
            return False
        except Exception as exc:
            for blob in plan.blobs:
                self.blobs.delete(blob.key)
            self._fail_job(job_id, f"{type(exc).__name__}: {exc}")
            log.error("compaction of series %s failed, left staged: %s", series_uid, exc)
            return False
        finish_removals(self.index, self.blobs, [inst.staged_key for inst in members])
        log.info("compacted series %s: %d instances in %d stacks + %d singles", series_uid,
                 len(members), kept, len(singles))
        return True

    def _frame_cycles(self, members: list) -> dict[str, FrameCycle]:
        """The frame cycle of each staged multi-frame instance (storage.frame_order.frame_cycle),
        read from its frames' functional groups."""
        found = {}
        for inst in members:
            if not inst.stack_format.startswith(MULTIFRAME + "|"):
                continue
            try:
                found[inst.sop_uid] = frame_cycle(frame_places(header_elements(
                    self.blobs.mapped(inst.staged_key), inst.transfer_syntax)))
            except UnparseableDatasetError as exc:
                log.info("frames of %s keep their order: %s", inst.sop_uid, exc)
        return found

    def _code_stack(self, stack: Stack, plan: _Plan, fast: bool = False) -> bool:
        """Code a stack's pixels as one volume blob into ``plan``; False (nothing planned)
        when a stack of at least NOISE_CHECK_BYTES of pixels would not code smaller than its
        pixels (noise-like data): its instances are then stored one by one
        (:meth:`_code_single`). Smaller stacks keep their blob whatever its size: there the
        container's own few hundred bytes, not the data, decide."""
        parts = []
        for inst in stack.members:
            data = self.blobs.mapped(inst.staged_key)      # the pixels stay in the page cache
            layout = pixel_layout(parse_fields(data, inst.transfer_syntax, PIXEL_KEYWORDS),
                                  inst.transfer_syntax)
            if layout is None or layout.offset != inst.pixel_offset:
                raise VerificationError(f"pixel layout of {inst.sop_uid} changed since ingest")
            parts.append((inst, *split(data, layout)))
        native = parts[0][2].dtype.newbyteorder("=")
        volume = parts[0][2] if len(parts) == 1 else np.concatenate([p[2] for p in parts])
        volume = volume.astype(native, copy=False)              # a copy only to swap bytes
        deferred = fast and self.adapt and adapts_by_default(volume.size, self.model)
        if deferred:
            log.info("coding a stack of %d instances without adaptation (more series waiting; "
                     "coded again when idle)", len(parts))
        parts, volume, how = self._coding_order(stack, parts, volume)
        interleave = how.interleave
        blob = models.encode_volume(position_major(volume, interleave), model=self.model,
                                    adapt=None if self.adapt and not deferred else False,
                                    **how.encode_options(self.slab))
        # a lone image is checked whatever its size: deflating it is the alternative
        if volume.nbytes >= NOISE_CHECK_BYTES or stack.slices == 1:
            beaten = "its bytes of pixels" if len(blob) >= volume.nbytes else \
                _deflated_smaller(volume, [p[2] for p in parts], len(blob))
            if beaten:
                log.info("a stack of %d instances (the first %s) coded to %d bytes, not below "
                         "%s: its instances are stored one by one", len(parts),
                         parts[0][0].sop_uid, len(blob), beaten)
                return False
        _check_rebuilds(blob, parts, volume.dtype, interleave)
        key, start, headers = new_key("b"), 0, {}
        for inst, before, pixels, after in parts:
            plan.updates[inst.id] = (key, dict(frame_start=start, header_before=b"",
                                               header_after=b""))
            headers[start] = (before, after)
            start += pixels.shape[0]
        info = models.blob_info(blob)
        stored = header_pack.wrap(headers, blob)
        if header_pack.unpack(stored) != headers:
            raise VerificationError("header pack does not give back the headers")
        self._put(plan, key, stored, header_pack.CODEC, volume.nbytes, dtype=volume.dtype.name,
                  shape=",".join(map(str, volume.shape)), slab=info["slab"],
                  interleave=interleave,
                  codec_info=header_pack.describe(codec_info(info, deferred),
                                                  len(stored) - len(blob)))
        return True

    def _coding_order(self, stack: Stack, parts: list, volume: np.ndarray):
        """(parts, volume, storage.frame_order.CodingOrder): the order a stack is coded in
        (:func:`storage.assembly.stack_order`), its parts and pixels in that order. A 4D
        stack's images of one position (time points, echoes, b-values) go together, a slab per
        position (the test fMRI: 5.9% fewer bits than slabs of 8, and faster), only where they
        differ less than neighbouring positions do; else a volume after the other."""
        how = stack_order(stack, volume)
        t = max(stack.repetitions if len(volume) == len(parts) else 1, stack.interleave)
        if how.why:
            log.info("%d images at each of %d places (the first %s): coded %s", t,
                     len(volume) // t, parts[0][0].sop_uid, how.why)
        if how.order is not None:
            parts, volume = [parts[i] for i in how.order], volume[how.order]
        return parts, volume, how

    def _code_single(self, inst, plan: _Plan, info: str = "") -> None:
        """Store one instance deflated (or raw when deflating does not shrink it); ``info``:
        its blob row's codec_info (CODEC_TRIED: the volume codec did worse)."""
        data = self.blobs.get(inst.staged_key)
        packed, codec = zlib.compress(data, 6), "zlib"
        if len(packed) >= len(data):
            packed, codec = data, "raw"
        elif _sha(zlib.decompress(packed)) != inst.sha256:
            raise VerificationError(f"zlib round trip of {inst.sop_uid} differs")
        key = new_key("b")
        plan.updates[inst.id] = (key, dict(frame_start=0, header_before=b"", header_after=b""))
        self._put(plan, key, packed, codec, len(data), codec_info=info)

    def _put(self, plan: _Plan, key: str, data: bytes, codec: str, raw: int, **extra) -> None:
        self.blobs.put(key, data)
        plan.blobs.append(Blob(key=key, codec=codec, raw_bytes=raw, stored_bytes=len(data),
                               sha256=_sha(data), created_at=time.time(), **extra))

    def _commit(self, plan: _Plan, members: list, job_id: int) -> None:
        self.index.write_checked(
            lambda s: self._write(s, plan, members, job_id),
            lambda s: s.scalar(select(Blob.id).where(           # this attempt's own blobs
                Blob.key.in_([b.key for b in plan.blobs])).limit(1)) is not None)

    def _write(self, s, plan: _Plan, members: list, job_id: int) -> None:
        by_key = {}
        for blob in plan.blobs:
            s.add(blob)
            by_key[blob.key] = blob
        s.flush()
        for inst in members:
            row = s.get(Instance, inst.id)
            if row is None or row.staged_key != inst.staged_key:
                raise VerificationError(f"instance {inst.sop_uid} changed during compaction")
            key, fields = plan.updates[inst.id]
            for name, value in fields.items():
                setattr(row, name, value)
            row.blob_fk, row.staged_key = by_key[key].id, None
        job = s.get(Job, job_id)
        if job is None:
            raise VerificationError("series deleted during compaction")
        job.state, job.reason, job.updated_at = "done", "", time.time()
        # the staged copies go once this commits, and surely (recovery finishes it): one left
        # behind would be indexed again at the next start
        record_removals(s, [inst.staged_key for inst in members])

    def _start_job(self, series_id: int) -> int | None:
        """Mark the series' compaction job running (made when missing); None when the series
        is gone (deleted)."""
        with self.index.write() as s:
            if s.get(Series, series_id) is None:
                return None
            job = s.scalar(select(Job).where(Job.series_fk == series_id, Job.kind == "compact",
                                             Job.state != "done"))
            if job is None:
                job = Job(series_fk=series_id, kind="compact", attempts=0)
                s.add(job)
            job.state, job.attempts, job.updated_at = "running", job.attempts + 1, time.time()
            s.flush()
            return job.id

    def _fail_job(self, job_id: int, reason: str) -> None:
        with self.index.write() as s:
            job = s.get(Job, job_id)
            if job is None or job.state == "done":   # deleted with its series; or another
                return                               # compactor (`compress --now`) did it
            backoff = min(3600.0, 30.0 * 2 ** (job.attempts - 1))
            job.state, job.reason = "failed", reason[:2000]
            job.updated_at = time.time()
            job.next_attempt = job.updated_at + backoff
