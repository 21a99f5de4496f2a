"""Durable staging of received instances: bytes on disk (fsync), index row committed, then success.

A staged instance is the dataset exactly as received (no File Meta), under a random key in the
blob store; its index row records the transfer syntax, size, SHA-256 and where its pixel words sit
so that compaction needs no second parse.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from storage import holds
from storage.blobstore import BlobStore
from storage.correction import CorrectionError, LateArrivals, corrected_bytes
from storage.dataset_parts import parse_fields, pixel_layout
from storage.errors import (CommitOutcomeUnknown, DatasetMismatchError, DuplicateInstanceError,
                            StorageFullError)
from storage.index import Correction, Deletion, Index, Instance, Patient, Series, Study
from storage.instance_facts import (
    INDEXED_KEYWORDS, PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS, InstanceFacts, describe, stack_format,
)
from storage.staged_keys import reception_time, recoverable, staged_file_key

log = logging.getLogger(__name__)
DUPLICATE_POLICIES = ("keep_first", "replace", "reject")


@dataclass(frozen=True)
class IngestResult:
    """Outcome of one ingest: ``"stored"``, ``"replaced"`` or ``"duplicate_ignored"``, and
    where the instance belongs."""

    outcome: str
    sop_uid: str
    series_uid: str
    sop_class_uid: str = ""
    study_uid: str = ""


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

    The receiving thread hashes each instance, writes its bytes under a name that lets recovery
    index them again (:mod:`storage.staged_keys`), and fsyncs them (file, then folder) on a
    small pool of I/O threads while it parses the dataset. Its index row then joins a queue, and the
    receiving thread becomes the committer if no other thread is committing: it takes every row
    waiting at that moment, executes their statements, waits until each of their files is
    durable, and only then commits them in one transaction and marks them done; the threads
    whose rows it took return without a transaction of their own. A lone client pays no thread
    switch and waits for no batching window (its statements run while its file is being
    fsync'd). Nothing is committed before its bytes are durable, nothing acknowledged before its
    row is committed. The commit does not wait for the database's own flush when every row of
    the batch has a recoverable file name (``Index.connect(durable=False)``): a crash of the
    process cannot lose it, and after a power loss recovery indexes the files again.

    Parameters
    ----------
    index : Index
    io_threads : int
        Threads fsyncing staged files.
    max_batch : int
        Most instances committed in one transaction.
    """

    def __init__(self, index: Index, io_threads: int = 4, max_batch: int = 256):
        self.index, self.max_batch = index, max_batch
        self.io = ThreadPoolExecutor(io_threads, thread_name_prefix="voxarc-stage-io")
        self._waiting: collections.deque = collections.deque()
        self._committer = threading.Lock()
        self.batches = self.committed = 0           # counters, for logs and tests
        self._ids: dict = {}     # (table, uid) -> row id of committed patients/studies/series
        self._generation = None  # the last deletion's id when those ids were good (None: read)
        self._warm()

    def _warm(self) -> None:
        """Run the ingest statements once in a rolled-back transaction, so that the first
        C-STORE after a start does not pay their compilation and the first connection (10-15 ms
        here)."""
        blank = lambda keys: {k: "\0voxarc-warm-up" for k in keys}    # noqa: E731
        facts = InstanceFacts("\0voxarc-warm-up", "", None, blank(PATIENT_KEYS),
                              blank(STUDY_KEYS), blank(SERIES_KEYS))
        fields = dict(transfer_syntax="", size=0, sha256="", staged_key="", stack_format="",
                      pixel_offset=0, pixel_length=0, frames=1)
        try:
            with self.index.connect(durable=False) as conn:
                _apply(conn, facts, fields, "keep_first", 0.0)
                raise _RollBack
        except _RollBack:
            pass
        except SQLAlchemyError as exc:       # not fatal: the first store compiles them
            log.debug("warming the ingest statements failed: %s", exc)

    def sync(self, blobs: BlobStore, new) -> Future:
        """Fsync a written staged file (:meth:`BlobStore.sync_new`) on an I/O thread; return
        once that thread is at the fsync (or after 2 ms, when every I/O thread is busy). The
        caller goes on to parse (pure Python, holding the GIL): without the wait, the I/O thread
        would only start when the interpreter next switches threads, up to a switch interval
        (5 ms) later."""
        started = threading.Event()

        def run():
            started.set()
            blobs.sync_new(new)

        future = self.io.submit(run)
        started.wait(0.002)
        return future

    def commit(self, facts: InstanceFacts, fields: dict, duplicates: str, written=None):
        """Commit one index row with whatever else is waiting, once ``written`` (the future of
        its file's write, if any) is done; return (outcome, key to drop). Raises what the write
        raised (the row is then not committed)."""
        item = _Pending(facts, fields, duplicates, written)
        self._waiting.append(item)
        while not item.done:
            with self._committer:          # the committer of the moment takes what is waiting
                if item.done:
                    break
                batch = []
                while self._waiting and len(batch) < self.max_batch:
                    batch.append(self._waiting.popleft())
                try:
                    self._commit_batch(batch)
                except BaseException as exc:    # never leave a taken row waiting forever
                    for other in batch:
                        if not other.done:
                            other.error, other.done = exc, True
                    raise
        if item.error is not None:
            raise item.error
        return item.result

    def close(self) -> None:
        """Stop the I/O threads (every commit happens on its caller's thread)."""
        self.io.shutdown(wait=True)

    def _commit_batch(self, batch: list, cached: bool = True, attempt: int = 0) -> None:
        # a deletion (`voxarc delete`, maybe in another process) frees row ids, and SQLite
        # gives a freed id to the next new row: cached ids are only good while no deletion
        # has committed since they were read. The last deletion's id, read within each
        # batch's write transaction, tells: unchanged since the last batch's, none came
        # between (one read a batch; a fresh baseline only after a change)
        generation = self._generation
        if generation is None:
            with self.index.engine.connect() as conn:
                generation = _last_deletion(conn)
            self._ids = {}
        ids = dict(self._ids) if cached else {}
        cached = bool(ids)
        # rows whose staged file can be indexed again (storage.staged_keys) need no flush of
        # the database: their files are durable before the commit
        durable = not all(recoverable(item.fields["staged_key"]) for item in batch)
        body_done = False
        try:
            with self.index.connect(durable) as conn:
                now, touched = time.time(), set()
                for item in batch:
                    try:
                        item.result = _apply(conn, item.facts, item.fields, item.duplicates,
                                             now, ids, touched)
                    except DuplicateInstanceError as exc:   # raised before any write
                        item.error = exc
                # within the write transaction: no deletion can commit after this read until
                # ours does, so an unchanged value means that none came since the baseline
                if _last_deletion(conn) != generation:
                    raise _DeletedMeanwhile()
                for item in batch:            # files durable before their rows commit
                    _wait_written(item)
                body_done = True              # what fails from here on is the commit itself
            self._ids = ids if len(ids) < 100_000 else {}
            self._generation = generation
            self.batches += 1
            self.committed += len(batch)
        except _DeletedMeanwhile:
            self._ids, self._generation = {}, None
            if attempt < 5:
                log.info("rows were deleted while %d instances were being indexed; again",
                         len(batch))
                for item in batch:
                    item.result, item.error = None, None
                self._commit_batch(batch, cached=False, attempt=attempt + 1)
                return
            raise StorageFullError("deletions kept changing the index under ingest") from None
        except Exception as exc:  # one bad row must not fail the others: retry them one by one
            self._ids, self._generation = {}, None
            if body_done and _took_place(self.index, batch, exc):
                self.batches += 1             # the commit's answer was lost, not the commit
                self.committed += len(batch)
                for item in batch:
                    item.done = True
                return
            if cached:
                # a cached patient, study or series row may have been deleted (`voxarc
                # delete` in another process): once more, looking every row up
                log.info("commit of %d instances failed (%s); again without cached rows",
                         len(batch), exc)
                for item in batch:
                    item.result, item.error = None, None
                self._commit_batch(batch, cached=False)
                return
            if len(batch) > 1:
                log.warning("group commit of %d instances failed (%s); committing one by one",
                            len(batch), exc)
                for item in batch:
                    item.result, item.error = None, None
                    self._commit_batch([item])
                return
            batch[0].error = exc
        for item in batch:
            item.done = True


