"""Legal holds (storage.holds, `voxarc hold`): nothing of a study or patient on hold is deleted,
by hand, by a retention rule, by a rejection note or by a replacing duplicate, until the hold is
released; the holds and their trail on the command line, the API and the page."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from admin_helpers import (CHROMIUM, admin_site, chromium, get_json, http_token,  # noqa: F401
                           post_json)
from node_helpers import (BACKENDS, database_url, dataset_bytes, make_series, retrieves_exactly,
                          store_series, write_series)
from sqlalchemy import update

from service import retention as node_retention
from service.config import load_settings
from storage import holds, retention
from storage.archive import Archive
from storage.deletion import OnHold
from storage.index import Instance

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=BACKENDS)
def held_archive(request, tmp_path):
    """An archive with a recycle bin and two studies of patient P1 (one compacted) and one of
    P2, all of 2010, received 60 days ago."""
    arch = Archive(tmp_path / "data", database_url(request.param, tmp_path),
                   deleted_keep_days=7)
    sent, studies = {}, []
    for pid, seed in (("P1", 1), ("P1", 2), ("P2", 3)):
        series = make_series(3, 8, 8, patient_id=pid, study_date="20100301", seed=seed)
        sent.update(store_series(arch, series))
        studies.append(series[0].StudyInstanceUID)
    assert arch.compact_series(arch.find("SERIES", {"StudyInstanceUID": studies[0],
                                                    "SeriesInstanceUID": ""})[0]
                               ["SeriesInstanceUID"])
    with arch.index.write() as s:
        s.execute(update(Instance).values(received_at=time.time() - 60 * 86400.0))
    yield arch, studies, sent
    arch.close()


def test_placing_a_hold_needs_a_reason_and_a_record_the_archive_holds(held_archive):
    arch, studies, _ = held_archive
    record, new = holds.place(arch.index, "study", studies[0], "claim 2026/114", "ana")
    assert new and record.reason == "claim 2026/114" and record.released_at is None
    again, new = holds.place(arch.index, "study", studies[0], "another reason", "bob")
    assert not new and again.held_by == "ana"                       # one hold, unchanged
    for level, uid, reason, why in [("study", "1.2.3", "x", "no study 1.2.3"),
                                    ("series", studies[0], "x", "not a series"),
                                    ("study", studies[1], "  ", "needs a reason")]:
        with pytest.raises(holds.HoldError, match=why):
            holds.place(arch.index, level, uid, reason, "ana")
    released = holds.release(arch.index, "study", studies[0], "carl")
    assert released.released_by == "carl" and released.released_at is not None
    with pytest.raises(holds.HoldError, match="is not on hold"):
        holds.release(arch.index, "study", studies[0], "carl")
    assert holds.listing(arch.index) == []
    assert [h.held_by for h in holds.listing(arch.index, released=True)] == ["ana"]


def test_nothing_of_a_held_study_or_patient_is_deleted_until_released(held_archive):
    arch, studies, sent = held_archive
    holds.place(arch.index, "study", studies[0], "claim", "ana")
    series_uid = arch.find("SERIES", {"StudyInstanceUID": studies[0],
                                      "SeriesInstanceUID": ""})[0]["SeriesInstanceUID"]
    one = next(uid for uid in sent if arch.find("IMAGE", {"SOPInstanceUID": uid,
                                                          "StudyInstanceUID": studies[0]}))
    for level, uid in (("study", studies[0]), ("series", series_uid), ("instance", one),
                       ("patient", "P1")):
        with pytest.raises(OnHold, match=f"study {studies[0]} on hold since .* by ana: claim; "
                                         f"release it first: voxarc hold release study"):
            arch.delete(level, uid)
    assert arch.recycle.entries() == [] and retrieves_exactly(arch, sent)
    arch.delete("study", studies[2])                                # P2's: not held
    holds.place(arch.index, "patient", "P1", "the patient's complaint", "ana")
    holds.release(arch.index, "study", studies[0], "ana")
    with pytest.raises(OnHold, match=r"on hold \(with patient P1\)"):   # the patient's hold
        arch.delete("study", studies[1])
    holds.release(arch.index, "patient", "P1", "ana")
    assert arch.delete("patient", "P1")["instances"] == 6


def test_a_patients_hold_follows_its_studies_through_corrections(held_archive):
    from storage.correction import CorrectionError
    arch, studies, sent = held_archive
    holds.place(arch.index, "patient", "P1", "claim", "ana")
    assert sorted(h.uid for h in holds.listing(arch.index) if h.through == "P1") == \
        sorted(studies[:2])
    # filed under another Patient ID (a correction, an HL7 merge), the study stays held
    arch.correct("study", studies[1], {"PatientID": "P9"}, "wrong patient")
    with pytest.raises(OnHold, match=f"study {studies[1]} on hold"):
        arch.delete("patient", "P9")
    # a new study under the held Patient ID is held too
    late = make_series(1, 8, 8, patient_id="P1", seed=9)
    store_series(arch, late)
    with pytest.raises(OnHold, match="patient P1 on hold"):
        arch.delete("study", late[0].StudyInstanceUID)
    # a series is not moved out of a held study
    series_uid = arch.find("SERIES", {"StudyInstanceUID": studies[0],
                                      "SeriesInstanceUID": ""})[0]["SeriesInstanceUID"]
    with pytest.raises(CorrectionError, match="is not moved to another study: study .* on hold"):
        arch.correct("series", series_uid, {"StudyInstanceUID": studies[2]})
    holds.release(arch.index, "patient", "P1", "ana")               # and its studies with it
    assert holds.listing(arch.index) == []
    arch.correct("series", series_uid, {"StudyInstanceUID": studies[2]})
    assert arch.delete("patient", "P9")["instances"] == 3


def test_a_correction_of_held_instances_keeps_their_originals_while_the_hold_lasts(
        held_archive, monkeypatch):
    """A correction (by hand or by an HL7 update) goes on, but the held instances' bytes as
    they were stay in the recycle bin as long as the hold: never restored over the corrected
    ones, never removed by age, a full disk or emptying the bin."""
    from storage import recycle_bin
    from storage.correction import CorrectionError
    from storage.part10 import split_file
    arch, studies, sent = held_archive
    held_sops = {r["SOPInstanceUID"] for r in arch.find("IMAGE", {
        "StudyInstanceUID": studies[0], "SOPInstanceUID": ""})}
    holds.place(arch.index, "study", studies[0], "claim 2026/114", "ana")
    usage = recycle_bin.shutil.disk_usage(arch.data_dir)
    with monkeypatch.context() as m:          # no room for the originals: nothing changes
        m.setattr(recycle_bin.shutil, "disk_usage",
                  lambda path: usage._replace(free=recycle_bin.SPARE_BYTES))
        with pytest.raises(CorrectionError, match="on hold and its originals could not be kept"):
            arch.correct("patient", "P1", {"PatientName": "Roe^Ann"})
    assert retrieves_exactly(arch, sent) and arch.recycle.entries() == []

    done = arch.correct("patient", "P1", {"PatientName": "Roe^Ann"}, "misspelt")
    entry = arch.recycle.entry(done["originals"])
    assert entry.kind == "original" and entry.holds == [("study", studies[0])]
    assert re.search(r"PatientName '.*' -> 'Roe\^Ann' \(misspelt\); kept while on hold: "
                     f"study {studies[0]}$", entry.reason)
    assert {i["sop_uid"] for i in entry.instances} == held_sops     # the held study's only
    for item in entry.instances:             # the bytes as received, the archive's corrected
        _, dataset = split_file((arch.recycle.root / entry.name / item["file"]).read_bytes())
        assert dataset == sent[item["sop_uid"]] != arch.retrieve(item["sop_uid"]).data
    assert b"Roe^Ann" in arch.retrieve(next(iter(held_sops))).data
    with pytest.raises(recycle_bin.RecycleBinError, match="originals of instances a correction"):
        arch.restore_deleted(entry.name, "ana")
    [row] = arch.recycle.summaries()
    assert row["held"] == [["study", studies[0]]] and row["expires_at"] is None

    deleted = arch.delete("study", studies[2])["kept_as"]      # an ordinary entry beside it
    later = time.time() + 30 * 86400
    with monkeypatch.context() as m:          # a nearly full disk takes the ordinary one only
        m.setattr(recycle_bin.shutil, "disk_usage",
                  lambda path: usage._replace(total=100 << 30, free=1 << 30))
        assert arch.recycle.make_room() == [deleted]
    assert arch.recycle.purge(now=later) == [] and arch.recycle.purge(everything=True) == []
    manifest = arch.recycle.root / entry.name / "entry.json"          # kept for a year
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**meta, "deleted_at": meta["deleted_at"] - 365 * 86400}))
    holds.release(arch.index, "study", studies[0], "ana")
    (row,) = arch.recycle.summaries()       # its days count from the release, not from then
    assert row["held"] == [] and 7 * 86400 - 60 < row["expires_at"] - time.time() <= 7 * 86400
    assert arch.recycle.purge() == [] and arch.recycle.purge(now=later) == [entry.name]
    done = arch.correct("patient", "P1", {"PatientName": "Roe^Ben"})     # not held: no copy
    assert "originals" not in done and arch.recycle.entries() == []


def test_retention_passes_over_held_records(held_archive):
    arch, studies, _ = held_archive
    holds.place(arch.index, "patient", "P1", "claim", "ana")
    rule = retention.parse_rule("old", "StudyDate=-5y")
    (sel,) = node_retention.select_all(arch, [rule], grace_days=30)
    assert sel.uids == [studies[2]] and sorted(sel.on_hold) == sorted(studies[:2])
    settings = load_settings(data_dir=str(arch.data_dir), retention={"old": "StudyDate=-5y"})
    (done,) = node_retention.apply_rules(arch, settings)
    assert [d["uid"] for d in done.deleted] == [studies[2]] and not done.failed
    assert node_retention.last_run(arch)["rules"][0]["on_hold"] == 2
    series_rule = retention.parse_rule("s", "series: StudyDate=-5y")
    (sel,) = node_retention.select_all(arch, [series_rule], grace_days=0)
    assert sel.uids == [] and len(sel.on_hold) == 2


def test_a_replacing_duplicate_does_not_replace_a_held_instance(tmp_path):
    arch = Archive(tmp_path / "data", duplicates="replace")
    try:
        (ds,) = make_series(1, 8, 8)
        store_series(arch, [ds])
        holds.place(arch.index, "study", ds.StudyInstanceUID, "claim", "ana")
        first = arch.retrieve(ds.SOPInstanceUID).data
        ds.StudyDescription = "changed"
        ts, data = dataset_bytes(ds)
        assert arch.store(data, ts).outcome == "duplicate_ignored"
        assert arch.retrieve(ds.SOPInstanceUID).data == first
        holds.release(arch.index, "study", ds.StudyInstanceUID, "ana")
        assert arch.store(data, ts).outcome == "replaced"
    finally:
        arch.close()


def test_a_rejection_note_for_a_held_study_is_stored_and_not_applied(tmp_path, caplog):
    from scu_helpers import store_bytes
    from test_rejection_notes import note

    from service.ae import Node
    node = Node(load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                              stable_age=3600.0, rejection_notes_from="*"),
                compaction=False).start()
    try:
        series = make_series(2, 8, 8)
        sent = store_series(node.archive, series)
        holds.place(node.archive.index, "study", series[0].StudyInstanceUID, "claim", "ana")
        kos = note([(series[0].StudyInstanceUID, series[0].SeriesInstanceUID,
                     series[0].SOPInstanceUID)])
        with caplog.at_level("WARNING"):
            assert store_bytes(node.port, [(kos.SOPClassUID, kos.SOPInstanceUID,
                                            *dataset_bytes(kos))], tmp_path) == [0]
        assert retrieves_exactly(node.archive, sent)
        assert node.archive.find("IMAGE", {"SOPInstanceUID": kos.SOPInstanceUID})
        assert any("not applied" in r.getMessage() and "on hold" in r.getMessage()
                   for r in caplog.records)
    finally:
        node.stop()


def _voxarc(*args):
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_the_command_places_lists_and_releases_holds(tmp_path):
    data = tmp_path / "node"
    series = make_series(2, 8, 8, patient_id="PH")
    write_series(series, tmp_path / "in")
    assert _voxarc("import", "--data-dir", data, tmp_path / "in").returncode == 0
    study = series[0].StudyInstanceUID
    assert _voxarc("hold", "--data-dir", data).stdout.strip() == "no holds in force"
    assert _voxarc("hold", "place", "study", study, "--data-dir", data).returncode == 2
    placed = _voxarc("hold", "place", "study", study, "1.2.3", "--reason", "claim 7",
                     "--data-dir", data)
    assert placed.returncode == 1 and "no study 1.2.3" in placed.stderr
    listed = _voxarc("hold", "--data-dir", data, "--json")
    (row,) = json.loads(listed.stdout)
    assert (row["uid"], row["reason"]) == (study, "claim 7") and row["held_by"].startswith("cli")
    assert json.loads(_voxarc("stats", "--data-dir", data, "--json").stdout)["holds"] == 1
    refused = _voxarc("delete", "study", study, "--yes", "--data-dir", data)
    assert refused.returncode == 1 and "on hold since" in refused.stderr
    corrected = _voxarc("correct", "study", study, "--set", "AccessionNumber=A7", "--yes",
                        "--data-dir", data)
    entry = re.search(r"originals are kept as recycle bin entry (\S+) while on hold",
                      corrected.stdout).group(1)
    binned = _voxarc("deleted", "--data-dir", data).stdout
    assert re.search(rf"{entry} .* 2 .* while held study {study}", binned)
    emptied = _voxarc("deleted", "empty", "--yes", "--data-dir", data)
    assert emptied.stdout.strip() == f"0 entries removed for good; 1 kept while on hold: {entry}"
    assert _voxarc("hold", "release", "study", study, "--data-dir", data).returncode == 0
    assert "released" in _voxarc("hold", "--all", "--data-dir", data).stdout
    assert _voxarc("delete", "study", study, "--yes", "--data-dir", data).returncode == 0


def test_the_admin_page_lists_the_holds(admin_site, tmp_path):
    node, admin = admin_site
    series = make_series(2, 8, 8, patient_id="HELD")
    store_series(node.archive, series)
    holds.place(node.archive.index, "study", series[0].StudyInstanceUID, "claim 9", "ana")
    (row,) = get_json(f"{admin.url}/api/holds")
    assert (row["uid"], row["reason"], row["held_by"]) == (series[0].StudyInstanceUID,
                                                           "claim 9", "ana")
    holds.release(node.archive.index, "study", series[0].StudyInstanceUID, "ana")
    assert get_json(f"{admin.url}/api/holds") == []
    assert len(get_json(f"{admin.url}/api/holds?all=1")) == 1
    holds.place(node.archive.index, "patient", "HELD", "complaint 3", "ana")
    if CHROMIUM is not None:
        dom = chromium(f"{admin.url}/", tmp_path / "page", "--dump-dom")
        listed = re.search(r'<ul id="holds">(.*?)</ul>', dom, re.S).group(1)
        assert "patient" in listed and "HELD" in listed and "complaint 3" in listed
        assert "on hold, placed by ana" in listed
    done = node.archive.correct("patient", "HELD", {"PatientName": "Held^Corrected"})
    (row,) = get_json(f"{admin.url}/api/deleted")["entries"]
    assert (row["entry"], row["kind"], row["held"], row["expires_at"]) == \
        (done["originals"], "original", [["study", series[0].StudyInstanceUID]], None)
    status, answer = post_json(f"{admin.url}/api/deleted/{row['entry']}/restore", b"{}")
    assert status == 409 and "still holds them, corrected" in answer["error"]
    if CHROMIUM is not None:
        dom = chromium(f"{admin.url}/", tmp_path / "page2", "--dump-dom")
        item = re.search(r'<li class="recycled">.*?</li>', dom, re.S).group(0)
        assert "2 instances of HELD" in item and "kept while on hold" in item
        assert "originals before the correction" in item and "Restore" not in item


def test_the_api_places_and_releases_holds_and_the_page_offers_both(admin_site, tmp_path):
    node, admin = admin_site
    series = make_series(2, 8, 8, patient_id="PAGE")
    store_series(node.archive, series)
    study = series[0].StudyInstanceUID
    url = f"{admin.url}/api/holds"
    ask = {"level": "study", "uid": study, "reason": "claim 5"}
    assert post_json(url, json.dumps(ask).encode(), "text/plain")[0] == 415
    for wrong, why in [({**ask, "reason": " "}, "needs a reason"),
                       ({**ask, "uid": "1.2.3"}, "no study 1.2.3"),
                       ({**ask, "level": "series"}, "not a series")]:
        status, answer = post_json(url, json.dumps(wrong).encode())
        assert status == 400 and why in answer["error"]
    status, answer = post_json(url, json.dumps(ask).encode())
    assert status == 201 and answer["reason"] == "claim 5"
    assert post_json(url, json.dumps(ask).encode())[0] == 200             # already held
    with pytest.raises(OnHold):
        node.archive.delete("study", study)
    if CHROMIUM is not None:
        dom = chromium(f"{admin.url}/#study/{study}", tmp_path / "page", "--dump-dom")
        controls = re.search(r'<tr class="series send">.*?</tr>', dom, re.S).group(0)
        assert ">Hold study</button>" in controls and 'class="hold-reason"' in controls
        listed = re.search(r'<ul id="holds">(.*?)</ul>', dom, re.S).group(1)
        assert "claim 5" in listed and ">Release</button>" in listed
    release = json.dumps({"level": "study", "uid": study}).encode()
    assert post_json(f"{url}/release", release)[0] == 200
    status, answer = post_json(f"{url}/release", release)
    assert status == 404 and "is not on hold" in answer["error"]
    assert node.archive.delete("study", study)["instances"] == 2
