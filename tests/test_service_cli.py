"""Settings (defaults, TOML, flags, documentation) and the serve / import / compress / stats
commands, run as a user runs them."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node_helpers import free_port, make_series, write_series
from scu_helpers import echo
from service.ae import open_archive
from service.config import SETTING_DOCS, Settings, load_settings, parse_destination, setting_names
from service.patrol import Patrol
from service.progress import Progress

REPO = Path(__file__).resolve().parents[1]


def _voxarc(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_every_setting_is_documented():
    table = (REPO / "docs" / "configuration.md").read_text()
    for name in setting_names():
        assert SETTING_DOCS.get(name), name
        assert f"| `{name}` |" in table, name
    assert set(SETTING_DOCS) == set(setting_names())


def test_yes_no_settings_take_booleans_and_refuse_other_words(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('codec_adapt = false\nrequire_called_ae_title = "no"\n')
    s = load_settings(config)
    assert s.codec_adapt is False and s.require_called_ae_title is False
    assert load_settings(None).codec_adapt is True
    config.write_text('codec_adapt = "maybe"\n')
    with pytest.raises(ValueError, match="codec_adapt must be true or false"):
        load_settings(config)


def test_a_cache_too_small_for_retrievals_is_refused():
    """At 1 MiB (a 512 x 512 slab of 8 slices is 4 MiB) a C-GET of a compacted 54-slice CT
    took about 30 s instead of under 2: each instance decoded its slab again."""
    assert load_settings(None, cache_bytes=32 << 20).cache_bytes == 32 << 20
    with pytest.raises(ValueError, match="cache_bytes must be at least"):
        load_settings(None, cache_bytes=1 << 20)


def test_public_url_setting_takes_http_urls_only():
    assert load_settings(None, http_public_url="https://pacs.example.org/voxarc/") \
        .http_public_url == "https://pacs.example.org/voxarc"
    assert load_settings(None).http_public_url == ""
    for bad in ("pacs.example.org", "ftp://pacs", "http://", "http://pacs/?a=1"):
        with pytest.raises(ValueError, match="http_public_url"):
            load_settings(None, http_public_url=bad)


def test_defaults_toml_and_flags(tmp_path):
    assert Settings().ae_title == "VOXARC" and Settings().port == 11112
    config = tmp_path / "node.toml"
    config.write_text('port = 4242\nae_title = "FROMFILE"\nstable_age = 5\n'
                      '[destinations]\nviewer = "VIEW@10.0.0.5:104"\n')
    s = load_settings(config, port=5555, destination=["pacs=PACS@host:11113"])
    assert (s.port, s.ae_title, s.stable_age) == (5555, "FROMFILE", 5.0)
    assert s.destination("VIEW").port == 104 and s.destination("PACS").host == "host"
    assert s.destination("NOPE") is None
    config.write_text("colour = 'blue'\n")
    with pytest.raises(ValueError):
        load_settings(config)
    with pytest.raises(ValueError):
        parse_destination("nonsense")
    with pytest.raises(ValueError):
        load_settings(duplicate_policy="sometimes")


def test_progress_plain_lines(caplog):
    caplog.set_level("INFO")
    progress = Progress("import", 3, stream=open(os.devnull, "w"), every=0)
    for _ in range(3):
        progress.advance(note="x")
    progress.finish()
    assert "import: 3/3" in caplog.text


def test_import_compress_stats(tmp_path):
    paths = write_series(make_series(4, 8, 8), tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    data = tmp_path / "data"
    proc = _voxarc("import", "--data-dir", data, tmp_path / "in")
    assert proc.returncode == 0, proc.stderr
    assert "imported 4 of 5 files" in proc.stderr
    stats = json.loads(_voxarc("stats", "--json", "--data-dir", data).stdout)
    assert stats["instances"] == 4 and stats["pending_instances"] == 4
    assert stats["series"] == 1 and stats["studies"] == 1
    assert stats["original_bytes"] == stats["stored_bytes"] > 0
    proc = _voxarc("compress", "--now", "--data-dir", data)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(_voxarc("stats", "--json", "--data-dir", data).stdout)
    assert stats["pending_instances"] == 0 and stats["instances"] == 4
    assert stats["coded_voxels"] == 4 * 8 * 8 and 0 < stats["bits_per_voxel"] < 16
    assert stats["by_modality"][0]["instances"] == 4
    text = _voxarc("stats", "--data-dir", data).stdout
    assert "instances  4" in text and "bits/voxel" in text and "modality" in text
    assert "integrity  not read back" in text and stats["integrity"] is None
    room = stats["room"]
    assert room["stored_per_day_bytes"] == stats["stored_bytes"] and room["window_days"] == 1
    shown = re.search(r"room       (\d+) bytes free; about ", text)
    # the disk's free bytes, which other processes change between the two commands
    assert shown and abs(int(shown[1]) - room["room_bytes"]) < 2 ** 30
    assert "over the last 1 day\n" in text
    assert len(paths) == 4
    archive = open_archive(load_settings(data_dir=str(data)))
    Patrol(archive, 3600, 0).run_round()
    archive.close()
    assert json.loads(_voxarc("stats", "--json", "--data-dir", data).stdout)["integrity"][
        "files"] == 1
    assert "1 file read back" in _voxarc("stats", "--data-dir", data).stdout


def test_serve_answers_and_stops_on_sigterm(tmp_path):
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {port + 1}\n')
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", config,
                             "--data-dir", tmp_path / "data", "--port", str(port),
                             "--stable-age", "1", "--destination", "x=X@127.0.0.1:1",
                             "--http-port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == f"listening on port {port}"
        assert echo(port) == 0x0000
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=180)      # generous: CI machines may be loaded
    assert proc.returncode == 0, err
    assert "association accepted" in err and "C-ECHO" in err and "stopped" in err


def test_serve_stops_after_a_burst_of_signals(tmp_path):
    """SIGTERM and SIGINT arriving while the handler of an earlier one runs (a supervisor and a
    wrapper both signalling, Ctrl-C pressed twice): the node still stops cleanly. Its handler
    once set a threading.Event, whose lock a nested handler waited on forever (this burst hung
    it in 6 runs of 6)."""
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--data-dir",
                             tmp_path / "data", "--port", str(free_port()), "--http-port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("listening on port")
        for k in range(3000):
            proc.send_signal(signal.SIGINT if k % 2 == 0 else signal.SIGTERM)
            started = time.perf_counter()
            while time.perf_counter() - started < 2e-6 * (k % 5):
                pass
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "signal received, stopping" in err and "stopped" in err
