"""Backing up an archive while it runs: a consistent copy that is itself an archive.

The copy is a data folder like any other (an index and ``blobs/``): ``voxarc serve --data-dir``
serves it, ``voxarc verify`` checks it, and backing it up again elsewhere restores it (to
PostgreSQL too). Steps:

1. A snapshot of the index at one moment, into a SQLite file in the destination: SQLite's online
   backup (consistent while writers go on), or, from another database, every table's rows read
   in one repeatable-read transaction.
2. Every file the snapshot refers to and the destination lacks is copied, checked against the
   SHA-256 its row records, and written durably. Files never change once written (a new version
   gets a new key), so a file already there with the right size is kept: a second backup into the
   same folder copies only what is new. A file that went away meanwhile (its series compacted, a
   stack recoded, an instance deleted) makes the snapshot stale: a new one is taken and what it
   adds is copied, up to :data:`ROUNDS` times.
3. The snapshot becomes the destination's index (a rename, or its rows copied into the database
   ``database_url`` names), and the destination's files that it does not refer to are removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, delete, func, insert, make_url, select, text

from storage.blobstore import BlobStore, fsync_dir, fsync_path
from storage.errors import StorageError
from storage.index import Base, Blob, Index, Instance
from storage.recovery import ArchiveLock

log = logging.getLogger(__name__)
ROUNDS = 5
SNAPSHOT = ".snapshot.sqlite"
INDEX_NAME = "index.sqlite"


class BackupError(StorageError):
    """A backup could not be completed (the destination's previous backup is left as it was)."""


@dataclass
class BackupReport:
    """What a backup did.

    Attributes
    ----------
    instances, blobs : int
        Rows in the backup's index.
    files_copied, bytes_copied : int
        Files copied in this run and their bytes.
    files_kept : int
        Files already in the destination from an earlier backup.
    files_removed : int
        Destination files no longer referred to (removed).
    rounds : int
        Snapshots taken (more than one when files moved while copying).
    """

    instances: int = 0
    blobs: int = 0
    files_copied: int = 0
    bytes_copied: int = 0
    files_kept: int = 0
    files_removed: int = 0
    rounds: int = 0


def backup(index: Index, blobs: BlobStore, dest, database_url: str = "",
           progress=None) -> BackupReport:
    """Copy the archive of ``index`` and ``blobs`` into the folder ``dest``.

    Parameters
    ----------
    index, blobs
        The archive's index and blob store (a node may be running on them).
    dest : path
        Destination data folder; created when missing; an earlier backup there is updated.
    database_url : str
        Index of the copy; default ``sqlite:///<dest>/index.sqlite``. Another database is
        emptied and filled (a restore onto PostgreSQL).
    progress : callable, optional
        ``progress(done, total)`` after each file.

    Raises
    ------
    BackupError
        The destination is in use or is the archive itself, a file does not match its
        SHA-256, or the files kept moving.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if dest.resolve() == blobs.root.parent.resolve():
        raise BackupError("the destination is the archive's own data folder")
    lock = ArchiveLock(dest)
    if not lock.try_exclusive():
        lock.release()
        raise BackupError(f"{dest} is open in another process (a node serving it?)")
    try:
        return _backup(index, blobs, dest, database_url, progress)
    finally:
        lock.release()


def _backup(index, blobs, dest: Path, database_url: str, progress) -> BackupReport:
    report = BackupReport()
    target = BlobStore(dest / "blobs")
    snapshot = dest / SNAPSHOT
    for report.rounds in range(1, ROUNDS + 1):
        _snapshot(index, snapshot)
        wanted, report.instances, report.blobs = _referenced(snapshot)
        if _copy(blobs, target, wanted, report, progress):
            break
        log.info("backup: files moved while copying (compaction or deletion); new snapshot")
    else:
        snapshot.unlink(missing_ok=True)
        raise BackupError(f"files kept moving over {ROUNDS} snapshots; try again when the "
                          "node is quieter")
    _install(snapshot, dest, database_url)
    report.files_removed = _prune(target, set(wanted))
    snapshot.unlink(missing_ok=True)
    return report


def _snapshot(index: Index, path: Path) -> None:
    """Write the index as it is at one moment into the SQLite file ``path``."""
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        path.with_name(name).unlink(missing_ok=True)
    url = make_url(index.url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        src = sqlite3.connect(url.database, timeout=30)
        dst = sqlite3.connect(path)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
    else:
        engine = create_engine(f"sqlite:///{path}")
        try:
            Base.metadata.create_all(engine)
            level = "SERIALIZABLE" if index.engine.dialect.name == "sqlite" else \
                "REPEATABLE READ"           # one snapshot for every table
            with index.engine.connect().execution_options(isolation_level=level) as conn, \
                    conn.begin():
                _copy_rows(conn, engine)
        finally:
            engine.dispose()


def _copy_rows(src_conn, dst_engine) -> None:
    """Every table's rows from the connection ``src_conn`` into ``dst_engine`` (its tables
    emptied first), keeping ids; PostgreSQL's id sequences set past them."""
    with dst_engine.begin() as dst:
        for table in reversed(Base.metadata.sorted_tables):
            dst.execute(delete(table))
        for table in Base.metadata.sorted_tables:
            batch = []
            for row in src_conn.execution_options(yield_per=2000).execute(select(table)):
                batch.append(dict(row._mapping))
                if len(batch) == 2000:
                    dst.execute(insert(table), batch)
                    batch = []
            if batch:
                dst.execute(insert(table), batch)
            if dst.dialect.name == "postgresql":
                dst.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                                 f"COALESCE((SELECT MAX(id) FROM {table.name}), 0) + 1, false)"))


