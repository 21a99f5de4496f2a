"""The admin JSON API and /metrics against the index, on a real node fed over C-STORE."""

import pytest

from admin_helpers import admin_site, get_json, http_get, http_token, metric, store_series  # noqa: F401
from scu_helpers import move

SPECS = [("CT", 5, "P1"), ("MR", 3, "P2"), ("CT", 2, "P3")]


def _metrics(admin) -> str:
    status, body = http_get(f"{admin.url}/metrics")
    assert status == 200
    return body.decode()


def test_stats_and_metrics_match_the_index(admin_site, tmp_path):
    node, admin = admin_site
    stored = store_series(node, tmp_path, SPECS)
    received = sum(sum(s["sizes"]) for s in stored)
    stats = get_json(f"{admin.url}/api/stats")
    assert stats["original_bytes"] == received == stats["stored_bytes"]
    assert (stats["instances"], stats["series"], stats["studies"]) == (10, 3, 3)
    assert stats["pending_instances"] == 10 and stats["ratio"] == 1.0
    ct = next(m for m in stats["by_modality"] if m["modality"] == "CT")
    assert ct["instances"] == 7 and ct["original_bytes"] == sum(stored[0]["sizes"]) + sum(
        stored[2]["sizes"])
    assert sum(d["original_bytes"] for d in stats["by_day"]) == received

    text = _metrics(admin)
    assert metric(text, "voxarc_instances_received_total") == 10
    assert metric(text, "voxarc_received_bytes_total") == received
    assert metric(text, "voxarc_original_bytes") == received
    assert metric(text, "voxarc_pending_instances") == 10
    assert metric(text, "voxarc_dimse_requests_total", operation="C-STORE") == 10
    assert metric(text, "voxarc_associations_total", event="accepted") >= 1
    assert metric(text, "voxarc_compaction_queue", state="pending") == 3

    assert node.archive.compact_series(stored[0]["series_uid"])
    stats = get_json(f"{admin.url}/api/stats")
    truth = node.archive.stats()
    assert stats["stored_bytes"] == truth["stored_bytes"] < received
    assert stats["original_bytes"] == received and stats["ratio"] == truth["ratio"]
    assert 0 < stats["bits_per_voxel"] < stats["original_bits_per_voxel"] == 16
    text = _metrics(admin)
    assert metric(text, "voxarc_compactions_total", result="ok") == 1
    assert metric(text, "voxarc_compacted_bytes_total") == sum(stored[0]["sizes"])
    assert metric(text, "voxarc_compaction_seconds_count") == 1
    assert metric(text, "voxarc_stored_bytes") == truth["stored_bytes"]
    assert metric(text, "voxarc_compaction_throughput_bytes_per_second") > 0
    assert metric(text, "voxarc_slab_cache_bytes") == 0
    assert metric(text, "voxarc_codec_jobs", state="waiting") == 0
    for found in node.archive.find("IMAGE", {"SeriesInstanceUID": stored[0]["series_uid"]}):
        node.archive.retrieve(found["SOPInstanceUID"])     # its whole slab is in the cache now
    text = _metrics(admin)
    assert metric(text, "voxarc_slab_cache_bytes") == node.archive.reconstructor.cache.used > 0
    assert metric(text, "voxarc_slab_cache_limit_bytes") == \
        node.archive.reconstructor.cache.max_bytes
    assert metric(text, "voxarc_codec_jobs", state="running") == 0


def test_studies_sorted_paginated_and_series_detail(admin_site, tmp_path):
    node, admin = admin_site
    stored = store_series(node, tmp_path, SPECS)
    assert node.archive.compact_series(stored[1]["series_uid"])
    page = get_json(f"{admin.url}/api/studies?sort=instances&order=asc&limit=2")
    assert page["total"] == 3 and [s["instances"] for s in page["items"]] == [2, 3]
    rest = get_json(f"{admin.url}/api/studies?sort=instances&order=asc&limit=2&offset=2")
    assert [s["instances"] for s in rest["items"]] == [5]
    everything = get_json(f"{admin.url}/api/studies?sort=ratio&order=asc")["items"]
    assert everything[0]["study_uid"] == stored[1]["study_uid"] and everything[0]["ratio"] < 1
    assert sum(s["stored_bytes"] for s in everything) == pytest.approx(
        node.archive.stats()["stored_bytes"], abs=3)
    for study, spec in ((s, next(x for x in stored if x["study_uid"] == s["study_uid"]))
                        for s in everything):
        assert study["original_bytes"] == sum(spec["sizes"])
        assert study["modalities"] == [spec["modality"]]
        assert study["series"][0]["series_uid"] == spec["series_uid"]
        assert study["series"][0]["sources"] == ["TESTSCU"]        # the SCU that sent it

    detail = get_json(f"{admin.url}/api/series/{stored[1]['series_uid']}")
    assert detail["instances"] == 3 and detail["staged_instances"] == 0
    assert {i["state"] for i in detail["instances_list"]} == {"compressed"}
    assert detail["blobs"][0]["codec"] == "volume+headers" and detail["job"]["state"] == "done"
    assert detail["blobs"][0]["time_points"] == 1 and detail["blobs"][0]["slab"] > 0
    assert http_get(f"{admin.url}/api/series/1.2.3.4")[0] == 404
    assert http_get(f"{admin.url}/api/studies?sort=colour")[0] == 400
    assert http_get(f"{admin.url}/api/studies?limit=many")[0] == 400


