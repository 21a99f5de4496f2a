"""The admin page in a real headless Chromium after storing real series: the totals and a study
row are in the rendered page, the charts drew their bars, and a screenshot is kept.

The screenshot goes to the test's tmp folder and, when ``VOXARC_ARTIFACTS`` names a folder, is
copied there. Skipped only when no Chromium binary is installed (CI installs Debian's).
"""

import os
import re
import shutil
from pathlib import Path

import pytest

from admin_helpers import (CHROMIUM, admin_site, chromium, http_get, http_token,  # noqa: F401
                           store_series)
from node_helpers import real_series_files
from scu_helpers import store_bytes
from service import patrol
from storage import compaction
from storage.part10 import split_file

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary installed")


def _store_real(node, tmp_path, folder: Path, limit: int) -> str:
    """C-STORE the first ``limit`` files of a real series; return its Study Instance UID."""
    import pydicom
    items, study = [], ""
    for path in real_series_files(folder, limit):
        ts, data = split_file(path.read_bytes())
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        items.append((ds.SOPClassUID, ds.SOPInstanceUID, ts, data))
        study = ds.StudyInstanceUID
    assert set(store_bytes(node.port, items, tmp_path)) == {0x0000}
    return study


def _populate(node, tmp_path, shared_series) -> list[str]:
    """Generated series and, when the shared data is there, a real one; all but the MR series
    compacted (so the queue shows it pending), the CT ones as a compaction that is behind
    does (their adaptation deferred)."""
    stored = store_series(node, tmp_path, [("CT", 6, "GEN1"), ("MR", 4, "GEN2")])
    studies = [s["study_uid"] for s in stored]
    try:
        folder = shared_series("test", "ct_ge_hispeed_head_tilt")
    except pytest.skip.Exception:
        folder = None
    if folder is not None:
        studies.append(_store_real(node, tmp_path, folder, 12))
    for series in node.archive.find("SERIES", {"Modality": "CT"}):
        assert node.archive.compact_series(series["SeriesInstanceUID"], fast=True)
    return studies


