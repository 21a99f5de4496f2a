"""Byte-exact reconstruction of stored instances, with a bounded cache of decoded slabs.

A staged instance is read back as is. A compacted one is its header bytes with the decoded pixel
words spliced in; a general-codec one is inflated. Either way the SHA-256 recorded at ingest is
checked before the bytes are returned.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from sqlalchemy import bindparam, select

import models
from models import parallel
from storage import header_pack
from storage.blobstore import BlobStore
from storage.dataset_parts import le_bytes, spliced
from storage.errors import InstanceNotFoundError, IntegrityError
from storage.frame_order import instance_major
from storage.index import Blob, Index, Instance

log = logging.getLogger(__name__)
SLAB = 16  # slices decoded together and cached as one entry, when the blob names no slab
AHEAD = 24    # most slabs a prefetch decodes before the senders have taken them
HEADER_PACKS = 4  # unpacked header packs kept (a pack holds a whole stack's headers)
WHOLE = "whole"   # the slab-cache entry of a position-major stack, decoded whole
POINT = "point"   # the slab-cache entries of one time point of such a stack


@dataclass(frozen=True)
class StoredInstance:
    """An instance as received: its SOP class, transfer syntax and dataset bytes (no File Meta)."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    data: bytes


@dataclass(frozen=True)
class StoredHeader:
    """An instance's attributes without decoding its pixels: ``data`` is its dataset bytes,
    whole for one kept as received, else up to and into its Pixel Data element; ``trailer``
    the bytes of the elements after the pixel data where ``data`` stops short of them (None:
    ``data`` is whole and holds them)."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    data: bytes
    trailer: bytes | None = None


@dataclass(frozen=True)
class StoredParts:
    """An instance as received, its dataset bytes in consecutive parts (header bytes and views
    of decoded pixel words), so that a large instance is never copied into one object."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    parts: tuple

    def joined(self) -> StoredInstance:
        """The same instance with its bytes in one object."""
        data = self.parts[0] if len(self.parts) == 1 and isinstance(self.parts[0], bytes) \
            else b"".join(self.parts)
        return StoredInstance(self.sop_uid, self.sop_class_uid, self.transfer_syntax, data)


class SlabCache:
    """Least-recently-used cache of decoded slabs (or a decoded prefix of one), bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict = {}       # key -> Future of the load in progress

    def peek(self, key):
        """Return the cached value of ``key`` (most recently used now) or None."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value) -> None:
        """Cache ``value`` when it fits, replacing a shorter prefix of the same slab."""
        with self._lock:
            old = self._items.get(key)
            if old is not None and len(old) >= len(value):
                return
            if value.nbytes > self.max_bytes:
                return
            if old is not None:
                self.used -= self._items.pop(key).nbytes
            self._items[key] = value
            self.used += value.nbytes
            while self.used > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.used -= evicted.nbytes

    def get(self, key, load):
        """Return the cached value of ``key`` or ``load()`` it (and cache it when it fits).
        Concurrent callers missing the same key share one load: a viewer asking for the
        frames of several instances of one slab at once decodes that slab once."""
        value = self.peek(key)
        if value is not None:
            return value
        with self._lock:
            loading = self._loading.get(key)
            mine = loading is None
            if mine:
                loading = self._loading[key] = Future()
        if not mine:
            return loading.result()
        try:
            value = load()
            self.put(key, value)
            loading.set_result(value)
            return value
        except BaseException as exc:
            loading.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def discard(self, key) -> None:
        """Drop ``key``'s entry, if cached (a part made redundant by a whole)."""
        with self._lock:
            value = self._items.pop(key, None)
            if value is not None:
                self.used -= value.nbytes

    def load_in_turn(self, keys: tuple, values) -> bool:
        """Load ``keys`` from one iterable, ``values``, that gives their values in that order
        (one decode giving a first part early, then the whole), concurrent callers of
        :meth:`get` for any of them waiting for theirs. False, loading nothing, when one of
        them is cached or being loaded already."""
        with self._lock:
            if any(key in self._items or key in self._loading for key in keys):
                return False
            futures = [self._loading.setdefault(key, Future()) for key in keys]
        done = 0
        try:
            for key, future, value in zip(keys, futures, values):
                self.put(key, value)
                future.set_result(value)
                done += 1
            if done < len(keys):
                raise RuntimeError(f"{len(keys)} values wanted, {done} given")
        except BaseException as exc:
            for future in futures[done:]:
                future.set_exception(exc)
            raise
        finally:
            with self._lock:
                for key in keys:
                    self._loading.pop(key, None)
        return True


