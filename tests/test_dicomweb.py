"""DICOMweb (service.dicomweb): QIDO-RS search and WADO-RS retrieval, metadata and frames, on a
node fed over C-STORE; retrieved datasets byte for byte, before and after compaction."""

import io
import json

import numpy as np
import pytest

from admin_helpers import admin_site, http_get, http_token, store_bundled  # noqa: F401
from admin_helpers import multipart_get as _multipart
from node_helpers import dataset_bytes, make_series
from scu_helpers import store_bytes
from storage.dataset_parts import parse_dataset, pixel_layout
from storage.part10 import split_file

TOKEN = "dicomweb-token"
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def _store(node, tmp_path, series_list) -> dict:
    """C-STORE generated series; return {SOP UID: dataset bytes}."""
    items, sent = [], {}
    for series in series_list:
        for ds in series:
            ts, data = dataset_bytes(ds)
            items.append((ds.SOPClassUID, ds.SOPInstanceUID, ts, data))
            sent[ds.SOPInstanceUID] = data
    assert set(store_bytes(node.port, items, tmp_path)) == {0}
    return sent


def _json(url: str, token: str = ""):
    status, body = http_get(url, token)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


def _value(item: dict, tag: str):
    return item[tag]["Value"][0] if "Value" in item.get(tag, {}) else None


@pytest.fixture
def web(admin_site, tmp_path):
    node, admin = admin_site
    study = make_series(4, 24, 24, patient_id="P1", patient_name="Doe^Jane", seed=1)
    second = make_series(3, 24, 24, study_uid=study[0].StudyInstanceUID, patient_id="P1",
                         modality="MR", seed=2)
    other = make_series(2, 16, 16, patient_id="P2", patient_name="Roe^Ann",
                        study_date="20250301", seed=3)
    sent = _store(node, tmp_path, [study, second, other])
    return node, f"{admin.url}/dicom-web", sent, study, second, other


def test_qido_studies_match_like_c_find(web):
    _, base, _, study, _, other = web
    everything = _json(f"{base}/studies")
    assert len(everything) == 2
    mine = next(s for s in everything if _value(s, "0020000D") == study[0].StudyInstanceUID)
    assert _value(mine, "00100020") == "P1" and mine["00100010"]["Value"][0] == {
        "Alphabetic": "Doe^Jane"}
    assert _value(mine, "00201206") == 2 and _value(mine, "00201208") == 7
    assert sorted(mine["00080061"]["Value"]) == ["CT", "MR"]
    assert _value(mine, "00081190").endswith(f"/dicom-web/studies/{study[0].StudyInstanceUID}")
    assert {_value(s, "00080056") for s in everything} == {"ONLINE"}     # availability
    assert len(_json(f"{base}/studies?InstanceAvailability=ONLINE")) == 2
    assert _json(f"{base}/instances?00080056=OFFLINE") == []
    assert [_value(s, "00100020") for s in _json(f"{base}/studies?PatientID=P2")] == ["P2"]
    assert len(_json(f"{base}/studies?00100020=P1")) == 1                  # by tag
    assert len(_json(f"{base}/studies?PatientName=roe*")) == 1             # PN: any case
    assert [_value(s, "00100020") for s in _json(
        f"{base}/studies?StudyDate=20250101-20251231")] == ["P2"]
    assert len(_json(f"{base}/studies?limit=1")) == 1
    assert len(_json(f"{base}/studies?limit=1&offset=1")) == 1
    assert _json(f"{base}/studies?offset=2") == []
    assert http_get(f"{base}/studies?NoSuchKeyword=1")[0] == 400
    assert http_get(f"{base}/studies?limit=-1")[0] == 400
    assert http_get(f"{base}/studies?PatientID=P2")[0] == 200
    assert other