def test_page_renders_totals_studies_and_charts(admin_site, tmp_path, shared_series,
                                               monkeypatch):
    node, admin = admin_site
    monkeypatch.setattr(compaction, "adapts_by_default", lambda voxels, model: True)
    studies = _populate(node, tmp_path, shared_series)
    mr = node.archive.find("IMAGE", {"Modality": "MR"})[0]["SOPInstanceUID"]
    node.archive.delete("instance", mr, reason="wrong image")
    totals = node.archive.stats()
    profile = tmp_path / "chromium-profile"
    dom = chromium(f"{admin.url}/", profile, "--dump-dom")
    assert re.search(r'id="integrity">([^<]*)<', dom).group(1) == "not checked yet"
    patrol.Patrol(node.archive, 3600, 0).run_round()
    dom = chromium(f"{admin.url}/", profile, "--dump-dom")
    assert re.search(r'id="integrity">([^<]*)<', dom).group(1) == "no damage"
    assert 'class="card alarm"' not in dom

    instances = re.search(r'id="total-instances">([^<]*)<', dom).group(1)
    assert instances.replace(",", "") == str(totals["instances"])
    assert re.search(r'id="total-studies">([^<]*)<', dom).group(1) == str(totals["studies"])
    assert re.search(r'id="total-ratio">([^<]*)<', dom).group(1) == f"{totals['ratio']:.3f}"
    pending = re.search(r'id="total-pending">([^<]*)<', dom).group(1)
    assert totals["deferred_stacks"] > 0
    assert pending.endswith(f", {totals['deferred_stacks']} stacks to adapt when idle")
    for study in studies:
        assert f'data-uid="{study}"' in dom
    chart = re.search(r'<svg id="chart-modality".*?</svg>', dom, re.S).group(0)
    assert chart.count('class="bar original"') >= 2 and 'class="bar stored"' in chart
    assert "CT" in chart and "MR" in chart
    assert 'class="status error"' not in dom and "VIEW@127.0.0.1:1" in dom
    deletions = re.search(r'<ul id="deletions">.*?</ul>', dom, re.S).group(0)
    assert mr in deletions and "wrong image" in deletions

    shot = tmp_path / "admin-page.png"
    chromium(f"{admin.url}/", profile, f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("VOXARC_ARTIFACTS"):
        target = Path(os.environ["VOXARC_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / shot.name)


def test_page_raises_the_alarm_when_the_patrol_finds_damage(admin_site, tmp_path):
    from sqlalchemy import select
    from storage.index import Blob
    node, admin = admin_site
    store_series(node, tmp_path, [("CT", 5, "DAMAGED")])
    node.archive.compact(0)
    with node.archive.index.read() as s:
        key = s.scalar(select(Blob.key))
    data = bytearray(node.archive.blobs.get(key))
    data[len(data) // 2] ^= 0x01
    node.archive.blobs.put(key, bytes(data))
    patrol.Patrol(node.archive, 3600, 0).run_round()
    dom = chromium(f"{admin.url}/", tmp_path / "chromium-profile", "--dump-dom")
    assert re.search(r'id="integrity">([^<]*)<', dom).group(1) == "5 damaged"
    assert 'class="card alarm"' in dom and "run voxarc verify" in dom


def test_series_viewer_opens_from_a_link_and_shows_the_rendered_images(admin_site, tmp_path):
    """``/#view/{study}/{series}/{n}`` opens the viewer on the series' n-th image in instance
    number order (multi-frame instances counted by frame), each image the WADO-RS rendered one;
    the window presets are offered."""
    from node_helpers import dataset_bytes, make_series
    node, admin = admin_site
    series = make_series(5, 32, 32, seed=31)
    for ds, number in zip(series, (3, 1, 5, 2, 4)):        # received out of order
        ds.InstanceNumber = number
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    assert store_bytes(node.port, items, tmp_path) == [0] * 5
    assert node.archive.compact(stable_age=0) == (1, 0)
    study, uid = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
    profile = tmp_path / "chromium-profile"
    dom = chromium(f"{admin.url}/#view/{study}/{uid}/2", profile, "--dump-dom")
    assert re.search(r'<dialog id="viewer"[^>]* open', dom)
    assert re.search(r'id="viewer-pos"[^>]*>([^<]*)<', dom).group(1) == "2 / 5"
    title = re.search(r'id="viewer-title"[^>]*>([^<]*)<', dom).group(1)
    assert title.startswith(f"{series[0].PatientName} · CT · series"), title
    second = next(ds.SOPInstanceUID for ds in series if ds.InstanceNumber == 2)
    src = re.search(r'id="viewer-img"[^>]*src="([^"]*)"', dom).group(1)
    assert src.endswith(f"/series/{uid}/instances/{second}/rendered"), src
    assert len(re.findall(r'<button type="button"[^>]*title="window', dom)) == 4
    assert re.search(r'id="viewer-slider"[^>]*max="4"', dom)
    status, body = http_get(f"{admin.url}/{src}")
    assert status == 200 and body[:3] == b"\xff\xd8\xff"              # a JPEG
    shot = tmp_path / "admin-viewer.png"
    chromium(f"{admin.url}/#view/{study}/{uid}/3", profile, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("VOXARC_ARTIFACTS"):
        target = Path(os.environ["VOXARC_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / shot.name)


def test_a_study_link_opens_its_row_with_the_download_and_send_controls(admin_site, tmp_path):
    """``/#study/{uid}`` opens the study's row: its series, the study's download as a file-set
    and as de-identified copies, and a "Send study" control offering each configured
    destination."""
    node, admin = admin_site
    (stored,) = store_series(node, tmp_path, [("CT", 3, "SEND1")])
    dom = chromium(f"{admin.url}/#study/{stored['study_uid']}", tmp_path / "profile",
                    "--dump-dom")
    assert f'data-uid="{stored["series_uid"]}"' in dom                  # the series row
    send = re.search(r'<tr class="series send">.*?</tr>', dom, re.S).group(0)
    assert ">Send study</button>" in send
    assert '<option value="viewer">viewer (VIEW@127.0.0.1:1)</option>' in send
    link, cd, deidentified = re.findall(r'<a class="download" href="([^"]+)"', send)
    assert link == f"api/studies/{stored['study_uid']}/media.zip"
    assert cd == link + "?profile=STD-GEN-CD"
    assert deidentified == f"api/studies/{stored['study_uid']}/deidentified.zip"
    for path in (link, deidentified):
        status, body = http_get(f"{admin.url}/{path}")
        assert status == 200 and body[:4] == b"PK\x03\x04"            # a ZIP


def test_a_patient_link_lists_that_patients_studies_with_their_download(admin_site, tmp_path):
    """An opened study whose patient has others links to ``#patient/{id}``, which lists that
    patient's studies only (not those of PAT10) and offers them as one file-set."""
    node, admin = admin_site
    stored = store_series(node, tmp_path, [("CT", 2, "PAT1"), ("MR", 2, "PAT1"),
                                           ("CT", 2, "PAT10")])
    first, second, other = (s["study_uid"] for s in stored)
    dom = chromium(f"{admin.url}/#study/{first}", tmp_path / "profile", "--dump-dom")
    actions = re.search(r'<tr class="series send">.*?</tr>', dom, re.S).group(0)
    assert re.search(r'<a class="patient" href="#patient/PAT1">this patient\'s 2 studies</a>',
                     actions)
    assert 'href="api/media.zip?patient=PAT1"' in actions

    dom = chromium(f"{admin.url}/#patient/PAT1", tmp_path / "profile2", "--dump-dom")
    rows = re.findall(r'<tr class="study" data-uid="([^"]+)"', dom)
    assert sorted(rows) == sorted([first, second]) and other not in dom
    chip = re.search(r'<span id="search-patient" class="chip">(.*?)</span>', dom, re.S).group(1)
    assert "Patient PAT1^Test (PAT1): 2 studies" in chip
    link = re.search(r'<a class="download" href="([^"]+)"', chip).group(1)
    assert link == "api/media.zip?patient=PAT1"
    status, body = http_get(f"{admin.url}/{link}")
    assert status == 200 and body[:4] == b"PK\x03\x04"
