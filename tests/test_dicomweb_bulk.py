"""WADO-RS bulk data (service.dicom_json, service.dicomweb): metadata names large binary values
and the pixel data by BulkDataURI, and each URI gives back the value as received, before and
after compaction, in sequences too."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import get_frame
from pydicom.uid import ImplicitVRLittleEndian

from admin_helpers import admin_site, http_get, http_token, store_bundled  # noqa: F401
from admin_helpers import multipart_get as _multipart
from node_helpers import dataset_bytes, make_series
from scu_helpers import store_bytes
from storage.part10 import build_file

CSA = 0x00291010


def _with_bulk_elements(ds: Dataset, seed: int) -> Dataset:
    """``ds`` with a large private blob (as a Siemens CSA header is), a small binary value and
    an icon image (the same in every instance) in a sequence."""
    rng = np.random.default_rng(seed)
    ds.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    ds.add_new(CSA, "OB", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    ds.add_new(0x00291020, "OB", bytes(range(100)))
    icon = Dataset()
    icon.Rows = icon.Columns = 40
    icon.SamplesPerPixel, icon.BitsAllocated, icon.BitsStored, icon.HighBit = 1, 8, 8, 7
    icon.PhotometricInterpretation, icon.PixelRepresentation = "MONOCHROME2", 0
    icon.PixelData = bytes(range(40)) * 40
    icon["PixelData"].VR = "OB"
    ds.IconImageSequence = [icon]
    return ds


def _series(transfer_syntax: str, seed: int) -> list[Dataset]:
    series = make_series(3, 32, 32, transfer_syntax=transfer_syntax, seed=seed)
    return [_with_bulk_elements(ds, seed + k) for k, ds in enumerate(series)]


@pytest.fixture(params=["explicit", "implicit"])
def stored(request, admin_site, tmp_path):
    node, admin = admin_site
    syntax = ImplicitVRLittleEndian if request.param == "implicit" else \
        "1.2.840.10008.1.2.1"
    series = _series(syntax, seed=7)
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    assert store_bytes(node.port, items, tmp_path) == [0, 0, 0]
    one = series[0]
    url = (f"{admin.url}/dicom-web/studies/{one.StudyInstanceUID}/series/"
           f"{one.SeriesInstanceUID}")
    return node, url, series


def _by_uid(meta: list) -> dict:
    return {m["00080018"]["Value"][0]: m for m in meta}


def test_large_values_and_pixels_go_by_uri_and_come_back_as_received(stored):
    node, url, series = stored
    for compacted in (False, True):
        if compacted:
            assert node.archive.compact(stable_age=0) == (1, 0)     # one series
        status, body = http_get(f"{url}/metadata")
        assert status == 200
        meta = _by_uid(json.loads(body))
        for ds in series:
            item, own = meta[ds.SOPInstanceUID], f"{url}/instances/{ds.SOPInstanceUID}"
            csa = item["00291010"]
            assert csa["BulkDataURI"] == f"{own}/bulkdata/00291010"
            assert csa["vr"] in ("OB", "UN")             # implicit VR: as pydicom reads it
            ((headers, value),) = _multipart(csa["BulkDataURI"], headers_too=True)
            assert (headers["Content-Type"], value) == ("application/octet-stream",
                                                        ds[CSA].value)
            assert headers["Content-Location"] == csa["BulkDataURI"]     # PS3.18
            assert base64.b64decode(item["00291020"]["InlineBinary"]) == bytes(range(100))
            icon = item["00880200"]["Value"][0]["7FE00010"]
            # the same icon in every instance, each named under its own instance
            assert icon["BulkDataURI"] == f"{own}/bulkdata/00880200/1/7FE00010"
            assert _multipart(icon["BulkDataURI"])[0][1] == bytes(range(40)) * 40
            pixels = _multipart(item["7FE00010"]["BulkDataURI"])
            assert pixels == [("application/octet-stream", ds.PixelData)]


def test_bulk_data_paths_that_name_nothing(stored):
    node, url, series = stored
    own = f"{url}/instances/{series[0].SOPInstanceUID}/bulkdata"
    for path in ("zz", "0029101", "00880200/0/7FE00010", "00880200/1", "00880200/x/7FE00010"):
        assert http_get(f"{own}/{path}")[0] == 400, path
    for path in ("00291030", "00880200/2/7FE00010", "00291010/1/7FE00010", "00100010",
                 "00880200/1/00280010"):                  # none, or not binary
        assert http_get(f"{own}/{path}")[0] == 404, path
    assert http_get(f"{url}/instances/1.2.3/bulkdata/00291010")[0] == 404
    assert http_get(f"{own}/00291010", accept="image/png")[0] == 406
    assert http_get(f"{own}/00291010", accept='multipart/related; type="*/*"')[0] == 200
    # pixel data follows the frames' rules: stored uncompressed, not given as JPEG-LS
    assert http_get(f"{own}/7FE00010",
                    accept='multipart/related; type="image/jls"')[0] == 406


def test_pixel_data_of_a_compressed_instance_is_its_frames(admin_site, tmp_path):
    node, admin = admin_site
    ds, ts, data, url = store_bundled(node, admin.url, tmp_path, "JPEG2000.dcm")
    status, body = http_get(f"{url}/metadata")
    (item,) = json.loads(body)
    assert item["7FE00010"] == {"vr": "OB", "BulkDataURI": f"{url}/bulkdata/7FE00010"}
    full = dcmread(io.BytesIO(build_file(ds.SOPClassUID, ds.SOPInstanceUID, ts, data)))
    ((ctype, frame),) = _multipart(item["7FE00010"]["BulkDataURI"])
    assert ctype == f"image/jp2; transfer-syntax={ts}"
    assert frame == get_frame(full.PixelData, 0, number_of_frames=1)


def test_float_pixel_data_goes_by_uri_too(admin_site, tmp_path):
    """A parametric map's Float Pixel Data (kept as received: the codec takes integers)."""
    node, admin = admin_site
    (ds,) = make_series(1, 8, 8, seed=3)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.30"
    del ds.PixelData, ds.PixelRepresentation, ds.HighBit
    ds.BitsAllocated = ds.BitsStored = 32
    values = np.linspace(-1.5, 2.5, 64, dtype="<f4")
    ds.FloatPixelData = values.tobytes()
    assert store_bytes(node.port, [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds))],
                       tmp_path) == [0]
    url = (f"{admin.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
           f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    (item,) = json.loads(http_get(f"{url}/metadata")[1])
    assert item["7FE00008"] == {"vr": "OF", "BulkDataURI": f"{url}/bulkdata/7FE00008"}
    assert _multipart(item["7FE00008"]["BulkDataURI"]) == [("application/octet-stream",
                                                           values.tobytes())]


def test_an_instance_without_pixel_data(admin_site, tmp_path):
    """A report (no pixel data): no Pixel Data entry in its metadata, and its path is a 404."""
    node, admin = admin_site
    (ds,) = make_series(1, 8, 8, seed=4)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    del ds.PixelData
    assert store_bytes(node.port, [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds))],
                       tmp_path) == [0]
    url = (f"{admin.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
           f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    (item,) = json.loads(http_get(f"{url}/metadata")[1])
    assert "7FE00010" not in item and item["00080018"]["Value"] == [ds.SOPInstanceUID]
    assert http_get(f"{url}/bulkdata/7FE00010")[0] == 404


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", ImplicitVRLittleEndian])
def test_elements_after_the_pixel_data_are_in_the_metadata(admin_site, tmp_path, syntax):
    """A private group after Pixel Data (GE writes 7FE1) is in the metadata, its large value
    by BulkDataURI, before and after compaction; Data Set Trailing Padding is left out."""
    node, admin = admin_site
    series = make_series(3, 16, 16, transfer_syntax=syntax, seed=12)
    blobs = [np.random.default_rng(k).integers(0, 256, 3000, dtype=np.uint8).tobytes()
             for k in range(3)]
    for ds, blob in zip(series, blobs):
        ds.add_new(0x7FE10010, "LO", "VOXARC TRAILING TEST")
        ds.add_new(0x7FE11001, "OB", blob)
        ds.add_new(0x7FE11002, "LO", "after the pixels")
        ds.add_new(0xFFFCFFFC, "OB", b"\0" * 16)
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    assert all(data.index(b"after the pixels") > data.index(ds.PixelData)
               for ds, (_, _, _, data) in zip(series, items))
    assert store_bytes(node.port, items, tmp_path) == [0, 0, 0]
    url = (f"{admin.url}/dicom-web/studies/{series[0].StudyInstanceUID}/series/"
           f"{series[0].SeriesInstanceUID}")
    for compacted in (False, True):
        if compacted:
            assert node.archive.compact(stable_age=0) == (1, 0)
        meta = _by_uid(json.loads(http_get(f"{url}/metadata")[1]))
        for ds, blob in zip(series, blobs):
            item = meta[ds.SOPInstanceUID]
            text = item["7FE11002"]          # implicit VR: an unknown private tag is UN
            assert text.get("Value") == ["after the pixels"] or \
                base64.b64decode(text["InlineBinary"]) == b"after the pixels", compacted
            assert item["7FE10010"]["Value"] == ["VOXARC TRAILING TEST"]
            assert "FFFCFFFC" not in item
            assert _multipart(item["7FE11001"]["BulkDataURI"]) == \
                [("application/octet-stream", blob)]
            assert _multipart(item["7FE00010"]["BulkDataURI"]) == \
                [("application/octet-stream", ds.PixelData)]