def test_qido_series_and_instances(web):
    _, base, _, study, second, _ = web
    uid = study[0].StudyInstanceUID
    series = _json(f"{base}/studies/{uid}/series")
    assert sorted(_value(s, "00080060") for s in series) == ["CT", "MR"]
    assert len(_json(f"{base}/series?Modality=MR")) == 1
    instances = _json(f"{base}/studies/{uid}/series/{second[0].SeriesInstanceUID}/instances")
    assert sorted(_value(i, "00080018") for i in instances) == sorted(
        ds.SOPInstanceUID for ds in second)
    assert len(_json(f"{base}/studies/{uid}/instances")) == 7
    assert len(_json(f"{base}/instances?SOPInstanceUID={second[0].SOPInstanceUID}")) == 1
    import urllib.request
    with urllib.request.urlopen(f"{base}/studies?InstitutionName=Clinic") as response:
        assert "InstitutionName" in response.headers["Warning"]     # kept, not matched
    assert _json(f"{base}/studies?PatientName=jane") == []             # literal: whole name
    for name in ("jane", "JANE%20DOE", "do^ja", "d%C3%B6e"):          # fuzzy: words, accents
        (found,) = _json(f"{base}/studies?PatientName={name}&fuzzymatching=true")
        assert found["00100010"]["Value"][0] == {"Alphabetic": "Doe^Jane"}, name
    assert _json(f"{base}/studies?PatientName=jane&fuzzymatching=false") == []
    assert _json(f"{base}/studies?PatientName=janet&fuzzymatching=true") == []


def test_qido_includefield_adds_the_computed_attributes_asked_for(web):
    _, base, _, study, _, _ = web
    url = f"{base}/studies/{study[0].StudyInstanceUID}/series"
    assert all("00201208" not in s for s in _json(url))
    series = _json(f"{url}?includefield=NumberOfStudyRelatedInstances,00201206")
    assert [(_value(s, "00201208"), _value(s, "00201206")) for s in series] == [(7, 2)] * 2
    everything = _json(f"{base}/instances?SOPInstanceUID={study[0].SOPInstanceUID}"
                       "&includefield=all")
    assert _value(everything[0], "00201200") == 1          # the patient's studies
    assert _value(everything[0], "00201209") == 4          # the series' instances
    assert http_get(f"{url}?includefield=NoSuchKeyword")[0] == 400


@pytest.mark.parametrize("compacted", [False, True])
def test_wado_gives_every_dataset_back_byte_for_byte(web, compacted):
    node, base, sent, study, second, _ = web
    if compacted:
        assert node.archive.compact(stable_age=0)[0] == 3
    uid = study[0].StudyInstanceUID
    parts = _multipart(f"{base}/studies/{uid}")
    assert len(parts) == 7
    for ctype, data in parts:
        ts, dataset = split_file(data)
        assert ctype == f"application/dicom; transfer-syntax={ts}"
        uid_match = [k for k, v in sent.items() if v == dataset]
        assert len(uid_match) == 1
    one = second[1]
    (part,) = _multipart(f"{base}/studies/{uid}/series/{one.SeriesInstanceUID}"
                         f"/instances/{one.SOPInstanceUID}")
    assert split_file(part[1])[1] == sent[one.SOPInstanceUID]
    assert http_get(f"{base}/studies/1.2.3")[0] == 404


def test_json_answers_are_gzipped_for_clients_that_take_it(web):
    """Metadata and QIDO answers over 1400 bytes come gzip-compressed to a client that takes
    gzip (a viewer loads a series' metadata before its first image), the same JSON."""
    import gzip
    import urllib.request
    _, base, _, study, _, _ = web
    url = f"{base}/studies/{study[0].StudyInstanceUID}/metadata"

    def answer(accept_encoding: str):
        request = urllib.request.Request(url, headers={"Accept-Encoding": accept_encoding})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.headers.get("Content-Encoding"), response.read()
    plain = _json(url)
    coding, body = answer("br, gzip;q=0.8")
    assert coding == "gzip" and json.loads(gzip.decompress(body)) == plain
    assert len(body) < len(json.dumps(plain)) / 3
    for refused in ("gzip;q=0", "br", "identity"):
        coding, body = answer(refused)
        assert coding is None and json.loads(body) == plain, refused
    request = urllib.request.Request(f"{base}/studies?limit=1",
                                     headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=60) as response:     # small: as it is
        assert response.headers.get("Content-Encoding") is None


