"""Deleting patients, studies, series or single instances from the archive.

A deletion removes the index rows of its instances (and of the series, studies and patients left
empty) and their files: staged copies, and each coded stack or general-codec blob whose every
instance goes. A coded stack that keeps some of its instances is not left holding the deleted
ones' pixels: its remaining instances are rebuilt (SHA-256 checked), staged again and the stack's
blob removed, so that compaction codes them anew without the deleted slices.

Order, so that a crash at any point loses nothing that was kept and brings back nothing that was
deleted: the restaged files are written durably first; one transaction then removes the rows,
points the remaining instances at their staged files, records every file to remove
(:class:`storage.index.Removal`) and the audit row (:class:`storage.index.Deletion`); only then
are the files removed. Recovery finishes removals a crash interrupted before it looks for
orphans (a deleted instance's staged file would otherwise be indexed again).

Nothing of a study or patient on legal hold (:mod:`storage.holds`) is deleted: such a deletion
is refused before anything changes (:class:`OnHold`).

With a recycle bin (:mod:`storage.recycle_bin`), the deleted instances are first written there
as received, durably, so the deletion can be undone until the entry expires; a bin that cannot
take them stops the deletion before anything changes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sqlalchemy import delete, exists, select, update
from sqlalchemy.exc import IntegrityError

from storage import holds
from storage.blobstore import BlobStore
from storage.errors import CommitOutcomeUnknown, StorageError
from storage.index import (
    Blob, Deletion, Forward, Index, Instance, Job, Patient, Series, Study,
)
from storage.removals import finish_removals, record_removals
from storage.staged_keys import staged_file_key

log = logging.getLogger(__name__)
LEVELS = ("patient", "study", "series", "instance")


class DeletionError(StorageError):
    """A deletion could not be done; nothing was deleted."""


class OnHold(DeletionError):
    """A deletion would remove instances of a study or patient on legal hold
    (:mod:`storage.holds`); nothing was deleted."""

    def __init__(self, level: str, uid: str, holds: list):
        self.holds = holds
        first = holds[0]
        super().__init__(f"{level} {uid} not deleted: {first.describe()}"
                         + (f" (and {len(holds) - 1} more holds)" if len(holds) > 1 else "")
                         + f"; release it first: voxarc hold release {first.level} {first.uid}")


@dataclass
class DeletionPlan:
    """What deleting ``uid`` at ``level`` removes, read from the index (nothing changed yet).

    Attributes
    ----------
    instances : dict
        Instance id -> (SOP Instance UID, staged key or None, blob id or None, size).
    blobs_freed : dict
        Blob id -> (key, stored bytes) of blobs all of whose instances go.
    restage : dict
        Blob id -> (key, stored bytes, [(instance id, SOP Instance UID, size, SHA-256)]) of
        coded stacks that keep some instances: those are staged again and the blob removed.
    series, studies, patients : int
        Rows left empty and removed with the instances (counted at planning; after
        :meth:`Deleter.execute`, as removed).
    series_ids : list of int
        Series the deleted instances belong to.
    """

    level: str
    uid: str
    instances: dict = field(default_factory=dict)
    blobs_freed: dict = field(default_factory=dict)
    restage: dict = field(default_factory=dict)
    series: int = 0
    studies: int = 0
    patients: int = 0
    series_ids: list = field(default_factory=list)

    @property
    def found(self) -> bool:
        """Whether anything matches."""
        return bool(self.instances)

    @property
    def restaged_instances(self) -> int:
        """Instances that stay, staged again out of a stack that loses others."""
        return sum(len(v[2]) for v in self.restage.values())

    @property
    def restaged_bytes(self) -> int:
        """Bytes of the instances staged again (held as received until compaction)."""
        return sum(size for v in self.restage.values() for _, _, size, _ in v[2])

    @property
    def freed_bytes(self) -> int:
        """Stored bytes removed: the deleted staged files and every removed blob."""
        staged = sum(size for _, key, _, size in self.instances.values() if key)
        blobs = sum(b[1] for b in self.blobs_freed.values()) + \
            sum(b[1] for b in self.restage.values())
        return staged + blobs

    def summary(self) -> dict:
        """Counts of the plan, for output and the audit row."""
        return {"level": self.level, "uid": self.uid, "instances": len(self.instances),
                "series": self.series, "studies": self.studies, "patients": self.patients,
                "restaged": self.restaged_instances, "freed_bytes": self.freed_bytes,
                "restaged_bytes": self.restaged_bytes}


_TARGET = select(Instance.id, Instance.sop_uid, Instance.staged_key, Instance.blob_fk,
                 Instance.size, Instance.series_fk)


def _targets(s, level: str, uid: str, sop_uids=None) -> list:
    """Rows (id, SOP UID, staged key, blob id, size, series id) of the instances to delete
    (``sop_uids``: those instances, at level ``instances``)."""
    if level == "instances":
        uids = list(sop_uids or ())
        return [row for i in range(0, len(uids), 500)
                for row in s.execute(_TARGET.where(Instance.sop_uid.in_(uids[i:i + 500])))]
    if level == "instance":
        return s.execute(_TARGET.where(Instance.sop_uid == uid)).all()
    query = _TARGET.join(Series, Instance.series_fk == Series.id)
    if level == "series":
        return s.execute(query.where(Series.series_uid == uid)).all()
    query = query.join(Study, Series.study_fk == Study.id)
    if level == "study":
        return s.execute(query.where(Study.study_uid == uid)).all()
    query = query.join(Patient, Study.patient_fk == Patient.id)
    return s.execute(query.where(Patient.patient_id == uid)).all()


def plan(index: Index, level: str, uid: str, sop_uids=None) -> DeletionPlan:
    """Read what deleting ``uid`` (a Patient ID, Study, Series or SOP Instance UID, as
    ``level`` says) would remove; at level ``instances``, the instances ``sop_uids`` (``uid``
    then names them in the audit trail: a rejection note's UID).

    Raises
    ------
    ValueError
        ``level`` is not one of :data:`LEVELS` or ``instances``.
    """
    if level not in LEVELS + ("instances",):
        raise ValueError(f"deletion level must be one of {LEVELS}")
    out = DeletionPlan(level, uid)
    with index.read() as s:
        rows = _targets(s, level, uid, sop_uids)
        for row in rows:
            out.instances[row.id] = (row.sop_uid, row.staged_key, row.blob_fk, row.size)
        blob_ids = sorted({row.blob_fk for row in rows if row.blob_fk is not None})
        for blob_id in blob_ids:
            blob = s.get(Blob, blob_id)
            kept = [(r.id, r.sop_uid, r.size, r.sha256) for r in s.execute(
                select(Instance.id, Instance.sop_uid, Instance.size, Instance.sha256)
                .where(Instance.blob_fk == blob_id)
                .order_by(Instance.frame_start)) if r.id not in out.instances]
            if kept:
                out.restage[blob_id] = (blob.key, blob.stored_bytes, kept)
            else:
                out.blobs_freed[blob_id] = (blob.key, blob.stored_bytes)
        out.series_ids = sorted({row.series_fk for row in rows})
        out.series, out.studies, out.patients = _emptied(s, set(out.instances), out.series_ids)
    return out


def _emptied(s, gone: set, series: list[int]) -> tuple[int, int, int]:
    """(series, studies, patients) that deleting the instances ``gone`` leaves empty."""
    empty_series = {sid for sid in series
                    if set(s.scalars(select(Instance.id).where(Instance.series_fk == sid))) <= gone}
    studies = set(s.scalars(select(Series.study_fk).where(Series.id.in_(empty_series))))
    empty_studies = {st for st in studies
                     if set(s.scalars(select(Series.id).where(Series.study_fk == st)))
                     <= empty_series}
    patients = set(s.scalars(select(Study.patient_fk).where(Study.id.in_(empty_studies))))
    empty_patients = {p for p in patients
                      if set(s.scalars(select(Study.id).where(Study.patient_fk == p)))
                      <= empty_studies}
    return len(empty_series), len(empty_studies), len(empty_patients)


class Deleter:
    """Carries out deletions on an archive.

    Parameters
    ----------
    index, blobs
        The archive's index and blob store.
    retrieve : callable
        ``retrieve(sop_uid)`` -> a :class:`storage.reconstruct.StoredInstance` (SHA-256 checked);
        rebuilds the instances that a stack keeps (and those the recycle bin keeps).
    recycle : RecycleBin, optional
        Where the deleted instances are kept restorable first; None: deleted for good.
    retrieval_order : callable, optional
        The archive's :meth:`storage.archive.Archive.retrieval_order`, for the recycle bin's
        copies (coded stacks decoded ahead, in order).
    """

    def __init__(self, index: Index, blobs: BlobStore, retrieve, recycle=None,
                 retrieval_order=None):
        self.index, self.blobs, self.retrieve = index, blobs, retrieve
        self.recycle = recycle if recycle is not None and recycle.enabled else None
        self.retrieval_order = retrieval_order

    def delete(self, level: str, uid: str, reason: str = "", sop_uids=None) -> dict:
        """Delete ``uid`` at ``level`` (see :func:`plan`) and return the plan's summary
        (``instances`` 0 when nothing matched). Retried once from a fresh plan when the
        archive changed under it.

        Raises
        ------
        DeletionError
            An instance that stays could not be rebuilt, the recycle bin could not keep the
            deleted ones, or the archive kept changing; nothing was deleted.
        """
        for attempt in range(2):
            todo = plan(self.index, level, uid, sop_uids)
            if not todo.found:
                return todo.summary()
            try:
                return self.execute(todo, reason)
            except _Changed as exc:
                if attempt:
                    raise DeletionError(f"{level} {uid}: the archive kept changing ({exc}); "
                                        "nothing deleted") from None
                log.info("deleting %s %s: the archive changed (%s); planning again", level,
                         uid, exc)
        raise AssertionError("unreachable")

    def execute(self, todo: DeletionPlan, reason: str = "") -> dict:
        """Carry out a :func:`plan` (see the module's docstring for the order of steps).

        Raises
        ------
        OnHold
            A study or patient it touches is on legal hold.
        """
        on_hold = holds.touching(self.index, todo.series_ids)
        if on_hold:
            raise OnHold(todo.level, todo.uid, on_hold)
        kept = self._keep(todo, reason)
        try:
            restaged = self._restage(todo)
        except BaseException:
            self._forget(kept)
            raise
        try:
            removals = self.index.write_checked(
                lambda s: self._write(s, todo, restaged, reason),
                lambda s: self._took_place(s, todo, restaged))
        except CommitOutcomeUnknown:
            # removing the restaged files under committed rows would lose the kept instances
            log.error("deleting %s %s: the commit's outcome is unknown; the %d restaged files "
                      "stay (the next start indexes or drops them)", todo.level, todo.uid,
                      len(restaged))
            raise
        except IntegrityError as exc:     # a row added meanwhile (PostgreSQL, see _write)
            self._discard(restaged)
            self._forget(kept)
            raise _Changed(f"the index refused the change: {exc.orig or exc}") from None
        except BaseException:
            self._discard(restaged)
            self._forget(kept)
            raise
        finish_removals(self.index, self.blobs, removals)
        summary = todo.summary()
        if kept:
            summary["kept_as"] = kept
        log.warning("deleted %s %s: %d instances, %d series, %d studies, %d patients; %d "
                    "bytes freed; %d instances (%d bytes) staged again for compaction%s; %s",
                    todo.level, todo.uid, summary["instances"], summary["series"],
                    summary["studies"], summary["patients"], summary["freed_bytes"],
                    summary["restaged"], summary["restaged_bytes"],
                    f" ({reason})" if reason else "",
                    f"restorable as recycle bin entry {kept}" if kept else "for good")
        return summary

    def _keep(self, todo: DeletionPlan, reason: str) -> str:
        """The recycle bin's entry of the instances ``todo`` removes ("" without a bin)."""
        if self.recycle is None:
            return ""
        try:
            return self.recycle.keep(self.index, self.retrieve, todo.instances, todo.level,
                                     todo.uid, reason, self.retrieval_order)
        except StorageError as exc:
            raise DeletionError(f"{todo.level} {todo.uid}: {exc}; nothing deleted") from exc

    def _forget(self, kept: str) -> None:
        if kept:
            self.recycle.discard(kept)

    def _restage(self, todo: DeletionPlan) -> dict:
        """Write every instance that a shrinking stack keeps as a staged file; return
        {instance id: (staged key, blob id)}."""
        written: dict = {}
        try:
            for blob_id, (_, _, kept) in todo.restage.items():
                for inst_id, sop_uid, _, digest in kept:
                    inst = self.retrieve(sop_uid)       # checked against ``digest``
                    key = staged_file_key(inst.transfer_syntax, digest)
                    self.blobs.put_new(key, inst.data)
                    written[inst_id] = (key, blob_id)
        except StorageError as exc:
            for key, _ in written.values():
                self.blobs.delete(key)
            raise DeletionError(f"{todo.level} {todo.uid}: an instance that stays could not be "
                                f"rebuilt ({exc}); nothing deleted") from exc
        return written

    def _discard(self, restaged: dict) -> None:
        for key, _ in restaged.values():
            self.blobs.delete(key)

    @staticmethod
    def _took_place(s, todo: DeletionPlan, restaged: dict) -> bool:
        """Whether the deletion's transaction committed (read after its commit raised): the
        kept instances point at their restaged files, or the deleted instances are gone."""
        if restaged:
            inst_id, (key, _) = next(iter(restaged.items()))
            return s.scalar(select(Instance.staged_key).where(Instance.id == inst_id)) == key
        return s.get(Instance, next(iter(todo.instances))) is None

    def _write(self, s, todo: DeletionPlan, restaged: dict, reason: str) -> list[str]:
        """In the transaction of ``s``: rows removed, kept instances staged, removals and audit
        recorded; return the keys to remove."""
        now = time.time()
        # PostgreSQL: lock the series first, so that an instance being committed into one
        # either is seen by _drop_empty or waits and then fails its own foreign key (the
        # ingest then looks its rows up again); SQLite has one writer and ignores it
        s.execute(select(Series.id).where(Series.id.in_(todo.series_ids)).with_for_update())
        for inst_id, (sop_uid, key, blob_id, _) in todo.instances.items():
            gone = s.execute(delete(Instance).where(
                Instance.id == inst_id, _same(Instance.staged_key, key),
                _same(Instance.blob_fk, blob_id)))
            if gone.rowcount != 1:
                raise _Changed(f"instance {sop_uid} moved or went")
        for inst_id, (key, blob_id) in restaged.items():
            moved = s.execute(update(Instance).where(
                Instance.id == inst_id, Instance.blob_fk == blob_id).values(
                staged_key=key, blob_fk=None, frame_start=0, header_before=None,
                header_after=None))
            if moved.rowcount != 1:
                raise _Changed(f"an instance of blob {blob_id} moved or went")
        blob_ids = list(todo.blobs_freed) + list(todo.restage)
        for blob_id in blob_ids:
            if s.scalar(select(Instance.id).where(Instance.blob_fk == blob_id).limit(1)):
                raise _Changed(f"blob {blob_id} gained instances")
            s.execute(delete(Blob).where(Blob.id == blob_id))
        # what is emptied now, not at planning (an instance may have arrived meanwhile)
        todo.series, todo.studies, todo.patients = _drop_empty(s, todo.series_ids)
        keys = [k for _, k, _, _ in todo.instances.values() if k] + \
            [todo.blobs_freed[b][0] for b in todo.blobs_freed] + \
            [todo.restage[b][0] for b in todo.restage]
        record_removals(s, keys)
        audit = {k: v for k, v in todo.summary().items() if k != "restaged_bytes"}
        s.add(Deletion(deleted_at=now, reason=reason[:500], **audit))
        return keys


class _Changed(Exception):
    """The archive changed between planning and committing a deletion."""


def _same(column, value):
    return column.is_(None) if value is None else column == value


def _drop_empty(s, series_ids: list[int]) -> tuple[int, int, int]:
    """Remove the series among ``series_ids`` left without instances (and their jobs), then
    their studies and patients when left empty; return how many of each."""
    empty = list(s.scalars(select(Series.id).where(
        Series.id.in_(series_ids), ~exists().where(Instance.series_fk == Series.id))))
    if not empty:
        return 0, 0, 0
    studies = list(s.scalars(select(Series.study_fk).distinct().where(Series.id.in_(empty))))
    patients = list(s.scalars(select(Study.patient_fk).distinct().where(Study.id.in_(studies))))
    s.execute(delete(Job).where(Job.series_fk.in_(empty)))
    s.execute(delete(Forward).where(Forward.series_fk.in_(empty)))
    s.execute(delete(Series).where(Series.id.in_(empty)))
    gone_studies = s.execute(delete(Study).where(
        Study.id.in_(studies), ~exists().where(Series.study_fk == Study.id))).rowcount
    gone_patients = s.execute(delete(Patient).where(
        Patient.id.in_(patients), ~exists().where(Study.patient_fk == Patient.id))).rowcount
    return len(empty), gone_studies, gone_patients


def history(index: Index, limit: int = 100) -> list[dict]:
    """The latest deletions, newest first (the audit trail)."""
    with index.read() as s:
        rows = s.scalars(select(Deletion).order_by(Deletion.id.desc()).limit(limit))
        return [{"deleted_at": r.deleted_at, "level": r.level, "uid": r.uid,
                 "instances": r.instances, "series": r.series, "studies": r.studies,
                 "patients": r.patients, "restaged": r.restaged, "freed_bytes": r.freed_bytes,
                 "reason": r.reason} for r in rows]