class _DeletedMeanwhile(Exception):
    """A deletion committed while a batch was being indexed: its looked-up row ids may be
    stale."""


class _RollBack(Exception):
    """Ends a transaction that must not commit."""


class _Pending:
    __slots__ = ("facts", "fields", "duplicates", "written", "result", "error", "done")

    def __init__(self, facts, fields, duplicates, written=None):
        self.facts, self.fields, self.duplicates = facts, fields, duplicates
        self.written = written
        self.result, self.error, self.done = None, None, False


def _wait_written(item: _Pending) -> None:
    """Wait for an item's file write; raise its error unless the row needs no file (a refused
    or ignored duplicate, whose file is removed anyway)."""
    if item.written is None:
        return
    try:
        item.written.result()
    except Exception:
        if item.error is None and item.result[0] != "duplicate_ignored":
            raise


def ingest(index: Index, blobs: BlobStore, data: bytes, transfer_syntax: str,
           duplicates: str = "keep_first", max_bytes: int = 0,
           stager: Stager | None = None, sop_uid: str | None = None,
           source_ae: str = "", late: LateArrivals | None = None) -> IngestResult:
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
    sop_uid : str, optional
        The SOP Instance UID the dataset must have (its C-STORE request's).
    source_ae : str
        The calling AE title that sent it (kept in the index; forwarding rules match it).
    late : LateArrivals, optional
        Brings an instance of a corrected series, study or patient in line with the
        correction before it is staged (logged); else it is staged as received.

    Raises
    ------
    UnparseableDatasetError, StorageFullError, DuplicateInstanceError, DatasetMismatchError
    """
    digest = hashlib.sha256(data).hexdigest()
    key = staged_file_key(transfer_syntax, digest)
    written = None
    if stager is not None and max_bytes <= 0:     # written here, fsync'd while we parse
        written = stager.sync(blobs, blobs.write_new(key, data))
    try:
        facts, fields = _describe(data, transfer_syntax, digest, key)
        if sop_uid is not None and facts.sop_uid != sop_uid:
            raise DatasetMismatchError(f"the dataset is instance {facts.sop_uid}, the request "
                                       f"names {sop_uid}")
        coerced = _in_line(late, facts, data, transfer_syntax)
        if coerced is not None:
            if written is not None:
                _discard(written, blobs, key)
            data, digest = coerced, hashlib.sha256(coerced).hexdigest()
            key = staged_file_key(transfer_syntax, digest)
            written = stager.sync(blobs, blobs.write_new(key, data)) \
                if written is not None else None
            facts, fields = _describe(data, transfer_syntax, digest, key)
        fields = {**fields, "source_ae": source_ae.strip()[:16]}
        if written is None:
            _check_space(index, len(data), max_bytes)
    except BaseException:
        if written is not None:
            _discard(written, blobs, key)
        raise
    if written is None:
        blobs.put_new(key, data)
    try:
        if stager is not None:
            outcome, dropped_key = stager.commit(facts, fields, duplicates, written)
        else:
            outcome, dropped_key = _commit(index, facts, fields, duplicates)
    except (SQLAlchemyError, DuplicateInstanceError, StorageFullError) as exc:
        if written is not None:
            _discard(written, blobs, key)
        else:
            blobs.delete(key)
        if isinstance(exc, (DuplicateInstanceError, StorageFullError)):
            raise
        raise StorageFullError(f"cannot index {facts.sop_uid}: {exc}") from exc
    if dropped_key:
        blobs.delete(dropped_key)
    log.debug("%s instance %s (%d bytes, %s) of series %s", outcome, facts.sop_uid, len(data),
              transfer_syntax, facts.series["series_uid"])
    return _result(outcome, facts)


def _in_line(late: LateArrivals | None, facts: InstanceFacts, data: bytes,
             transfer_syntax: str) -> bytes | None:
    """The instance's bytes brought in line with a correction of where it is filed (None:
    nothing to change, or it cannot be changed: then it is stored as received, logged)."""
    values = late.values_for(facts) if late is not None else {}
    if not values:
        return None
    try:
        new = corrected_bytes(data, transfer_syntax, values)
    except CorrectionError as exc:
        log.warning("instance %s arrived after its series or study was corrected, and is "
                    "stored as received: %s", facts.sop_uid, exc)
        return None
    log.warning("instance %s of series %s arrived after a correction and is brought in line "
                "with it: %s", facts.sop_uid, facts.series["series_uid"],
                "; ".join(f"{k} -> {v!r}" for k, v in values.items()))
    return new


def _result(outcome: str, facts: InstanceFacts) -> IngestResult:
    return IngestResult(outcome, facts.sop_uid, facts.series["series_uid"], facts.sop_class_uid,
                        facts.study["study_uid"])


def _describe(data: bytes, transfer_syntax: str, digest: str, key: str):
    """(facts, instance row fields) of a staged dataset; raises UnparseableDatasetError."""
    ds = parse_fields(data, transfer_syntax, INDEXED_KEYWORDS)
    facts = describe(ds)
    layout = pixel_layout(ds, transfer_syntax)
    return facts, dict(transfer_syntax=transfer_syntax, size=len(data), sha256=digest,
                       staged_key=key, stack_format=stack_format(layout, facts, transfer_syntax),
                       pixel_offset=layout.offset if layout else 0,
                       pixel_length=layout.nbytes if layout else 0,
                       frames=layout.frames if layout else 1)


def reindex_staged(index: Index, blobs: BlobStore, key: str, data: bytes, digest: str,
                   transfer_syntax: str, duplicates: str = "keep_first") -> IngestResult:
    """Index again the staged file ``key`` (its bytes ``data``, their hex SHA-256 ``digest``)
    whose row was lost (recovery after a power loss), with a durable commit; the reception time
    its name carries (else its modification time) stands for the row's, and under the
    ``replace`` policy it never replaces a row received after it.

    Raises
    ------
    UnparseableDatasetError, DuplicateInstanceError
    """
    facts, fields = _describe(data, transfer_syntax, digest, key)
    received = reception_time(key, blobs.path(key))
    with index.connect() as conn:
        outcome, dropped_key = _apply(conn, facts, fields, duplicates, received, keep_newer=True)
    if dropped_key:
        blobs.delete(dropped_key)
    log.warning("recovery: %s instance %s from staged file %s (its index row was lost)",
                outcome, facts.sop_uid, key)
    return _result(outcome, facts)


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
    item = _Pending(facts, fields, duplicates, None)
    body_done = False
    try:
        with index.connect() as conn:
            item.result = _apply(conn, facts, fields, duplicates, time.time())
            body_done = True
    except Exception as exc:
        if not (body_done and _took_place(index, [item], exc)):
            raise
    return item.result


_STAGED = select(Instance.__table__.c.staged_key).where(
    Instance.__table__.c.staged_key.in_(bindparam("p_keys", expanding=True)))


def _took_place(index: Index, batch: list, exc: Exception) -> bool:
    """After a commit of ``batch`` raised ``exc``: whether it took place all the same (a server
    connection lost with the commit's answer), read from the index: its rows name the batch's
    staged files, whose keys are new to this attempt. Raises CommitOutcomeUnknown when the
    index cannot be read: the files must then stay (recovery indexes a file without a row)."""
    keys = [item.fields["staged_key"] for item in batch if item.error is None]
    if not keys:
        return False
    try:
        with index.engine.connect() as conn:
            found = set(conn.scalars(_STAGED, {"p_keys": keys}))
    except SQLAlchemyError as again:
        raise CommitOutcomeUnknown(f"a commit failed ({exc}) and the index cannot be read to "
                                   f"tell whether it took place ({again})") from exc
    if found:
        log.warning("a commit of %d instances reported an error but took place: %s",
                    len(keys), exc)
    return bool(found)


# Core statements on the tables, built once (SQLAlchemy caches their compiled form): the ORM
# session and per-call statement building cost more than the fsync here.
_INSTANCES, _SERIES = Instance.__table__, Series.__table__
_OLD = select(_INSTANCES.c.id, _INSTANCES.c.staged_key, _INSTANCES.c.received_at) \
    .where(_INSTANCES.c.sop_uid == bindparam("p_sop_uid"))
_DELETE = delete(_INSTANCES).where(_INSTANCES.c.id == bindparam("p_id"))
_TOUCH = update(_SERIES).where(_SERIES.c.id == bindparam("p_id")) \
    .values(last_received=bindparam("p_now"))
_INSERT = insert(_INSTANCES)
_HELD_SERIES = select(_SERIES.c.id, Study.study_uid, Patient.patient_id) \
    .join(Study, _SERIES.c.study_fk == Study.id).join(Patient, Study.patient_fk == Patient.id) \
    .where(_SERIES.c.series_uid == bindparam("p_uid"))
_HELD_STUDY = select(Study.id, Patient.patient_id).join(Patient, Study.patient_fk == Patient.id) \
    .where(Study.study_uid == bindparam("p_uid"))
# a correction drops patient and study rows as a deletion does
_LAST_DELETION = (f"SELECT (SELECT coalesce(max(id), 0) FROM {Deletion.__tablename__}), "
                  f"(SELECT coalesce(max(id), 0) FROM {Correction.__tablename__})")


def _last_deletion(conn) -> tuple[int, int]:
    """The ids of the last deletion and the last correction (0: none), on ``conn``'s DBAPI
    connection, in its transaction: a Core statement costs ten times as much, on every
    batch."""
    cursor = conn.connection.cursor()
    try:
        cursor.execute(_LAST_DELETION)
        return tuple(cursor.fetchone())
    finally:
        cursor.close()


def _apply(conn, facts: InstanceFacts, fields: dict, duplicates: str, now: float,
           ids: dict | None = None, touched: set | None = None, keep_newer: bool = False):
    """Add one instance's rows on the Core connection ``conn``; raise DuplicateInstanceError
    before any write. ``ids`` caches the row ids of patients, studies and series already in the
    database; ``touched`` holds the series whose ``last_received`` is ``now`` already;
    ``keep_newer``: a replacement never replaces a row received after ``now``."""
    old = conn.execute(_OLD, {"p_sop_uid": facts.sop_uid}).first()
    if old is not None and old.staged_key == fields["staged_key"]:
        return "stored", None          # this very file's row (a retried commit that took place)
    if old is not None and duplicates == "reject":
        raise DuplicateInstanceError(f"instance {facts.sop_uid} already stored")
    if old is not None and keep_newer and (old.received_at or 0) > now:
        duplicates = "keep_first"
    if old is not None and duplicates == "replace" and \
            conn.execute(holds.INSTANCE_HELD, {"p_id": old.id}).first() is not None:
        log.warning("duplicate instance %s ignored: its study is on legal hold, so it does not "
                    "replace the stored one (policy replace)", facts.sop_uid)
        return "duplicate_ignored", fields["staged_key"]
    if old is not None and duplicates != "replace":
        log.warning("duplicate instance %s ignored (policy keep_first)", facts.sop_uid)
        return "duplicate_ignored", fields["staged_key"]
    dropped = None
    if old is not None:
        dropped = old.staged_key
        conn.execute(_DELETE, {"p_id": old.id})
        log.warning("duplicate instance %s replaces the stored one (policy replace)",
                    facts.sop_uid)
    series = _series_id(conn, {} if ids is None else ids, facts)
    if touched is None or series not in touched:
        conn.execute(_TOUCH, {"p_id": series, "p_now": now})
        if touched is not None:
            touched.add(series)
    conn.execute(_INSERT, dict(
        sop_uid=facts.sop_uid, series_fk=series, sop_class_uid=facts.sop_class_uid,
        instance_number=facts.instance_number, position=facts.position, received_at=now,
        **fields))
    return ("replaced" if old is not None else "stored"), dropped


def _series_id(conn, ids: dict, facts: InstanceFacts) -> int:
    """The id of an instance's series row, made (with its study's and patient's, when new)
    from its attributes. A series or study held already stays where it is filed, which a
    correction may have changed (`voxarc correct`): its study and patient are neither looked
    up nor made from this instance's attributes, and an instance that names another patient
    or study is logged (once per series while ``ids`` holds it)."""
    uid, study_uid = facts.series["series_uid"], facts.study["study_uid"]
    if ("series", uid) in ids:
        return ids["series", uid]
    held = conn.execute(_HELD_SERIES, {"p_uid": uid}).first()
    if held is not None:
        _note_filed(facts, held.patient_id, held.study_uid)
        ids["series", uid] = held.id
        return held.id
    study = ids.get(("studies", study_uid))
    if study is None:
        held = conn.execute(_HELD_STUDY, {"p_uid": study_uid}).first()
        if held is not None:
            _note_filed(facts, held.patient_id, study_uid)
            study = ids["studies", study_uid] = held.id
        else:
            patient = _row_id(conn, ids, Patient, "patient_id", facts.patient)
            study = _row_id(conn, ids, Study, "study_uid", facts.study, patient_fk=patient)
    return _row_id(conn, ids, Series, "series_uid", facts.series, study_fk=study)


def _note_filed(facts: InstanceFacts, patient_id: str, study_uid: str) -> None:
    if facts.patient["patient_id"] != patient_id or facts.study["study_uid"] != study_uid:
        log.warning("instance %s names patient %r, study %s; stored in its series where it is "
                    "held: patient %r, study %s (corrected?)", facts.sop_uid,
                    facts.patient["patient_id"], facts.study["study_uid"], patient_id,
                    study_uid)


def _row_id(conn, ids: dict, model, key: str, values: dict, **parent) -> int:
    """Id of the row of ``model`` whose ``key`` is ``values[key]``, added when missing."""
    cache_key = (model.__tablename__, values[key])
    row_id = ids.get(cache_key)
    if row_id is None:
        table = model.__table__
        row_id = conn.scalar(select(table.c.id).where(table.c[key] == values[key]))
        if row_id is None:
            row_id = conn.execute(insert(table).values(**values, **parent)) \
                .inserted_primary_key[0]
        ids[cache_key] = row_id
    return row_id