def test_metadata_and_frames(web):
    node, base, sent, study, _, _ = web
    one = study[2]
    path = f"{base}/studies/{one.StudyInstanceUID}/series/{one.SeriesInstanceUID}"
    meta = _json(f"{path}/metadata")
    assert len(meta) == 4
    mine = next(m for m in meta if _value(m, "00080018") == one.SOPInstanceUID)
    assert _value(mine, "00280010") == 24 and _value(mine, "00083002") == \
        one.file_meta.TransferSyntaxUID
    assert mine["00091011"]["InlineBinary"] == "AQIDAA=="    # small values inline, as padded
    pixels = mine["7FE00010"]
    assert pixels["vr"] == "OW" and pixels["BulkDataURI"] == \
        f"{path}/instances/{one.SOPInstanceUID}/bulkdata/7FE00010"
    ts, data = split_file(_multipart(f"{path}/instances/{one.SOPInstanceUID}")[0][1])
    layout = pixel_layout(parse_dataset(data, ts), ts)
    stored_words = data[layout.offset:layout.offset + layout.nbytes]
    assert _multipart(pixels["BulkDataURI"]) == [("application/octet-stream", stored_words)]
    assert node.archive.compact(stable_age=0)[0] == 3
    assert _json(f"{path}/metadata") == meta
    assert _multipart(pixels["BulkDataURI"]) == [("application/octet-stream", stored_words)]
    ((ctype, frame),) = _multipart(f"{path}/instances/{one.SOPInstanceUID}/frames/1")
    assert ctype == "application/octet-stream"
    assert frame == stored_words
    assert np.frombuffer(frame, np.int16).size == 24 * 24
    assert http_get(f"{path}/instances/{one.SOPInstanceUID}/frames/2")[0] == 404
    assert http_get(f"{path}/instances/{one.SOPInstanceUID}/frames/x")[0] == 400


@pytest.mark.parametrize("name, media", [("JPEG2000.dcm", "image/jp2"),
                                         ("MR_small_RLE.dcm", "image/x-dicom-rle"),
                                         ("SC_rgb_small_odd.dcm", "application/octet-stream")])
def test_frames_of_compressed_and_colour_instances_as_stored(admin_site, tmp_path, name, media):
    from pydicom import dcmread
    from pydicom.encaps import get_frame
    from storage.part10 import build_file
    node, admin = admin_site
    ds, ts, data, url = store_bundled(node, admin.url, tmp_path, name)
    ((ctype, frame),) = _multipart(f"{url}/frames/1")
    full = dcmread(io.BytesIO(build_file(ds.SOPClassUID, ds.SOPInstanceUID, ts, data)))
    assert ctype.split(";")[0] == media
    if media == "application/octet-stream":
        size = full.Rows * full.Columns * full.SamplesPerPixel * full.BitsAllocated // 8
        assert frame == full.PixelData[:size]
    else:
        assert ctype.endswith(f"transfer-syntax={ts}")
        assert frame == get_frame(full.PixelData, 0, number_of_frames=int(
            full.get("NumberOfFrames", 1) or 1))
    assert http_get(f"{url}/frames/9")[0] == 404
    ((ctype, part),) = _multipart(url)                      # the instance itself, as stored
    assert ctype.endswith(ts) and split_file(part)[1] == data


class TestToken:
    @pytest.fixture
    def http_token(self):
        return TOKEN

    def test_dicomweb_needs_the_token(self, admin_site):
        _, admin = admin_site
        assert http_get(f"{admin.url}/dicom-web/studies")[0] == 401
        assert http_get(f"{admin.url}/dicom-web/studies", token=TOKEN)[0] == 200


def _post(url: str, parts: list[bytes], ctype: str = "", token: str = ""):
    """POST files as multipart/related; return (status, JSON answer or None)."""
    import urllib.error
    import urllib.request
    boundary = "voxarc-test-boundary"
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + p + b"\r\n" for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": ctype or f'multipart/related; type="application/dicom"; '
                                 f'boundary={boundary}'})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        return exc.code, json.loads(text) if text else None


