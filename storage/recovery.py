"""Startup recovery: make the data folder agree with the index after a crash.

A crash (kill -9, power loss) can leave behind what was written but never committed: a staged
file whose index row was not committed, a compacted blob whose transaction did not commit, a
staged copy not yet deleted after its series was compacted, or a half-written ``.tmp`` file. The
index is the truth: such files are removed, with one exception. A staged row is committed
without waiting for the database's flush once its file is durable, so a power loss can take the
row of an acknowledged instance; a complete staged file whose name says how to read it
(:mod:`storage.staged_keys`) is therefore indexed again, in the order the files were written,
under the archive's duplicate policy. The reverse, an index row whose file is gone, cannot be
repaired here; it is reported loudly and the row is kept (never silently dropped).

The scan only runs while no other process has the archive open: every :class:`ArchiveLock`
holder keeps a shared ``flock`` on the data folder, and the scan needs the exclusive one, so an
uncommitted file of a running node is never mistaken for an orphan.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from storage.blobstore import BlobStore, fsync_dir
from storage.errors import DuplicateInstanceError, UnparseableDatasetError
from storage.index import Blob, Index, Instance, Job
from storage.ingest import reindex_staged
from storage.removals import finish_removals
from storage.staged_keys import reception_time, recoverable

log = logging.getLogger(__name__)
LOCK_NAME = ".voxarc.lock"


@dataclass
class RecoveryReport:
    """What a recovery scan found and did.

    Attributes
    ----------
    ran : bool
        False when another process had the archive open and the scan was skipped.
    orphans_removed : list of str
        Keys of files no index row refers to (removed).
    temp_removed : int
        Half-written temporary files removed.
    missing_staged : list of str
        SOP Instance UIDs whose staged file is missing (kept, reported).
    missing_blobs : list of str
        Keys of blob rows whose file is missing (kept, reported).
    reindexed : list of str
        SOP Instance UIDs indexed again from complete staged files whose rows were lost.
    jobs_reset : int
        Compaction jobs left ``running`` by a crash, set back to ``pending``.
    removals_finished : int
        Files of committed deletions removed (a crash came between commit and removal).
    """

    ran: bool = True
    orphans_removed: list = field(default_factory=list)
    temp_removed: int = 0
    missing_staged: list = field(default_factory=list)
    missing_blobs: list = field(default_factory=list)
    reindexed: list = field(default_factory=list)
    jobs_reset: int = 0
    removals_finished: int = 0

    @property
    def clean(self) -> bool:
        """True when nothing referenced by the index is missing."""
        return not self.missing_staged and not self.missing_blobs


class ArchiveLock:
    """A shared lock on a data folder for as long as an archive is open.

    Parameters
    ----------
    data_dir : path
        The archive's data folder (the lock file lives there).
    """

    def __init__(self, data_dir: str | os.PathLike):
        self._fd = os.open(Path(data_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)

    def try_exclusive(self) -> bool:
        """Take the lock exclusively when no other holder exists; return whether it was taken."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def share(self) -> None:
        """Hold the lock shared (waits while another holder runs its scan)."""
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release(self) -> None:
        """Release the lock and close its file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _referenced(index: Index) -> tuple[dict, set]:
    """Return ({staged key: SOP UID}, {blob key}) of everything the index refers to."""
    with index.read() as s:
        staged = dict(s.execute(select(Instance.staged_key, Instance.sop_uid)
                                .where(Instance.staged_key.is_not(None))).all())
        blob_keys = set(s.scalars(select(Blob.key)))
    return staged, blob_keys


def _remove_temp_files(blobs: BlobStore) -> int:
    removed = 0
    for sub in blobs.root.iterdir():
        if sub.is_dir():
            for tmp in sub.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def _reset_running_jobs(index: Index) -> int:
    with index.write() as s:
        jobs = list(s.scalars(select(Job).where(Job.state == "running")))
        for job in jobs:
            job.state, job.reason = "pending", "interrupted by a restart"
            job.next_attempt, job.updated_at = 0.0, time.time()
    return len(jobs)


def scan(index: Index, blobs: BlobStore, duplicates: str = "keep_first") -> RecoveryReport:
    """Index again the complete staged files whose rows were lost, remove other orphans and
    temporary files, report missing files, reset interrupted jobs.

    The caller must be the only user of the archive (see :func:`recover`).

    Parameters
    ----------
    index, blobs
        The archive's index and blob store.
    duplicates : str
        The archive's duplicate policy, applied to the files indexed again.

    Returns
    -------
    RecoveryReport
    """
    # first: a deleted instance's staged file must not look like a lost row's file below
    report = RecoveryReport(removals_finished=finish_removals(index, blobs),
                            temp_removed=_remove_temp_files(blobs))
    staged, blob_keys = _referenced(index)
    named = []                           # staged files whose name says how to index them
    for key in list(blobs.keys()):
        if key not in staged and key not in blob_keys:
            if recoverable(key):
                named.append(key)
            else:
                blobs.delete(key)
                report.orphans_removed.append(key)
    for key in sorted(named, key=lambda k: (reception_time(k, blobs.path(k)), k)):  # as received
        _reindex_if_complete(index, blobs, key, duplicates, report)
    for sub in {blobs.path(k).parent for k in report.orphans_removed}:
        fsync_dir(sub)
    if report.reindexed:     # a reindexed newer version may have replaced a missing row
        staged, blob_keys = _referenced(index)
    report.missing_staged = sorted(uid for key, uid in staged.items() if not blobs.exists(key))
    report.missing_blobs = sorted(k for k in blob_keys if not blobs.exists(k))
    report.jobs_reset = _reset_running_jobs(index)
    _log(report)
    return report


def _reindex_if_complete(index: Index, blobs: BlobStore, key: str, duplicates: str,
                         report: RecoveryReport) -> None:
    """Index a staged file again when its content matches the hash in its name (a complete
    write), else remove it (a write that never finished, never acknowledged)."""
    transfer_syntax, prefix = recoverable(key)
    try:
        data = blobs.get(key)
    except (KeyError, OSError):
        data = None
    digest = "" if data is None else hashlib.sha256(data).hexdigest()
    result = None
    if digest.startswith(prefix):
        try:
            result = reindex_staged(index, blobs, key, data, digest, transfer_syntax, duplicates)
        except (UnparseableDatasetError, DuplicateInstanceError) as exc:
            log.warning("recovery: staged file %s not indexed again (%s); removed", key, exc)
    if result is None:
        blobs.delete(key)
    if result is None or result.outcome == "duplicate_ignored":
        report.orphans_removed.append(key)
    else:
        report.reindexed.append(result.sop_uid)


def _log(report: RecoveryReport) -> None:
    if report.removals_finished:
        log.warning("recovery: removed %d files of interrupted deletions",
                    report.removals_finished)
    if report.orphans_removed or report.temp_removed or report.jobs_reset:
        log.warning("recovery: removed %d orphan files and %d temporary files, reset %d "
                    "interrupted compaction jobs", len(report.orphans_removed),
                    report.temp_removed, report.jobs_reset)
    for uid in report.missing_staged:
        log.error("recovery: staged file of instance %s is MISSING; it cannot be retrieved "
                  "(index row kept; run `voxarc verify`)", uid)
    for key in report.missing_blobs:
        log.error("recovery: blob %s is MISSING; its instances cannot be retrieved "
                  "(index rows kept; run `voxarc verify`)", key)


def recover(lock: ArchiveLock, index: Index, blobs: BlobStore,
            duplicates: str = "keep_first") -> RecoveryReport:
    """Scan the archive when no other process has it open, then hold ``lock`` shared.

    Returns
    -------
    RecoveryReport
        ``ran`` is False when the scan was skipped because the archive is in use.
    """
    if not lock.try_exclusive():
        log.info("recovery scan skipped: the archive is open in another process")
        lock.share()
        return RecoveryReport(ran=False)
    try:
        return scan(index, blobs, duplicates)
    finally:
        lock.share()
