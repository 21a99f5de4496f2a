"""DICOMweb (service.dicomweb, service.dicomweb_store) when something is wrong: instances that
cannot be rebuilt, UIDs that are patterns, malformed values, frame lists, oversize STOW bodies,
truncated searches and odd parameters."""

import base64
import http.client
import io
import json
import types
import urllib.request
from urllib.parse import urlsplit

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from sqlalchemy import select

from admin_helpers import admin_site, http_get, http_token  # noqa: F401
from node_helpers import dataset_bytes, file_bytes, make_series
from scu_helpers import store_bytes
from service import dicomweb, dicomweb_store
from service.preview import render_image
from storage.errors import InstanceNotFoundError
from storage.index import Instance
from test_dicomweb import _multipart, _post


def _store(node, tmp_path, datasets) -> None:
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in datasets]
    assert set(store_bytes(node.port, items, tmp_path)) == {0}


def _damage(node, sop_uid: str) -> None:
    """Flip a byte of an instance's staged file: it fails its SHA-256 check from now on."""
    with node.archive.index.read() as s:
        key = s.scalar(select(Instance.staged_key).where(Instance.sop_uid == sop_uid))
    path = node.archive.blobs.path(key)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def _sending_order(node, series) -> list[str]:
    ordered, prefetch = node.archive.plan_retrieval([ds.SOPInstanceUID for ds in series])
    if prefetch is not None:
        prefetch.cancel()
    return ordered


