"""Durable staging of received instances: bytes on disk (fsync), index row committed, then success.

A staged instance is the dataset exactly as received (no File Meta), under a random key in the
blob store; its index row records the transfer syntax, size, SHA-256 and where its pixel words sit
so that compaction needs no second parse.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from storage.blobstore import BlobStore, new_key
from storage.dataset_parts import parse_dataset, pixel_layout
from storage.errors import DuplicateInstanceError, StorageFullError
from storage.index import Index, Instance, Patient, Series, Study
from storage.instance_facts import InstanceFacts, describe, stack_format

log = logging.getLogger(__name__)
DUPLICATE_POLICIES = ("keep_first", "replace", "reject")


@dataclass(frozen=True)
class IngestResult:
    """Outcome of one ingest: ``"stored"``, ``"replaced"`` or ``"duplicate_ignored"``."""

    outcome: str
    sop_uid: str
    series_uid: str


def _get_or_add(session, model, key: str, values: dict, **parent):
    row = session.scalar(select(model).where(getattr(model, key) == values[key]))
    if row is None:
        row = model(**values, **parent)
        session.add(row)
        session.flush()
    return row


def _index_row(session, facts: InstanceFacts, now: float, **fields) -> Series:
    patient = _get_or_add(session, Patient, "patient_id", facts.patient)
    study = _get_or_add(session, Study, "study_uid", facts.study, patient_fk=patient.id)
    series = _get_or_add(session, Series, "series_uid", facts.series, study_fk=study.id)
    series.last_received = now
    session.add(Instance(sop_uid=facts.sop_uid, series_fk=series.id,
                         sop_class_uid=facts.sop_class_uid, instance_number=facts.instance_number,
                         position=facts.position, received_at=now, **fields))
    return series


def stored_bytes(session) -> int:
    """Return the bytes the archive holds now (staged instances, blobs and header bytes)."""
    from storage.index import Blob
    staged = session.scalar(select(func.coalesce(func.sum(Instance.size), 0))
                            .where(Instance.staged_key.is_not(None)))
    blobs = session.scalar(select(func.coalesce(func.sum(Blob.stored_bytes), 0)))
    headers = session.scalar(select(func.coalesce(
        func.sum(func.length(Instance.header_before) + func.length(Instance.header_after)), 0)))
    return int(staged) + int(blobs) + int(headers)


def _check_space(index: Index, incoming: int, max_bytes: int) -> None:
    if max_bytes <= 0:
        return
    with index.read() as session:
        used = stored_bytes(session)
    if used + incoming > max_bytes:
        raise StorageFullError(f"storage limit {max_bytes} bytes reached ({used} used)")


def ingest(index: Index, blobs: BlobStore, data: bytes, transfer_syntax: str,
           duplicates: str = "keep_first", max_bytes: int = 0) -> IngestResult:
    """Stage one received dataset durably and index it.

    Parameters
    ----------
    index, blobs
        The archive's index and blob store.
    data : bytes
        The dataset as received, without File Meta, encoded in ``transfer_syntax``.
    transfer_syntax : str
        Transfer Syntax UID of ``data``.
    duplicates : {"keep_first", "replace", "reject"}
        What to do when the SOP Instance UID is already stored.
    max_bytes : int
        Refuse the instance when the archive would exceed this many bytes (0: no limit).

    Raises
    ------
    UnparseableDatasetError, StorageFullError, DuplicateInstanceError
    """
    ds = parse_dataset(data, transfer_syntax)
    facts = describe(ds)
    layout = pixel_layout(ds, transfer_syntax)
    _check_space(index, len(data), max_bytes)
    key = new_key("s")
    blobs.put(key, data)
    fields = dict(transfer_syntax=transfer_syntax, size=len(data),
                  sha256=hashlib.sha256(data).hexdigest(), staged_key=key,
                  stack_format=stack_format(layout, facts, transfer_syntax),
                  pixel_offset=layout.offset if layout else 0,
                  pixel_length=layout.nbytes if layout else 0,
                  frames=layout.frames if layout else 1)
    try:
        outcome, dropped_key = _commit(index, facts, fields, duplicates)
    except (SQLAlchemyError, DuplicateInstanceError) as exc:
        blobs.delete(key)
        if isinstance(exc, DuplicateInstanceError):
            raise
        raise StorageFullError(f"cannot index {facts.sop_uid}: {exc}") from exc
    if dropped_key:
        blobs.delete(dropped_key)
    log.info("%s instance %s (%d bytes, %s) of series %s", outcome, facts.sop_uid, len(data),
             transfer_syntax, facts.series["series_uid"])
    return IngestResult(outcome, facts.sop_uid, facts.series["series_uid"])


def _commit(index: Index, facts: InstanceFacts, fields: dict, duplicates: str):
    """Write the index rows; return (outcome, staged key to delete afterwards or None)."""
    with index.write() as session:
        old = session.scalar(select(Instance).where(Instance.sop_uid == facts.sop_uid))
        if old is not None and duplicates == "reject":
            raise DuplicateInstanceError(f"instance {facts.sop_uid} already stored")
        if old is not None and duplicates != "replace":
            log.warning("duplicate instance %s ignored (policy keep_first)", facts.sop_uid)
            return "duplicate_ignored", fields["staged_key"]
        dropped = None
        if old is not None:
            dropped = old.staged_key
            session.delete(old)
            session.flush()
            log.warning("duplicate instance %s replaces the stored one (policy replace)",
                        facts.sop_uid)
        _index_row(session, facts, time.time(), **fields)
        return ("replaced" if old is not None else "stored"), dropped