def test_stow_stores_through_the_ingest_path_and_says_what_failed(admin_site):
    from node_helpers import file_bytes
    node, admin = admin_site
    base = f"{admin.url}/dicom-web"
    series = make_series(3, 16, 16, seed=7)
    files = [file_bytes(ds) for ds in series]
    status, answer = _post(f"{base}/studies", files[:2] + [b"DICM garbage"])
    assert status == 202
    stored = answer["00081199"]["Value"]
    assert sorted(i["00081155"]["Value"][0] for i in stored) == sorted(
        ds.SOPInstanceUID for ds in series[:2])
    assert all(i["00081190"]["Value"][0].startswith(base) for i in stored)
    (failure,) = answer["00081198"]["Value"]
    assert failure["00081197"]["Value"][0] == 0xC210                  # cannot parse
    for ds in series[:2]:
        assert node.archive.retrieve(ds.SOPInstanceUID).data == dataset_bytes(ds)[1]
    study = series[0].StudyInstanceUID
    status, answer = _post(f"{base}/studies/{study}", files[2:])
    assert status == 200 and answer["00081190"]["Value"][0] == f"{base}/studies/{study}"
    other = make_series(1, 16, 16, seed=8)
    status, answer = _post(f"{base}/studies/{study}", [file_bytes(other[0])])
    assert status == 409 and answer["00081198"]["Value"][0]["00081197"]["Value"][0] == 0xA900
    assert _post(f"{base}/studies", files, ctype="application/dicom")[0] == 415
    assert _post(f"{base}/studies", files, ctype='multipart/related; type="application/dicom"'
                 )[0] == 400                                          # no boundary
    assert node.archive.stats()["instances"] == 3
    ((_, part),) = _multipart(f"{base}/studies/{study}/series/{series[2].SeriesInstanceUID}"
                              f"/instances/{series[2].SOPInstanceUID}")
    assert split_file(part)[1] == dataset_bytes(series[2])[1]


def test_rendered_images(web):
    """As Accept ranks JPEG (the default), PNG and GIF; viewport, window and quality."""
    _, base, _, study, _, _ = web
    one = study[0]
    url = (f"{base}/studies/{one.StudyInstanceUID}/series/{one.SeriesInstanceUID}"
           f"/instances/{one.SOPInstanceUID}")
    from PIL import Image
    status, png = http_get(f"{url}/rendered", accept="image/png")
    assert status == 200 and png.startswith(PNG_MAGIC)
    assert Image.open(io.BytesIO(png)).size == (24, 24)
    assert http_get(f"{url}/frames/1/rendered", accept="image/png")[1] == png
    assert http_get(f"{url}/frames/2/rendered")[0] == 404
    assert http_get(f"{url}/frames/x/rendered")[0] == 400
    for accept, magic in (("", JPEG_MAGIC), ("*/*", JPEG_MAGIC), ("image/*", JPEG_MAGIC),
                          ("image/png;q=0.4, image/jpeg", JPEG_MAGIC),
                          ("image/jpeg;q=0.4, image/png", PNG_MAGIC), ("image/gif", b"GIF8"),
                          ("image/jp2, */*;q=0.1", JPEG_MAGIC)):
        for path in ("rendered", "frames/1/rendered"):
            status, image = http_get(f"{url}/{path}", accept=accept)
            assert status == 200 and image.startswith(magic), (accept, path)
            assert _same_picture(image, png), (accept, path)
    assert http_get(f"{url}/rendered", accept="image/jp2")[0] == 406
    assert http_get(f"{url}/rendered", accept="image/jp2, image/jpeg;q=0")[0] == 406

    status, small = http_get(f"{url}/rendered?viewport=12,6", accept="image/png")
    assert status == 200 and Image.open(io.BytesIO(small)).size == (6, 6)
    low = http_get(f"{url}/rendered?quality=5")[1]
    assert len(low) < len(http_get(f"{url}/rendered?quality=100")[1])
    grey = np.asarray(Image.open(io.BytesIO(png)), dtype=float)
    for window in ("-1e9,1", "1e9,1"):                         # all white, all black
        status, image = http_get(f"{url}/rendered?window={window}", accept="image/png")
        expected = 255 if window.startswith("-") else 0
        assert status == 200 and (np.asarray(Image.open(io.BytesIO(image))) == expected).all()
    pixels = one.pixel_array.astype(float) - 1024                # the modality LUT
    center, width = float(np.median(pixels)), float(np.ptp(pixels)) / 2
    for shape in ("linear", "linear-exact", "sigmoid"):
        status, image = http_get(f"{url}/rendered?window={center},{width},{shape}",
                                 accept="image/png")
        windowed = np.asarray(Image.open(io.BytesIO(image)), dtype=float)
        assert status == 200 and windowed.shape == grey.shape, shape
        assert np.corrcoef(windowed.ravel(), pixels.ravel())[0, 1] > 0.8, shape
    for bad in ("viewport=0,5", "viewport=5", "window=40", "window=40,0",
                "window=40,0.5,linear", "window=40,80,cubic", "window=a,b", "quality=0",
                "quality=101", "quality=high"):
        assert http_get(f"{url}/rendered?{bad}")[0] == 400, bad


