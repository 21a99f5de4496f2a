"""C-FIND matching over the index: records of one level, filtered by DICOM matching rules.

Matching (PS3.4 C.2.2.2): an empty key is universal; ``\\``-separated values are a list (UID list
matching); ``*`` and ``?`` are wildcards; DA/TM/DT keys take ``a-b``, ``-b`` and ``a-`` ranges;
anything else is a single value. Comparison is case-sensitive except for person names. Unique keys
are also pushed down into SQL so a query for one series never loads the archive.
"""

from __future__ import annotations

import re
from collections import defaultdict

from pydicom.datadict import dictionary_VR
from sqlalchemy import func, select

from storage.index import Index, Instance, Patient, Series, Study

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_LEVEL_ENTITY = {"PATIENT": Patient, "STUDY": Study, "SERIES": Series, "IMAGE": Instance}
# keyword -> (level, attribute of that level's row)
ATTRIBUTES = {
    "PatientID": ("PATIENT", "patient_id"), "PatientName": ("PATIENT", "patient_name"),
    "PatientBirthDate": ("PATIENT", "birth_date"), "PatientSex": ("PATIENT", "sex"),
    "StudyInstanceUID": ("STUDY", "study_uid"), "StudyDate": ("STUDY", "study_date"),
    "StudyTime": ("STUDY", "study_time"), "AccessionNumber": ("STUDY", "accession_number"),
    "StudyDescription": ("STUDY", "study_description"), "StudyID": ("STUDY", "study_id"),
    "ReferringPhysicianName": ("STUDY", "referring_physician"),
    "SeriesInstanceUID": ("SERIES", "series_uid"), "Modality": ("SERIES", "modality"),
    "SeriesNumber": ("SERIES", "series_number"),
    "SeriesDescription": ("SERIES", "series_description"), "SeriesDate": ("SERIES", "series_date"),
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
_UNIQUE = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}


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


def matches(value, pattern: str, keyword: str) -> bool:
    """Return whether a stored value (str, int or list of them) matches a C-FIND key value."""
    if pattern in ("", "*"):
        return True
    try:
        vr = dictionary_VR(keyword)
    except KeyError:
        vr = "LO"
    values = value if isinstance(value, list) else [value]
    return any(_match_one("" if v is None else str(v), pattern, vr) for v in values)


def _statement(level: str, criteria: dict):
    chain = LEVELS[:LEVELS.index(level) + 1]
    stmt = select(*[_LEVEL_ENTITY[lv] for lv in chain]).select_from(Patient)
    if "STUDY" in chain:
        stmt = stmt.join(Study, Study.patient_fk == Patient.id)
    if "SERIES" in chain:
        stmt = stmt.join(Series, Series.study_fk == Study.id)
    if "IMAGE" in chain:
        stmt = stmt.join(Instance, Instance.series_fk == Series.id)
    for keyword, pattern in criteria.items():
        spec = ATTRIBUTES.get(keyword)
        if spec and spec[0] in chain and (keyword in _UNIQUE or keyword == "PatientID") \
                and pattern and not _has_wildcard(pattern):
            column = getattr(_LEVEL_ENTITY[spec[0]], spec[1])
            stmt = stmt.where(column.in_(pattern.split("\\")))
    return stmt


def _counts(session, level: str, ids: list[int]) -> dict:
    """Computed attributes of the rows ``ids`` of ``level``: {id: {keyword: value}}."""
    out: dict = defaultdict(dict)
    joined = (select(Patient.id, Study.id, Series.id, Series.modality, Instance.id,
                     Instance.sop_class_uid).select_from(Patient)
              .join(Study, Study.patient_fk == Patient.id)
              .join(Series, Series.study_fk == Study.id)
              .join(Instance, Instance.series_fk == Series.id))
    pos = {"PATIENT": 0, "STUDY": 1, "SERIES": 2}[level]
    column = (Patient.id, Study.id, Series.id)[pos]
    rows = []
    for i in range(0, len(ids), 500):
        rows.extend(session.execute(joined.where(column.in_(ids[i:i + 500]))).all())
    groups = defaultdict(list)
    for row in rows:
        groups[row[pos]].append(row)
    for key, members in groups.items():
        n_series = len({r[2] for r in members})
        if level == "PATIENT":
            out[key] = {"NumberOfPatientRelatedStudies": len({r[1] for r in members}),
                        "NumberOfPatientRelatedSeries": n_series,
                        "NumberOfPatientRelatedInstances": len(members)}
        elif level == "STUDY":
            out[key] = {"NumberOfStudyRelatedSeries": n_series,
                        "NumberOfStudyRelatedInstances": len(members),
                        "ModalitiesInStudy": sorted({r[3] for r in members if r[3]}),
                        "SOPClassesInStudy": sorted({r[5] for r in members})}
        else:
            out[key] = {"NumberOfSeriesRelatedInstances": len(members)}
    return out


def _record(row) -> dict:
    record = {}
    for keyword, (level, attr) in ATTRIBUTES.items():
        entity = _LEVEL_ENTITY[level]
        obj = next((o for o in row if isinstance(o, entity)), None)
        if obj is not None:
            record[keyword] = getattr(obj, attr)
    return record


def find(index: Index, level: str, criteria: dict[str, str]) -> list[dict]:
    """Return the records of ``level`` that match ``criteria``.

    Parameters
    ----------
    index : Index
    level : {"PATIENT", "STUDY", "SERIES", "IMAGE"}
    criteria : dict
        C-FIND keys by keyword, values as sent (empty: universal). Keys the index does not keep
        do not filter.

    Returns
    -------
    list of dict
        One dict per matching entity, keyword -> value, with the attributes of its level and above
        and the computed counts of its level and above.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown query level {level!r}")
    with index.read() as session:
        rows = session.execute(_statement(level, criteria)).all()
        records = [_record(row) for row in rows]
        needed = {COMPUTED[k] for k in criteria if k in COMPUTED}
        for lv in needed & set(LEVELS[:LEVELS.index(level) + 1]):
            pos = LEVELS.index(lv)
            ids = sorted({row[pos].id for row in rows})
            counts = _counts(session, lv, ids)
            for row, record in zip(rows, records):
                record.update(counts.get(row[pos].id, {}))
    return [r for r in records
            if all(matches(r.get(k), v, k) for k, v in criteria.items() if k in r)]
