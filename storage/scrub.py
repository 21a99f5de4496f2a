"""Scrubbing: read back everything the archive holds and check it against the index.

Every blob's stored bytes are hashed against the SHA-256 of its row and coded volumes are decoded
in full; every instance is rebuilt and checked against the SHA-256 taken at ingest. Nothing is
changed except by :func:`requeue_failed_jobs`, the one repair the index allows (orphan files are
removed by :mod:`storage.recovery` when the archive is opened with no other user).
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
    bad_blobs: dict = field(default_factory=dict)        # key -> reason
    bad_instances: dict = field(default_factory=dict)    # SOP Instance UID -> reason

    @property
    def ok(self) -> bool:
        """True when every blob and every instance checked out."""
        return not self.bad_blobs and not self.bad_instances


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
    return report


def requeue_failed_jobs(archive) -> int:
    """Make failed compaction jobs due now (their series are still staged); return how many."""
    with archive.index.write() as s:
        jobs = list(s.scalars(select(Job).where(Job.state == "failed")))
        for job in jobs:
            job.next_attempt = 0.0
    return len(jobs)
