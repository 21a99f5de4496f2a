"""Named users of the admin page and DICOMweb (service.web_auth ``http_users``, `voxarc
web-user`): a viewer reads and is refused writes, an admin writes, an unknown token is
refused, each named in the access trail and the audit messages; the shared ``http_token``
still works."""

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from admin_helpers import CHROMIUM, chromium
from node_helpers import dataset_bytes, make_series, store_as_received
from service.audit_syslog import _who
from service.config import load_settings
from service.web_auth import parse_users, token_digest
from storage import access_log

REPO = Path(__file__).resolve().parents[1]


def _request(url: str, token: str, method: str = "GET", body: bytes | None = None,
             content_type: str = "application/json") -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _web_user(name: str, role: str) -> tuple[str, str]:
    """`voxarc web-user`'s token and settings value for ``name``."""
    out = subprocess.run([sys.executable, "-m", "service.cli", "web-user", name, "--role", role],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    token = re.search(r"shown once: (\S+)", out.stdout).group(1)
    value = re.search(rf'^{name} = "([^"]+)"$', out.stdout, re.M).group(1)
    return token, value


@pytest.fixture
def users_site(tmp_path):
    from service.ae import Node
    from service.web_server import start_admin
    viewer, viewer_value = _web_user("drsmith", "viewer")
    admin, admin_value = _web_user("pacsadmin", "admin")
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             http_port=0, stable_age=3600.0, http_token="shared-secret",
                             http_users={"drsmith": viewer_value, "pacsadmin": admin_value},
                             destination=["viewer=VIEW@127.0.0.1:1"])
    node = Node(settings, compaction=False).start()
    site = start_admin(node)
    yield node, site, viewer, admin
    site.stop()
    node.stop()


