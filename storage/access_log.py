"""The access trail: who read which study, how and when, kept in the index (table
``accesses``) beside the deletions' audit trail, for the questions a privacy officer asks
("who looked at this patient's images?").

Readers note what they did (:meth:`AccessLog.note`): a C-FIND, a C-GET or C-MOVE and what
it sent, a DICOMweb request, a download, an export, a study sent by hand. Notes with the same
actor, action, study and detail within :data:`WINDOW_S` of each other are one row, which counts
its requests and instances and keeps the first and the last time: a viewer that fetches a
series image by image leaves one row, not hundreds. Notes are written in the background every
few seconds, and when the archive closes; a crash loses at most those seconds' notes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

from sqlalchemy import delete, or_, select, update

from storage.index import Access, Index, Patient, Study

log = logging.getLogger(__name__)

#: notes this close together (seconds) add to one row
WINDOW_S = 60.0
#: how often the background writer writes what was noted (seconds)
FLUSH_S = 5.0
_DETAIL_CHARS = 300


@dataclass
class _Open:
    """A row being added to: its id once written, its counts and times."""

    first: float
    last: float
    patient_id: str
    requests: int = 0
    instances: int = 0
    row_id: int | None = None
    dirty: bool = True


class AccessLog:
    """What readers of an archive noted, coalesced and written to its index.

    Parameters
    ----------
    index : Index
    window_s, flush_s : float
        See :data:`WINDOW_S` and :data:`FLUSH_S`.
    keep_days : float
        Rows last read longer ago than this are removed, by the background writer once a day
        (0: kept for ever).
    """

    def __init__(self, index: Index, window_s: float = WINDOW_S, flush_s: float = FLUSH_S,
                 keep_days: float = 0.0):
        self.index, self.window_s, self.flush_s = index, window_s, flush_s
        self.keep_days, self._pruned_at = keep_days, 0.0
        self._open: dict[tuple, _Open] = {}
        self._retired: list[tuple[tuple, _Open]] = []
        self._latest = 0.0                      # the latest note's time
        self._lock = threading.Lock()           # guards _open
        self._flushing = threading.Lock()       # one writer at a time
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        #: told of every note, kept or not: objects with ``note(actor, action, study_uid,
        #: patient_id, instances, detail, now, about)`` and ``close()`` (the audit messages)
        self.listeners: list = []

    def note(self, actor: str, action: str, study_uid: str = "", patient_id: str = "",
             instances: int = 0, detail: str = "", now: float | None = None,
             keep: bool = True, about: str = "") -> None:
        """Note one request of ``actor`` (``instances`` it read) on a study (or none, such as
        a query, whose ``detail`` then says what it asked). ``keep`` false: only the
        listeners are told (a store, a deletion, a correction: the index keeps those
        otherwise); ``about``: more for the listeners (a query's SOP class)."""
        now = time.time() if now is None else now
        for listener in self.listeners:
            try:
                listener.note(actor, action, study_uid, patient_id, instances, detail, now,
                              about)
            except Exception:                 # never the reader's problem
                log.exception("access trail: a listener failed")
        if not keep:
            return
        key = (actor, action, study_uid or "", detail[:_DETAIL_CHARS])
        with self._lock:
            row = self._open.get(key)
            if row is None or now - row.last > self.window_s:
                if row is not None and row.dirty:
                    self._retired.append((key, row))        # still to be written
                row = self._open[key] = _Open(now, now, patient_id or "")
            self._latest = max(self._latest, now)
            row.requests += 1
            row.instances += instances
            row.last = max(row.last, now)
            row.patient_id = row.patient_id or patient_id or ""
            row.dirty = True
        self._start_writer()

    def note_records(self, actor: str, action: str, records: list[dict],
                     sent: set[str] | None = None, detail: str = "") -> None:
        """Note an operation on instance ``records`` (with ``StudyInstanceUID``, ``PatientID``
        and ``SOPInstanceUID``): one note per study, counting its instances (those in
        ``sent`` when given)."""
        counts, patients = Counter(), {}
        for r in records:
            study = str(r.get("StudyInstanceUID") or "")
            patients[study] = str(r.get("PatientID") or "")
            if sent is None or r.get("SOPInstanceUID") in sent:
                counts[study] += 1
        now = time.time()
        for study, patient in patients.items():
            self.note(actor, action, study, patient, counts[study], detail, now)

    def flush(self) -> None:
        """Write what was noted (rows of studies whose patient was not given get it from the
        index); rows idle for a window are then forgotten here."""
        with self._flushing:
            with self._lock:
                rows = self._retired + [(k, r) for k, r in self._open.items() if r.dirty]
                self._retired = []
                todo = [(key, row, row.row_id, row.requests, row.instances, row.last)
                        for key, row in rows]
                for _, row, *_ in todo:
                    row.dirty = False
            if todo:
                try:
                    self._write(todo)
                except Exception as exc:       # the trail must never fail a retrieval
                    log.error("access trail: %d rows not written: %s", len(todo), exc)
                    with self._lock:
                        for key, row, *_ in todo:
                            row.dirty = True
                            if self._open.get(key) is not row:
                                self._retired.append((key, row))
                    return
            with self._lock:       # on the notes' clock: rows a window older are done
                idle = self._latest - self.window_s
                for key in [k for k, r in self._open.items() if not r.dirty and r.last < idle]:
                    del self._open[key]

    def _write(self, todo: list) -> None:
        missing = {key[2] for key, row, *_ in todo if key[2] and not row.patient_id}
        made = []
        with self.index.write() as s:
            found = {k: v[0] for k, v in _patients(s, missing).items()} if missing else {}
            for (actor, action, study, detail), row, row_id, requests, instances, last in todo:
                values = {"last_at": last, "requests": requests, "instances": instances}
                if row_id is not None:
                    s.execute(update(Access).where(Access.id == row_id).values(**values))
                    continue
                added = Access(first_at=row.first, actor=actor, action=action, study_uid=study,
                               patient_id=row.patient_id or found.get(study, ""), detail=detail,
                               **values)
                s.add(added)
                s.flush()
                made.append((row, added.patient_id, added.id))
        with self._lock:        # committed: later notes update these rows
            for row, patient, row_id in made:
                row.patient_id, row.row_id = patient, row_id

    def _start_writer(self) -> None:
        if self._writer is None and not self._stop.is_set():
            with self._lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._run, name="access-trail",
                                                    daemon=True)
                    self._writer.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()
            if self.keep_days > 0 and time.time() - self._pruned_at >= 86400.0:
                self.prune()

    def prune(self, now: float | None = None) -> int:
        """Remove the rows last read more than ``keep_days`` before ``now``; return how
        many (none when rows are kept for ever)."""
        now = time.time() if now is None else now
        self._pruned_at = now
        if self.keep_days <= 0:
            return 0
        try:
            with self.index.write() as s:
                gone = s.execute(delete(Access).where(
                    Access.last_at < now - self.keep_days * 86400.0)).rowcount
        except Exception as exc:           # tried again the next day
            log.error("access trail: old rows not removed: %s", exc)
            return 0
        if gone:
            log.info("access trail: %d rows older than %g days removed", gone, self.keep_days)
        return gone

    def close(self) -> None:
        """Write what is left and stop the background writer, then the listeners."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=10)
        self.flush()
        for listener in self.listeners:
            listener.close()

    def patients_of(self, study_uids) -> dict[str, tuple[str, str]]:
        """{Study Instance UID: (Patient ID, patient's name)} of those of ``study_uids`` the
        index holds."""
        with self.index.read() as s:
            return _patients(s, study_uids)


def _patients(s, study_uids) -> dict[str, tuple[str, str]]:
    rows = s.execute(select(Study.study_uid, Patient.patient_id, Patient.patient_name)
                     .join(Patient, Study.patient_fk == Patient.id)
                     .where(Study.study_uid.in_(list(study_uids))))
    return {study: (patient_id or "", name or "") for study, patient_id, name in rows}


def history(index: Index, limit: int | None = 100, study_uid: str | None = None,
            patient_id: str | None = None, since: float | None = None,
            user: str | None = None) -> list[dict]:
    """The latest rows of the access trail, newest first: all, or a study's or a patient's,
    or a user's (a named web user, a calling AE title, a command's user name), those that
    lasted until ``since`` (a time) or later; at most ``limit`` (None: all)."""
    stmt = select(Access).order_by(Access.last_at.desc(), Access.id.desc()).limit(limit)
    if user is not None:
        name = user.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(or_(*(Access.actor.like(p, escape="\\") for p in (
            f"http {name}@%", f"{name}@%", f"cli % ({name})"))))
    if study_uid is not None:
        stmt = stmt.where(Access.study_uid == study_uid)
    if patient_id is not None:
        stmt = stmt.where(Access.patient_id == patient_id)
    if since is not None:
        stmt = stmt.where(Access.last_at >= since)
    with index.read() as s:
        return [{"first_at": r.first_at, "last_at": r.last_at, "actor": r.actor,
                 "action": r.action, "study_uid": r.study_uid, "patient_id": r.patient_id,
                 "requests": r.requests, "instances": r.instances, "detail": r.detail}
                for r in s.scalars(stmt)]
