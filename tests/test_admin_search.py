"""The admin page's study search (``/api/studies?q=&modality=&from=&to=``,
storage.reports.StudyFilter), on SQLite and, when configured, PostgreSQL."""

import json

import pytest

from admin_helpers import admin_site, get_json, http_get, http_token  # noqa: F401
from node_helpers import archive, make_series, store_as_received  # noqa: F401
from storage import reports


def _study(patient_id, name, modality, date, accession, description, seed):
    series = make_series(2, 8, 8, patient_id=patient_id, patient_name=name, modality=modality,
                         study_date=date, seed=seed)
    for ds in series:
        ds.AccessionNumber, ds.StudyDescription = accession, description
    return series


STUDIES = [("ID-1001", "Doe^Jane", "CT", "20240105", "ACC-77", "CT THORAX", 1),
           ("ID-1002", "Müller^Jörg", "MR", "20240301", "ACC-78", "MR HEAD 50%", 2),
           ("X_2003", "Smith^John", "CT", "***", "A-9", "CT ABDOMEN", 3)]


def _found(arch, **where) -> set[str]:
    page = reports.studies(arch.index, limit=500, where=reports.StudyFilter(**where))
    assert page["total"] == len(page["items"])
    return {item["patient_id"] for item in page["items"]}


def test_each_word_is_found_in_a_field_of_the_study(archive):  # noqa: F811
    uids = {}
    for spec in STUDIES:
        series = _study(*spec)
        store_as_received(archive, series)
        uids[spec[0]] = series[0].StudyInstanceUID
    everyone = {"ID-1001", "ID-1002", "X_2003"}
    assert _found(archive) == everyone
    assert _found(archive, text="jane DOE") == {"ID-1001"}          # each word, any case
    assert _found(archive, text="doe smith") == set()                # every word must be found
    assert _found(archive, text="müller") == {"ID-1002"}
    assert _found(archive, text="MÜLLER JÖRG") == {"ID-1002"}      # any letter's case
    assert _found(archive, text="id-100") == {"ID-1001", "ID-1002"}  # patient ID
    assert _found(archive, text="acc-78") == {"ID-1002"}             # accession
    assert _found(archive, text="thorax") == {"ID-1001"}             # description
    assert _found(archive, text=uids["X_2003"]) == {"X_2003"}        # Study Instance UID
    assert _found(archive, text="50%") == {"ID-1002"}                # % is a character
    assert _found(archive, text="%") == {"ID-1002"}
    assert _found(archive, text="x_2") == {"X_2003"} and _found(archive, text="d_1") == set()
    assert _found(archive, modality="ct") == {"ID-1001", "X_2003"}
    assert _found(archive, modality="CT", text="smith") == {"X_2003"}
    assert _found(archive, date_from="20240201") == {"ID-1002"}
    assert _found(archive, date_to="20240105") == {"ID-1001"}       # inclusive; not "***"
    assert _found(archive, date_from="20240105", date_to="20240301") == {"ID-1001", "ID-1002"}
    with pytest.raises(ValueError, match="YYYYMMDD"):
        reports.StudyFilter(date_from="2024-01-05")


def test_the_api_filters_and_pages_what_matches(admin_site):
    node, admin = admin_site
    for spec in STUDIES:
        store_as_received(node.archive, _study(*spec))
    page = get_json(f"{admin.url}/api/studies?q=id-100&limit=1&sort=patient&order=asc")
    assert page["total"] == 2 and [i["patient_id"] for i in page["items"]] == ["ID-1001"]
    page = get_json(f"{admin.url}/api/studies?q=id-100&limit=1&offset=1&sort=patient&order=asc")
    assert [i["patient_id"] for i in page["items"]] == ["ID-1002"]
    page = get_json(f"{admin.url}/api/studies?modality=MR&from=20240101&to=20241231")
    assert [i["patient_id"] for i in page["items"]] == ["ID-1002"]
    status, body = http_get(f"{admin.url}/api/studies?from=yesterday")
    assert status == 400 and "YYYYMMDD" in json.loads(body)["error"]


def test_one_patients_studies_by_their_exact_id(archive):  # noqa: F811
    """``patient_id`` keeps one patient's studies (not those of an ID it begins), each item
    counts its patient's studies, and study_uids lists them oldest first."""
    older = _study("ID-1001", "Doe^Jane", "CT", "20230105", "A1", "CT THORAX", 11)
    newer = _study("ID-1001", "Doe^Jane", "MR", "20240105", "A2", "MR HEAD", 12)
    other = _study("ID-10011", "Roe^Joan", "CT", "20220105", "A3", "CT HEAD", 13)
    for series in (newer, other, older):
        store_as_received(archive, series)
    assert _found(archive, patient_id="ID-1001") == {"ID-1001"}
    page = reports.studies(archive.index, where=reports.StudyFilter(patient_id="ID-1001"))
    assert page["total"] == 2 and [i["patient_studies"] for i in page["items"]] == [2, 2]
    page = reports.studies(archive.index)
    assert sorted(i["patient_studies"] for i in page["items"]) == [1, 2, 2]
    assert _found(archive, patient_id="ID-1001", modality="MR") == {"ID-1001"}
    assert _found(archive, patient_id="ID-100") == set()
    mine = reports.StudyFilter(patient_id="ID-1001")
    assert reports.study_uids(archive.index, mine, 10) == [older[0].StudyInstanceUID,
                                                         newer[0].StudyInstanceUID]
    assert reports.study_uids(archive.index, mine, 1) == [older[0].StudyInstanceUID]
