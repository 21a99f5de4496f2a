"""Durable staging of received instances: bytes on disk (fsync), index row committed, then success.

A staged instance is the dataset exactly as received (no File Meta), under a random key in the
blob store; its index row records the transfer syntax, size, SHA-256 and where its pixel words sit
so that compaction needs no second parse.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, update
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


class Stager:
    """Group commit of received instances: concurrent C-STOREs share one index transaction.

    Each instance's bytes are written and fsync'd (file and directory) on a small pool of I/O
    threads while the receiving thread parses the dataset; its index row then goes to one writer
    thread, which takes every row waiting at that moment, commits them in one transaction (one
    fsync of the SQLite WAL, ``synchronous=FULL``) and only then wakes their senders. A lone
    client waits for no batching window; concurrent ones share fsyncs. Nothing is acknowledged
    before its bytes are durable and its row is committed.

    Parameters
    ----------
    index : Index
    io_threads : int
        Threads writing and fsyncing staged files.
    max_batch : int
        Most instances committed in one transaction.
    """

    def __init__(self, index: Index, io_threads: int = 4, max_batch: int = 256):
        self.index, self.max_batch = index, max_batch
        self.io = ThreadPoolExecutor(io_threads, thread_name_prefix="voxarc-stage-io")
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._run, name="voxarc-group-commit", daemon=True)
        self._writer.start()
        self.batches = self.committed = 0           # counters, for logs and tests
        self._ids: dict = {}     # (table, uid) -> row id of committed patients/studies/series

    def commit(self, facts: InstanceFacts, fields: dict, duplicates: str):
        """Commit one index row with whatever else is waiting; return (outcome, key to drop)."""
        item = _Pending(facts, fields, duplicates)
        self._queue.put(item)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def close(self) -> None:
        """Commit what is queued, stop the writer thread and the I/O threads."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
        self.io.shutdown(wait=True)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit_batch(batch)
            if stop:
                return

    def _commit_batch(self, batch: list) -> None:
        ids = dict(self._ids)
        try:
            with self.index.write() as session:
                now = time.time()
                for item in batch:
                    try:
                        item.result = _apply(session, item.facts, item.fields, item.duplicates,
                                             now, ids)
                    except DuplicateInstanceError as exc:   # raised before any write
                        item.error = exc
            self._ids = ids if len(ids) < 100_000 else {}
            self.batches += 1
            self.committed += len(batch)
        except Exception as exc:  # one bad row must not fail the others: retry them one by one
            self._ids = {}
            if len(batch) > 1:
                log.warning("group commit of %d instances failed (%s); committing one by one",
                            len(batch), exc)
                for item in batch:
                    item.result, item.error = None, None
                    self._commit_batch([item])
                return
            batch[0].error = exc
        for item in batch:
            item.done.set()


class _Pending:
    __slots__ = ("facts", "fields", "duplicates", "result", "error", "done")

    def __init__(self, facts, fields, duplicates):
        self.facts, self.fields, self.duplicates = facts, fields, duplicates
        self.result, self.error, self.done = None, None, threading.Event()


def ingest(index: Index, blobs: BlobStore, data: bytes, transfer_syntax: str,
           duplicates: str = "keep_first", max_bytes: int = 0,
           stager: Stager | None = None) -> IngestResult:
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
    stager : Stager, optional
        Write the file while parsing and group-commit the index row (else all in this thread).

    Raises
    ------
    UnparseableDatasetError, StorageFullError, DuplicateInstanceError
    """
    key = new_key("s")
    written = None
    if stager is not None and max_bytes <= 0:     # write (and fsync) while we parse
        written = stager.io.submit(blobs.put, key, data)
    try:
        ds = parse_dataset(data, transfer_syntax)
        facts = describe(ds)
        layout = pixel_layout(ds, transfer_syntax)
        if written is None:
            _check_space(index, len(data), max_bytes)
        digest = hashlib.sha256(data).hexdigest()
    except BaseException:
        if written is not None:
            _discard(written, blobs, key)
        raise
    if written is None:
        blobs.put(key, data)
    else:
        written.result()                          # StorageFullError when the write failed
    fields = dict(transfer_syntax=transfer_syntax, size=len(data), sha256=digest, staged_key=key,
                  stack_format=stack_format(layout, facts, transfer_syntax),
                  pixel_offset=layout.offset if layout else 0,
                  pixel_length=layout.nbytes if layout else 0,
                  frames=layout.frames if layout else 1)
    try:
        if stager is not None:
            outcome, dropped_key = stager.commit(facts, fields, duplicates)
        else:
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


def _discard(written, blobs: BlobStore, key: str) -> None:
    """Wait for a write whose instance was refused, then remove its file."""
    try:
        written.result()
    except Exception:
        pass
    blobs.delete(key)


def _commit(index: Index, facts: InstanceFacts, fields: dict, duplicates: str):
    """Write the index rows in their own transaction; return (outcome, staged key to delete
    afterwards or None)."""
    with index.write() as session:
        return _apply(session, facts, fields, duplicates, time.time())


def _apply(session, facts: InstanceFacts, fields: dict, duplicates: str, now: float,
           ids: dict | None = None):
    """Add one instance's rows to ``session`` with Core statements (the ORM costs more than the
    fsync here); raise DuplicateInstanceError before any write. ``ids`` caches the row ids of
    patients, studies and series already in the database."""
    old = session.execute(select(Instance.id, Instance.staged_key)
                          .where(Instance.sop_uid == facts.sop_uid)).first()
    if old is not None and duplicates == "reject":
        raise DuplicateInstanceError(f"instance {facts.sop_uid} already stored")
    if old is not None and duplicates != "replace":
        log.warning("duplicate instance %s ignored (policy keep_first)", facts.sop_uid)
        return "duplicate_ignored", fields["staged_key"]
    dropped = None
    if old is not None:
        dropped = old.staged_key
        session.execute(delete(Instance).where(Instance.id == old.id))
        log.warning("duplicate instance %s replaces the stored one (policy replace)",
                    facts.sop_uid)
    ids = {} if ids is None else ids
    patient = _row_id(session, ids, Patient, "patient_id", facts.patient)
    study = _row_id(session, ids, Study, "study_uid", facts.study, patient_fk=patient)
    series = _row_id(session, ids, Series, "series_uid", facts.series, study_fk=study)
    session.execute(update(Series).where(Series.id == series).values(last_received=now))
    session.execute(insert(Instance).values(
        sop_uid=facts.sop_uid, series_fk=series, sop_class_uid=facts.sop_class_uid,
        instance_number=facts.instance_number, position=facts.position, received_at=now,
        **fields))
    return ("replaced" if old is not None else "stored"), dropped


def _row_id(session, ids: dict, model, key: str, values: dict, **parent) -> int:
    """Id of the row of ``model`` whose ``key`` is ``values[key]``, added when missing."""
    cache_key = (model.__tablename__, values[key])
    row_id = ids.get(cache_key)
    if row_id is None:
        row_id = session.scalar(select(model.id).where(getattr(model, key) == values[key]))
        if row_id is None:
            row_id = session.execute(insert(model).values(**values, **parent)) \
                .inserted_primary_key[0]
        ids[cache_key] = row_id
    return row_id
