"""Lone images deflated by an older release, staged again for the volume codec.

Until 2026-12-05 a lone image (the only one of its format in its series: a radiograph, a
scout, an RT image) went to the general codec, deflated; since then compaction codes it as a
one-slice volume in about 0.7x the bytes (storage.assembly). ``voxarc compress --recode``
brings such an archive up to date: each deflated lone image is rebuilt (SHA-256 checked),
written back as a staged file, and its row pointed at it and its blob dropped in one
transaction; compaction then codes it as any staged instance, checking the new blob before
the staged file goes. A crash in between leaves the instance staged or still deflated, never
lost.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select, update

from storage.assembly import LONE_MIN_VOXELS, frame_voxels
from storage.blobstore import BlobStore
from storage.compaction import CODEC_TRIED
from storage.errors import CommitOutcomeUnknown, StorageError
from storage.index import Blob, Index, Instance
from storage.instance_facts import MULTIFRAME
from storage.removals import finish_removals, record_removals
from storage.staged_keys import staged_file_key

log = logging.getLogger(__name__)
#: deflated to more than this share of its bytes: noise-like, the volume codec would not help
DEFLATED_SHARE = 0.9


def candidates(index: Index) -> list[tuple[int, str, int, str, int]]:
    """(instance id, SOP Instance UID, blob id, SHA-256, series id) of the deflated lone
    images: single-frame
    images of a stackable format that no other instance of their series shares, of at least
    LONE_MIN_VOXELS pixels, that deflating shrank, and that the volume codec was not tried on
    (CODEC_TRIED: it did worse)."""
    shared = select(Instance.series_fk, Instance.stack_format) \
        .group_by(Instance.series_fk, Instance.stack_format) \
        .having(func.count(Instance.id) > 1).subquery()
    stmt = select(Instance.id, Instance.sop_uid, Instance.stack_format, Blob.id,
                  Instance.sha256, Instance.series_fk) \
        .join(Blob, Instance.blob_fk == Blob.id) \
        .outerjoin(shared, (shared.c.series_fk == Instance.series_fk)
                   & (shared.c.stack_format == Instance.stack_format)) \
        .where(Blob.codec == "zlib", Instance.stack_format != "", Instance.frames == 1,
               ~Instance.stack_format.startswith(MULTIFRAME),
               Blob.stored_bytes <= DEFLATED_SHARE * Blob.raw_bytes,
               Blob.codec_info != CODEC_TRIED,
               shared.c.series_fk.is_(None)).order_by(Instance.id)
    with index.read() as s:
        return [(i, uid, blob, digest, series) for i, uid, fmt, blob, digest, series
                in s.execute(stmt) if frame_voxels(fmt) >= LONE_MIN_VOXELS]


def restage(index: Index, blobs: BlobStore, retrieve, inst_id: int, sop_uid: str,
            blob_id: int, digest: str) -> bool:
    """Stage one deflated lone image again (see the module's docstring); False when the
    archive changed under it (nothing changed then).

    Raises
    ------
    StorageError
        The instance could not be rebuilt; nothing changed.
    """
    inst = retrieve(sop_uid)                         # checked against ``digest``
    key = staged_file_key(inst.transfer_syntax, digest)
    blobs.put_new(key, inst.data)

    def swap(s) -> list[str]:
        moved = s.execute(update(Instance).where(Instance.id == inst_id,
                                                 Instance.blob_fk == blob_id)
                          .values(staged_key=key, blob_fk=None, frame_start=0,
                                  header_before=None, header_after=None))
        if moved.rowcount != 1 or s.scalar(select(func.count(Instance.id)).where(
                Instance.blob_fk == blob_id)):
            raise _Changed()
        old = s.get(Blob, blob_id)
        s.delete(old)
        record_removals(s, [old.key])
        return [old.key]

    def took_place(s) -> bool:
        return s.scalar(select(Instance.staged_key).where(Instance.id == inst_id)) == key

    try:
        gone = index.write_checked(swap, took_place)
    except CommitOutcomeUnknown:
        raise                   # the staged file stays: the next start indexes or drops it
    except _Changed:
        blobs.delete(key)
        return False
    except Exception:
        blobs.delete(key)
        raise
    finish_removals(index, blobs, gone)
    return True


class _Changed(StorageError):
    """The instance moved or its blob gained others between reading and swapping."""
