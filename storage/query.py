"""C-FIND matching over the index: records of one level, filtered by DICOM matching rules.

Matching (PS3.4 C.2.2.2): an empty key is universal; ``\\``-separated values are a list (UID list
matching); ``*`` and ``?`` are wildcards; DA/TM/DT keys take ``a-b``, ``-b`` and ``a-`` ranges;
anything else is a single value. Comparison is case-sensitive except for person names. What SQL
can narrow (single values, lists, wildcards as LIKE, digit ranges; not person names or integers)
is pushed down into the query, only the attribute columns are read, and every record is matched
again in Python, so the database only has to let through a superset. Two options an SCU can
negotiate (:class:`Matching`) change the rules: fuzzy person names, and combined date-time
matching, where a date and its time (StudyDate and StudyTime, SeriesDate and SeriesTime) are one
range of moments (PS3.4 C.2.2.2.5.1) rather than a range of days and a range of hours of each.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from sqlalchemy import and_, distinct, exists, func, or_, select, true

from storage.index import Index, Instance, Patient, Series, Study
from storage.instance_facts import PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_LEVEL_ENTITY = {"PATIENT": Patient, "STUDY": Study, "SERIES": Series, "IMAGE": Instance}
# keyword -> (level, attribute of that level's row): what ingest indexes of patients, studies
# and series (storage.instance_facts), and the instance's own columns
ATTRIBUTES = {
    **{kw: (level, column) for level, keys in (("PATIENT", PATIENT_KEYS), ("STUDY", STUDY_KEYS),
                                               ("SERIES", SERIES_KEYS))
       for column, kw in keys.items()},
    "SOPInstanceUID": ("IMAGE", "sop_uid"), "SOPClassUID": ("IMAGE", "sop_class_uid"),
    "InstanceNumber": ("IMAGE", "instance_number"), "NumberOfFrames": ("IMAGE", "frames"),
}
# Computed attributes: keyword -> level they describe
COMPUTED = {
    "NumberOfPatientRelatedStudies": "PATIENT", "NumberOfPatientRelatedSeries": "PATIENT",
    "NumberOfPatientRelatedInstances": "PATIENT", "NumberOfStudyRelatedSeries": "STUDY",
    "NumberOfStudyRelatedInstances": "STUDY", "ModalitiesInStudy": "STUDY",
    "SOPClassesInStudy": "STUDY", "NumberOfSeriesRelatedInstances": "SERIES",
}


def parse_criteria(text: str, allowed, what: str) -> dict[str, str]:
    """C-FIND keys written as ``Keyword=pattern`` terms separated by ``;``
    (``Modality=CT\\MR; StudyDescription=*HEAD*``); empty: none. ``what`` names them in errors.

    Raises
    ------
    ValueError
        On a term without ``=``, or a keyword not in ``allowed``.
    """
    criteria = {}
    for term in filter(None, (t.strip() for t in text.split(";"))):
        keyword, equals, pattern = term.partition("=")
        keyword = keyword.strip()
        if not equals or not keyword:
            raise ValueError(f"{what} term {term!r} is not Keyword=pattern")
        if keyword not in allowed:
            raise ValueError(f"{what} key {keyword!r} is not one of "
                             f"{', '.join(sorted(allowed))}")
        criteria[keyword] = pattern.strip()
    return criteria


# the date and time keys that combined date-time matching takes as one moment
DATE_TIME_PAIRS = (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"))


@dataclass(frozen=True)
class Matching:
    """Matching options beyond PS3.4's defaults, as an SCU negotiates them.

    fuzzy : person names also match by :func:`fuzzy_name_match`.
    combined_datetime : date and time keys of :data:`DATE_TIME_PAIRS` are matched together
        (:func:`combined_match`) where either holds a range.
    """

    fuzzy: bool = False
    combined_datetime: bool = False


def _has_wildcard(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def _match_one(value: str, pattern: str, vr: str) -> bool:
    if "\\" in pattern:
        return any(_match_one(value, p, vr) for p in pattern.split("\\"))
    if vr in ("DA", "TM", "DT") and "-" in pattern:
        low, _, high = pattern.partition("-")
        if not value:
            return False
        return (not low or value >= low) and (not high or value[:len(high)] <= high)
    flags = re.IGNORECASE if vr == "PN" else 0
    if _has_wildcard(pattern):
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        return re.fullmatch(regex, value, flags | re.DOTALL) is not None
    return value.lower() == pattern.lower() if vr == "PN" else value == pattern


def _vr(keyword: str) -> str:
    """The VR matching treats a key as: its dictionary VR, LO when it has none."""
    try:
        return dictionary_VR(keyword)
    except KeyError:
        return "LO"


def _range_bounds(pattern: str) -> tuple[str, str]:
    """(low, high) of a DA/TM range or single value; either may be empty (open)."""
    low, dash, high = pattern.partition("-")
    return (low, high) if dash else (pattern, pattern)


def combined_match(date, time, date_pattern: str, time_pattern: str) -> bool:
    """Combined date-time matching (PS3.4 C.2.2.2.5.1): the stored date and time as one moment
    in the range from the patterns' lows to their highs; ``20060705-20060707`` with
    ``1000-1800`` is from July 5, 10:00 to July 7, 18:00. A single value is a range of one; a
    record without a time matches on its date."""
    date, time = str(date or "").strip(), str(time or "").strip()
    if not date:
        return False
    (d_low, d_high), (t_low, t_high) = _range_bounds(date_pattern), _range_bounds(time_pattern)
    low = d_low + t_low if d_low else ""
    high = d_high + t_high if d_high else ""
    if not time:
        low, high = low[:8], high[:8]
    moment = date + time
    return (not low or moment >= low) and (not high or moment[:len(high)] <= high)


def _combined_pairs(criteria: dict, matching: Matching) -> list[tuple[str, str]]:
    """The date-time pairs of ``criteria`` matched as one moment: both keys hold a value (no
    list, no wildcard) and the date a range. With a single date, matching the two apart is
    the same thing, and the date keeps its single-value meaning."""
    if not matching.combined_datetime:
        return []
    pairs = []
    for date_key, time_key in DATE_TIME_PAIRS:
        values = criteria.get(date_key) or "", criteria.get(time_key) or ""
        if all(v and v != "*" and "\\" not in v and not _has_wildcard(v) for v in values) \
                and "-" in values[0]:
            pairs.append((date_key, time_key))
    return pairs


def matches(value, pattern: str, keyword: str, fuzzy: bool = False) -> bool:
    """Return whether a stored value (str, int or list of them) matches a C-FIND key value;
    ``fuzzy``: person names also by :func:`fuzzy_name_match`."""
    if pattern in ("", "*"):
        return True
    vr = _vr(keyword)
    values = value if isinstance(value, list) else [value]
    texts = ("" if v is None else str(v) for v in values)
    return any(_match_one(text, pattern, vr)
               or (fuzzy and vr == "PN" and fuzzy_name_match(text, pattern)) for text in texts)


_NAME_WORDS = re.compile(r"[\s^=,.\-']+")


def _folded_words(text: str) -> list[str]:
    """The words of a person name without case or accents (Müller, MULLER and muller alike)."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text)
                    if not unicodedata.combining(c))
    return [w for w in _NAME_WORDS.split(plain.casefold()) if w]


