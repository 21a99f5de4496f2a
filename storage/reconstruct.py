"""Byte-exact reconstruction of stored instances, with a bounded cache of decoded slabs.

A staged instance is read back as is. A compacted one is its header bytes with the decoded pixel
words spliced in; a general-codec one is inflated. Either way the SHA-256 recorded at ingest is
checked before the bytes are returned.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

import models
from storage.blobstore import BlobStore
from storage.dataset_parts import join
from storage.errors import InstanceNotFoundError, IntegrityError
from storage.index import Index, Instance

log = logging.getLogger(__name__)
SLAB = 16  # slices decoded together and cached as one entry, when the blob names no slab


@dataclass(frozen=True)
class StoredInstance:
    """An instance as received: its SOP class, transfer syntax and dataset bytes (no File Meta)."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    data: bytes


class SlabCache:
    """Least-recently-used cache of decoded slabs, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, load):
        """Return the cached value of ``key`` or ``load()`` it (and cache it when it fits)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()
        with self._lock:
            if key not in self._items and value.nbytes <= self.max_bytes:
                self._items[key] = value
                self.used += value.nbytes
                while self.used > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self.used -= old.nbytes
        return value


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

    def get(self, sop_uid: str) -> StoredInstance:
        """Return the instance ``sop_uid`` as received.

        Raises
        ------
        InstanceNotFoundError
            No such instance.
        IntegrityError
            The rebuilt bytes do not match the ingest SHA-256 (nothing is returned).
        """
        with self.index.read() as s:
            inst = s.scalar(select(Instance).where(Instance.sop_uid == sop_uid))
            if inst is None:
                raise InstanceNotFoundError(sop_uid)
            blob = inst.blob
        data = self._bytes(inst, blob)
        if hashlib.sha256(data).hexdigest() != inst.sha256:
            log.error("instance %s does not match its ingest SHA-256; not sent", sop_uid)
            raise IntegrityError(f"instance {sop_uid} failed its SHA-256 check")
        return StoredInstance(inst.sop_uid, inst.sop_class_uid, inst.transfer_syntax, data)

    def _bytes(self, inst, blob) -> bytes:
        try:
            if inst.staged_key is not None:
                return self.blobs.get(inst.staged_key)
            if blob.codec == "raw":
                return self.blobs.get(blob.key)
            if blob.codec == "zlib":
                return zlib.decompress(self.blobs.get(blob.key))
            pixels = self._slices(blob, inst.frame_start, inst.frame_start + inst.frames)
            return join(inst.header_before, pixels, inst.header_after)
        except (KeyError, zlib.error, models.CorruptBlobError) as exc:
            raise IntegrityError(f"instance {inst.sop_uid}: stored data unreadable ({exc})") from exc

    def _slices(self, blob, start: int, stop: int) -> np.ndarray:
        depth, step = int(blob.shape.split(",")[0]), blob.slab or SLAB
        parts = []
        for slab in range(start // step, (stop - 1) // step + 1):
            lo, hi = slab * step, min(depth, slab * step + step)
            data = self.cache.get((blob.key, slab), lambda lo=lo, hi=hi: models.decode_slices(
                self.blobs.get(blob.key), lo, hi))
            parts.append(data[max(start, lo) - lo:min(stop, hi) - lo])
        return np.concatenate(parts)