@dataclass
class _Step:
    """One decode of a prefetch plan: slices [lo, hi) of a blob, cut into per-slab entries."""

    key: str
    step: int
    lo: int
    hi: int
    head: int = 0   # first slices sent as a piece of their own (the first instance's image)
    interleave: int = 1   # > 1: a position-major stack, decoded whole (lo, hi unused), after
    # its time point ``head - 1`` when ``head`` (the first instance's)


class _Coded(NamedTuple):
    """Where a retrieval's instance lies in a coded stack (:meth:`Reconstructor.plan`)."""

    blob_id: int
    frame_start: int
    frames: int
    key: str
    depth: int      # slices of the stack
    slab: int
    order: int      # the blob's interleave: > 1 for time points coded position-major


class _Moved(Exception):
    """An instance's stored file is gone: it was moved after the index said where it was."""


class _BlobRef(NamedTuple):
    key: str
    codec: str
    shape: str
    slab: int
    interleave: int = 1


# One Core statement per retrieved instance (an ORM query and its lazy load of the blob took
# about 3 ms of the sender's CPU per instance here)
_LOCATION = select(
    Instance.sop_uid, Instance.sop_class_uid, Instance.transfer_syntax, Instance.sha256,
    Instance.staged_key, Instance.frame_start, Instance.frames, Instance.header_before,
    Instance.header_after, Blob.key.label("blob_key"), Blob.codec, Blob.shape, Blob.slab,
    Blob.interleave,
).outerjoin(Blob, Instance.blob_fk == Blob.id)
_LOCATE = _LOCATION.where(Instance.sop_uid == bindparam("p_sop_uid"))
_LOCATE_MANY = _LOCATION.where(Instance.sop_uid.in_(bindparam("p_sop_uids", expanding=True)))


def _as_received(inst) -> bool:
    """Whether a located instance is kept as received (staged, raw or deflated), not coded."""
    return inst.staged_key is not None or inst.codec not in header_pack.VOLUME_CODECS


