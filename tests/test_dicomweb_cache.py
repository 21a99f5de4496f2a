"""Conditional DICOMweb retrievals (service.web_cache): answers fixed by their instances carry
a weak ETag, a request that names it gets 304 without anything decoded or sent, and the tag
changes with the instances (added, deleted), with the representation asked for, and with each
start of the node."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from admin_helpers import admin_site, http_token  # noqa: F401
from node_helpers import dataset_bytes, make_series
from scu_helpers import store_bytes
from service import web_cache


def _get(url: str, **headers) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers={k.replace("_", "-"): v
                                                   for k, v in headers.items()})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _store(node, tmp_path, series) -> None:
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    assert store_bytes(node.port, items, tmp_path) == [0] * len(items)


@pytest.fixture
def series_url(admin_site, tmp_path):
    node, admin = admin_site
    series = make_series(3, 16, 16, seed=21)
    _store(node, tmp_path, series)
    url = (f"{admin.url}/dicom-web/studies/{series[0].StudyInstanceUID}/series/"
           f"{series[0].SeriesInstanceUID}")
    return node, url, series


def test_a_frame_asked_again_with_its_tag_is_not_sent_again(series_url, monkeypatch):
    node, url, series = series_url
    frame = f"{url}/instances/{series[0].SOPInstanceUID}/frames/1"
    status, headers, body = _get(frame)
    tag = headers["etag"]
    assert status == 200 and body and tag.startswith('W/"')
    assert headers["cache-control"] == "private, no-cache" and "Accept" in headers["vary"]
    # compacted: the same bytes, the same tag; and a 304 decodes nothing
    assert node.archive.compact(stable_age=0) == (1, 0)
    monkeypatch.setattr(node.archive, "frames", lambda *a: pytest.fail("decoded for a 304"))
    for named in (tag, f'"other", {tag}', tag.removeprefix("W/"), "*"):
        status, headers, body = _get(frame, If_None_Match=named)
        assert (status, body, headers["etag"]) == (304, b"", tag), named
    monkeypatch.undo()
    assert _get(frame, If_None_Match='W/"other"')[0] == 200
    # another representation is another tag
    octets = 'multipart/related; type="application/octet-stream"'
    other = _get(frame, Accept=octets)[1]["etag"]
    assert other != tag and _get(frame, Accept=octets, If_None_Match=tag)[0] == 200


def test_series_tags_follow_the_instances(series_url, admin_site, tmp_path):
    node, url, series = series_url
    resources = [f"{url}/metadata", url, f"{url}/thumbnail", f"{url}/rendered"]
    tags = {r: _get(r)[1]["etag"] for r in resources}
    assert len(set(tags.values())) == len(resources)
    assert all(_get(r, If_None_Match=t)[0] == 304 for r, t in tags.items())
    # a new instance of the series: every series answer changes
    (late,) = make_series(1, 16, 16, seed=22)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName"):
        setattr(late, key, getattr(series[0], key))
    late.InstanceNumber = 4
    _store(node, tmp_path, [late])
    assert all(_get(r, If_None_Match=t)[0] == 200 for r, t in tags.items())
    # an instance deleted: its own answers are gone (no tag), the series' change again
    own = f"{url}/instances/{late.SOPInstanceUID}/metadata"
    own_tag = _get(own)[1]["etag"]
    again = _get(f"{url}/metadata")[1]["etag"]
    node.archive.delete("instance", late.SOPInstanceUID, reason="test")
    status, headers, _ = _get(own, If_None_Match=own_tag)
    assert status == 404 and "etag" not in headers
    assert _get(f"{url}/metadata", If_None_Match=again)[0] == 200
    assert _get(f"{url}/metadata", If_None_Match=tags[f"{url}/metadata"])[0] == 304
    # searches change with every instance received: never tagged
    assert "etag" not in _get(f"{url}/instances")[1]


def test_tags_do_not_outlive_the_node(series_url, monkeypatch):
    node, url, _ = series_url
    tag = _get(f"{url}/metadata")[1]["etag"]
    monkeypatch.setattr(web_cache, "_STARTED", "another start")
    assert _get(f"{url}/metadata", If_None_Match=tag)[0] == 200


@pytest.mark.parametrize("header, found", [
    (None, False), ("", False), ("*", True), ('W/"abc"', True), ('"abc"', True),
    ('"x", W/"abc" ', True), ('"abcd"', False), ('W/"ab"', False)])
def test_if_none_match_is_a_weak_comparison(header, found):
    assert web_cache.not_modified(header, 'W/"abc"') is found


def test_an_instance_replaced_under_its_uid_has_a_new_tag(series_url, tmp_path):
    """Under the ``replace`` duplicate policy the same SOP Instance UID can come back with
    other bytes: its SHA-256, and so its answers' tags, change."""
    node, url, series = series_url
    own = f"{url}/instances/{series[1].SOPInstanceUID}"
    tags = [_get(f"{own}{r}")[1]["etag"] for r in ("", "/metadata", "/frames/1")]
    node.archive.duplicates = "replace"
    changed = series[1]
    changed.PixelData = bytes(reversed(changed.PixelData))
    _store(node, tmp_path, [changed])
    for resource, tag in zip(("", "/metadata", "/frames/1"), tags):
        status, headers, _ = _get(f"{own}{resource}", If_None_Match=tag)
        assert status == 200 and headers["etag"] != tag, resource