def _open(url: str, method: str = "GET", headers=None, body=None):
    """An http.client response (status, headers, unread body) and its connection."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=body,
                 headers=headers or {})
    return conn, conn.getresponse()


# --- 1. an instance that cannot be rebuilt is never skipped ------------------------------------
def test_wado_rs_answers_an_error_when_the_first_instance_fails(admin_site, tmp_path,
                                                                monkeypatch):
    node, admin = admin_site
    series = make_series(3, 8, 8, seed=31)
    _store(node, tmp_path, series)
    _damage(node, _sending_order(node, series)[0])
    study = f"{admin.url}/dicom-web/studies/{series[0].StudyInstanceUID}"
    status, body = http_get(study)
    assert status == 500 and b"SHA-256" in body
    assert http_get(f"{study}/metadata")[0] == 500
    one = series[0]
    instance = f"{study}/series/{one.SeriesInstanceUID}/instances/{one.SOPInstanceUID}"

    def gone(uid):
        raise InstanceNotFoundError(uid)
    for method in ("retrieve", "retrieve_parts", "header"):      # deleted after it was found
        monkeypatch.setattr(node.archive, method, gone)
    assert http_get(instance)[0] == 404
    assert http_get(f"{instance}/metadata")[0] == 404


def test_wado_rs_cuts_the_transfer_off_when_a_later_instance_fails(admin_site, tmp_path):
    node, admin = admin_site
    series = make_series(3, 8, 8, seed=32)
    _store(node, tmp_path, series)
    _damage(node, _sending_order(node, series)[-1])
    study = f"{admin.url}/dicom-web/studies/{series[0].StudyInstanceUID}"
    conn, response = _open(study)
    try:
        assert response.status == 200                  # sent before the failure was known
        with pytest.raises(http.client.IncompleteRead) as failed:
            response.read()
        boundary = response.headers["Content-Type"].rsplit("boundary=", 1)[1].encode()
        assert not failed.value.partial.rstrip().endswith(b"--" + boundary + b"--")
    finally:
        conn.close()
    assert http_get(f"{study}/metadata")[0] == 500      # not 200 with 2 of 3 instances


def test_metadata_of_compressed_instances_decodes_no_pixels(admin_site, tmp_path,
                                                              monkeypatch):
    node, admin = admin_site
    series = make_series(4, 16, 16, seed=33)
    _store(node, tmp_path, series)
    study = f"{admin.url}/dicom-web/studies/{series[0].StudyInstanceUID}"
    staged = _json_of(f"{study}/metadata")
    assert node.archive.compact(stable_age=0) == (1, 0)

    def no_decoding(*args, **kwargs):
        raise AssertionError("metadata decoded pixels")
    monkeypatch.setattr("models.decode_slices", no_decoding)
    monkeypatch.setattr("models.decode_stream", no_decoding)
    coded = _json_of(f"{study}/metadata")
    by_uid = {m["00080018"]["Value"][0]: m for m in staged}
    assert len(coded) == 4 and all(m == by_uid[m["00080018"]["Value"][0]] for m in coded)
    blob = node.archive.blobs.path(_blob_key(node, series[0].SOPInstanceUID))  # header pack
    raw = bytearray(blob.read_bytes())
    raw[20] ^= 0xFF
    blob.write_bytes(bytes(raw))
    node.archive.reconstructor._header_packs.clear()
    status, body = http_get(f"{study}/metadata")
    assert status == 500 and b"unreadable" in body


def _json_of(url: str):
    status, body = http_get(url)
    assert status == 200
    return json.loads(body)


def _blob_key(node, sop_uid: str) -> str:
    from storage.index import Blob
    with node.archive.index.read() as s:
        return s.scalar(select(Blob.key).join(Instance, Instance.blob_fk == Blob.id)
                        .where(Instance.sop_uid == sop_uid))


# --- 2. UIDs are UIDs, not C-FIND patterns -----------------------------------------------------
def test_uids_of_paths_and_wado_uri_must_be_uids(admin_site, tmp_path):
    node, admin = admin_site
    series = make_series(2, 8, 8, seed=51)
    _store(node, tmp_path, series)
    one = series[0]
    base, study, sop = f"{admin.url}/dicom-web", one.StudyInstanceUID, one.SOPInstanceUID
    for path in ("studies/*", f"studies/{study}%5C1.2.3", "studies/1.2.%3F", "studies/1..2",
                 "studies/*/metadata", "studies/*/series", "studies/*/thumbnail",
                 f"studies/{study}/series/*/instances",
                 f"studies/{study}/series/*/instances/*/frames/1",
                 f"studies/{study}/series/{one.SeriesInstanceUID}/instances/*/rendered",
                 "studies/1.2.3%0A", "studies/" + "1." * 32 + "1"):
        assert http_get(f"{base}/{path}")[0] == 400, path
    wado = f"{admin.url}/wado?requestType=WADO&contentType=application/dicom"
    assert http_get(f"{wado}&objectUID=*")[0] == 400
    assert http_get(f"{wado}&objectUID={sop}&studyUID=*")[0] == 400
    assert http_get(f"{wado}&objectUID={sop}&seriesUID=1.2%5C1.3")[0] == 400
    assert http_get(f"{wado}&objectUID={sop}&studyUID={study}")[0] == 200
    assert http_get(f"{base}/studies/1.2.3")[0] == 404          # a UID, just not here
    assert http_get(f"{base}/studies?StudyInstanceUID=*")[0] == 200     # QIDO matches


# --- 3. malformed values that C-STORE accepted -------------------------------------------------
def _malformed(seed: int):
    series = make_series(2, 8, 8, seed=seed)
    for ds in series:
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds._dict[Tag(0x00281050)] = RawDataElement(Tag(0x00281050), "DS", 4, b"40/1", 0,
                                                   False, True)
        ds._dict[Tag(0x00180050)] = RawDataElement(Tag(0x00180050), "DS", 4, b"abc ", 0,
                                                   False, True)
    return series


def _stored_malformed(admin_site, tmp_path, seed: int):
    """Store a :func:`_malformed` series in the node; its first instance and the series' URL."""
    node, admin = admin_site
    series = _malformed(seed)
    _store(node, tmp_path, series)
    one = series[0]
    return one, (f"{admin.url}/dicom-web/studies/{one.StudyInstanceUID}/series/"
                 f"{one.SeriesInstanceUID}")


def test_metadata_sends_values_it_cannot_convert_raw_and_says_so(admin_site, tmp_path):
    one, path = _stored_malformed(admin_site, tmp_path, 61)
    with urllib.request.urlopen(f"{path}/metadata", timeout=60) as response:
        meta, warning = json.loads(response.read()), response.headers["Warning"]
    assert len(meta) == 2 and "00180050" in warning and "00281050" in warning
    for item in meta:
        assert item["00281050"] == {"vr": "DS",
                                    "InlineBinary": base64.b64encode(b"40/1").decode()}
        assert item["00180050"] == {"vr": "DS",
                                    "InlineBinary": base64.b64encode(b"abc ").decode()}
        assert item["00281051"] == {"vr": "DS", "Value": [400]}
        assert item["00280010"]["Value"] == [8] and "00091011" in item


