"""Room left and its pace (storage.reports.room), in /api/stats and the metrics."""

import calendar
import shutil
import time

from admin_helpers import admin_site, get_json, http_get, http_token, metric, store_series  # noqa: F401
from storage import reports

NOW = calendar.timegm(time.strptime("2026-12-05 12:00", "%Y-%m-%d %H:%M"))
GB = 10 ** 9


def _day(day: str, stored: float) -> dict:
    return {"day": day, "stored_bytes": stored}


def test_the_pace_is_taken_over_the_archive_s_recent_days():
    days = [_day("2026-12-01", 10 * GB), _day("2026-12-05", 20 * GB)]
    found = reports.room(days, 30 * GB, (1000 * GB, 600 * GB), now=NOW)
    assert found["window_days"] == 5                       # a five-day-old archive
    assert found["stored_per_day_bytes"] == 6 * GB and found["days_left"] == 100.0
    assert (found["room_bytes"], found["bound"]) == (600 * GB, "disk")

    older = [_day("2026-09-01", 900 * GB)] + days           # before the window: not the pace
    found = reports.room(older, 930 * GB, (1000 * GB, 600 * GB), now=NOW)
    assert found["window_days"] == 30 and found["stored_per_day_bytes"] == 1 * GB
    assert found["days_left"] == 600.0
    assert reports.room(older, 930 * GB, (1000 * GB, 600 * GB), window=7,
                        now=NOW)["stored_per_day_bytes"] == round(30 * GB / 7)


def test_the_storage_cap_and_no_growth():
    days = [_day("2026-12-05", 5 * GB)]
    found = reports.room(days, 95 * GB, (1000 * GB, 600 * GB), max_storage_bytes=100 * GB,
                         now=NOW)
    assert (found["room_bytes"], found["bound"], found["days_left"]) == \
        (5 * GB, "max_storage_bytes", 1.0)
    found = reports.room(days, 120 * GB, (1000 * GB, 600 * GB), max_storage_bytes=100 * GB,
                         now=NOW)
    assert found["room_bytes"] == 0 and found["days_left"] == 0.0
    quiet = reports.room([_day("2026-10-01", 5 * GB)], 5 * GB, (10 * GB, 5 * GB), now=NOW)
    assert quiet["stored_per_day_bytes"] == 0 and quiet["days_left"] is None
    assert reports.room([], 0, (10 * GB, 5 * GB), now=NOW)["days_left"] is None


def test_stats_and_metrics_tell_the_room(admin_site, tmp_path):
    node, admin = admin_site
    store_series(node, tmp_path, [("CT", 3, "R1")])
    room = get_json(f"{admin.url}/api/stats")["room"]
    usage = shutil.disk_usage(node.archive.data_dir)
    assert room["disk_total_bytes"] == usage.total and room["bound"] == "disk"
    assert abs(room["disk_free_bytes"] - usage.free) < 1 << 30
    assert room["window_days"] == 1 and room["stored_per_day_bytes"] > 0
    assert room["days_left"] == round(room["room_bytes"] / room["stored_per_day_bytes"], 1)
    status, body = http_get(f"{admin.url}/metrics")
    assert status == 200
    assert metric(body.decode(), "voxarc_disk_total_bytes") == usage.total
    assert metric(body.decode(), "voxarc_disk_free_bytes") > 0
