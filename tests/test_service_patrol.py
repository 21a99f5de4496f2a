"""The running node's integrity patrol (service.patrol, storage.scrub.check_stored_files): every
stored file read back against its recorded SHA-256; damage named by instance, kept in
scrub.json, shown by /api/stats and /metrics; paced, and stopped promptly with the node."""

import time

import pytest
from sqlalchemy import select

from admin_helpers import admin_site, get_json, http_get, http_token  # noqa: F401
from node_helpers import archive, dataset_bytes, make_series, store_series  # noqa: F401
from service import patrol
from service.config import load_settings
from storage.index import Blob, Instance
from storage.scrub import check_stored_files


def _populate(arch):
    """A compacted series of four and a staged one of two; their SOP UIDs."""
    compacted, staged = make_series(4, 16, 16, seed=61), make_series(2, 16, 16, seed=62)
    store_series(arch, compacted)
    arch.compact(0)
    store_series(arch, staged)
    return [d.SOPInstanceUID for d in compacted], [d.SOPInstanceUID for d in staged]


def _flip(arch, key: str) -> None:
    data = bytearray(arch.blobs.get(key))
    data[len(data) // 2] ^= 0x01                            # one bit, same size
    arch.blobs.put(key, bytes(data))


def test_damaged_blob_and_staged_file_are_named_with_their_instances(archive):
    compacted, staged = _populate(archive)
    sound = check_stored_files(archive)
    assert sound.ok and sound.blobs_checked == 1 and sound.instances_checked == 2
    assert sound.bytes_checked == sum(
        f.stat().st_size for f in archive.blobs.root.rglob("*") if f.is_file())
    with archive.index.read() as s:
        blob_key = s.scalar(select(Blob.key))
        staged_key = s.scalar(select(Instance.staged_key)
                              .where(Instance.sop_uid == staged[1]))
    _flip(archive, blob_key)
    _flip(archive, staged_key)
    report = check_stored_files(archive)
    assert list(report.bad_blobs) == [blob_key] and list(report.bad_staged) == [staged_key]
    assert set(report.bad_instances) == set(compacted) | {staged[1]}
    assert "SHA-256" in report.bad_instances[staged[1]]


def test_a_file_removed_with_its_row_meanwhile_is_not_damage(archive, monkeypatch):
    """A deletion (or a compaction) between listing the files and reading one: no damage."""
    from storage import scrub
    _, staged = _populate(archive)
    with archive.index.read() as s:
        staged_key = s.scalar(select(Instance.staged_key)
                              .where(Instance.sop_uid == staged[0]))
    read = scrub._file_check

    def deleted_first(arch, key, sha):
        if key == staged_key:
            arch.delete("instance", staged[0], reason="test")
            assert not arch.blobs.exists(key)
        return read(arch, key, sha)
    monkeypatch.setattr(scrub, "_file_check", deleted_first)
    report = check_stored_files(archive)
    assert report.ok and report.instances_checked == 2


def test_a_round_is_saved_shown_and_due_again(admin_site, http_token):
    node, admin = admin_site
    compacted, _ = _populate(node.archive)
    assert get_json(f"{admin.url}/api/stats", http_token)["integrity"] == {
        "last_round": None, "every_days": 7.0}
    assert b"voxarc_scrub_damaged_instances" not in http_get(f"{admin.url}/metrics",
                                                             http_token)[1]
    watch = patrol.Patrol(node.archive, every_s=3600, read_bytes_per_s=0, start_delay=0)
    assert watch.due_in() == 0
    watch.run_round()
    assert 3590 < watch.due_in() <= 3600
    last = get_json(f"{admin.url}/api/stats", http_token)["integrity"]["last_round"]
    assert (last["files"], last["damaged_instances"], last["damage"]) == (3, 0, {})
    with node.archive.index.read() as s:
        _flip(node.archive, s.scalar(select(Blob.key)))
    watch.run_round()
    last = patrol.last_round(node.archive)
    assert last["damaged_files"] == 1 and set(last["damage"]) == set(compacted)
    metrics = http_get(f"{admin.url}/metrics", http_token)[1].decode()
    assert "voxarc_scrub_damaged_instances 4.0" in metrics
    assert "voxarc_scrub_damaged_bin_files 0.0" in metrics
    assert "voxarc_scrub_last_finished_timestamp_seconds" in metrics


def test_the_patrol_paces_its_reading_and_stops_with_the_node(archive):
    _populate(archive)
    total = check_stored_files(archive).bytes_checked
    paced = patrol.Patrol(archive, every_s=3600, read_bytes_per_s=total / 1.0, start_delay=0)
    started = time.monotonic()
    paced.run_round()
    assert time.monotonic() - started >= 0.9                # about a second's worth of bytes
    slow = patrol.Patrol(archive, every_s=0, read_bytes_per_s=100, start_delay=0)
    (archive.data_dir / patrol.STATE).unlink()
    slow.start()
    time.sleep(0.3)
    started = time.monotonic()
    slow.stop()
    assert time.monotonic() - started < 5 and not slow.is_alive()
    assert patrol.last_round(archive) is None               # a cut-short round is not saved


def test_settings_and_the_node_wiring(tmp_path):
    from service.ae import Node
    assert load_settings(None).scrub_every_days == 7.0
    with pytest.raises(ValueError, match="scrub_every_days must be 0 or more"):
        load_settings(None, scrub_every_days=-1)
    off = Node(load_settings(data_dir=str(tmp_path / "a"), port=0, scrub_every_days=0))
    on = Node(load_settings(data_dir=str(tmp_path / "b"), port=0))
    try:
        assert off.patrol is None and on.patrol.every_s == 7 * 86400
        assert on.patrol.rate == 50e6 and on.patrol.start_delay == patrol.START_DELAY
    finally:
        off.archive.close()
        on.archive.close()
