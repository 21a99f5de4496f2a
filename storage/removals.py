"""Files to remove once the transaction that stopped referring to them has committed.

A transaction that drops the last reference to a file (a deletion, a compaction that replaced
staged copies by a blob) records the file's key as a
:class:`storage.index.Removal` row in that same transaction; the file goes after the commit
(:func:`finish_removals`). A crash in between leaves the row, and recovery finishes the removal
before it looks for orphans: a staged file left behind would otherwise be indexed again, and an
instance deleted afterwards would come back.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import delete, insert, select

from storage.blobstore import BlobStore, fsync_dir
from storage.index import Index, Removal

log = logging.getLogger(__name__)
_CHUNK = 500


def record_removals(conn, keys: list[str]) -> None:
    """In the open transaction of ``conn`` (a session or Core connection): remove ``keys``'
    files once it commits."""
    if keys:
        now = time.time()
        conn.execute(insert(Removal), [{"key": k, "created_at": now} for k in keys])


def finish_removals(index: Index, blobs: BlobStore, keys: list[str] | None = None) -> int:
    """Remove the files recorded as :class:`Removal` rows (only ``keys`` when given), then
    their rows; return how many. Recovery calls it with no keys, before its orphan scan."""
    with index.read() as s:
        if keys is None:
            recorded = list(s.scalars(select(Removal.key)))
        else:
            recorded = [k for i in range(0, len(keys), _CHUNK) for k in s.scalars(
                select(Removal.key).where(Removal.key.in_(keys[i:i + _CHUNK])))]
    done, folders = [], set()
    for key in recorded:
        try:
            blobs.delete(key)
        except OSError as exc:     # committed: the row stays, and the next start removes it
            log.warning("file %s not removed yet: %s", key, exc)
            continue
        done.append(key)
        folders.add(blobs.path(key).parent)
    for folder in folders:
        fsync_dir(folder)
    for i in range(0, len(done), _CHUNK):
        with index.write() as s:
            s.execute(delete(Removal).where(Removal.key.in_(done[i:i + _CHUNK])))
    return len(done)