def test_rendered_and_thumbnails_of_a_malformed_window(admin_site, tmp_path):
    one, path = _stored_malformed(admin_site, tmp_path, 62)
    for url in (f"{path}/instances/{one.SOPInstanceUID}/rendered",
                f"{path}/instances/{one.SOPInstanceUID}/thumbnail", f"{path}/thumbnail"):
        status, jpeg = http_get(url)
        assert status == 200 and jpeg[:3] == b"\xff\xd8\xff", url


def test_a_window_that_cannot_be_read_falls_back_to_percentiles():
    (ds,) = make_series(1, 16, 16, seed=63)
    ts, plain = dataset_bytes(ds)
    ds.WindowWidth = "400"
    ds._dict[Tag(0x00281050)] = RawDataElement(Tag(0x00281050), "DS", 4, b"40/1", 0, False,
                                               True)
    ts, malformed = dataset_bytes(ds)
    args = (ds.SOPClassUID, ds.SOPInstanceUID, ts)
    assert render_image(*args, malformed, 0) == render_image(*args, plain, 0)


# --- 4. frame lists ----------------------------------------------------------------------------
def _frames_instance(frames: int):
    (ds,) = make_series(1, 16, 16, seed=71)
    stack = np.arange(frames * 256, dtype=np.int16).reshape(frames, 16, 16)
    ds.NumberOfFrames, ds.PixelData = frames, stack.tobytes()
    ts, data = dataset_bytes(ds)
    inst = types.SimpleNamespace(transfer_syntax=ts, sop_class_uid=ds.SOPClassUID,
                                 sop_uid=ds.SOPInstanceUID, data=data)
    return inst, stack


def test_frames_are_taken_one_at_a_time_and_a_repeat_is_refused():
    inst, stack = _frames_instance(3)
    media, frames = dicomweb.frame_data(inst, [3, 1])
    assert media == "application/octet-stream" and iter(frames) is frames     # lazily
    assert [bytes(f) for f in frames] == [stack[2].tobytes(), stack[0].tobytes()]
    with pytest.raises(dicomweb._NotServed) as refused:
        dicomweb.frame_data(inst, [1] * 2000)
    assert refused.value.status == 400
    with pytest.raises(dicomweb._NotServed) as refused:
        dicomweb.frame_numbers("2,1,2")
    assert refused.value.status == 400
    assert dicomweb.frame_numbers("2,1") == [2, 1]


def test_frame_urls_with_repeats_or_numbers_below_one_are_bad_requests(admin_site, tmp_path):
    node, admin = admin_site
    (one,) = make_series(1, 8, 8, seed=72)
    _store(node, tmp_path, [one])
    url = (f"{admin.url}/dicom-web/studies/{one.StudyInstanceUID}/series/"
           f"{one.SeriesInstanceUID}/instances/{one.SOPInstanceUID}/frames")
    for frames in ("1,1", ",".join(["1"] * 500), "0", "-1"):
        assert http_get(f"{url}/{frames}")[0] == 400, frames
    assert http_get(f"{url}/2")[0] == 404                            # no such frame
    assert len(_multipart(f"{url}/1")) == 1


# --- 5. STOW-RS body cap -----------------------------------------------------------------------
@pytest.fixture
def capped_site(tmp_path, monkeypatch):
    """A node whose STOW-RS bodies are capped at 200,000 bytes (no per-dataset limit)."""
    from service.ae import Node
    from service.config import load_settings
    from service.web_server import start_admin
    monkeypatch.setattr(dicomweb_store, "MAX_REQUEST_BYTES", 200_000)
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             http_port=0, stable_age=3600.0, max_dataset_bytes=0)
    node = Node(settings, compaction=False).start()
    admin = start_admin(node)
    yield node, admin
    admin.stop()
    node.stop()


