"""Recoding: stored stacks written by an older blob format or another model, coded again with
today's codec.

A coded stack keeps the blob format and model it was written with (old blobs always decode).
When a later release codes better (blob format 4 codes a CT's padding and air floor more
cheaply; format 5 only decodes faster, and is not worth a recode; format 6 groups the streams
of small slices, a little smaller and faster to decode for those), an archive can bring its
older blobs up to date: each one is read and checked against
its SHA-256, decoded, encoded again, and the new blob is decoded and compared with the old
pixels before it is written; the instances are then pointed at it and the old blob row removed
in one transaction, and only then is the old file deleted. A new blob that is not smaller is
not kept. The header pack in front of the codec blob is carried over byte for byte, so every
instance rebuilds exactly as before. A failure leaves the old blob in place.

The same path codes again, with adaptation, the stacks a busy compaction coded without it
(marked in their ``codec_info``, see :meth:`storage.compaction.Compactor.run_once`): the
node's idle compaction worker takes them one at a time (:meth:`Recoder.adapt_deferred`), and
`voxarc compress --recode` takes them all.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from sqlalchemy import select, update

import models
from models import value_range
from models.api import stream_group
from models.container import CorruptBlobError
from models.registry import load_model
from models.value_range import ValueRange
from storage import header_pack
from storage.blobstore import BlobStore, new_key
from storage.compaction import codec_info, deferred_rows, is_deferred, undeferred
from storage.errors import CommitOutcomeUnknown
from storage.frame_order import point_group
from storage.index import Blob, Index, Instance

log = logging.getLogger(__name__)


class RecodeError(RuntimeError):
    """A blob could not be recoded (it is left as it was)."""


@dataclass
class Recoded:
    """What happened to one blob: ``state`` is "recoded", "kept" (the new blob was not
    smaller) or "current" (already today's format and model, or an older format that today's
    would code no smaller)."""
    blob_id: int
    state: str
    old_bytes: int
    new_bytes: int
    old_format: int


def _sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


SAME_BITS_FROM = 4   # blobs of today's model from this format on code no smaller today
#                      (format 5 codes the same bits, its tokens in two stages, for speed)


def _gains_from_stream_groups(info: dict, max_group: int | None) -> bool:
    """Whether today's encoder would let this blob's slices share streams where its format
    (before 6) could not: small slices, whose blobs then lose a few tenths of a percent and
    decode 1.1-1.4x faster (models.codec); ``max_group`` as the stack is coded with."""
    nz, ny, _ = info["shape"]
    most = min(info["slab"], nz, max_group or nz)
    return info["format"] < 6 and stream_group(ny, info["tile"][1], most) > 1


def _gains_from_value_range(info: dict, volume) -> bool:
    """Whether a blob of format 2 or 3 (its model today's) would code smaller in format 4,
    whose only change is the value range: not when the volume starts at its dtype's floor
    without padding (an MR's background at 0), where only predictions within a few tokens of
    the range's top could change (measured: the phantom and the MRs of the test series gained
    nothing, their format 4 blobs were 16 bytes larger)."""
    if info["format"] not in (2, 3):
        return True
    values = value_range.scan(volume)
    return values.substitutes or values.lo != ValueRange.of_dtype(volume.dtype).lo


class Recoder:
    """Code the volume blobs of an archive again with ``model`` (see the module docstring).

    Parameters
    ----------
    index, blobs
        The archive's index and blob store.
    model : str
        Codec model name passed to :func:`models.encode_volume`.
    adapt : bool
        Let the codec fine-tune its model on large stacks (its default); False: never.
    """

    def __init__(self, index: Index, blobs: BlobStore, model: str = "default",
                 adapt: bool = True):
        self.index, self.blobs, self.model, self.adapt = index, blobs, model, adapt
        self.model_id = load_model(model).model_id.hex()

    def volume_blobs(self) -> list[int]:
        """Ids of the archive's coded stacks, oldest first."""
        with self.index.read() as s:
            return list(s.scalars(select(Blob.id).where(
                Blob.codec.in_(header_pack.VOLUME_CODECS)).order_by(Blob.created_at, Blob.id)))

    def recode(self, blob_id: int) -> Recoded:
        """Bring one coded stack up to today's format and model; raise :class:`RecodeError`
        (the blob left as it was) when it cannot be read, decoded or replaced exactly."""
        with self.index.read() as s:
            row = s.get(Blob, blob_id)
            if row is None or row.codec not in header_pack.VOLUME_CODECS:
                raise RecodeError(f"blob {blob_id} is not a stored coded stack")
            key, codec, sha, slab = row.key, row.codec, row.sha256, row.slab
            max_group = point_group(row.interleave or 1, slab or 0)
            deferred = self.adapt and is_deferred(row.codec_info)
        try:
            data = self.blobs.get(key)
        except KeyError:
            raise RecodeError(f"blob {key}: file missing") from None
        if _sha(data) != sha:
            raise RecodeError(f"blob {key} does not match its SHA-256; left for `voxarc verify`")
        coded = header_pack.coded_view(data) if codec == header_pack.CODEC else memoryview(data)
        info = models.blob_info(coded)
        current = info["model_id"] == self.model_id and not deferred
        if current and info["format"] >= SAME_BITS_FROM \
                and not _gains_from_stream_groups(info, max_group):
            return Recoded(blob_id, "current", len(data), len(data), info["format"])
        try:
            volume = models.decode_volume(coded)
        except CorruptBlobError as exc:
            raise RecodeError(f"blob {key} does not decode: {exc}") from None
        if current and not _gains_from_value_range(info, volume):
            return Recoded(blob_id, "current", len(data), len(data), info["format"])
        new = models.encode_volume(volume, model=self.model, slab=slab or None,
                                   max_group=max_group,
                                   adapt=None if self.adapt else False)
        if _sha(models.decode_volume(new).tobytes()) != _sha(volume.tobytes()):
            raise RecodeError(f"blob {key}: the new blob does not decode to the same voxels")
        stored = bytes(data[:len(data) - len(coded)]) + new     # the header pack as it was
        if len(stored) >= len(data):
            if deferred:     # adaptation did not pay: nothing is left to do for this stack
                self._undefer(blob_id, sha)
            return Recoded(blob_id, "kept", len(data), len(stored), info["format"])
        self._replace(blob_id, sha, stored, len(stored) - len(new), models.blob_info(new))
        try:
            self.blobs.delete(key)
        except OSError as exc:      # committed: the file is an orphan that recovery removes
            log.warning("recoded blob %s: its old file stays until recovery (%s)", key, exc)
        return Recoded(blob_id, "recoded", len(data), len(stored), info["format"])

    def deferred_blobs(self, limit: int | None = None) -> list[int]:
        """Ids of the coded stacks whose adaptation compaction deferred, oldest first, at most
        ``limit`` (none when this recoder does not adapt)."""
        if not self.adapt:
            return []
        with self.index.read() as s:
            return list(s.scalars(select(Blob.id).where(
                Blob.codec.in_(header_pack.VOLUME_CODECS), deferred_rows())
                .order_by(Blob.created_at, Blob.id).limit(limit)))

    def adapt_deferred(self, limit: int = 1) -> list[Recoded]:
        """Code up to ``limit`` stacks whose adaptation compaction deferred again, now with it
        (see :meth:`recode`); what cannot be read is logged and left for `voxarc verify`."""
        out = []
        for blob_id in self.deferred_blobs(limit):
            try:
                done = self.recode(blob_id)
            except RecodeError as exc:     # unmarked: not tried again at every idle pass
                log.error("adapting deferred stack %d: %s; it stays as it is", blob_id, exc)
                self._undefer(blob_id)
                continue
            log.info("deferred stack %d coded with adaptation: %s, %d -> %d bytes", blob_id,
                     done.state, done.old_bytes, done.new_bytes)
            out.append(done)
        return out

    def _undefer(self, blob_id: int, sha: str | None = None) -> None:
        """Drop the deferred mark of blob ``blob_id`` (unless it changed meanwhile from
        ``sha``, when given)."""
        with self.index.write() as s:
            row = s.get(Blob, blob_id)
            if row is not None and sha in (None, row.sha256):
                row.codec_info = undeferred(row.codec_info)

    def _replace(self, blob_id: int, sha: str, stored: bytes, pack: int, info: dict) -> None:
        """Write ``stored`` (a header pack of ``pack`` bytes, then the codec blob described by
        ``info``) durably, then swap it in for blob ``blob_id`` in one transaction."""
        key = new_key("b")
        self.blobs.put(key, stored)

        def swap(s):
            old = s.get(Blob, blob_id)
            if old is None or old.sha256 != sha:
                raise RecodeError(f"blob {blob_id} changed while it was recoded")
            described = codec_info(info)
            row = Blob(key=key, codec=old.codec, dtype=old.dtype, shape=old.shape,
                       interleave=old.interleave,
                       slab=info["slab"], raw_bytes=old.raw_bytes, stored_bytes=len(stored),
                       sha256=_sha(stored), created_at=time.time(),
                       codec_info=header_pack.describe(described, pack) if pack else described)
            s.add(row)
            s.flush()
            s.execute(update(Instance).where(Instance.blob_fk == blob_id).values(blob_fk=row.id))
            s.delete(old)
        try:
            self.index.write_checked(
                swap, lambda s: s.scalar(select(Blob.id).where(Blob.key == key)) is not None)
        except CommitOutcomeUnknown:    # both files stay: the next start drops the orphan
            raise
        except BaseException:
            self.blobs.delete(key)
            raise
