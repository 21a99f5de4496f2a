"""Retention rules: which patients, studies or series a rule of C-FIND keys selects for deletion.

A rule is ``LEVEL: Keyword=pattern; ...`` (the level defaults to ``study``), with keys of the
level or above and C-FIND matching; date keys may hold ages (``StudyDate=-10y``,
:mod:`storage.rule_dates`). ``voxarc delete --matching`` selects with the same code, once; a
node's ``[retention]`` rules select every day (service.retention).

Two guards keep a rule from deleting more than its words say:

- a record without a value for one of the rule's keys is never selected (a study without a date
  is not old), and a rule without any key with a value is refused (it would select everything);
- a record any of whose instances arrived within the grace period is held back (an old prior
  pulled in or restored this week is not deleted the night it came): :func:`recently_received`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import select

from storage import query, rule_dates
from storage.index import Index, Instance, Patient, Series, Study

#: a deletion level -> the C-FIND level and key that names its records
UID_KEYS = {"patient": ("PATIENT", "PatientID"), "study": ("STUDY", "StudyInstanceUID"),
            "series": ("SERIES", "SeriesInstanceUID"), "instance": ("IMAGE", "SOPInstanceUID")}
_SET_KEYS = ("ModalitiesInStudy", "SOPClassesInStudy")     # computed keys a rule may use
RULE_LEVELS = ("patient", "study", "series")


@dataclass(frozen=True)
class RetentionRule:
    """A named rule: delete the records at ``level`` that ``criteria`` (C-FIND keys, ages
    unresolved) select."""

    name: str
    level: str
    criteria: dict

    @property
    def text(self) -> str:
        """The rule as written in the settings, normalised."""
        keys = "; ".join(f"{k}={v}" for k, v in self.criteria.items())
        return f"{self.level}: {keys}"


def parse_criteria(level: str, text: str, what: str) -> dict[str, str]:
    """The C-FIND keys of ``text`` for selecting at ``level`` (``what`` names them in errors).

    Raises
    ------
    ValueError
        A malformed rule or age, a key below the level, or no key with a value (the rule would
        select everything).
    """
    query_level, _ = UID_KEYS[level]
    above = query.LEVELS[:query.LEVELS.index(query_level) + 1]
    known = {k: lv for k, (lv, _) in query.ATTRIBUTES.items()} | \
        {k: query.COMPUTED[k] for k in _SET_KEYS}
    criteria = query.parse_criteria(text, known, what)
    below = [k for k in criteria if known[k] not in above]
    if below:       # a query at the level would not look at them: everything would match
        raise ValueError(f"{what}: {', '.join(below)} is not a key of a {level} or above")
    if not any(v not in ("", "*") for v in criteria.values()):
        raise ValueError(f"{what} needs at least one key with a value: it would select "
                         "everything")
    rule_dates.resolve(criteria, date.today())        # its ages are well formed
    return criteria


def parse_rule(name: str, text: str) -> RetentionRule:
    """A ``[retention]`` entry: ``"study: StudyDate=-10y"`` (``study:`` may be left out).

    Raises
    ------
    ValueError
        As :func:`parse_criteria`, or a level other than patient, study or series.
    """
    head, colon, keys = str(text).partition(":")
    level = head.strip().lower() if colon and "=" not in head else ""
    if not level:
        level, keys = "study", str(text)
    if level not in RULE_LEVELS:
        raise ValueError(f"retention rule {name!r}: level {level!r} is not one of "
                         f"{', '.join(RULE_LEVELS)}")
    return RetentionRule(name, level, parse_criteria(level, keys, f"retention rule {name!r}"))


def matching_uids(archive, level: str, criteria: dict, today: date) -> list[str]:
    """The UIDs (Patient IDs) at ``level`` of the records that ``criteria`` (from
    :func:`parse_criteria`; ages as of ``today``) select and that hold a value for every key
    with one."""
    query_level, key = UID_KEYS[level]
    asked = rule_dates.resolve(criteria, today)
    found = archive.find(query_level, {**asked, key: asked.get(key, "")})
    return sorted({str(r[key]) for r in found
                   if all(r.get(k) not in (None, "", []) for k, v in criteria.items()
                          if v not in ("", "*"))})


def recently_received(index: Index, level: str, uids: list[str], since: float) -> set[str]:
    """Those of ``uids`` (at ``level``) holding an instance received at or after ``since``
    (Unix time)."""
    column = {"patient": Patient.patient_id, "study": Study.study_uid,
              "series": Series.series_uid, "instance": Instance.sop_uid}[level]
    stmt = select(column).select_from(Instance).where(Instance.received_at >= since)
    if level != "instance":
        stmt = stmt.join(Series, Instance.series_fk == Series.id)
    if level in ("study", "patient"):
        stmt = stmt.join(Study, Series.study_fk == Study.id)
    if level == "patient":
        stmt = stmt.join(Patient, Study.patient_fk == Patient.id)
    out: set[str] = set()
    with index.read() as s:
        for i in range(0, len(uids), 500):
            out |= set(s.scalars(stmt.where(column.in_(uids[i:i + 500])).distinct()))
    return out