class Prefetch:
    """A background thread decoding, in sending order, the slabs a retrieval will need.

    Each step streams a run of slabs from the codec's worker processes (models.decode_stream:
    the first slab alone, then lockstep groups), so the senders send each slab as soon as
    it is decoded while the workers decode the next ones. The first step starts with a piece of
    the slices up to the first instance only (its image goes out after one slice's decode, not a
    slab's): the worker decoding the first slab decodes those slices first, hands them over and
    then finishes the slab, while the other starts on the next slabs. :meth:`Reconstructor.get`
    waits for a slab the plan is decoding rather than decoding it twice.
    """

    def __init__(self, owner: "Reconstructor", steps: list[_Step]):
        self.owner, self.steps = owner, steps
        self.cancelled = False
        self.consumed: set = set()       # planned slabs the senders have taken
        self.finished: set = set()       # planned slabs decoded for the last time
        self.thread = threading.Thread(target=self._run, name="voxarc-prefetch", daemon=True)

    def cancel(self) -> None:
        """Stop after the current step (the retrieval ended early)."""
        self.cancelled = True

    def _run(self) -> None:
        owner, blobs, ahead = self.owner, {}, 0
        try:
            for n, st in enumerate(self.steps):
                if st.interleave > 1:
                    ref = _BlobRef(st.key, "", "", st.step, st.interleave)
                    if st.head:
                        owner._point_then_whole(ref, st.head - 1)
                    owner._whole_stack(ref)
                    owner._points.pop(st.key, None)
                    if self.cancelled:
                        return
                    continue
                later = self.steps[n + 1:]
                data = blobs.get(st.key)
                if data is None:
                    blobs.clear()
                    data = blobs[st.key] = header_pack.coded_view(owner.blobs.get(st.key))
                pieces = models.decode_stream(data, st.lo, st.hi, head=st.head)
                for z0, pixels in pieces:
                    end = z0 + len(pixels)
                    for slab in range(z0 // st.step, (end - 1) // st.step + 1):
                        lo = slab * st.step
                        complete = min(lo + st.step, st.hi) <= end
                        self._cache_piece((st.key, slab), lo, st.step, z0, pixels)
                        last = complete and all(
                            s.key != st.key or (s.hi - 1) // s.step < slab for s in later)
                        owner._done(self, (st.key, slab), final=last)
                        ahead += complete
                    with owner._cond:       # stay at most AHEAD slabs ahead of the senders
                        while ahead - len(self.consumed) > AHEAD and not self.cancelled:
                            owner._cond.wait(1.0)
                    if self.cancelled:
                        return
        except Exception:   # the senders decode on demand instead (and report the damage)
            log.exception("prefetch of %d decode steps stopped", len(self.steps))
        finally:
            owner._release(self)

    def _cache_piece(self, key, lo: int, step: int, z0: int, pixels) -> None:
        """Cache the slices of a decoded piece (slices from ``z0``) that fall in the slab
        ``key`` (slices from ``lo``), after the ones cached before when the piece continues it."""
        part = pixels[max(lo, z0) - z0:lo + step - z0]
        if z0 > lo:
            before = self.owner.cache.peek(key)
            if before is None or len(before) != z0 - lo:
                return                # its first slices were evicted: senders decode it
            part = np.concatenate([before, part])
        self.owner.cache.put(key, part)


class Reconstructor:
    """Give back stored instances byte for byte.

    Parameters
    ----------
    index, blobs
        The archive's index and blob store.
    cache_bytes : int
        Budget of the decoded-slab cache.
    """

    def __init__(self, index: Index, blobs: BlobStore, cache_bytes: int = 256 << 20):
        self.index, self.blobs = index, blobs
        self.cache = SlabCache(cache_bytes)
        self._cond = threading.Condition()
        self._planned: dict = {}      # (blob key, slab) -> prefetch decoding it
        self._header_packs: dict = {}  # blob key -> unpacked header pack, oldest first
        self._points: dict = {}       # blob key -> the time point a plan decodes first

    def plan(self, sop_uids: list[str]) -> tuple[list[str], Prefetch | None]:
        """Order ``sop_uids`` for sending (slab by slab through each compressed stack) and start
        decoding their slabs in that order in the background (a position-major stack whole).

        Returns
        -------
        (ordered uids, prefetch or None)
            Call ``prefetch.cancel()`` when the retrieval stops early.
        """
        rows = {}
        with self.index.read() as s:
            for i in range(0, len(sop_uids), 500):
                for uid, fs, frames, key, codec, shape, slab, bid, order in s.execute(
                        select(Instance.sop_uid, Instance.frame_start, Instance.frames, Blob.key,
                               Blob.codec, Blob.shape, Blob.slab, Blob.id, Blob.interleave)
                        .outerjoin(Blob, Instance.blob_fk == Blob.id)
                        .where(Instance.sop_uid.in_(sop_uids[i:i + 500]),
                               Instance.staged_key.is_(None))):
                    if codec in header_pack.VOLUME_CODECS:
                        rows[uid] = _Coded(bid, fs, frames, key, int(shape.split(",")[0]),
                                           slab or SLAB, order or 1)
        ordered = sorted(sop_uids, key=lambda u: (u in rows, rows[u][:2] if u in rows else 0))
        coded = [rows[u] for u in ordered if u in rows]
        volume = [row for row in coded if row.order == 1]
        steps = self._steps(volume) if volume else []
        wholes = self._whole_steps([row for row in coded if row.order > 1])
        if coded and coded[0].order > 1:
            self._first_point(coded[0], wholes)
            steps = wholes + steps
        else:
            steps = steps + wholes
        if not steps:
            return ordered, None
        prefetch = Prefetch(self, steps)
        with self._cond:
            for st in steps:
                for slab in range(st.lo // st.step, (st.hi - 1) // st.step + 1) \
                        if st.interleave == 1 else ():
                    self._planned[(st.key, slab)] = prefetch
        prefetch.thread.start()
        return ordered, prefetch

    def _steps(self, volume: list[_Coded]) -> list[_Step]:
        """Decode steps for instances in sending order: each run of consecutive uncached slabs of
        a blob, streamed (models.decode_stream); the first run starts with a piece of the first
        instance's slices when its slab holds more than it needs."""
        need: dict = {}                                # (key, slab) -> slices needed from lo
        order: list = []
        for _, fs, frames, key, depth, step, _ in volume:
            for slab in range(fs // step, (fs + frames - 1) // step + 1):
                end = min(fs + frames, (slab + 1) * step, depth) - slab * step
                if (key, slab) not in need:
                    order.append((key, slab, step))
                need[(key, slab)] = max(need.get((key, slab), 0), end)
        steps, run = [], []
        for key, slab, step in order + [(None, -1, 1)]:
            cached = self.cache.peek((key, slab)) if key is not None else None
            if cached is not None and len(cached) >= need[(key, slab)]:
                continue
            if run and (key != run[-1][0] or slab != run[-1][1] + 1):
                k, first_slab, st = run[0]
                steps.append(_Step(k, st, first_slab * st, run[-1][1] * st + need[(k, run[-1][1])]))
                run = []
            if key is not None:
                run.append((key, slab, step))
        _, fs, frames, key0, _, step0, _ = volume[0]
        slab0 = fs // step0
        first_end = fs + frames - slab0 * step0
        cached = self.cache.peek((key0, slab0))
        if steps and (steps[0].key, steps[0].lo) == (key0, slab0 * step0) \
                and (cached is None or len(cached) < first_end) and first_end < need[(key0, slab0)]:
            steps[0].head = first_end   # the first instance goes out before its whole slab
        cut = -(-(fs + frames) // step0) * step0     # the end of the first instance's last slab
        if first_end > step0 and steps and steps[0].key == key0 and steps[0].lo < fs + frames \
                and cut < steps[0].hi:
            # a first instance of several slabs (a multi-frame one) is decoded on its own: the
            # stream's groups after its first slab may hold the rest of the blob (small slices)
            first = steps[0]
            steps[:1] = [_Step(key0, first.step, first.lo, cut, first.head),
                         _Step(key0, first.step, cut, first.hi)]
        return steps

    def _whole_steps(self, rows: list[_Coded]) -> list[_Step]:
        """Decode steps for the position-major stacks of ``rows`` (instances in sending
        order) that are not cached: each decoded whole, in order."""
        stacks = dict.fromkeys((row.key, row.slab, row.order) for row in rows)
        return [_Step(key, slab, 0, 0, interleave=order) for key, slab, order in stacks
                if self.cache.peek((key, WHOLE)) is None]

    def _first_point(self, row: _Coded, wholes: list[_Step]) -> None:
        """Have the plan hand the first instance's time point over first when its stack is
        coded a slab per position: the stack's one decode reaches every slab's slices up to it
        first (:meth:`_point_then_whole`), the rest of the stack follows."""
        _, fs, frames, key, depth, slab, order = row
        # (not for one instance holding every time point: it needs the whole stack)
        if wholes and wholes[0].key == key and slab == order and frames * order == depth:
            self._points[key] = fs // frames
            wholes[0].head = fs // frames + 1

    def _done(self, prefetch: Prefetch, key, final: bool) -> None:
        with self._cond:
            if final:
                prefetch.finished.add(key)
            self._cond.notify_all()

    def _release(self, prefetch: Prefetch) -> None:
        with self._cond:
            for key in [k for k, p in self._planned.items() if p is prefetch]:
                del self._planned[key]
            self._cond.notify_all()

    def warm(self) -> bool:
        """Start the codec's worker processes if any compressed volume is stored."""
        with self.index.read() as s:
            coded = s.scalar(select(Blob.id).where(Blob.codec.in_(header_pack.VOLUME_CODECS))
                             .limit(1))
        if coded is None:
            return False
        parallel.warm()
        return True

    def get(self, sop_uid: str) -> StoredInstance:
        """Return the instance ``sop_uid`` as received.

        Raises
        ------
        InstanceNotFoundError
            No such instance.
        IntegrityError
            The rebuilt bytes do not match the ingest SHA-256 (nothing is returned).
        """
        return self.get_parts(sop_uid).joined()

    def get_parts(self, sop_uid: str, located=None) -> StoredParts:
        """Return the instance ``sop_uid`` as received, in parts (see :class:`StoredParts`):
        what :meth:`get` joins. ``located``: its index row from :meth:`locate`, read when a
        retrieval started (it is located again if its file has moved since). Raises as
        :meth:`get`."""
        inst, parts = self._located(sop_uid, self._parts, located)
        return StoredParts(inst.sop_uid, inst.sop_class_uid, inst.transfer_syntax,
                           self._checked(inst, parts))

    def header(self, sop_uid: str, located=None) -> StoredHeader:
        """Return the instance's attributes as bytes, without decoding any pixels (``located``:
        its row from :meth:`locate`, as for :meth:`get_parts`).

        An instance stored as received (staged, raw or deflated) comes whole and SHA-256
        checked; a coded one is its stored header bytes, which end inside the Pixel Data
        element, with the bytes of any elements after it as ``trailer``; it cannot be checked
        without decoding its pixels.

        Raises
        ------
        InstanceNotFoundError, IntegrityError
            As :meth:`get`.
        """
        inst, (data, trailer) = self._located(sop_uid, self._header_bytes, located)
        if _as_received(inst):
            data = self._checked(inst, (data,))[0]
        return StoredHeader(inst.sop_uid, inst.sop_class_uid, inst.transfer_syntax, data,
                            trailer)

    def frames(self, sop_uid: str, numbers: list[int] | None) -> list[memoryview] | None:
        """The stored words (little endian) of frames ``numbers`` (from 1; None: all) of a
        coded instance, decoding only the slabs that hold them (through the slab cache, shared
        with concurrent requests); None for an instance kept as received (use :meth:`get`).
        The codec's per-slab CRCs vouch for these words; the ingest SHA-256 covers whole
        instances.

        Raises
        ------
        InstanceNotFoundError, IntegrityError
            As :meth:`get`.
        ValueError
            A frame number is outside the instance.
        """
        def read(inst, blob):
            if _as_received(inst):
                return None
            wanted = range(1, inst.frames + 1) if numbers is None else numbers
            if not all(1 <= n <= inst.frames for n in wanted):
                raise ValueError(f"frames are 1 to {inst.frames}")
            with self._unreadable(inst, blob):
                return [le_bytes(self._slices(blob, inst.frame_start + n - 1,
                                              inst.frame_start + n)[0]) for n in wanted]
        return self._located(sop_uid, read)[1]

    def locate(self, sop_uids: list[str]) -> dict:
        """The index rows :meth:`get_parts` needs of many instances, in one query per 500: a
        retrieval then does not query the index once per instance."""
        rows = {}
        with self.index.engine.connect() as conn:
            for i in range(0, len(sop_uids), 500):
                for row in conn.execute(_LOCATE_MANY, {"p_sop_uids": sop_uids[i:i + 500]}):
                    rows[row.sop_uid] = row
        return rows

    def _located(self, sop_uid: str, read, located=None):
        """(index row, ``read(row, blob)``) of ``sop_uid`` (at its row ``located`` first,
        when given), located again once when its file moved in between."""
        tries = ([located] if located is not None else []) + [None, None]
        for attempt, inst in enumerate(tries):
            if inst is None:
                with self.index.engine.connect() as conn:
                    inst = conn.execute(_LOCATE, {"p_sop_uid": sop_uid}).first()
            if inst is None:
                raise InstanceNotFoundError(sop_uid)
            blob = None if inst.blob_key is None else \
                _BlobRef(inst.blob_key, inst.codec, inst.shape, inst.slab, inst.interleave or 1)
            try:
                return inst, read(inst, blob)
            except _Moved:
                # its file went away after it was located: compaction or recoding moved it
                # (the file goes once the new place is committed), so locate it again once
                if attempt == len(tries) - 1:
                    raise IntegrityError(f"instance {sop_uid}: stored file missing") from None

    @staticmethod
    def _checked(inst, parts: tuple) -> tuple:
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        if digest.hexdigest() != inst.sha256:
            log.error("instance %s does not match its ingest SHA-256; not sent", inst.sop_uid)
            raise IntegrityError(f"instance {inst.sop_uid} failed its SHA-256 check")
        return parts

    def _parts(self, inst, blob) -> tuple:
        with self._unreadable(inst, blob):
            if _as_received(inst):
                return (self._whole(inst, blob),)
            # headers first: the pack unpacks while the decoder processes work on the pixels
            before, after = self._header_parts(inst, blob)
            start, stop = inst.frame_start, inst.frame_start + inst.frames
            if inst.frames > (blob.slab or SLAB) and blob.interleave == 1 \
                    and not self._ready(blob, start, stop):
                parts = self._streamed(blob, start, stop)
            else:
                parts = self._slices(blob, start, stop)
            return spliced(before, parts, after)

    def _header_bytes(self, inst, blob) -> tuple[bytes, bytes | None]:
        """(data, trailer) of :class:`StoredHeader`."""
        with self._unreadable(inst, blob):
            if _as_received(inst):
                return self._whole(inst, blob), None
            return self._header_parts(inst, blob)

    def _whole(self, inst, blob) -> bytes:
        """The bytes of an instance stored as received (staged, raw or deflated)."""
        if inst.staged_key is not None:
            return self.blobs.get(inst.staged_key)
        if blob.codec == "raw":
            return self.blobs.get(blob.key)
        if blob.codec == "zlib":
            return zlib.decompress(self.blobs.get(blob.key))
        raise IntegrityError(f"instance {inst.sop_uid}: unknown codec {blob.codec!r}")

    def _header_parts(self, inst, blob) -> tuple[bytes, bytes]:
        if blob.codec == header_pack.CODEC:
            return self._headers(blob.key)[inst.frame_start]
        return inst.header_before, inst.header_after

    @contextlib.contextmanager
    def _unreadable(self, inst, blob):
        """Stored data that cannot be read becomes an IntegrityError (or _Moved when its file
        went away)."""
        try:
            yield
        except (KeyError, zlib.error, models.CorruptBlobError,
                header_pack.HeaderPackError) as exc:
            if isinstance(exc, KeyError) and not self.blobs.exists(inst.staged_key or blob.key):
                raise _Moved() from exc
            raise IntegrityError(
                f"instance {inst.sop_uid}: stored data unreadable ({exc})") from exc

    def _headers(self, key: str) -> dict:
        """The unpacked header pack of blob ``key`` (the last few are kept)."""
        with self._cond:
            packs = self._header_packs
            if key in packs:
                packs[key] = packs.pop(key)  # most recently used last
                return packs[key]
        value = header_pack.unpack(self.blobs.get(key))
        with self._cond:
            packs[key] = value
            while len(packs) > HEADER_PACKS:
                packs.pop(next(iter(packs)))
        return value

    def _coded(self, key: str) -> memoryview:
        return header_pack.coded_view(self.blobs.get(key))

    def _slices(self, blob, start: int, stop: int) -> list[np.ndarray]:
        """Slices ``[start, stop)`` of a coded stack as parts of cached slabs (decoded slab by
        slab when neither cached nor planned; a position-major stack decoded whole)."""
        if blob.interleave > 1:
            return [self._position_major(blob, start, stop)]
        depth, step = int(blob.shape.split(",")[0]), blob.slab or SLAB
        parts = []
        for slab in range(start // step, (stop - 1) // step + 1):
            lo, hi = slab * step, min(depth, slab * step + step)
            need = min(stop, hi) - lo
            data = self._planned_slab((blob.key, slab), need)
            if data is None and self._plan_slab(blob.key, slab, lo, hi, need, step):
                data = self._planned_slab((blob.key, slab), need)
            if data is None:
                data = self.cache.get((blob.key, slab), lambda lo=lo, hi=hi: models.decode_slices(
                    self._coded(blob.key), lo, hi))
                if len(data) < min(stop, hi) - lo:       # a cached prefix too short
                    data = models.decode_slices(self._coded(blob.key), lo, hi)
                    self.cache.put((blob.key, slab), data)
            parts.append(data[max(start, lo) - lo:min(stop, hi) - lo])
        return parts

    def _position_major(self, blob, start: int, stop: int) -> np.ndarray:
        """Slices ``[start, stop)`` (instance order) of a position-major stack: from the stack
        decoded whole, or the time point a retrieval plan decodes first when it is that."""
        whole = self.cache.peek((blob.key, WHOLE))
        if whole is None:
            t = self._points.get(blob.key)
            frames = int(blob.shape.split(",")[0]) // blob.interleave
            if t is not None and (start, stop) == (t * frames, (t + 1) * frames):
                return self._time_point(blob, t)
            whole = self._whole_stack(blob)
        return whole[start:stop]

    def _time_point(self, blob, t: int) -> np.ndarray:
        """Time point ``t`` of a position-major stack coded a slab per position: slice ``t``
        of every slab, each decoded up to there."""
        return self.cache.get((blob.key, POINT, t), lambda: models.decode_slab_slices(
            self._coded(blob.key), t))

    def _point_then_whole(self, blob, t: int) -> None:
        """Cache time point ``t`` of a position-major stack coded a slab per position and then
        the stack whole, from one decode (models.decode_with_slab_slices): the time point as
        soon as every slab's slices up to it are decoded, no slice decoded twice."""
        def values():
            pieces = models.decode_with_slab_slices(self._coded(blob.key), t)
            yield next(pieces)
            yield instance_major(next(pieces), blob.interleave)

        point = (blob.key, POINT, t)
        if self.cache.load_in_turn((point, (blob.key, WHOLE)), values()):
            self.cache.discard(point)     # the whole stack serves that time point from now on
        else:
            self._time_point(blob, t)         # a request got there first: as it does

    def _whole_stack(self, blob) -> np.ndarray:
        """A position-major stack (:mod:`storage.frame_order`), decoded whole on both cores
        and put in instance order: every instance of it has a frame in each of its slabs. One
        cache entry, shared by concurrent requests."""
        return self.cache.get((blob.key, WHOLE), lambda: instance_major(
            models.decode_volume(self._coded(blob.key)), blob.interleave))

    def _ready(self, blob, start: int, stop: int) -> bool:
        """Whether the slices ``[start, stop)`` are planned (a retrieval's prefetch decodes
        them) or all in the slab cache."""
        step = blob.slab or SLAB
        with self._cond:
            if (blob.key, start // step) in self._planned:
                return True
        for slab in range(start // step, (stop - 1) // step + 1):
            data = self.cache.peek((blob.key, slab))
            if data is None or len(data) < min(stop, (slab + 1) * step) - slab * step:
                return False
        return True

    def _streamed(self, blob, start: int, stop: int) -> list[np.ndarray]:
        """Slices ``[start, stop)`` of a multi-frame instance of several slabs that no
        retrieval plan decodes, as the pieces the worker processes decode in parallel
        (models.decode_stream) rather than slab after slab; each slab starting in a piece is
        cached as a view of it."""
        step, parts = blob.slab or SLAB, []
        for z0, pixels in models.decode_stream(self._coded(blob.key), start, stop):
            for slab in range(-(-z0 // step), (z0 + len(pixels) - 1) // step + 1):
                lo = slab * step - z0
                self.cache.put((blob.key, slab), pixels[lo:lo + step])
            parts.append(pixels)
        return parts

    def _plan_slab(self, key: str, slab: int, lo: int, hi: int, need: int, step: int) -> bool:
        """Start decoding one slab that no plan covers (a web viewer's frames, one instance at
        a time), its first ``need`` slices handed over first, so that the instance asking goes
        out before the rest of its slab is decoded and requests for the other instances of
        the slab wait for the same decode; False when it is cached or planned already."""
        with self._cond:
            cached = self.cache.peek((key, slab))
            if (cached is not None and len(cached) >= hi - lo) or (key, slab) in self._planned:
                return False
            prefetch = Prefetch(self, [_Step(key, step, lo, hi, need if need < hi - lo else 0)])
            self._planned[(key, slab)] = prefetch
        prefetch.thread.start()
        return True

    def _planned_slab(self, key, need: int):
        """The cached slab ``key`` holding ``need`` slices, waiting for a prefetch decoding it;
        None when it is neither cached long enough nor planned."""
        with self._cond:
            prefetch = self._planned.get(key)
            if prefetch is not None and key not in prefetch.consumed:
                prefetch.consumed.add(key)           # the prefetch may decode further ahead
                self._cond.notify_all()
            while True:
                data = self.cache.peek(key)
                if data is not None and len(data) >= need:
                    return data
                prefetch = self._planned.get(key)
                if prefetch is None or key in prefetch.finished:   # evicted: decode on demand
                    return None
                self._cond.wait(1.0)