def _stow_body(files, boundary: str = "xyz") -> bytes:
    return b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + f + b"\r\n" for f in files) + b"--" + boundary.encode() + b"--\r\n"


STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=xyz'


def test_stow_refuses_a_body_over_the_cap_without_reading_it(capped_site):
    node, admin = capped_site
    url = f"{admin.url}/dicom-web/studies"
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.putrequest("POST", u.path)
        conn.putheader("Content-Type", STOW_TYPE)
        conn.putheader("Content-Length", str(10 << 30))            # declared, never sent
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    big = _stow_body([file_bytes(ds) for ds in make_series(8, 128, 128, seed=81)])
    assert len(big) > 200_000
    try:
        conn, response = _open(url, "POST", {"Content-Type": STOW_TYPE},
                               (big[i:i + 7000] for i in range(0, len(big), 7000)))  # chunked
        conn.close()
        status = response.status
    except (ConnectionResetError, BrokenPipeError):
        status = None           # the server answered 413 and closed while this still sent
    assert status in (413, None)
    assert node.archive.stats()["instances"] == 0
    status, _ = _post(url, [file_bytes(ds) for ds in make_series(2, 16, 16, seed=82)])
    assert status == 200 and node.archive.stats()["instances"] == 2


def test_a_chunked_stow_body_is_read_no_further_than_the_cap():
    import asyncio
    from starlette.requests import Request

    def chunked(received: list) -> Request:
        """A request whose body comes in 100 chunks of 1,000 bytes, counted in ``received``."""
        async def receive():
            received.append(1)
            return {"type": "http.request", "body": bytes(1000),
                    "more_body": len(received) < 100}
        return Request({"type": "http", "method": "POST", "headers": []}, receive)
    received = []
    with pytest.raises(dicomweb_store._TooLarge):
        asyncio.run(dicomweb_store._read_body(chunked(received), 5500))
    assert len(received) == 6                        # 6,000 bytes read of 100,000
    assert len(asyncio.run(dicomweb_store._read_body(chunked([]), 100_000))) == 100_000


def test_the_stow_cap_leaves_room_for_one_largest_dataset():
    assert dicomweb_store.body_limit(0) == dicomweb_store.MAX_REQUEST_BYTES
    assert dicomweb_store.body_limit(2 << 30) > 2 << 30


def test_stow_parts_are_views_of_the_body_not_copies():
    files = [file_bytes(ds) for ds in make_series(2, 16, 16, seed=83)]
    body = bytearray(_stow_body(files))
    parts = dicomweb_store.split_parts(STOW_TYPE, body)
    assert [bytes(p) for p in parts] == files
    assert all(isinstance(p, memoryview) and p.obj is body for p in parts)


# --- 6. QIDO paging ----------------------------------------------------------------------------
def test_qido_pages_in_uid_order_and_says_when_more_match(admin_site, tmp_path, monkeypatch):
    node, admin = admin_site
    monkeypatch.setattr(dicomweb, "MAX_LIMIT", 2)
    studies = [make_series(1, 8, 8, seed=40 + k)[0] for k in range(3)]
    _store(node, tmp_path, studies)
    url = f"{admin.url}/dicom-web/studies"

    def page(query: str):
        with urllib.request.urlopen(f"{url}?{query}", timeout=30) as response:
            return ([s["0020000D"]["Value"][0] for s in json.loads(response.read())],
                    response.headers.get("Warning") or "")
    first, warning = page("limit=10")
    assert len(first) == 2 and "There are additional results that can be requested" in warning
    assert warning.startswith("299 ")
    rest, warning = page("offset=2")
    assert len(rest) == 1 and warning == ""
    assert first + rest == sorted(ds.StudyInstanceUID for ds in studies)
    assert [page(f"limit=1&offset={k}")[0][0] for k in range(3)] == first + rest


