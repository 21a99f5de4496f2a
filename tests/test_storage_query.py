"""C-FIND matching (storage.query): what is pushed down into SQL must never change the answer.

The index is filled with awkward values (LIKE's own ``%`` and ``_``, backslash-free lists, mixed
case, non-ASCII names, empty values, malformed dates), then several hundred random queries at
every level are answered by :func:`storage.query.find` and by a reference that reads every row
and matches in Python only. Runs on SQLite and, when configured, on PostgreSQL.
"""

import json
import random

import pytest
from sqlalchemy import select

from node_helpers import archive  # noqa: F401
from storage import query
from storage.index import Instance, Patient, Series, Study

NAMES = ["Doe^Jane", "DOE^JOHN", "doe^jim", "Ærøskøbing^Åse", "ÉLODIE^Ève", "Smith", ""]
DESCRIPTIONS = ["CHEST 5mm", "chest 1mm", "Head_W/O", "100% dose", "a_b%c", "", "Kopf Ådn"]
MODALITIES = ["CT", "MR", "ct", "PT", "", "SEG"]
DATES = ["20240102", "20231231", "20240615", "", "2024.01.02", "19991231", "2024"]
TIMES = ["101500", "0930", "235959", "", "101500.123"]
LEVEL_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
              "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
SOP_CLASSES = ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4",
               "1.2.840.10008.5.1.4.1.1.7"]


def _fill(index, rng: random.Random) -> None:
    with index.write() as s:
        for p in range(6):
            patient = Patient(patient_id=f"P{p}{'_x' if p % 3 == 0 else ''}",
                              patient_name=rng.choice(NAMES), birth_date=rng.choice(DATES),
                              sex=rng.choice(["F", "M", "O", ""]))
            s.add(patient)
            s.flush()
            for t in range(rng.randint(1, 3)):
                study = Study(study_uid=f"1.2.{p}.{t}", patient_fk=patient.id,
                              study_date=rng.choice(DATES), study_time=rng.choice(TIMES),
                              accession_number=rng.choice(["A1", "a1", "A%1", ""]),
                              study_description=rng.choice(DESCRIPTIONS),
                              study_id=rng.choice(["S1", "s1", "1"]),
                              referring_physician=rng.choice(NAMES))
                s.add(study)
                s.flush()
                for r in range(rng.randint(1, 3)):
                    series = Series(series_uid=f"1.2.{p}.{t}.{r}", study_fk=study.id,
                                    modality=rng.choice(MODALITIES),
                                    series_number=str(rng.choice([1, 2, 10, 100])),
                                    series_description=rng.choice(DESCRIPTIONS),
                                    series_date=rng.choice(DATES))
                    s.add(series)
                    s.flush()
                    for i in range(rng.randint(1, 4)):
                        s.add(Instance(sop_uid=f"1.2.{p}.{t}.{r}.{i}", series_fk=series.id,
                                       sop_class_uid=rng.choice(SOP_CLASSES),
                                       transfer_syntax="1.2.840.10008.1.2.1",
                                       instance_number=rng.choice([None, i + 1, 10 + i]),
                                       size=1, sha256="0" * 64, received_at=0.0,
                                       frames=rng.choice([1, 1, 3])))


def _all_records(index) -> dict:
    """Level -> every record of it: each table read whole as ORM objects, joined in Python."""
    with index.read() as s:
        paths = [(p,) for p in s.scalars(select(Patient))]
        out = {"PATIENT": paths}
        for level, entity, parent in (("STUDY", Study, "patient_fk"),
                                      ("SERIES", Series, "study_fk"),
                                      ("IMAGE", Instance, "series_fk")):
            children: dict = {}
            for row in s.scalars(select(entity)):
                children.setdefault(getattr(row, parent), []).append(row)
            paths = out[level] = [path + (row,) for path in paths
                                  for row in children.get(path[-1].id, [])]
        return {level: [{kw: getattr(path[query.LEVELS.index(lv)], attr)
                         for kw, (lv, attr) in query.ATTRIBUTES.items()
                         if query.LEVELS.index(lv) < len(path)} for path in paths]
                for level, paths in out.items()}


def _reference(records: list[dict], criteria: dict) -> list[dict]:
    """The records matching ``criteria``, matched in Python only."""
    return [r for r in records
            if all(query.matches(r[k], v, k) for k, v in criteria.items() if k in r)]


def _pattern(rng: random.Random, keyword: str, value) -> str:
    """A matching key for ``keyword`` built from a stored value: the value itself, its other
    case, a wildcard form, a list, a range, or something that matches nothing."""
    text = "" if value is None else str(value)
    kind = rng.choice(["exact", "case", "star", "question", "list", "range", "none", "universal"])
    if kind == "case":
        return text.swapcase()
    if kind == "star" and text:
        cut = rng.randint(0, len(text))
        return text[:cut] + "*" + (text[cut + 1:] if rng.random() < 0.5 else "")
    if kind == "question" and text:
        k = rng.randrange(len(text))
        return text[:k] + "?" + text[k + 1:]
    if kind == "list":
        return "\\".join([text, rng.choice(DATES + MODALITIES + NAMES)])
    if kind == "range":
        low, high = sorted(rng.sample(["20231231", "20240102", "2024", "1999", "", "20240615"], 2))
        return f"{low}-{high}" if low or high else "-20240101"
    if kind == "none":
        return "no-such-value"
    if kind == "universal":
        return rng.choice(["", "*", "**"])
    return text