def _same_picture(jpeg: bytes, png: bytes) -> bool:
    """The image (a JPEG, or a GIF or PNG) shows the PNG's picture (its grey levels within a
    few steps)."""
    from PIL import Image
    a, b = (np.asarray(Image.open(io.BytesIO(x)).convert("L"), dtype=float) for x in (jpeg, png))
    return a.shape == b.shape and np.abs(a - b).mean() < 4


def test_wado_uri(web):
    _, base, sent, study, _, _ = web
    one = study[1]
    root = base.removesuffix("/dicom-web")
    url = (f"{root}/wado?requestType=WADO&studyUID={one.StudyInstanceUID}"
           f"&seriesUID={one.SeriesInstanceUID}&objectUID={one.SOPInstanceUID}")
    status, body = http_get(url + "&contentType=application/dicom")
    assert status == 200 and split_file(body)[1] == sent[one.SOPInstanceUID]
    status, jpeg = http_get(url)                        # default: image/jpeg (PS3.18)
    assert status == 200 and jpeg[:3] == JPEG_MAGIC
    assert http_get(f"{url}&contentType=image/*")[1][:3] == JPEG_MAGIC
    assert http_get(f"{url}&contentType=image/gif")[1][:4] == b"GIF8"
    for asked in ("image/png", "image/jpeg;q=0.5,image/png"):
        status, png = http_get(f"{url}&contentType={asked}")
        assert status == 200 and png[:8] == PNG_MAGIC, asked
    assert _same_picture(jpeg, png)
    assert http_get(url + "&contentType=video/mpeg")[0] == 406
    assert http_get(f"{root}/wado?requestType=WADO&objectUID=1.2.3")[0] == 404
    assert http_get(f"{root}/wado?objectUID={one.SOPInstanceUID}")[0] == 400