# --- 7. WADO-URI parameters --------------------------------------------------------------------
def test_wado_uri_sizes_and_content_type_lists(admin_site, tmp_path):
    from PIL import Image
    from storage.part10 import split_file
    node, admin = admin_site
    (one,) = make_series(1, 24, 24, seed=91)
    _store(node, tmp_path, [one])
    url = (f"{admin.url}/wado?requestType=WADO&studyUID={one.StudyInstanceUID}"
           f"&seriesUID={one.SeriesInstanceUID}&objectUID={one.SOPInstanceUID}")
    for bad in ("rows=-5", "columns=-5", "rows=x", "contentType=image/png;q=high"):
        assert http_get(f"{url}&{bad}")[0] == 400, bad
    status, jpeg = http_get(f"{url}&rows=12&columns=8")
    assert status == 200 and Image.open(io.BytesIO(jpeg)).size == (8, 8)
    for asked, magic in (("image/png;q=0.9", b"\x89PNG\r\n\x1a\n"),
                         ("application/dicom;q=0,image/jpeg", b"\xff\xd8\xff"),
                         ("video/mpeg,%20image/png;charset=x", b"\x89PNG\r\n\x1a\n")):
        status, body = http_get(f"{url}&contentType={asked}")
        assert status == 200 and body.startswith(magic), asked
    for asked in ("image/png;q=0.5,application/dicom", "video/mpeg,application/dicom",
                  "application/dicom;transfer-syntax=*"):
        status, body = http_get(f"{url}&contentType={asked}")
        assert status == 200 and split_file(body)[1] == dataset_bytes(one)[1], asked
    assert http_get(f"{url}&contentType=video/mpeg,text/html")[0] == 406


# --- 8. parameter syntax -----------------------------------------------------------------------
def test_stow_content_type_parameters_with_spaces(admin_site):
    node, admin = admin_site
    url = f"{admin.url}/dicom-web/studies"
    files = [file_bytes(ds) for ds in make_series(2, 8, 8, seed=95)]
    for ctype, data in (('multipart/related; type="application/dicom" ; boundary=xyz', files[0]),
                        ('multipart/related; boundary=xyz ; type="application/dicom"',
                         files[1])):
        conn, response = _open(url, "POST", {"Content-Type": ctype}, _stow_body([data]))
        try:
            assert response.status == 200, (ctype, response.read())
        finally:
            conn.close()
    assert node.archive.stats()["instances"] == 2
    conn, response = _open(url, "POST", {"Content-Type": "multipart/related; boundary=xyz"},
                           _stow_body(files))
    conn.close()
    assert response.status == 415                                   # no type: not DICOM


def test_qido_uid_lists_with_commas(admin_site, tmp_path):
    node, admin = admin_site
    studies = [make_series(1, 8, 8, seed=96 + k)[0] for k in range(3)]
    _store(node, tmp_path, studies)
    a, b = studies[0].StudyInstanceUID, studies[1].StudyInstanceUID
    status, body = http_get(f"{admin.url}/dicom-web/studies?StudyInstanceUID={a},{b}")
    assert status == 200
    assert sorted(s["0020000D"]["Value"][0] for s in json.loads(body)) == sorted([a, b])
    status, body = http_get(f"{admin.url}/dicom-web/studies?PatientID=PAT1,X")
    assert status == 200 and json.loads(body) == []          # only UIDs are lists so


def test_metadata_converts_implicit_vr_elements_of_each_instance_on_its_own(admin_site, tmp_path):
    """Repeated header elements are converted once per request, but not one whose implicit VR
    depends on the instance: the same bytes are 65535 (US) in one and -1 (SS) in the other."""
    from pydicom.uid import ImplicitVRLittleEndian
    node, admin = admin_site
    series = make_series(2, 8, 8, transfer_syntax=ImplicitVRLittleEndian, dtype="uint16",
                         seed=34)
    for ds, signed in zip(series, (0, 1)):
        ds.PixelRepresentation = signed
        ds.SmallestImagePixelValue = -1 if signed else 65535
    _store(node, tmp_path, series)
    meta = _json_of(f"{admin.url}/dicom-web/studies/{series[0].StudyInstanceUID}/metadata")
    by_uid = {m["00080018"]["Value"][0]: m["00280106"] for m in meta}
    assert by_uid[series[0].SOPInstanceUID] == {"vr": "US", "Value": [65535]}
    assert by_uid[series[1].SOPInstanceUID] == {"vr": "SS", "Value": [-1]}