def fuzzy_name_match(value: str, pattern: str) -> bool:
    """voxarc's fuzzy semantic matching of person names (QIDO-RS ``fuzzymatching=true``): each
    word of the pattern, wildcards dropped, begins some word of the name, in any order and
    component, ignoring case and accents ("jane doe", "DOE^J" and "müll" find
    ``Doe^Jane`` and ``MULLER^HANS`` alike)."""
    if "\\" in pattern:                                  # a list: any of its names
        return any(fuzzy_name_match(value, p) for p in pattern.split("\\"))
    wanted = _folded_words(pattern.replace("*", " ").replace("?", " "))
    words = _folded_words(value)
    return bool(wanted) and all(any(w.startswith(p) for w in words) for p in wanted)


_INTEGER = {"InstanceNumber", "NumberOfFrames"}   # matched on their text, in Python only


def _columns(level: str) -> list:
    """The selected columns of a query at ``level``: each level's id (labelled ``<LEVEL>``) and
    the attributes of that level and above (labelled by keyword); never a header's bytes."""
    chain = LEVELS[:LEVELS.index(level) + 1]
    cols = [_LEVEL_ENTITY[lv].id.label(lv) for lv in chain]
    cols += [getattr(_LEVEL_ENTITY[lv], attr).label(kw)
             for kw, (lv, attr) in ATTRIBUTES.items() if lv in chain]
    return cols