def test_cors_lets_a_viewer_elsewhere_call_with_its_token(tmp_path):
    import urllib.request
    from service.ae import Node
    from service.config import load_settings
    from service.web_server import start_admin
    viewer = "https://viewer.example.org"
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             http_port=0, http_token=TOKEN, http_cors_origins=viewer)
    node = Node(settings, compaction=False).start()
    admin = start_admin(node)
    try:
        url = f"{admin.url}/dicom-web/studies"
        preflight = urllib.request.Request(url, method="OPTIONS", headers={
            "Origin": viewer, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        with urllib.request.urlopen(preflight, timeout=30) as response:   # no token needed
            assert response.headers["Access-Control-Allow-Origin"] == viewer
        asked = urllib.request.Request(url, headers={"Origin": viewer,
                                                     "Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(asked, timeout=30) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == viewer
        other = urllib.request.Request(url, headers={"Origin": "https://elsewhere.example",
                                                     "Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(other, timeout=30) as response:
            assert response.headers.get("Access-Control-Allow-Origin") is None
        assert http_get(url)[0] == 401                      # the token still guards
    finally:
        admin.stop()
        node.stop()


def test_rendered_study_and_series(web):
    """Every image of a study or series rendered as its instance is, in one multipart."""
    from PIL import Image
    _, base, _, study, second, _ = web
    uid = study[0].StudyInstanceUID
    parts = _multipart(f"{base}/studies/{uid}/rendered")
    assert len(parts) == 7 and {ctype for ctype, _ in parts} == {"image/jpeg"}
    assert {Image.open(io.BytesIO(p)).size for _, p in parts} == {(24, 24)}
    series = f"{base}/studies/{uid}/series/{second[0].SeriesInstanceUID}/rendered"
    by_number = {ds.InstanceNumber: ds for ds in second}
    one = f"{base}/studies/{uid}/series/{second[0].SeriesInstanceUID}/instances"
    pngs = _multipart(f"{series}?viewport=12,12", accept="image/png")
    assert [p for _, p in pngs] == [                       # in instance number order
        http_get(f"{one}/{by_number[n].SOPInstanceUID}/rendered?viewport=12,12",
                 accept="image/png")[1] for n in sorted(by_number)]
    assert http_get(f"{base}/studies/1.2.3/rendered")[0] == 404
    assert http_get(series, accept="application/dicom")[0] == 406
    assert http_get(f"{series}?quality=0")[0] == 400


def test_thumbnails(web):
    from PIL import Image
    _, base, _, study, second, _ = web
    uid = study[0].StudyInstanceUID
    for path in (f"studies/{uid}", f"studies/{uid}/series/{second[0].SeriesInstanceUID}",
                 f"studies/{uid}/series/{second[0].SeriesInstanceUID}/instances/"
                 f"{second[0].SOPInstanceUID}"):
        status, png = http_get(f"{base}/{path}/thumbnail?viewport=20,20", accept="image/png")
        assert status == 200 and Image.open(io.BytesIO(png)).size == (20, 20), path
        status, jpeg = http_get(f"{base}/{path}/thumbnail?viewport=20,20")
        assert status == 200 and jpeg.startswith(JPEG_MAGIC) and _same_picture(jpeg, png), path
        assert http_get(f"{base}/{path}/thumbnail", accept="image/jp2")[0] == 406, path
    assert http_get(f"{base}/studies/1.2.3/thumbnail")[0] == 404
    assert http_get(f"{base}/studies/{uid}/thumbnail?viewport=big")[0] == 400


def test_frames_of_a_coded_multi_frame_instance_decode_only_their_slabs(admin_site, tmp_path,
                                                                        monkeypatch):
    """A viewer walking a 40-frame instance (5 slabs) frame by frame: frames 3 and 17 decode
    slabs 1 and 3 only, each frame the instance's own words for it; outside it: 404."""
    import models
    node, admin = admin_site
    (ds,) = make_series(1, 32, 32, seed=12)
    frames = 40
    volume = (np.random.default_rng(4).integers(-30, 30, (frames, 32, 32))
              + np.arange(frames)[:, None, None]).astype(np.int16)
    ds.NumberOfFrames, ds.PixelData = frames, volume.tobytes()
    _store(node, tmp_path, [[ds]])
    assert node.archive.compact(stable_age=0) == (1, 0)
    decoded, decode_stream, decode_slices = [], models.decode_stream, models.decode_slices

    def stream(*args, **kwargs):
        decoded.append(args[1:3])
        yield from decode_stream(*args, **kwargs)
    monkeypatch.setattr(models, "decode_stream", stream)
    monkeypatch.setattr(models, "decode_slices",
                        lambda *a, **k: decoded.append(a[1:3]) or decode_slices(*a, **k))
    url = (f"{admin.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}")
    parts = _multipart(f"{url}/frames/3,17")
    assert [c for c, _ in parts] == ["application/octet-stream"] * 2
    assert [p for _, p in parts] == [volume[2].tobytes(), volume[16].tobytes()]
    assert sorted(decoded) == [(0, 8), (16, 24)]
    assert http_get(f"{url}/frames/41")[0] == 404