def test_pushed_down_matching_answers_as_python_matching_does(archive):  # noqa: F811
    rng = random.Random(7)
    _fill(archive.index, rng)
    everything = _all_records(archive.index)
    assert len(everything["IMAGE"]) > 20
    keys = {lv: [kw for kw, (at, _) in query.ATTRIBUTES.items()
                 if query.LEVELS.index(at) <= query.LEVELS.index(lv)] for lv in query.LEVELS}
    narrowed = 0
    for _ in range(400):
        level = rng.choice(query.LEVELS)
        source = rng.choice(everything[level])
        criteria = {kw: _pattern(rng, kw, source[kw])
                    for kw in rng.sample(keys[level], rng.randint(1, 3))}
        expected = sorted(r[LEVEL_KEYS[level]] for r in _reference(everything[level], criteria))
        found = sorted(r[LEVEL_KEYS[level]] for r in archive.find(level, criteria))
        assert found == expected, (level, criteria)
        narrowed += len(expected) < len(everything[level])
    assert narrowed > 100        # the queries do select, not only return everything


def test_bench_query_fills_an_index_and_times_the_viewers_queries(tmp_path, capsys):
    from service.cli import main
    out = tmp_path / "q.json"
    assert main(["bench-query", "--studies", "12", "--series-per-study", "3",
                 "--instances-per-series", "5", "--runs", "1", "--json", str(out)]) == 0
    rows = {r["query"]: r for r in json.loads(out.read_text())}
    assert rows["series of one study"]["results"] == 3
    assert rows["instances of one series"]["results"] == 5
    assert rows["one instance by UID, no higher keys"]["results"] == 1
    assert all(r["median_ms"] > 0 for r in rows.values())
    assert "| worklist (study dates, modalities, counts) | STUDY |" in capsys.readouterr().out


@pytest.mark.parametrize("pattern, found", [
    ("muller", True), ("MÜLLER", True), ("hans müller", True), ("Mul^Ha", True),
    ("hans*", True), ("müller hans peter", False), ("ans", False), ("", False),
    ("Müller-Lüdenscheid", True), ("lud", True), ("straße", False)])
def test_fuzzy_person_name_matching(pattern, found):
    from storage.query import fuzzy_name_match, matches
    name = "MÜLLER-LÜDENSCHEID^Hans"
    assert fuzzy_name_match(name, pattern) is found
    assert matches(name, pattern, "PatientName", fuzzy=True) is (found or pattern == "")
    assert matches("STRASSE^Anna", "straße", "PatientName", fuzzy=True)   # casefold: ss
    assert not matches(name, "muller", "PatientName")                       # literal by default
    assert not matches("muller", "mul", "PatientID", fuzzy=True)            # names only
    assert fuzzy_name_match(name, "roe\\hans") and not fuzzy_name_match(name, "roe\\ann")


@pytest.mark.parametrize("date, time, found", [
    ("20060705", "095959", False), ("20060705", "100000", True), ("20060706", "0300", True),
    ("20060706", "235959", True), ("20060707", "180059", True), ("20060707", "180100", False),
    ("20060707", "1801", False), ("20060704", "120000", False), ("20060708", "0900", False),
    ("20060706", "", True), ("20060705", "", True), ("20060708", "", False), ("", "1200", False)])
def test_combined_date_time_matching_is_one_range_of_moments(date, time, found):
    """PS3.4's example: July 5 to 7 with 10:00 to 18:00 is from July 5, 10:00 to July 7, 18:00
    (the nights between included), not 10:00 to 18:00 of each day; 18:00 takes in its minute,
    as a time range's end does without the option; a record without a time matches on its
    date."""
    assert query.combined_match(date, time, "20060705-20060707", "1000-1800") is found
    separate = query.matches(date, "20060705-20060707", "StudyDate") \
        and query.matches(time, "1000-1800", "StudyTime")
    if date and time and date[6:] == "06":
        assert found and separate is ("1000" <= time[:4] <= "1800")


@pytest.mark.parametrize("dates, times, date, time, found", [
    ("20060705-", "1000-", "20060705", "0959", False),
    ("20060705-", "1000-", "20991231", "0000", True),
    ("-20060707", "-1800", "19991231", "2359", True),
    ("-20060707", "-1800", "20060707", "1815", False),
    ("20060705", "1000-1200", "20060705", "1130", True),
    ("20060705", "1000-1200", "20060705", "1300", False),
    ("20060705-20060707", "1000", "20060706", "0100", True)])
def test_combined_date_time_matching_with_open_ends_and_single_values(dates, times, date, time,
                                                                      found):
    assert query.combined_match(date, time, dates, times) is found


def test_combined_date_time_matching_in_sql_answers_as_python_does(archive):  # noqa: F811
    """With combined date-time matching, the time range is not pushed down on its own (it
    would drop the nights of a multi-day range); the date range still narrows in SQL. A single
    date keeps its own meaning (matched apart from the time, as without the option)."""
    rng = random.Random(11)
    _fill(archive.index, rng)
    studies = _all_records(archive.index)["STUDY"]
    combined = query.Matching(combined_datetime=True)
    bounds = ["20231231", "20240102", "2024", "", "20240615", "19991231"]
    hours = ["1000", "0930", "2359", "", "101500", "0000"]
    differs = 0
    for _ in range(200):
        dates = ("-".join(sorted(rng.sample(bounds, 2))) if rng.random() < 0.8
                 else rng.choice(bounds[:3]))
        times = "-".join(rng.sample(hours, 2))
        criteria = {"StudyDate": dates, "StudyTime": times}
        expected = sorted(r["StudyInstanceUID"] for r in studies
                          if (query.combined_match(r["StudyDate"], r["StudyTime"], dates, times)
                              if "-" in dates else _reference([r], criteria)))
        found = sorted(r["StudyInstanceUID"] for r in archive.find("STUDY", criteria, combined))
        assert found == expected, criteria
        differs += found != sorted(r["StudyInstanceUID"] for r in archive.find("STUDY", criteria))
    assert differs > 10           # the option changes answers, not only in theory
