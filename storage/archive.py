"""The archive: one object owning the index, the blob store, ingest, compaction and retrieval.

The service and the command line build an :class:`Archive` and go through it; nothing else opens
the database or the data folder.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import func, select

from models.api import SLAB_SLICES
from storage import (correction, forwarding, holds, lone_images, query, reconciled,
                     rejection)
from storage.access_log import AccessLog
from storage.backup import BackupReport, backup
from storage.blobstore import BlobStore
from storage.compaction import Compactor, deferred_rows
from storage.correction import CorrectionPlan
from storage.deletion import Deleter, DeletionPlan, plan
from storage.errors import StorageError
from storage.index import Blob, Index, Instance, Series, Study
from storage.index_upgrade import fill_added_attributes
from storage.ingest import DUPLICATE_POLICIES, IngestResult, Stager, ingest, stored_bytes
from storage.recode import Recoder
from storage.reconstruct import Reconstructor, StoredHeader, StoredInstance, StoredParts
from storage.recycle_bin import RecycleBin
from storage.recovery import ArchiveLock, recover

log = logging.getLogger(__name__)


class Archive:
    """A voxarc archive in a data folder.

    Parameters
    ----------
    data_dir : path
        Folder of the blob store (and of the SQLite index when ``database_url`` is empty).
    database_url : str, optional
        SQLAlchemy URL of the index; default ``sqlite:///<data_dir>/index.sqlite``.
    duplicates : {"keep_first", "replace", "reject"}
        Policy for a SOP Instance UID that is already stored.
    max_storage_bytes : int
        Refuse new instances beyond this many stored bytes (0: no limit).
    model : str
        Codec model used by compaction.
    max_stack_slices : int
        Largest stack coded as one blob.
    cache_bytes : int
        Budget of the decoded-slab cache used by retrieval.
    slab : int
        Slices per independently decodable slab of a coded stack (random-access granularity).
    adapt : bool
        Let the codec fine-tune its model on large stacks (False: faster compaction, larger
        blobs).
    access_trail_days : float
        Days the access trail keeps a row after its last read (0: for ever).
    deleted_keep_days : float
        Days deleted instances stay restorable in the recycle bin (:mod:`storage.recycle_bin`,
        ``<data_dir>/recycle``); 0: deletions are for good at once.
    """

    def __init__(self, data_dir, database_url: str = "", duplicates: str = "keep_first",
                 max_storage_bytes: int = 0, model: str = "default", max_stack_slices: int = 256,
                 cache_bytes: int = 256 << 20, slab: int = SLAB_SLICES, adapt: bool = True,
                 access_trail_days: float = 0.0, deleted_keep_days: float = 0.0):
        if duplicates not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicate policy must be one of {DUPLICATE_POLICIES}")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url = database_url or f"sqlite:///{self.data_dir / 'index.sqlite'}"
        self.index = Index(url)
        self.blobs = BlobStore(self.data_dir / "blobs")
        self.lock = ArchiveLock(self.data_dir)
        self.duplicates, self.max_storage_bytes = duplicates, max_storage_bytes
        self.recovery = recover(self.lock, self.index, self.blobs, duplicates)   # after a crash
        self.compactor = Compactor(self.index, self.blobs, model, max_stack_slices, slab, adapt)
        self.reconstructor = Reconstructor(self.index, self.blobs, cache_bytes)
        fill_added_attributes(self.index, self.reconstructor, self.index.added_columns)
        self.stager = Stager(self.index)      # group commit of concurrent C-STOREs
        #: instances of corrected series and studies brought in line as they arrive
        self.late = correction.LateArrivals(self.index)
        #: who read what (:mod:`storage.access_log`): readers note it here
        self.accesses = AccessLog(self.index, keep_days=access_trail_days)
        #: deleted instances kept restorable for a while
        self.recycle = RecycleBin(self.data_dir / "recycle", deleted_keep_days,
                                  lambda: holds.states(self.index))

    def store(self, data: bytes, transfer_syntax: str, sop_uid: str | None = None,
              source_ae: str = "") -> IngestResult:
        """Stage a received dataset durably (see :func:`storage.ingest.ingest`); ``sop_uid``:
        the SOP Instance UID it must have; ``source_ae``: the calling AE title that sent it."""
        return ingest(self.index, self.blobs, data, transfer_syntax, self.duplicates,
                      self.max_storage_bytes, self.stager, sop_uid, source_ae, self.late)

    def retrieve(self, sop_uid: str) -> StoredInstance:
        """Return an instance byte for byte, SHA-256 checked (see :class:`Reconstructor`)."""
        return self.reconstructor.get(sop_uid)

    def retrieve_parts(self, sop_uid: str, located=None) -> StoredParts:
        """:meth:`retrieve` without joining the instance's bytes into one object (see
        :meth:`Reconstructor.get_parts`): a large multi-frame instance is then held once.
        ``located``: its row from :meth:`locate`."""
        return self.reconstructor.get_parts(sop_uid, located)

    def locate(self, sop_uids: list[str]) -> dict:
        """Where many instances are stored, for :meth:`retrieve_parts`, with their SOP class
        and transfer syntax (see :meth:`Reconstructor.locate`)."""
        return self.reconstructor.locate(sop_uids)

    def header(self, sop_uid: str, located=None) -> StoredHeader:
        """An instance's bytes up to its pixel data, nothing decoded (see
        :meth:`Reconstructor.header`); ``located`` as for :meth:`retrieve_parts`."""
        return self.reconstructor.header(sop_uid, located)

    def frames(self, sop_uid: str, numbers: list[int] | None):
        """Stored words of some frames (None: all) of a coded instance, decoding only their
        slabs; None for one kept as received (see :meth:`Reconstructor.frames`)."""
        return self.reconstructor.frames(sop_uid, numbers)

    def plan_retrieval(self, sop_uids: list[str]):
        """Order instances for sending and prefetch their slabs (see :meth:`Reconstructor.plan`)."""
        return self.reconstructor.plan(sop_uids)

    @contextmanager
    def retrieval_order(self, sop_uids: list[str], what: str = "retrieval"):
        """``(ordered, stop)``: the instances in the order the archive decodes best, their
        slabs decoded ahead in the background while the block runs, and a function that stops
        that early (it stops when the block ends); without a plan (logged as ``what``'s), in
        the given order, decoded on demand."""
        try:
            ordered, prefetch = self.plan_retrieval(sop_uids)
        except Exception as exc:          # a plan is an optimisation: never fail for it
            log.warning("%s: no retrieval plan (%s); decoding on demand", what, exc)
            ordered, prefetch = list(sop_uids), None
        stop = prefetch.cancel if prefetch is not None else (lambda: None)
        try:
            yield ordered, stop
        finally:
            stop()

    def warm_decoders(self) -> bool:
        """Start the codec's decoder processes now when the archive holds compressed volumes, so
        that the first retrieval does not wait for them; returns whether it did."""
        return self.reconstructor.warm()

    def find(self, level: str, criteria: dict[str, str],
             matching: query.Matching = query.Matching()) -> list[dict]:
        """Return matching records of a query level (see :func:`storage.query.find`)."""
        return query.find(self.index, level, criteria, matching)

    def formats(self, sop_uids: list[str]) -> dict[str, set[str]]:
        """Return {SOP Class UID: {transfer syntaxes}} of the given instances."""
        out: dict[str, set[str]] = {}
        for sop_class, ts in self.instance_formats(sop_uids).values():
            out.setdefault(sop_class, set()).add(ts)
        return out

    def instance_formats(self, sop_uids: list[str]) -> dict[str, tuple[str, str]]:
        """Return {SOP Instance UID: (SOP Class UID, transfer syntax)} of the given instances
        (those the index holds)."""
        out: dict[str, tuple[str, str]] = {}
        with self.index.read() as s:
            for i in range(0, len(sop_uids), 500):
                for uid, sop_class, ts in s.execute(
                        select(Instance.sop_uid, Instance.sop_class_uid, Instance.transfer_syntax)
                        .where(Instance.sop_uid.in_(sop_uids[i:i + 500]))):
                    out[uid] = (sop_class, ts)
        return out

    def digests(self, study_uid: str, series_uid: str | None = None,
                sop_uid: str | None = None) -> dict[str, str]:
        """{SOP Instance UID: SHA-256 taken at ingest} of the instances of a study (of one of
        its series, or one instance of that series), in one indexed query."""
        stmt = (select(Instance.sop_uid, Instance.sha256)
                .join(Series, Instance.series_fk == Series.id)
                .join(Study, Series.study_fk == Study.id)
                .where(Study.study_uid == study_uid))
        if series_uid is not None:
            stmt = stmt.where(Series.series_uid == series_uid)
        if sop_uid is not None:
            stmt = stmt.where(Instance.sop_uid == sop_uid)
        with self.index.read() as s:
            return dict(s.execute(stmt).all())

    def held(self, sop_uids: list[str]) -> dict[str, str]:
        """{SOP Instance UID: SOP Class UID} of the given instances that the archive holds:
        indexed, and their staged file or blob present (what a storage commitment vouches for;
        every row is committed only after its bytes are durable)."""
        out: dict[str, str] = {}
        query = select(Instance.sop_uid, Instance.sop_class_uid, Instance.staged_key, Blob.key) \
            .outerjoin(Blob, Instance.blob_fk == Blob.id)
        with self.index.read() as s:
            for i in range(0, len(sop_uids), 500):
                for uid, sop_class, staged, blob in s.execute(
                        query.where(Instance.sop_uid.in_(sop_uids[i:i + 500]))):
                    key = staged or blob
                    if key is not None and self.blobs.exists(key):
                        out[uid] = sop_class
        return out

    def stored_syntaxes(self) -> dict[str, list[str]]:
        """Return {SOP Class UID: transfer syntaxes it is held in, most instances first}."""
        out: dict[str, list[str]] = {}
        count = func.count(Instance.id)
        with self.index.read() as s:
            rows = s.execute(select(Instance.sop_class_uid, Instance.transfer_syntax, count)
                             .group_by(Instance.sop_class_uid, Instance.transfer_syntax)
                             .order_by(count.desc(), Instance.transfer_syntax)).all()
        for sop_class, ts, _ in rows:
            out.setdefault(sop_class, []).append(ts)
        return out

    def compact(self, stable_age: float, fast_backlog: int = 0) -> tuple[int, int]:
        """Compact every series stable for ``stable_age`` seconds; return (done, failed).
        ``fast_backlog``: see :meth:`storage.compaction.Compactor.run_once`."""
        return self.compactor.run_once(stable_age, fast_backlog=fast_backlog)

    def adapt_deferred(self, limit: int = 1) -> list:
        """Code up to ``limit`` stacks whose adaptation a busy compaction deferred again, with
        it (see :meth:`storage.recode.Recoder.adapt_deferred`)."""
        return self.recoder().adapt_deferred(limit)

    def compact_series(self, series_uid: str, fast: bool = False) -> bool:
        """Compact the staged instances of one series now; return True on success. ``fast``:
        without adaptation, for later (see :meth:`storage.compaction.Compactor.run_once`)."""
        with self.index.read() as s:
            series_id = s.scalar(select(Series.id).where(Series.series_uid == series_uid))
        return series_id is not None and self.compactor.compact_series(series_id, fast=fast)

    def deletion_plan(self, level: str, uid: str) -> DeletionPlan:
        """What deleting ``uid`` at ``level`` (patient, study, series, instance) would remove
        (see :func:`storage.deletion.plan`); nothing changes."""
        return plan(self.index, level, uid)

    def delete(self, level: str, uid: str, reason: str = "", keep: bool = True) -> dict:
        """Delete a patient (by Patient ID), study, series or instance with its files; return
        what was removed (see :meth:`storage.deletion.Deleter.delete`; ``kept_as``: its
        recycle bin entry). ``keep=False``, or a bin turned off: for good at once."""
        return Deleter(self.index, self.blobs, self.retrieve, self.recycle if keep else None,
                       self.retrieval_order).delete(level, uid, reason)

    def restore_deleted(self, entry: str, actor: str = "") -> dict:
        """Store again the instances of a recycle bin entry, byte for byte (see
        :meth:`storage.recycle_bin.RecycleBin.restore`), and note it in the access trail as
        ``actor``'s ``restore`` of each study."""
        counts = self.recycle.restore(entry, self.store)
        for study, (patient, instances) in counts["studies"].items():
            self.accesses.note(actor or "restore", "restore", study, patient, instances,
                               detail=f"recycle bin entry {entry}")
        return counts

    def apply_rejection(self, note: rejection.RejectionNote, sender: str) -> dict:
        """Delete the instances an IOCM rejection note from ``sender`` rejects (see
        :mod:`storage.rejection`); return the deletion's summary, with ``passed_over``: the
        references it did not follow, and why, ``studies``: {Study Instance UID: instances
        rejected}, and ``sent_to``: the destinations that had them, to which the note's series
        is queued (the running node sends it on its next forwarding pass)."""
        uids, passed = rejection.rejected(self.index, note)
        for why in passed:
            log.warning("rejection note %s from %s: passed over %s", note.sop_uid, sender, why)
        if not uids:
            return {"instances": 0, "passed_over": passed, "studies": {}, "sent_to": []}
        told = forwarding.destinations_of(self.index, uids)   # before their rows go
        done = Deleter(self.index, self.blobs, self.retrieve, self.recycle,
                       self.retrieval_order).delete(
            "instances", note.sop_uid, f"{note.title}: rejection note {note.sop_uid} from "
            f"{sender}", uids)
        done["sent_to"] = forwarding.queue_series_of(
            self.index, note.sop_uid, told, "rejection note: to where the rejected went") \
            if told and done["instances"] else []
        rejected = set(uids)
        studies = Counter(study for study, _, sop in note.references if sop in rejected)
        return {**done, "passed_over": passed, "studies": dict(studies)}

    def correction_plan(self, level: str, uid: str, values: dict[str, str]) -> CorrectionPlan:
        """What correcting a patient (by Patient ID), a study or a series to ``values`` would
        change (see :func:`storage.correction.plan`); nothing changes. Raises
        CorrectionError."""
        return correction.plan(self.index, level, uid, values)

    def reconcile(self, patient_id: str, values: dict[str, str], reason: str,
                  merged_from: str = "") -> None:
        """Keep what the hospital information system said of a patient (and that
        ``merged_from`` was merged into it), so that new studies follow it
        (:mod:`storage.reconciled`); a running node's ingest sees it at once."""
        reconciled.record(self.index, patient_id, values, reason, merged_from)
        self.late.invalidate()

    def patient(self, patient_id: str) -> dict[str, str] | None:
        """The attributes held of the patient ``patient_id`` (PatientID, PatientName,
        PatientBirthDate, PatientSex), or None when none is held."""
        return correction.patient_values(self.index, patient_id)

    def correct(self, level: str, uid: str, values: dict[str, str], reason: str = "",
                resend: bool = False) -> dict:
        """Correct a patient's, a study's or a series' attributes, in the index and in every
        instance's bytes (see :mod:`storage.correction`); planned again once when the archive
        changed under the first plan. Instances on legal hold keep their originals in the
        recycle bin for as long as the hold (``originals``: that entry), and a series of a held
        study is not moved to another. With ``resend``, each series goes again to every
        destination that had it (``resent``: their (series, destination) pairs). Returns what
        changed; raises CorrectionError."""
        for attempt in range(2):
            todo = correction.plan(self.index, level, uid, values)
            held = holds.held_series(self.index, todo.series_ids)
            on_hold = holds.distinct(held.values())
            if on_hold and "StudyInstanceUID" in todo.changes:   # its held study would lose it
                raise correction.CorrectionError(
                    f"{level} {uid} is not moved to another study: {on_hold[0].describe()}; "
                    f"release it first: voxarc hold release {on_hold[0].level} "
                    f"{on_hold[0].uid}")
            originals = self._originals(todo, held, on_hold, reason) if on_hold else None
            corrector = correction.Corrector(self.index, self.blobs, self.retrieve, originals)
            try:
                done = corrector.correct(todo, reason)
            except correction.CorrectionConflict as exc:
                if attempt:
                    raise
                log.info("correcting %s %s: %s; planning again", level, uid, exc)
                continue
            self.late.invalidate()
            if originals is not None:
                done["originals"] = originals.name
            if resend:
                done["resent"] = forwarding.queue_again(
                    self.index, todo.series_ids, "corrected: to be sent again")
            return done
        raise AssertionError("unreachable")

    def _originals(self, todo, held: dict, on_hold: list, reason: str):
        """A recycle bin entry for the originals of a correction's instances whose series
        ``held`` names (series id -> its hold); ``on_hold``: those holds."""
        changes = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in todo.changes.items())
        why = f"originals before the correction {changes}" + (f" ({reason})" if reason else "") \
            + "; kept while on hold: " + ", ".join(f"{h.level} {h.uid}" for h in on_hold)
        try:
            return self.recycle.begin(self.index, {i.id: i.size for i in todo.instances
                                                   if i.series_fk in held},
                                      todo.level, todo.uid, why, "original",
                                      [(h.level, h.uid) for h in on_hold])
        except StorageError as exc:
            raise correction.CorrectionError(
                f"{todo.level} {todo.uid} is on hold and its originals could not be kept, so "
                f"nothing changed: {exc}") from exc

    def backup(self, dest, database_url: str = "", progress=None,
               force: bool = False) -> BackupReport:
        """Copy this archive, consistent at one moment, and its recycle bin into the data
        folder ``dest`` (see :func:`storage.backup.backup`); works while a node serves it."""
        return backup(self.index, self.blobs, dest, database_url, progress, force,
                      self.recycle)

    def restage_lone_images(self) -> list[int]:
        """Stage again the lone images an older release deflated, so that compaction codes
        them as one-slice volumes (:mod:`storage.lone_images`); return the ids of their series
        (each once). An image that cannot be rebuilt is logged and left as it is."""
        series = []
        for inst_id, sop_uid, blob_id, digest, series_id in lone_images.candidates(self.index):
            try:
                if lone_images.restage(self.index, self.blobs, self.retrieve, inst_id, sop_uid,
                                       blob_id, digest):
                    series.append(series_id)
            except StorageError as exc:
                log.error("lone image %s not staged again: %s", sop_uid, exc)
        return sorted(set(series))

    def recoder(self) -> Recoder:
        """A :class:`Recoder` that brings this archive's coded stacks to today's blob format
        and its codec model."""
        return Recoder(self.index, self.blobs, self.compactor.model, self.compactor.adapt)

    def pending_series(self, stable_age: float = 0.0) -> list[int]:
        """Ids of staged series stable for ``stable_age`` seconds and not waiting for a retry."""
        return self.compactor.ready_series(stable_age)

    def stats(self) -> dict:
        """Counts and byte totals of what is stored.

        Returns
        -------
        dict
            ``instances``, ``series``, ``studies``, ``original_bytes`` (as received),
            ``stored_bytes`` (on disk now), ``pending_instances`` (staged),
            ``deferred_stacks`` (coded without adaptation while compaction was behind, to be
            coded again when idle), ``ratio``, ``recycle_bin_bytes`` (deleted instances kept
            restorable, not in ``stored_bytes``).
        """
        with self.index.read() as s:
            original = int(s.scalar(select(func.coalesce(func.sum(Instance.size), 0))))
            stored = stored_bytes(s)
            out = {
                "instances": s.scalar(select(func.count(Instance.id))),
                "series": s.scalar(select(func.count(Series.id))),
                "studies": s.scalar(select(func.count(Study.id))),
                "original_bytes": original,
                "stored_bytes": stored,
                "pending_instances": s.scalar(select(func.count(Instance.id)).where(
                    Instance.staged_key.is_not(None))),
                "deferred_stacks": s.scalar(select(func.count(Blob.id)).where(deferred_rows())),
            }
        out["ratio"] = round(stored / original, 4) if original else 0.0
        out["recycle_bin_bytes"] = self.recycle.bytes_held()
        return out

    def close(self) -> None:
        """Finish pending commits, release the database connections and the data folder lock."""
        self.stager.close()
        self.accesses.close()
        self.index.close()
        self.lock.release()
