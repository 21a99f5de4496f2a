"""Scrubbing: read back everything the archive holds and check it against the index.

:func:`scrub` (``voxarc verify``): every blob's stored bytes are hashed against the SHA-256 of
its row and coded volumes are decoded in full; every instance is rebuilt and checked against the
SHA-256 taken at ingest. :func:`check_stored_files` (the running node's patrol,
``service.patrol``): every blob file and every staged file hashed against the SHA-256 recorded
when it was written, without decoding. Both hash the recycle bin's files too. That is enough to find what the disk changed since: a
blob was decoded and compared with its staged pixels before it was committed, and decoding is
exact, so a blob with the same bytes decodes the same. Nothing is changed except by
:func:`requeue_failed_jobs`, the one repair the index allows (orphan files are removed by
:mod:`storage.recovery` when the archive is opened with no other user).
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from dataclasses import dataclass, field

from sqlalchemy import select

import models
from storage import header_pack
from storage.errors import StorageError
from storage.index import Blob, Instance, Job

log = logging.getLogger(__name__)


@dataclass
class ScrubReport:
    """Outcome of a scrub: counts checked and the failures, each with its reason."""

    blobs_checked: int = 0
    instances_checked: int = 0
    bytes_checked: int = 0
    bad_blobs: dict = field(default_factory=dict)        # key -> reason
    bad_instances: dict = field(default_factory=dict)    # SOP Instance UID -> reason
    bad_staged: dict = field(default_factory=dict)       # staged file key -> reason (patrol)
    bin_files_checked: int = 0
    bad_bin_files: dict = field(default_factory=dict)    # "ENTRY/FILE" of the bin -> reason

    @property
    def ok(self) -> bool:
        """True when every blob, every instance and every recycle bin file checked out."""
        return not self.bad_blobs and not self.bad_instances and not self.bad_bin_files


def _check_blob(archive, blob: Blob) -> str:
    """Return why ``blob`` is bad, or "" when its bytes and decoding are sound."""
    try:
        data = archive.blobs.get(blob.key)
    except KeyError:
        return "file missing"
    if hashlib.sha256(data).hexdigest() != blob.sha256:
        return "stored bytes differ from their recorded SHA-256"
    try:
        if blob.codec in header_pack.VOLUME_CODECS:
            if blob.codec == header_pack.CODEC:
                header_pack.unpack(data)
            models.decode_volume(header_pack.coded_view(data))
        elif blob.codec == "zlib":
            zlib.decompress(data)
    except (models.CorruptBlobError, zlib.error, ValueError) as exc:
        return f"does not decode: {exc}"
    return ""


def scrub(archive) -> ScrubReport:
    """Check every blob and every instance of ``archive``.

    Parameters
    ----------
    archive : storage.archive.Archive

    Returns
    -------
    ScrubReport
    """
    report = ScrubReport()
    with archive.index.read() as s:
        blobs = list(s.scalars(select(Blob)))
        uids = list(s.scalars(select(Instance.sop_uid).order_by(Instance.id)))
    for blob in blobs:
        reason = _check_blob(archive, blob)
        report.blobs_checked += 1
        if reason:
            report.bad_blobs[blob.key] = reason
            log.error("blob %s is bad: %s", blob.key, reason)
    for uid in uids:
        report.instances_checked += 1
        try:
            archive.retrieve(uid)
        except StorageError as exc:
            report.bad_instances[uid] = str(exc)
            log.error("instance %s is bad: %s", uid, exc)
    _check_bin(archive, report)
    return report


def _check_bin(archive, report: ScrubReport, pace=None) -> None:
    """The recycle bin's files (deletions to undo, originals kept for legal holds)."""
    files, nbytes, bad = archive.recycle.check(pace)
    report.bin_files_checked, report.bad_bin_files = files, bad
    report.bytes_checked += nbytes


def check_stored_files(archive, pace=None) -> ScrubReport:
    """Hash every blob file and every staged instance file of ``archive`` against its recorded
    SHA-256 (no decoding). A damaged blob makes each instance it holds bad too. Files removed
    meanwhile (a compaction, a deletion) are skipped. ``pace(nbytes)``, when given, is called
    after each file: it may sleep to spread the reading out, or raise to end the round.

    Returns
    -------
    ScrubReport
        ``instances_checked`` counts the staged instances; ``bytes_checked`` what was read.
    """
    report = ScrubReport()
    with archive.index.read() as s:
        blobs = list(s.execute(select(Blob.id, Blob.key, Blob.sha256).order_by(Blob.id)))
        staged = list(s.execute(select(Instance.sop_uid, Instance.staged_key, Instance.sha256)
                                .where(Instance.staged_key.is_not(None)).order_by(Instance.id)))
    for blob_id, key, sha in blobs:
        reason, nbytes = _file_check(archive, key, sha)
        if reason and _still_there(archive, Blob.key, key):
            report.bad_blobs[key] = reason
            held = _instances_in(archive, blob_id)
            for uid in held:
                report.bad_instances[uid] = f"its blob {key} is damaged: {reason}"
            log.error("blob %s is damaged (%s); it holds %d instances: %s", key, reason,
                      len(held), ", ".join(held[:20]) + (" ..." if len(held) > 20 else ""))
        report.blobs_checked += 1
        report.bytes_checked += nbytes
        if pace:
            pace(nbytes)
    for uid, key, sha in staged:
        reason, nbytes = _file_check(archive, key, sha)
        if reason and _still_there(archive, Instance.staged_key, key):
            report.bad_staged[key] = reason
            report.bad_instances[uid] = f"its staged file {key} is damaged: {reason}"
            log.error("instance %s is damaged: staged file %s %s", uid, key, reason)
        report.instances_checked += 1
        report.bytes_checked += nbytes
        if pace:
            pace(nbytes)
    _check_bin(archive, report, pace)
    return report


def _file_check(archive, key: str, sha256: str) -> tuple[str, int]:
    """(why the file of ``key`` is bad or "", bytes read)."""
    try:
        with open(archive.blobs.path(key), "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            nbytes = f.tell()
    except FileNotFoundError:
        return "file missing", 0
    except OSError as exc:
        return f"unreadable ({exc})", 0
    return ("" if digest == sha256 else "bytes differ from their recorded SHA-256"), nbytes


def _still_there(archive, column, key: str) -> bool:
    """Whether a row still refers to ``key`` (else its file was removed with it: no damage)."""
    with archive.index.read() as s:
        return s.scalar(select(column).where(column == key).limit(1)) is not None


def _instances_in(archive, blob_id: int) -> list[str]:
    with archive.index.read() as s:
        return list(s.scalars(select(Instance.sop_uid).where(Instance.blob_fk == blob_id)
                              .order_by(Instance.id)))


def requeue_failed_jobs(archive) -> int:
    """Make failed compaction jobs due now (their series are still staged); return how many."""
    with archive.index.write() as s:
        jobs = list(s.scalars(select(Job).where(Job.state == "failed")))
        for job in jobs:
            job.next_attempt = 0.0
    return len(jobs)
