"""Access to the admin page: a token guards everything but /healthz and never reaches the log;
`voxarc serve` starts the page on localhost beside the DICOM listener."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from admin_helpers import admin_site, get_json, http_get  # noqa: F401
from node_helpers import free_port
from service.config import load_settings
from service.web import public_settings

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-value"


@pytest.fixture
def http_token() -> str:
    return TOKEN


def test_token_required_and_never_logged(admin_site, caplog):
    caplog.set_level(logging.DEBUG)
    _, admin = admin_site
    for path in ("/", "/api/stats", "/api/studies", "/api/jobs", "/api/config", "/metrics"):
        assert http_get(f"{admin.url}{path}")[0] == 401, path
        assert http_get(f"{admin.url}{path}", token="wrong")[0] == 401, path
        assert http_get(f"{admin.url}{path}", token=TOKEN)[0] == 200, path
    assert http_get(f"{admin.url}/api/stats?token={TOKEN}")[0] == 200
    assert http_get(f"{admin.url}/healthz")[0] == 200
    # the page's script and style hold no data, and a browser asks for them without a token
    for asset in ("/static/app.js", "/static/style.css", "/static/upload.js"):
        assert http_get(f"{admin.url}{asset}")[0] == 200, asset
    assert http_get(f"{admin.url}/static/../api/stats")[0] in (400, 401, 404)
    config = get_json(f"{admin.url}/api/config", token=TOKEN)
    assert config["http_token_required"] is True and TOKEN not in str(config)
    assert "refused" in caplog.text and TOKEN not in caplog.text


def test_public_settings_hide_secrets():
    settings = load_settings(http_token="abc",
                             database_url="postgresql+psycopg://voxarc:pw123@db:5432/voxarc")
    shown = public_settings(settings)
    assert "http_token" not in shown and shown["http_token_required"] is True
    assert shown["database_url"] == "postgresql+psycopg://voxarc:***@db:5432/voxarc"


def test_serve_starts_the_admin_page_on_localhost(tmp_path):
    port, http_port = free_port(), free_port()
    env = dict(os.environ, VOXARC_HTTP_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--data-dir",
                             tmp_path / "data", "--port", str(port), "--http-port",
                             str(http_port)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == f"listening on port {port}"
        url = f"http://127.0.0.1:{http_port}"
        assert proc.stdout.readline().strip() == f"admin page on {url}/"
        assert http_get(f"{url}/healthz")[0] == 200
        assert http_get(f"{url}/api/stats")[0] == 401
        assert get_json(f"{url}/api/stats", token=TOKEN)["instances"] == 0
        assert get_json(f"{url}/api/config", token=TOKEN)["http_host"] == "127.0.0.1"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "admin page on" in err and TOKEN not in err