def _statement(level: str, criteria: dict, dialect: str = "sqlite", skip: frozenset = frozenset()):
    """The query of ``level``'s records, narrowed by ``criteria`` but the keywords in ``skip``."""
    chain = LEVELS[:LEVELS.index(level) + 1]
    stmt = select(*_columns(level)).select_from(Patient)
    if "STUDY" in chain:
        stmt = stmt.join(Study, Study.patient_fk == Patient.id)
    if "SERIES" in chain:
        stmt = stmt.join(Series, Series.study_fk == Study.id)
    if "IMAGE" in chain:
        stmt = stmt.join(Instance, Instance.series_fk == Series.id)
    for keyword, pattern in criteria.items():
        spec = ATTRIBUTES.get(keyword)
        if spec and spec[0] in chain and pattern and keyword not in _INTEGER | skip:
            condition = _sql_condition(getattr(_LEVEL_ENTITY[spec[0]], spec[1]), keyword,
                                       pattern, dialect)
            if condition is not None:
                stmt = stmt.where(condition)
    return stmt


def _sql_condition(column, keyword: str, pattern: str, dialect: str):
    """A SQL condition that every value matching ``pattern`` meets (it may let through more:
    each record is matched again in Python), or None when the pattern cannot be narrowed."""
    parts = pattern.split("\\")
    if len(parts) > 1:
        conditions = [_sql_condition(column, keyword, p, dialect) for p in parts]
        return None if any(c is None for c in conditions) else or_(*conditions)
    vr = _vr(keyword)
    if vr == "PN" or pattern.strip("*") == "":
        return None                         # case-folding differs; universal
    if vr in ("DA", "TM", "DT") and "-" in pattern:
        low, _, high = pattern.partition("-")
        if not (low + high).isdigit():
            return None
        text = column.collate("C") if dialect == "postgresql" else column
        return and_(text >= low if low else true(),
                    func.substr(text, 1, len(high)) <= high if high else true())
    if _has_wildcard(pattern):
        escaped = "".join("\\" + c if c in "%_\\" else c for c in pattern)
        return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")
    return column == pattern


# Computed attributes by the aggregate that gives them: (level, keywords, statement builder).
# Each counts in the database over the rows of the matched entities only (an archive's worth
# of instance rows never comes back to Python).
def _patient_counts():
    return (select(Study.patient_fk, func.count(distinct(Study.id)),
                   func.count(distinct(Series.id)), func.count(Instance.id))
            .join(Series, Series.study_fk == Study.id)
            .join(Instance, Instance.series_fk == Series.id).group_by(Study.patient_fk),
            Study.patient_fk)


def _study_counts():
    return (select(Series.study_fk, func.count(distinct(Series.id)), func.count(Instance.id))
            .join(Instance, Instance.series_fk == Series.id).group_by(Series.study_fk),
            Series.study_fk)


def _series_counts():
    return (select(Instance.series_fk, func.count(Instance.id)).group_by(Instance.series_fk),
            Instance.series_fk)


