"""Retention rules: ages in date keys, what a rule selects (and holds back), the node's daily
run through the recycle bin, `voxarc retention`, and ages in forwarding rules."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import date, datetime
from pathlib import Path

import pytest
from admin_helpers import (CHROMIUM, admin_site, chromium, get_json, http_get,  # noqa: F401
                           http_token, metric)
from node_helpers import (BACKENDS, archive, database_url, make_series, store_series,  # noqa: F401
                          write_series)
from sqlalchemy import update

from service import retention as node_retention
from service.config import load_settings
from storage import forwarding, retention, rule_dates
from storage.archive import Archive
from storage.index import Instance

REPO = Path(__file__).resolve().parents[1]
DAY = 86400.0


@pytest.mark.parametrize("age, today, expected", [
    ("10y", date(2026, 12, 5), date(2016, 12, 5)),
    ("1y", date(2024, 2, 29), date(2023, 2, 28)),       # no 29 February that year
    ("1m", date(2026, 3, 31), date(2026, 2, 28)),       # nor a 31st
    ("14m", date(2026, 1, 15), date(2024, 11, 15)),
    ("2w", date(2026, 1, 10), date(2025, 12, 27)),
    ("0d", date(2026, 1, 10), date(2026, 1, 10)),
])
def test_an_age_is_the_day_that_long_before_today(age, today, expected):
    assert rule_dates.days_ago(age, today) == expected


def test_ages_become_dates_in_date_keys_only():
    today = date(2026, 12, 5)
    out = rule_dates.resolve({"StudyDate": "-10y", "PatientBirthDate": "28y-1m",
                              "SeriesDate": "20200101-2y", "StudyDescription": "10y",
                              "Modality": "CT"}, today)
    assert out == {"StudyDate": "-20161205", "PatientBirthDate": "19981205-20261105",
                   "SeriesDate": "20200101-20241205", "StudyDescription": "10y",
                   "Modality": "CT"}
    for bad in ("-10x", "-y", "-10y\\-5y", "ten years"):
        with pytest.raises(ValueError, match="StudyDate"):
            rule_dates.resolve({"StudyDate": bad}, today)


def test_a_rule_names_its_level_and_refuses_what_would_select_too_much():
    rule = retention.parse_rule("old", "StudyDate=-10y; ModalitiesInStudy=CR")
    assert (rule.level, rule.criteria) == ("study", {"StudyDate": "-10y",
                                                     "ModalitiesInStudy": "CR"})
    assert retention.parse_rule("s", " series : Modality=CT; SeriesDate=-1y").level == "series"
    for text, why in [("instance: StudyDate=-1y", "level 'instance'"),
                      ("study: Modality=CT", "not a key of a study"),
                      ("patient: StudyDate=-1y", "not a key of a patient"),
                      ("study: StudyDate=*", "at least one key with a value"),
                      ("", "at least one key with a value"),
                      ("StudyDate=-10 years", "not an age"),
                      ("Colour=red", "not one of")]:
        with pytest.raises(ValueError, match=why):
            retention.parse_rule("r", text)


def _aged(arch, sop_uids, days: float) -> None:
    """Make instances look received ``days`` ago."""
    with arch.index.write() as s:
        s.execute(update(Instance).where(Instance.sop_uid.in_(list(sop_uids)))
                  .values(received_at=time.time() - days * DAY))


@pytest.fixture(params=BACKENDS)
def kept_archive(request, tmp_path):
    """An archive whose deletions go through a recycle bin, with three studies: one of 2010,
    one of this year, one without a date, each received 60 days ago."""
    arch = Archive(tmp_path / "data", database_url(request.param, tmp_path),
                   deleted_keep_days=7)
    studies = {}
    for name, when, pid in (("old", "20100301", "P1"), ("new", date.today().strftime("%Y%m%d"),
                                                         "P2"), ("undated", "", "P3")):
        series = make_series(2, 8, 8, patient_id=pid, study_date=when)
        _aged(arch, store_series(arch, series), 60)
        studies[name] = series[0].StudyInstanceUID
    yield arch, studies
    arch.close()


def test_a_rule_selects_the_old_records_that_have_the_key_and_holds_back_recent_arrivals(
        kept_archive):
    arch, studies = kept_archive
    rule = retention.parse_rule("old", "StudyDate=-5y")
    (sel,) = node_retention.select_all(arch, [rule], grace_days=30)
    assert (sel.uids, sel.held_back) == ([studies["old"]], [])       # the undated one is not old
    # an old prior pulled in this week is held back for the grace period
    late = make_series(1, 8, 8, patient_id="P1", study_date="20090101")
    store_series(arch, late)
    (sel,) = node_retention.select_all(arch, [rule], grace_days=30)
    assert sel.uids == [studies["old"]] and sel.held_back == [late[0].StudyInstanceUID]
    (sel,) = node_retention.select_all(arch, [rule], grace_days=0)
    assert sorted(sel.uids) == sorted([studies["old"], late[0].StudyInstanceUID])
    # a patient-level rule: the patients born long ago; two rules never take a record twice
    both = node_retention.select_all(arch, [rule, retention.parse_rule(
        "again", "study: StudyDate=-1y")], grace_days=30)
    assert both[0].uids == [studies["old"]] and both[1].uids == []


def test_applying_the_rules_deletes_through_the_recycle_bin_and_records_the_run(
        kept_archive, monkeypatch):
    arch, studies = kept_archive
    noted = []
    monkeypatch.setattr(arch.accesses, "note", lambda *a, **k: noted.append((a, k)))
    settings = load_settings(data_dir=str(arch.data_dir),
                             retention={"ten years": "study: StudyDate=-10y"})
    (sel,) = node_retention.apply_rules(arch, settings, "retention (node)")
    assert [d["uid"] for d in sel.deleted] == [studies["old"]] and not sel.failed
    assert not arch.find("STUDY", {"StudyInstanceUID": studies["old"]})
    assert len(arch.find("STUDY", {"StudyInstanceUID": ""})) == 2
    (entry,) = arch.recycle.entries()
    summary = entry.summary()
    assert summary["uid"] == studies["old"] and "retention rule ten years" in summary["reason"]
    last = node_retention.last_run(arch)
    assert last["by"] == "retention (node)" and last["rules"][0]["deleted_instances"] == 2
    # what the audit messages are told: the node deleted the study
    assert [(a[:4], k) for a, k in noted] == [(("retention (node)", "delete study",
                                                studies["old"], "P1"), {"keep": False})]
    # and it can be undone
    arch.restore_deleted(summary["entry"])
    assert arch.find("STUDY", {"StudyInstanceUID": studies["old"]})


def test_a_stopping_node_ends_its_run_after_the_current_record(tmp_path, caplog):
    arch = Archive(tmp_path / "data", deleted_keep_days=7)
    try:
        for seed in (1, 2, 3):
            _aged(arch, store_series(arch, make_series(1, 8, 8, study_date="20100301",
                                                       seed=seed)), 60)
        settings = load_settings(data_dir=str(arch.data_dir), retention={"old": "StudyDate=-5y"})
        asked = []
        with caplog.at_level("WARNING"):
            (sel,) = node_retention.apply_rules(arch, settings, stopping=lambda: len(
                asked.append(1) or asked) > 1)
        assert len(sel.deleted) == 1 and len(arch.find("STUDY", {"StudyInstanceUID": ""})) == 2
        assert "stopped after 1 of 3 records" in caplog.text
        (sel,) = node_retention.apply_rules(arch, settings)          # the next run: the rest
        assert len(sel.deleted) == 2
    finally:
        arch.close()


def test_the_node_applies_the_rules_once_in_their_hour(tmp_path):
    arch = Archive(tmp_path / "data", deleted_keep_days=7)
    series = make_series(2, 8, 8, study_date="20100301")
    _aged(arch, store_series(arch, series), 60)
    settings = load_settings(data_dir=str(arch.data_dir), retention_hour=3,
                             retention={"old": "StudyDate=-5y"})
    clock = [datetime(2026, 12, 5, 2, 59).timestamp()]
    worker = node_retention.RetentionWorker(arch, settings, clock=lambda: clock[0])
    try:
        assert worker.look() is None                        # not its hour yet
        clock[0] = datetime(2026, 12, 5, 3, 10).timestamp()
        (sel,) = worker.look()
        assert len(sel.deleted) == 1
        assert worker.look() is None                        # once a day
        clock[0] = datetime(2026, 12, 5, 14, 0).timestamp()
        assert worker.look() is None                        # past its hour: the next night
        clock[0] = datetime(2026, 12, 6, 3, 30).timestamp()
        assert worker.look() is not None                    # the next day's run
        settings.retention_hour = -1                        # a reload: never by itself
        clock[0] = datetime(2026, 12, 7, 3, 30).timestamp()
        assert worker.look() is None
        settings.retention_hour, settings.retention = 3, {}
        assert worker.look() is None                        # no rules
    finally:
        arch.close()


def test_settings_check_retention_rules_hour_and_grace(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('retention_hour = 23\nretention_grace_days = 0\n[retention]\n'
                      'kids = "patient: PatientBirthDate=-28y"\n')
    s = load_settings(config)
    assert s.retention == {"kids": "patient: PatientBirthDate=-28y"}
    assert (s.retention_hour, s.retention_grace_days) == (23, 0)
    assert load_settings(None).retention_hour == 2
    for text, why in [('retention_hour = 24\n', "retention_hour must be an hour"),
                      ('retention_grace_days = -1\n', "retention_grace_days must be 0 or more"),
                      ('retention = "StudyDate=-1y"\n', "retention must be a table"),
                      ('[retention]\nall = "study: Modality=*"\n', "retention rule 'all'")]:
        config.write_text(text)
        with pytest.raises(ValueError, match=why):
            load_settings(config)


def test_a_reload_takes_new_retention_rules(tmp_path):
    from service.ae import Node
    node = Node(load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0),
                compaction=True)
    try:
        fresh = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                              retention={"old": "StudyDate=-10y"}, retention_hour=4)
        applied, pending = node.reload(fresh)
        assert sorted(applied) == ["retention", "retention_hour"] and pending == []
        assert node.retention.settings.retention == {"old": "StudyDate=-10y"}
    finally:
        node.archive.close()


def _voxarc(*args):
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_the_command_shows_what_the_rules_select_and_runs_them(tmp_path):
    data = tmp_path / "node"
    old = make_series(2, 8, 8, study_date="20100301", patient_id="OLD")
    new = make_series(2, 8, 8, study_date=date.today().strftime("%Y%m%d"), patient_id="NEW")
    write_series(old + new, tmp_path / "in")
    assert _voxarc("import", "--data-dir", data, tmp_path / "in").returncode == 0
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{data}"\n')
    assert _voxarc("retention", "--config", config).returncode == 2        # no rules
    config.write_text(f'data_dir = "{data}"\n[retention]\nbad = "study: Modality=CT"\n')
    refused = _voxarc("retention", "--config", config)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "retention rule 'bad': Modality is not a key of a study" in refused.stderr
    config.write_text(f'data_dir = "{data}"\n[retention]\nold = "StudyDate=-5y"\n')
    shown = _voxarc("retention", "--config", config)
    assert shown.returncode == 0, shown.stderr
    assert "selects 0 study records now" in shown.stdout and "1 more held back" in shown.stdout
    config.write_text(f'data_dir = "{data}"\nretention_grace_days = 0\n'
                      '[retention]\nold = "StudyDate=-5y"\n')
    shown = _voxarc("retention", "--config", config, "--json")
    (rule,) = json.loads(shown.stdout)["rules"]
    assert rule["uids"] == [old[0].StudyInstanceUID] and rule["instances"] == 2
    assert _voxarc("retention", "--config", config, "--run").returncode == 2   # cannot ask
    ran = _voxarc("retention", "--config", config, "--run", "--yes")
    assert ran.returncode == 0, ran.stderr
    assert "old: deleted 1 records, 2 instances" in ran.stdout
    listed = _voxarc("deleted", "--config", config)
    assert "retention rule old" in listed.stdout and old[0].StudyInstanceUID in listed.stdout
    write_series(old, tmp_path / "again")                       # a first clean-up, for good
    config.write_text(f'data_dir = "{data}"\nretention_grace_days = 0\n'
                      '[retention]\nold = "StudyDate=-5y"\n')
    assert _voxarc("deleted", "--config", config, "empty", "--yes").returncode == 0
    assert _voxarc("import", "--data-dir", data, tmp_path / "again").returncode == 0
    ran = _voxarc("retention", "--config", config, "--run", "--yes", "--no-keep")
    assert ran.returncode == 0 and "old: deleted 1 records, 2 instances" in ran.stdout
    assert "the recycle bin is empty" in _voxarc("deleted", "--config", config).stdout
    again = _voxarc("retention", "--config", config)
    assert "selects 0 study records" in again.stdout and "last run" in again.stdout
    assert "retention  1 rules; last run" in _voxarc("stats", "--config", config).stdout


def test_a_forwarding_rule_with_an_age_matches_as_of_each_look(archive):
    today = date.today().strftime("%Y%m%d")
    recent = make_series(1, 8, 8, study_date=today)
    old = make_series(1, 8, 8, study_date="20100301")
    store_series(archive, recent + old)
    rules = {"ws": forwarding.parse_rule("StudyDate=7d-")}
    due = forwarding.due(archive.index, rules, stable_age=0.0, now=time.time() + 1)
    assert [d.series_uid for d in due] == [recent[0].SeriesInstanceUID]
    with pytest.raises(ValueError, match="not an age"):
        forwarding.parse_rule("StudyDate=7 days-")


def test_the_admin_page_and_metrics_show_the_rules_and_the_last_run(admin_site, tmp_path):
    node, admin = admin_site
    assert "voxarc_retention_failed_records" not in \
        http_get(f"{admin.url}/metrics")[1].decode()                # no run yet
    _aged(node.archive, store_series(node.archive, make_series(2, 8, 8, study_date="20100301")),
          60)
    node.settings.retention = {"old": "study: StudyDate=-5y"}        # as a reload sets it
    node_retention.apply_rules(node.archive, node.settings, "retention (node)")
    last = get_json(f"{admin.url}/api/deleted")["retention"]
    assert last["by"] == "retention (node)" and last["rules"][0]["deleted_instances"] == 2
    text = http_get(f"{admin.url}/metrics")[1].decode()
    assert metric(text, "voxarc_retention_deleted_instances") == 2
    assert metric(text, "voxarc_retention_failed_records") == 0
    assert metric(text, "voxarc_retention_last_run_timestamp_seconds") == last["started"]
    _aged(node.archive, store_series(node.archive, make_series(1, 8, 8, study_date="20110301",
                                                               seed=4)), 60)
    _aged(node.archive, store_series(node.archive, make_series(1, 8, 8, study_date="20120301",
                                                               seed=5)), 1)
    (now,) = get_json(f"{admin.url}/api/retention")             # nothing deleted by looking
    assert (now["rule"], now["selected"], now["held_back"]) == ("old", 1, 1)
    assert len(get_json(f"{admin.url}/api/studies")["items"]) == 2
    if CHROMIUM is not None:
        dom = chromium(f"{admin.url}/", tmp_path / "page", "--dump-dom")
        assert ">What they select now</button>" in dom
        shown = re.search(r'<p class="muted" id="retention">(.*?)</p>', dom, re.S).group(1)
        assert "Retention rules, applied daily at 02:00: old (study: StudyDate=-5y)." in shown
        assert "1 records, 2 instances deleted." in shown


def test_the_admin_guides_retention_example_loads(tmp_path):
    """The settings the admin guide shows for retention load as they are written."""
    guide = (REPO / "docs" / "admin.md").read_text()
    section = guide[guide.index("## Retention rules"):guide.index("## Legal holds")]
    example = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    config = tmp_path / "node.toml"
    config.write_text(example)
    s = load_settings(config)
    assert set(s.retention) == {"adults", "radiographs"} and s.retention_hour == 2
    rules = node_retention.rules_of(s)
    assert rules[1].criteria == {"StudyDate": "-5y", "ModalitiesInStudy": "CR\\DX"}