def test_jobs_and_failures(admin_site, tmp_path, monkeypatch):
    node, admin = admin_site
    stored = store_series(node, tmp_path, SPECS[:2])
    jobs = get_json(f"{admin.url}/api/jobs")
    assert {j["series_uid"] for j in jobs["pending"]} == {s["series_uid"] for s in stored}
    assert jobs["running"] == jobs["failed"] == []

    def broken(*args, **kwargs):
        raise RuntimeError("codec exploded")
    monkeypatch.setattr("storage.compaction.models.encode_volume", broken)
    assert not node.archive.compact_series(stored[0]["series_uid"])
    jobs = get_json(f"{admin.url}/api/jobs")
    assert [j["series_uid"] for j in jobs["failed"]] == [stored[0]["series_uid"]]
    assert "codec exploded" in jobs["failed"][0]["reason"]
    assert [j["series_uid"] for j in jobs["pending"]] == [stored[1]["series_uid"]]

    assert move(node.port, {"QueryRetrieveLevel": "STUDY",
                            "StudyInstanceUID": stored[1]["study_uid"]}, "NOWHERE").Status \
        == 0xA801
    assert move(node.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"},
                "NOWHERE").Status == 0xA900       # refused before pynetdicom's handler, counted
    text = _metrics(admin)
    assert metric(text, "voxarc_compactions_total", result="failed") == 1
    assert metric(text, "voxarc_dimse_failures_total", operation="C-MOVE", status="0xA801") == 1
    assert metric(text, "voxarc_dimse_failures_total", operation="C-MOVE", status="0xA900") == 1
    assert metric(text, "voxarc_dimse_requests_total", operation="C-MOVE") == 2
    assert metric(text, "voxarc_compaction_queue", state="failed") == 1


def test_config_and_health(admin_site):
    node, admin = admin_site
    config = get_json(f"{admin.url}/api/config")
    assert config["ae_title"] == "VOXARC" and config["port"] == node.port
    assert config["destinations"] == {"viewer": "VIEW@127.0.0.1:1"}
    assert "http_token" not in config and config["http_token_required"] is False
    assert get_json(f"{admin.url}/healthz") == {"status": "ok"}
    status, body = http_get(f"{admin.url}/")
    assert status == 200 and b'id="chart-modality"' in body
    assert http_get(f"{admin.url}/static/app.js")[0] == 200


def test_a_deletion_beside_the_running_node_shows_and_the_node_stores_again(admin_site,
                                                                           tmp_path):
    from storage.archive import Archive
    node, admin = admin_site
    store_series(node, tmp_path, SPECS)
    assert get_json(f"{admin.url}/api/deletions") == []
    admin_side = Archive(node.archive.data_dir)           # as `voxarc delete` opens it
    try:
        summary = admin_side.delete("patient", "P1", reason="wrong patient")
    finally:
        admin_side.close()
    assert summary["instances"] == 5 and summary["patients"] == 1
    (row,) = get_json(f"{admin.url}/api/deletions")
    assert (row["level"], row["uid"], row["reason"]) == ("patient", "P1", "wrong patient")
    stats = get_json(f"{admin.url}/api/stats")
    assert (stats["instances"], stats["studies"]) == (5, 2)
    assert get_json(f"{admin.url}/api/studies")["total"] == 2
    assert metric(_metrics(admin), "voxarc_compaction_queue", state="pending") == 2
    (tmp_path / "again").mkdir()
    again = store_series(node, tmp_path / "again", SPECS[:1])    # same patient, sent again
    assert get_json(f"{admin.url}/api/stats")["instances"] == 10
    assert node.archive.find("SERIES", {"SeriesInstanceUID": again[0]["series_uid"]})
