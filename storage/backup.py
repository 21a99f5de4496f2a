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
4. The recycle bin's complete entries are copied too (checked, manifest last), so that what
   can be undone, and the originals kept for legal holds, survive the archive's disk.

Step 3 empties the destination, so a destination is checked first: never the archive's own
folder or index, and (unless ``force``) only an empty folder or one whose marker file
:data:`MARKER` names this archive as its source; a destination database holding rows only when
that marker names it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import create_engine, delete, func, insert, inspect, literal, make_url, select, text
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from storage.blobstore import BlobStore, fsync_dir, fsync_path
from storage.errors import StorageError
from storage.index import Base, Blob, Index, Instance
from storage.recycle_bin import RecycleBin, RecycleBinError
from storage.recovery import LOCK_NAME, ArchiveLock

log = logging.getLogger(__name__)
ROUNDS = 5
SNAPSHOT = ".snapshot.sqlite"
INDEX_NAME = "index.sqlite"
MARKER = ".voxarc-backup"       # JSON: the source archive, the copy's index, first backup's time
_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1"}
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}


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
    bin_entries_copied, bin_entries_kept, bin_entries_removed, bin_bytes_copied : int
        The recycle bin's entries (``recycle/``): copied in this run, already there, no
        longer in the archive's bin (removed); bytes copied.
    """

    instances: int = 0
    blobs: int = 0
    files_copied: int = 0
    bytes_copied: int = 0
    files_kept: int = 0
    files_removed: int = 0
    rounds: int = 0
    bin_entries_copied: int = 0
    bin_entries_kept: int = 0
    bin_entries_removed: int = 0
    bin_bytes_copied: int = 0


def backup(index: Index, blobs: BlobStore, dest, database_url: str = "",
           progress=None, force: bool = False, recycle: RecycleBin | None = None
           ) -> BackupReport:
    """Copy the archive of ``index`` and ``blobs`` into the folder ``dest``.

    Parameters
    ----------
    index, blobs
        The archive's index and blob store (a node may be running on them).
    dest : path
        Destination data folder; created when missing; an earlier backup there is updated.
        Marked as a backup of this archive (file :data:`MARKER`).
    database_url : str
        Index of the copy; default ``sqlite:///<dest>/index.sqlite``. Another database is
        emptied and filled (a restore onto PostgreSQL).
    progress : callable, optional
        ``progress(done, total)`` after each file.
    force : bool
        Replace what ``dest`` (and the database ``database_url`` names) holds even when it is
        not a backup of this archive. Never allows the archive's own folder or index.
    recycle : RecycleBin, optional
        The archive's recycle bin, copied into ``dest/recycle`` after the index and files
        (its entries: deletions that can be undone, originals kept for legal holds).

    Raises
    ------
    BackupError
        The destination is the archive itself, is in use, cannot be written, holds something
        other than a backup of this archive (without ``force``); a file does not match its
        SHA-256, or the files kept moving.
    """
    dest = Path(dest)
    copy_url = database_url or f"sqlite:///{dest / INDEX_NAME}"
    _refuse_own(index, blobs, dest, copy_url)
    lock = _lock(dest)
    try:
        source = _identity(index.url, blobs.root.parent)
        _check_destination(dest, source, copy_url, bool(database_url), force)
        _mark(dest, source, copy_url)
        report = _backup(index, blobs, dest, database_url, progress)
        if recycle is not None:
            _mirror_bin(recycle, dest / "recycle", report)
        return report
    finally:
        lock.release()


def _mirror_bin(recycle: RecycleBin, dest: Path, report: BackupReport) -> None:
    try:
        counts = recycle.mirror(dest)
    except (OSError, RecycleBinError) as exc:
        raise BackupError(f"the index and files are backed up, the recycle bin is not: "
                          f"{exc}") from exc
    report.bin_entries_copied, report.bin_entries_kept = counts["copied"], counts["kept"]
    report.bin_entries_removed, report.bin_bytes_copied = counts["removed"], counts["bytes"]


def _refuse_own(index: Index, blobs: BlobStore, dest: Path, copy_url: str) -> None:
    """Raise when the copy's folder or index is the archive's own (never allowed)."""
    try:
        make_url(copy_url)
    except ArgumentError:
        raise BackupError(f"{copy_url!r} is not a database URL") from None
    if dest.resolve() == blobs.root.parent.resolve():
        raise BackupError("the destination is the archive's own data folder")
    if _same_database(copy_url, index.url):
        raise BackupError(f"the copy's index ({_shown(copy_url)}) is the archive's own index: "
                          "backing up into it would destroy it")


def _lock(dest: Path) -> ArchiveLock:
    """Create ``dest`` when missing and lock it exclusively."""
    if dest.exists() and not dest.is_dir():
        raise BackupError(f"{dest} exists and is not a folder")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        lock = ArchiveLock(dest)
    except OSError as exc:
        raise BackupError(f"cannot use {dest} as the destination folder: "
                          f"{exc.strerror or exc}") from exc
    if not lock.try_exclusive():
        lock.release()
        raise BackupError(f"{dest} is open in another process (a node serving it?)")
    return lock


def _check_destination(dest: Path, source: dict, copy_url: str, url_given: bool,
                       force: bool) -> None:
    """Raise unless ``dest`` (and the database the copy's index goes to, when given) is
    empty or a backup of ``source``; with ``force``, log what will be replaced instead."""
    marker = _read_marker(dest)
    ours = marker is not None and _same_source(marker.get("source"), source)
    if marker is not None and not ours:
        _refuse(f"{dest} holds a backup of another archive ({_marker_source(marker)})", force)
    elif marker is None and _contents(dest):
        _refuse(f"{dest} is not empty and is not a voxarc backup (it has no {MARKER})", force)
    if url_given and not (ours and _same_database(marker.get("index", ""), copy_url)) \
            and _has_rows(copy_url):
        _refuse(f"the database {_shown(copy_url)} already holds an archive's rows and {dest} "
                "has no backup marker naming it", force)


def _refuse(problem: str, force: bool) -> None:
    if not force:
        raise BackupError(f"{problem}; refusing to replace it (--force replaces it)")
    log.warning("backup: %s; replacing it (--force)", problem)


def _identity(index_url: str, data_dir: Path) -> dict:
    """The archive as a marker names it (no password)."""
    return {"data_dir": str(Path(data_dir).resolve()), "index": _shown(index_url)}


def _same_source(named, source: dict) -> bool:
    return isinstance(named, dict) and named.get("data_dir") == source["data_dir"] \
        and _same_database(named.get("index", ""), source["index"])


def _marker_source(marker: dict) -> str:
    named = marker.get("source")
    if not isinstance(named, dict):
        return "its marker names no source"
    return f"data folder {named.get('data_dir')}, index {named.get('index')}"


def _read_marker(dest: Path) -> dict | None:
    """The destination's marker; None when there is none; {} when it cannot be read."""
    try:
        marker = json.loads((dest / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _contents(dest: Path) -> list[str]:
    """What ``dest`` holds besides the lock file every opener creates."""
    return sorted(p.name for p in dest.iterdir() if p.name != LOCK_NAME)


def _mark(dest: Path, source: dict, copy_url: str) -> None:
    """Write the marker naming ``source`` and the copy's index (kept when already so)."""
    old = _read_marker(dest) or {}
    same = _same_source(old.get("source"), source)
    if same and _same_database(old.get("index", ""), copy_url):
        return
    first = old.get("first_backup") if same else None
    marker = {"source": source, "index": _shown(copy_url),
              "first_backup": first or datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = dest / (MARKER + ".tmp")
    try:
        tmp.write_text(json.dumps(marker, indent=1) + "\n")
        fsync_path(tmp)
        os.replace(tmp, dest / MARKER)
        fsync_dir(dest)
    except OSError as exc:
        raise BackupError(f"cannot write {dest / MARKER}: {exc.strerror or exc}") from exc


def _shown(url: str) -> str:
    """``url`` without its password; a SQLite file by its absolute path."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    if parsed.get_backend_name() == "sqlite":
        path = _sqlite_file(parsed)
        return f"sqlite:///{path}" if path else url
    return parsed.render_as_string(hide_password=True)


def _sqlite_file(parsed) -> Path | None:
    """The resolved file of a SQLite URL; None for an in-memory database."""
    if parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).resolve()


def _same_database(a: str, b: str) -> bool:
    """Whether two index URLs name the same database: the same SQLite file, or the same
    backend, server (local names counted as one), port and database."""
    try:
        x, y = make_url(a), make_url(b)
    except ArgumentError:
        return False
    backend = x.get_backend_name()
    if backend != y.get_backend_name():
        return False
    if backend == "sqlite":
        return _sqlite_file(x) is not None and _sqlite_file(x) == _sqlite_file(y)
    return _server(x) == _server(y) and x.database == y.database


def _server(url) -> tuple:
    host = (url.host or "").lower()
    if host in _LOCAL_HOSTS or "host" in url.query:   # ?host=/run/postgresql: a local socket
        host = "local"
    return host, url.port or _DEFAULT_PORTS.get(url.get_backend_name())


def _has_rows(url: str) -> bool:
    """Whether the database ``url`` names has rows in any of the index's tables."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = _sqlite_file(parsed)
        if path is None or not path.is_file():
            return False
    engine = None
    try:
        engine = create_engine(url)
        present = set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            return any(conn.execute(select(literal(1)).select_from(table).limit(1)).first()
                       for table in Base.metadata.sorted_tables if table.name in present)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise BackupError(f"cannot read the database {_shown(url)}: {reason}") from exc
    finally:
        if engine is not None:
            engine.dispose()


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


