"""Legal holds: patients and studies that nothing may delete until the hold is released.

A hospital keeps images past their retention period when they are evidence (a claim, a
complaint, an investigation). While a hold is on a study, or on its patient, every deletion
that would remove one of its instances is refused before anything changes
(:mod:`storage.deletion`, which ``voxarc delete``, the retention rules and rejection notes all
go through), and the retention rules pass over it. A hold says who placed it, when and why;
releasing it records who and when, and the row stays as the trail.

A hold is kept by UID: a patient's hold is also placed on each of the patient's studies
(``through`` the patient), so that they stay held when a correction or an HL7 merge files them
under another Patient ID, while the patient's own hold takes the studies that come under its
ID later. Releasing the patient releases those with it. A series of a held study is not moved
to another study by a correction (storage.archive refuses it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from sqlalchemy import and_, bindparam, or_, select

from storage.errors import StorageError
from storage.index import Hold, Index, Instance, Patient, Series, Study

log = logging.getLogger(__name__)
LEVELS = ("patient", "study")


class HoldError(StorageError):
    """A hold that cannot be placed or released as asked."""


@dataclass(frozen=True)
class HoldRecord:
    """One hold, as the index keeps it (``released_at`` None: in force)."""

    level: str
    uid: str
    reason: str
    held_by: str
    held_at: float
    released_by: str | None = None
    released_at: float | None = None
    through: str | None = None

    def summary(self) -> dict:
        """JSON-ready."""
        return asdict(self)

    def describe(self) -> str:
        """``study 1.2.3 on hold since 2026-12-05 by cli hold (ana): claim 2026/114``, and
        ``(released DAY by WHO)`` after a release."""
        via = f" (with patient {self.through})" if self.through else ""
        text = (f"{self.level} {self.uid} on hold{via} since {_day(self.held_at)} by "
                f"{self.held_by}: {self.reason}")
        if self.released_at is not None:
            text += f" (released {_day(self.released_at)} by {self.released_by})"
        return text


def _day(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")


def _record(row: Hold) -> HoldRecord:
    return HoldRecord(row.level, row.uid, row.reason, row.held_by, row.held_at,
                      row.released_by, row.released_at, row.through)


def _active(s, level: str | None = None, uid: str | None = None):
    stmt = select(Hold).where(Hold.released_at.is_(None))
    if level is not None:
        stmt = stmt.where(Hold.level == level, Hold.uid == uid)
    return s.scalars(stmt.order_by(Hold.held_at, Hold.id)).all()


def place(index: Index, level: str, uid: str, reason: str, actor: str,
          now: float | None = None) -> tuple[HoldRecord, bool]:
    """Put ``uid`` (a Patient ID or Study Instance UID, as ``level`` says) on hold, logged;
    return the hold and whether it is new (False: it was on hold already, unchanged).

    Raises
    ------
    HoldError
        A level other than patient or study, an empty reason, or a record the archive does not
        hold (a mistyped UID would otherwise hold nothing).
    """
    if level not in LEVELS:
        raise HoldError(f"a hold is on a patient or a study, not a {level}")
    if not reason.strip():
        raise HoldError("a hold needs a reason (the claim, the request, who asked)")
    column = Patient.patient_id if level == "patient" else Study.study_uid
    with index.write() as s:
        if s.scalars(select(column).where(column == uid)).first() is None:
            raise HoldError(f"no {level} {uid} in the archive")
        existing = _active(s, level, uid)
        if existing:
            held_already = _record(existing[0])
            log.info("already held: %s", held_already.describe())
            return held_already, False
        when = time.time() if now is None else now
        row = Hold(level=level, uid=uid, reason=reason.strip(), held_by=actor, held_at=when)
        s.add(row)
        if level == "patient":
            for study_uid in s.scalars(select(Study.study_uid).join(
                    Patient, Study.patient_fk == Patient.id).where(Patient.patient_id == uid)):
                if not _active(s, "study", study_uid):
                    s.add(Hold(level="study", uid=study_uid, reason=reason.strip(),
                               held_by=actor, held_at=when, through=uid))
        s.flush()
        placed = _record(row)
    log.warning("hold placed: %s", placed.describe())
    return placed, True


def release(index: Index, level: str, uid: str, actor: str,
            now: float | None = None) -> HoldRecord:
    """Release the hold on ``uid``, logged; return it, released.

    Raises
    ------
    HoldError
        Nothing of that level and UID is on hold.
    """
    with index.write() as s:
        rows = _active(s, level, uid)
        if not rows:
            raise HoldError(f"{level} {uid} is not on hold")
        if level == "patient":          # and the studies held with it
            rows += s.scalars(select(Hold).where(Hold.released_at.is_(None),
                                                 Hold.through == uid)).all()
        for row in rows:
            row.released_by, row.released_at = actor, time.time() if now is None else now
        released = _record(rows[0])
    log.warning("hold released: %s", released.describe())
    return released


def listing(index: Index, released: bool = False) -> list[HoldRecord]:
    """The holds in force, oldest first (``released``: the released ones too)."""
    with index.read() as s:
        rows = s.scalars(select(Hold).order_by(Hold.held_at, Hold.id)).all() if released \
            else _active(s)
        return [_record(r) for r in rows]


def states(index: Index) -> dict[tuple[str, str], float | None]:
    """Every hold ever placed, by (level, uid): None while in force, else when it was last
    released."""
    out: dict = {}
    with index.read() as s:
        for level, uid, released_at in s.execute(
                select(Hold.level, Hold.uid, Hold.released_at)):
            key = (level, uid)
            in_force = released_at is None or (key in out and out[key] is None)
            out[key] = None if in_force else max(released_at, out.get(key, 0.0))
    return out


def _in_force(s) -> dict[tuple[str, str], HoldRecord]:
    return {(r.level, r.uid): _record(r) for r in _active(s)}


#: a Core statement: the id of a hold in force on the study or the patient of the instance
#: ``p_id`` (none: not held), for the ingest's own connection
INSTANCE_HELD = select(Hold.id).select_from(
    Instance.__table__.join(Series, Instance.series_fk == Series.id)
    .join(Study, Series.study_fk == Study.id).join(Patient, Study.patient_fk == Patient.id)
    .join(Hold, or_(and_(Hold.level == "study", Hold.uid == Study.study_uid),
                    and_(Hold.level == "patient", Hold.uid == Patient.patient_id)))) \
    .where(Instance.id == bindparam("p_id"), Hold.released_at.is_(None)).limit(1)


def _first_hold(holds: dict, study_uid: str, patient_id: str) -> HoldRecord | None:
    return holds.get(("study", study_uid)) or holds.get(("patient", patient_id))


def touching(index: Index, series_ids: list[int]) -> list[HoldRecord]:
    """The holds in force on the studies or patients of these series."""
    return distinct(held_series(index, series_ids).values())


def distinct(records) -> list[HoldRecord]:
    """Each hold of ``records`` once (several series may be held by one)."""
    return list({(h.level, h.uid): h for h in records}.values())


def held_series(index: Index, series_ids: list[int]) -> dict[int, HoldRecord]:
    """Those of these series whose study or patient is on hold, with that hold."""
    with index.read() as s:
        holds = _in_force(s)
        if not holds or not series_ids:
            return {}
        found = {}
        for i in range(0, len(series_ids), 500):
            for series_id, study_uid, patient_id in s.execute(
                    select(Series.id, Study.study_uid, Patient.patient_id)
                    .join(Study, Series.study_fk == Study.id)
                    .join(Patient, Study.patient_fk == Patient.id)
                    .where(Series.id.in_(series_ids[i:i + 500]))):
                hold = _first_hold(holds, study_uid, patient_id)
                if hold is not None:
                    found[series_id] = hold
        return found


def held(index: Index, level: str, uids: list[str]) -> dict[str, HoldRecord]:
    """Those of ``uids`` (Patient IDs, Study or Series Instance UIDs, as ``level`` says) that
    hold, or belong to, a study or patient on hold, with that hold."""
    key = {"patient": Patient.patient_id, "study": Study.study_uid,
           "series": Series.series_uid}[level]
    with index.read() as s:
        holds = _in_force(s)
        if not holds or not uids:
            return {}
        stmt = select(key, Study.study_uid, Patient.patient_id) \
            .select_from(Study).join(Patient, Study.patient_fk == Patient.id)
        if level == "series":
            stmt = stmt.join(Series, Series.study_fk == Study.id)
        out = {}
        for i in range(0, len(uids), 500):
            for uid, study_uid, patient_id in s.execute(stmt.where(key.in_(uids[i:i + 500]))):
                hold = _first_hold(holds, study_uid, patient_id)
                if hold is not None and uid not in out:
                    out[uid] = hold
        return out