def _referenced(snapshot: Path) -> tuple[dict, int, int]:
    """({key: (size, SHA-256)} of every file the snapshot's index refers to, its instance
    and blob counts)."""
    engine = create_engine(f"sqlite:///{snapshot}")
    try:
        with engine.connect() as conn:
            staged = conn.execute(select(Instance.staged_key, Instance.size, Instance.sha256)
                                  .where(Instance.staged_key.is_not(None))).all()
            coded = conn.execute(select(Blob.key, Blob.stored_bytes, Blob.sha256)).all()
            instances = conn.scalar(select(func.count(Instance.id)))
    finally:
        engine.dispose()
    return {key: (size, sha) for key, size, sha in [*staged, *coded]}, instances, len(coded)


def _copy(blobs: BlobStore, target: BlobStore, wanted: dict, report: BackupReport,
          progress) -> bool:
    """Copy the wanted files the destination lacks; False when one went away meanwhile."""
    done = 0
    for key, (size, sha) in wanted.items():
        done += 1
        path = target.path(key)
        if path.is_file() and path.stat().st_size == size:
            report.files_kept += 1
        else:
            try:
                data = blobs.get(key)
            except KeyError:
                return False
            if hashlib.sha256(data).hexdigest() != sha:
                raise BackupError(f"file {key} does not match its SHA-256: run `voxarc verify` "
                                  "on the archive")
            target.put(key, data)
            report.files_copied += 1
            report.bytes_copied += len(data)
        if progress:
            progress(done, len(wanted))
    return True


def _install(snapshot: Path, dest: Path, database_url: str) -> None:
    """Make the snapshot the destination's index."""
    conn = sqlite3.connect(snapshot)
    try:                                    # the copy has no deletion half done
        conn.execute("DELETE FROM removals")
        conn.commit()
    finally:
        conn.close()
    fsync_path(snapshot)
    if not database_url:
        for name in (INDEX_NAME + "-wal", INDEX_NAME + "-shm"):
            (dest / name).unlink(missing_ok=True)
        os.replace(snapshot, dest / INDEX_NAME)
        fsync_dir(dest)
        return
    src = create_engine(f"sqlite:///{snapshot}")
    dst = create_engine(database_url)
    try:
        Base.metadata.create_all(dst)
        with src.connect() as conn:
            _copy_rows(conn, dst)
    finally:
        src.dispose()
        dst.dispose()


def _prune(target: BlobStore, keep: set) -> int:
    removed = 0
    for key in list(target.keys()):
        if key not in keep:
            target.delete(key)
            removed += 1
    return removed


