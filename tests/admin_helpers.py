"""Helpers of the admin page tests: a running node with its admin server, storing generated
series over C-STORE, and plain HTTP requests as a browser or Prometheus makes them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node_helpers import bundled, dataset_bytes, free_port, make_series
from scu_helpers import store_bytes


CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(b)), None)


def chromium(url: str, profile: Path, *mode: str, budget_ms: int = 5000) -> str:
    """Open ``url`` in headless Chromium (``mode``: ``--dump-dom``, ``--screenshot=...``) with
    ``budget_ms`` of virtual time for its scripts; return what it printed."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
               "--window-size=1280,1600", f"--virtual-time-budget={budget_ms}", *mode, url]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def http_get(url: str, token: str = "", timeout: float = 30, accept: str = ""
             ) -> tuple[int, bytes]:
    """GET ``url`` (with a Bearer token and an Accept header when given); return (status,
    body)."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post_json(url: str, body: bytes, content_type: str = "application/json"
              ) -> tuple[int, dict]:
    """POST ``body`` to ``url``; return (status, the decoded JSON answer)."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get_json(url: str, token: str = ""):
    """GET ``url`` and decode its JSON body; fail on a non-200 status."""
    status, body = http_get(url, token)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


def metric(text: str, name: str, **labels) -> float:
    """The value of sample ``name`` with ``labels`` in a Prometheus exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def store_series(node, tmp_path, specs) -> list[dict]:
    """C-STORE one generated series per ``(modality, instances, patient)`` spec.

    Returns
    -------
    list of dict
        Per series: ``study_uid``, ``series_uid``, ``modality`` and ``sizes`` (dataset bytes).
    """
    out, items = [], []
    for seed, (modality, n, patient) in enumerate(specs):
        series = make_series(n, 32, 32, modality=modality, patient_id=patient,
                             patient_name=f"{patient}^Test", seed=seed)
        sizes = []
        for ds in series:
            ts, data = dataset_bytes(ds)
            items.append((ds.SOPClassUID, ds.SOPInstanceUID, ts, data))
            sizes.append(len(data))
        out.append({"study_uid": series[0].StudyInstanceUID, "modality": modality,
                    "series_uid": series[0].SeriesInstanceUID, "sizes": sizes})
    assert set(store_bytes(node.port, items, tmp_path)) == {0x0000}
    return out


@pytest.fixture
def http_token() -> str:
    """The token the admin server of :func:`admin_site` requires (a test module overrides this
    fixture to set one)."""
    return ""


@pytest.fixture
def admin_site(tmp_path, http_token, http_public):
    """A running node (no background compaction) with its admin server on free ports."""
    from service.ae import Node
    from service.config import load_settings
    from service.web_server import start_admin
    http_port = free_port() if http_public else 0
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             http_port=http_port, stable_age=3600.0, http_token=http_token,
                             destination=["viewer=VIEW@127.0.0.1:1"],
                             http_public_url=f"http://127.0.0.1:{http_port}" if http_public
                             else None)
    node = Node(settings, compaction=False).start()
    admin = start_admin(node)
    yield node, admin
    admin.stop()
    node.stop()


def store_bundled(node, base_url: str, tmp_path, name: str):
    """C-STORE pydicom's bundled file ``name`` as it is; return (its parsed UIDs dataset, its
    transfer syntax, its dataset bytes, its WADO-RS instance URL under ``base_url``)."""
    from storage.dataset_parts import parse_dataset
    ts, data = bundled(name)
    ds = parse_dataset(data, ts, ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                  "SeriesInstanceUID"))
    assert store_bytes(node.port, [(ds.SOPClassUID, ds.SOPInstanceUID, ts, data)],
                       tmp_path) == [0]
    url = (f"{base_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
           f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    return ds, ts, data, url


def multipart_get(url: str, accept: str = "", headers_too: bool = False) -> list[tuple]:
    """GET a multipart/related response; return its (content type, body) parts (with
    ``headers_too``: (headers, body))."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=120) as response:
        ctype, body = response.headers["Content-Type"], response.read()
    boundary = re.search(r"boundary=([^;\s]+)", ctype).group(1).encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        assert len(data) == int(headers["Content-Length"]) + 2 and data.endswith(b"\r\n")
        parts.append((headers if headers_too else headers["Content-Type"], data[:-2]))
    return parts