def test_roles_and_names(users_site):
    node, site, viewer, admin = users_site
    series = make_series(2, 8, 8)
    store_as_received(node.archive, series)
    study = series[0].StudyInstanceUID
    search = f"{site.url}/dicom-web/studies?StudyInstanceUID={study}"
    for token in (viewer, admin, "shared-secret"):
        status, body = _request(search, token)
        assert status == 200 and len(json.loads(body)) == 1
    assert _request(search, "not-a-token")[0] == 401
    assert _request(search, "")[0] == 401
    send = f"{site.url}/api/studies/{study}/send"
    body = json.dumps({"destination": "viewer"}).encode()
    status, answer = _request(send, viewer, "POST", body)
    assert status == 403 and b"the viewer role may only read" in answer
    assert _request(send, admin, "POST", body)[0] == 202
    restore = f"{site.url}/api/deleted/nonesuch/restore"
    assert _request(restore, viewer, "POST", b"{}")[0] == 403      # the recycle bin's too
    assert _request(restore, admin, "POST", b"{}")[0] == 404
    (ds,) = make_series(1, 8, 8, study_uid=study, seed=5)
    ts, data = dataset_bytes(ds)
    boundary = "b0undary"
    stow = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode() + \
        _part10(ds) + f"\r\n--{boundary}--\r\n".encode()
    kind = f'multipart/related; type="application/dicom"; boundary={boundary}'
    assert _request(f"{site.url}/dicom-web/studies", viewer, "POST", stow, kind)[0] == 403
    assert _request(f"{site.url}/dicom-web/studies", admin, "POST", stow, kind)[0] == 200
    config = json.loads(_request(f"{site.url}/api/config", viewer)[1])
    assert config["http_users"] == {"drsmith": "viewer", "pacsadmin": "admin"}
    assert config["http_token_required"] and "http_token" not in config
    assert token_digest(viewer) not in json.dumps(config)
    # the trail names the user and where they were
    assert _request(f"{site.url}/dicom-web/studies/{study}/metadata", viewer)[0] == 200
    node.archive.accesses.flush()
    actors = {r["actor"] for r in access_log.history(node.archive.index, study_uid=study)}
    assert {"http drsmith@127.0.0.1", "http pacsadmin@127.0.0.1"} <= actors
    # what one user read (a name with LIKE's own characters matches only itself)
    mine = access_log.history(node.archive.index, user="drsmith")
    assert mine and {r["actor"] for r in mine} == {"http drsmith@127.0.0.1"}
    assert access_log.history(node.archive.index, user="dr%") == []
    out = subprocess.run([sys.executable, "-m", "service.cli", "accesses", "--user", "drsmith",
                          "--json", "--data-dir", node.settings.data_dir], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert {r["actor"] for r in json.loads(out.stdout)} == {"http drsmith@127.0.0.1"}


def _part10(ds) -> bytes:
    from node_helpers import file_bytes
    return file_bytes(ds)


def test_audit_messages_name_the_user():
    assert _who("http drsmith@10.0.0.5", "pacs") == ("drsmith", "10.0.0.5")
    assert _who("http 10.0.0.5", "pacs") == ("10.0.0.5", "10.0.0.5")


def test_malformed_users_are_refused():
    for bad in ({"drsmith": "reader:" + "a" * 64}, {"drsmith": "viewer:xyz"},
                {"dr smith": "viewer:" + "a" * 64}, {"drsmith": "viewer"}):
        with pytest.raises(ValueError, match="http_users"):
            load_settings(http_users=bad)
    assert parse_users({"a": "admin:" + "0" * 64})["0" * 64].role == "admin"


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (which .ci/run installs)")
def test_the_page_offers_a_viewer_no_writes(users_site, tmp_path):
    """Opened with a viewer's token, the admin page names them and offers no Send control and
    no import; with an admin's, both are there."""
    node, site, viewer, admin = users_site
    series = make_series(2, 8, 8)
    store_as_received(node.archive, series)
    study = series[0].StudyInstanceUID
    seen = {}
    for name, token in (("viewer", viewer), ("admin", admin)):
        dom = chromium(f"{site.url}/?token={token}#study/{study}", tmp_path / name,
                       "--dump-dom")
        actions = re.search(r'<tr class="series send">.*?</tr>', dom, re.S).group(0)
        seen[name] = (">Send study</button>" in actions,
                      bool(re.search(r'<section class="panel" id="import-panel"(?! hidden)', dom)),
                      re.search(r'<span id="who"[^>]*>([^<]*)<', dom).group(1))
    assert seen == {"viewer": (False, False, "drsmith (viewer)"),
                    "admin": (True, True, "pacsadmin (admin)")}


def test_sighup_takes_a_users_access_away_without_a_restart(tmp_path):
    """`voxarc serve` reads its settings file again on SIGHUP: a user taken out of it is
    refused from then on, the DICOM listener never stopping; a file that no longer loads
    changes nothing."""
    import os
    import signal
    import time
    from node_helpers import free_port
    viewer, value = _web_user("drsmith", "viewer")
    config = tmp_path / "node.toml"
    config.write_text(f'[http_users]\ndrsmith = "{value}"\npacsadmin = "admin:{"0" * 64}"\n')
    port, http_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", config,
                             "--data-dir", tmp_path / "data", "--port", str(port),
                             "--http-port", str(http_port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{http_port}/api/stats"
    try:
        assert proc.stdout.readline().strip() == f"listening on port {port}"
        proc.stdout.readline()
        assert _request(url, viewer)[0] == 200

        def after_sighup(expected: int) -> int:
            os.kill(proc.pid, signal.SIGHUP)
            deadline = time.monotonic() + 30
            while (status := _request(url, viewer)[0]) != expected and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
            return status
        for refused in ("[http_users\nbroken", "[http_users]\n"):    # unreadable; open to all
            config.write_text(refused)
            assert after_sighup(200) == 200
            time.sleep(2)                     # the node looks at its signals twice a second
            assert _request(url, viewer)[0] == 200
        config.write_text(f'[http_users]\npacsadmin = "admin:{"0" * 64}"\n')
        assert after_sighup(401) == 401
        config.write_text(f'codec_slab = 4\n[http_users]\ndrsmith = "{value}"\n')
        assert after_sighup(200) == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "SIGHUP: settings not reloaded: " in err and "would open the admin page" in err
    assert "SIGHUP: settings reloaded (http_users)" in err
    assert "SIGHUP: changed in the settings file, applied at the next restart: codec_slab" \
        in err


def test_an_admin_places_and_releases_a_hold_and_a_viewer_may_not(users_site):
    node, site, viewer, admin = users_site
    series = make_series(2, 8, 8)
    store_as_received(node.archive, series)
    study = series[0].StudyInstanceUID
    place = json.dumps({"level": "study", "uid": study, "reason": "claim 12"}).encode()
    assert _request(f"{site.url}/api/holds", viewer, "POST", place)[0] == 403
    status, answer = _request(f"{site.url}/api/holds", admin, "POST", place)
    assert status == 201 and json.loads(answer)["held_by"] == "http pacsadmin@127.0.0.1"
    release = json.dumps({"level": "study", "uid": study}).encode()
    assert _request(f"{site.url}/api/holds/release", viewer, "POST", release)[0] == 403
    assert len(json.loads(_request(f"{site.url}/api/holds", viewer)[1])) == 1   # it may read
    status, answer = _request(f"{site.url}/api/holds/release", admin, "POST", release)
    assert status == 200 and json.loads(answer)["released_by"] == "http pacsadmin@127.0.0.1"