def _study_modalities():
    return (select(Series.study_fk, Series.modality).distinct()
            .where(exists().where(Instance.series_fk == Series.id)), Series.study_fk)


def _study_sop_classes():
    return (select(Series.study_fk, Instance.sop_class_uid).distinct()
            .join(Instance, Instance.series_fk == Series.id), Series.study_fk)


_AGGREGATES = (
    ("PATIENT", ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                 "NumberOfPatientRelatedInstances"), _patient_counts, "counts"),
    ("STUDY", ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"), _study_counts,
     "counts"),
    ("SERIES", ("NumberOfSeriesRelatedInstances",), _series_counts, "counts"),
    ("STUDY", ("ModalitiesInStudy",), _study_modalities, "set"),
    ("STUDY", ("SOPClassesInStudy",), _study_sop_classes, "set"),
)


def _computed(session, level: str, ids: list[int]) -> dict:
    """The computed attributes of the rows ``ids`` of ``level``: {id: {keyword: value}}."""
    out: dict = defaultdict(dict)
    for agg_level, keywords, build, kind in _AGGREGATES:
        if agg_level != level:
            continue
        stmt, column = build()
        for i in range(0, len(ids), 500):
            for row in session.execute(stmt.where(column.in_(ids[i:i + 500]))):
                if kind == "counts":
                    out[row[0]].update(zip(keywords, row[1:]))
                else:
                    out[row[0]].setdefault(keywords[0], set()).add(row[1])
    for values in out.values():
        for keyword in ("ModalitiesInStudy", "SOPClassesInStudy"):
            if keyword in values:
                values[keyword] = sorted(v for v in values[keyword] if v)
    return out


def _record(row) -> dict:
    values = row._mapping
    return {kw: values[kw] for kw in ATTRIBUTES if kw in values}


def find(index: Index, level: str, criteria: dict[str, str], matching: Matching = Matching()
         ) -> list[dict]:
    """Return the records of ``level`` that match ``criteria``.

    Parameters
    ----------
    index : Index
    level : {"PATIENT", "STUDY", "SERIES", "IMAGE"}
    criteria : dict
        C-FIND keys by keyword, values as sent (empty: universal). Keys the index does not keep
        do not filter.
    matching : Matching
        The options the caller negotiated.

    Returns
    -------
    list of dict
        One dict per matching entity, keyword -> value, with the attributes of its level and above
        and the computed counts of its level and above.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown query level {level!r}")
    pairs = _combined_pairs(criteria, matching)
    # a combined pair's date range still bounds its dates in SQL; its time range does not
    skip = frozenset(time_key for _, time_key in pairs)
    with index.read() as session:
        rows = session.execute(_statement(level, criteria, index.engine.dialect.name,
                                          skip)).all()
        # the stored attributes first: the computed ones are counted for what still matches
        matched = [(row, record) for row, record in ((row, _record(row)) for row in rows)
                   if _matching(record, criteria, matching, pairs)]
        for lv in {COMPUTED[k] for k in criteria if k in COMPUTED} \
                & set(LEVELS[:LEVELS.index(level) + 1]):
            pos = LEVELS.index(lv)
            computed = _computed(session, lv, sorted({row[pos] for row, _ in matched}))
            for row, record in matched:
                record.update(computed.get(row[pos], {}))
    return [record for _, record in matched if _matching(record, criteria, matching, pairs)]


def _matching(record: dict, criteria: dict, matching: Matching, pairs: list) -> bool:
    """Whether ``record`` matches every criterion it has an attribute for, the date-time
    ``pairs`` (:func:`_combined_pairs`) each as one moment."""
    together = {key for pair in pairs for key in pair}
    return all(combined_match(record.get(d), record.get(t), criteria[d], criteria[t])
               for d, t in pairs if d in record) \
        and all(matches(record.get(k), v, k, matching.fuzzy) for k, v in criteria.items()
                if k in record and k not in together)
