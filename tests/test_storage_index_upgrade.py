"""An index written before the series time, body part, protocol and patient age were indexed:
opening it adds their columns and fills them from the stored headers (staged and compressed)."""

import logging

from sqlalchemy import text

from node_helpers import archive, make_series, store_series  # noqa: F401
from storage import query
from storage.archive import Archive

NEW = {"series": ("series_time", "body_part", "protocol_name"), "studies": ("patient_age",)}


def _series(n, seed, time, part, protocol, age, **kwargs):
    series = make_series(n, 8, 8, seed=seed, **kwargs)
    for ds in series:
        ds.SeriesTime, ds.BodyPartExamined, ds.ProtocolName, ds.PatientAge = (
            time, part, protocol, age)
    return series


def _attributes(arch, level="SERIES"):
    keys = {"SeriesInstanceUID": "", "SeriesTime": "", "BodyPartExamined": "",
            "ProtocolName": "", "PatientAge": ""}
    return {r["SeriesInstanceUID"]: (r["SeriesTime"], r["BodyPartExamined"], r["ProtocolName"],
                                     r["PatientAge"]) for r in query.find(arch.index, level, keys)}


def test_an_older_index_gets_the_new_attributes_from_the_stored_headers(archive, caplog):
    compressed = _series(4, 1, "081500", "HEAD", "Head routine", "061Y")
    store_series(archive, compressed)
    assert archive.compact(stable_age=0)[0] == 1
    staged = _series(3, 2, "093000.5", "KNEE", "Knee PD", "033Y", patient_id="PAT2")
    sent = store_series(archive, staged)
    expected = {compressed[0].SeriesInstanceUID: ("081500", "HEAD", "Head routine", "061Y"),
                staged[0].SeriesInstanceUID: ("093000.5", "KNEE", "Knee PD", "033Y")}
    assert _attributes(archive) == expected
    url, data_dir = archive.index.url, archive.blobs.root.parent
    with archive.index.engine.begin() as conn:      # as an index of 2026-12-04 has it
        for table, columns in NEW.items():
            for column in columns:
                conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
    archive.close()
    caplog.set_level(logging.INFO, logger="storage.index_upgrade")
    again = Archive(data_dir, url)
    try:
        assert sorted(again.index.added_columns) == sorted(
            f"{t}.{c}" for t, cs in NEW.items() for c in cs)
        assert _attributes(again) == expected
        assert "index upgrade: 2 of 2 series filled" in caplog.text
        assert query.find(again.index, "SERIES", {"BodyPartExamined": "KN*"})
        assert all(again.retrieve(uid).data == data for uid, data in sent.items())
    finally:
        again.close()
    reopened = Archive(data_dir, url)          # nothing more to add or fill
    try:
        assert reopened.index.added_columns == [] and _attributes(reopened) == expected
    finally:
        reopened.close()


def test_an_unreadable_header_leaves_its_series_empty_and_the_rest_filled(archive, caplog):
    good = _series(2, 3, "101010", "HAND", "Hand", "012Y")
    bad = _series(2, 4, "111111", "FOOT", "Foot", "013Y", patient_id="PAT3")
    store_series(archive, good + bad)
    url, data_dir = archive.index.url, archive.blobs.root.parent
    first_bad = min(ds.SOPInstanceUID for ds in bad)
    with archive.index.engine.begin() as conn:
        key = conn.execute(text("SELECT staged_key FROM instances WHERE sop_uid = :u"),
                           {"u": first_bad}).scalar()
        conn.execute(text("ALTER TABLE series DROP COLUMN body_part"))
    archive.blobs.path(key).write_bytes(b"\0" * 64)      # its staged file damaged
    archive.close()
    again = Archive(data_dir, url)
    try:
        found = _attributes(again)
        assert found[good[0].SeriesInstanceUID][1] == "HAND"
        assert found[bad[0].SeriesInstanceUID][1] == ""
        assert "cannot be read" in caplog.text
    finally:
        again.close()


def test_an_empty_column_is_added_to_an_older_table_and_left_empty(archive):
    """A nullable column without a default (a hold's ``through``) is added as it is."""
    from storage import holds
    series = make_series(1, 8, 8)
    store_series(archive, series)
    holds.place(archive.index, "study", series[0].StudyInstanceUID, "claim", "ana")
    url, data_dir = archive.index.url, archive.blobs.root.parent
    with archive.index.engine.begin() as conn:      # as the index of 2026-12-05 evening has it
        conn.execute(text("ALTER TABLE holds DROP COLUMN through"))
    archive.close()
    again = Archive(data_dir, url)
    try:
        assert "holds.through" in again.index.added_columns
        (hold,) = holds.listing(again.index)
        assert hold.uid == series[0].StudyInstanceUID and hold.through is None
    finally:
        again.close()
