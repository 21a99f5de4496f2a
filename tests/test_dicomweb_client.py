"""A real DICOMweb client against the node: `dicomweb-client` (the library 3D Slicer's DICOMweb
browser and highdicom users build on) searches, retrieves, reads metadata, frames and rendered
images, and stores, through its own HTTP and multipart handling rather than the tests' own."""

from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom import Dataset, dcmread

from admin_helpers import admin_site, http_token  # noqa: F401
from node_helpers import (TESTDATA, bundled, dataset_bytes, file_bytes, make_series,
                          with_scanner_private_elements)
from scu_helpers import store_bytes

dicomweb_client = pytest.importorskip("dicomweb_client.api")


@pytest.fixture
def http_public() -> bool:
    """dicomweb-client sends no port in its Host header: the node's URLs come from its
    ``http_public_url`` setting instead."""
    return True


@pytest.fixture
def client(admin_site, http_token, tmp_path):
    node, admin = admin_site
    series = [with_scanner_private_elements(ds) for ds in make_series(3, 16, 16, seed=41)]
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    assert store_bytes(node.port, items, tmp_path) == [0, 0, 0]
    web = dicomweb_client.DICOMwebClient(url=f"{admin.url}/dicom-web",
                                         headers={"Authorization": f"Bearer {http_token}"})
    return node, web, series


def _sent(ds):
    """The dataset as the node received it, read by pydicom."""
    return dcmread(io.BytesIO(file_bytes(ds)))


def test_search_and_retrieve(client):
    node, web, series = client
    one = series[0]
    study, uid_series = one.StudyInstanceUID, one.SeriesInstanceUID
    (found,) = web.search_for_studies(search_filters={"PatientID": "PAT1"})
    assert found["0020000D"]["Value"] == [study] and found["00201208"]["Value"] == [3]
    assert [s["0020000E"]["Value"][0] for s in web.search_for_series(study)] == [uid_series]
    assert len(web.search_for_instances(study, uid_series)) == 3
    assert len(web.search_for_studies(limit=1, offset=0)) == 1
    assert web.search_for_studies(search_filters={"PatientID": "nobody"}) == []

    by_uid = {ds.SOPInstanceUID: ds for ds in series}
    for got in web.retrieve_study(study) + web.retrieve_series(study, uid_series):
        assert got == _sent(by_uid[got.SOPInstanceUID])
    got = web.retrieve_instance(study, uid_series, one.SOPInstanceUID)
    np.testing.assert_array_equal(got.pixel_array, _sent(one).pixel_array)
    explicit = web.retrieve_instance(study, uid_series, one.SOPInstanceUID, media_types=(
        ("application/dicom", "1.2.840.10008.1.2.1"),))
    assert explicit.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert explicit == _sent(one)


def test_metadata_frames_and_rendered_images(client):
    node, web, series = client
    one = series[0]
    ids = (one.StudyInstanceUID, one.SeriesInstanceUID, one.SOPInstanceUID)
    metadata = web.retrieve_instance_metadata(*ids)
    assert metadata["00080018"]["Value"] == [one.SOPInstanceUID]
    assert metadata["00280010"]["Value"] == [16]
    assert len(web.retrieve_series_metadata(*ids[:2])) == 3
    (frame,) = web.retrieve_instance_frames(*ids, frame_numbers=[1],
                                            media_types=("application/octet-stream",))
    assert frame == bytes(one.PixelData)
    from PIL import Image
    for media_type in ("image/jpeg", "image/png"):
        image = web.retrieve_instance_rendered(*ids, media_types=(media_type,))
        assert Image.open(io.BytesIO(image)).get_format_mimetype() == media_type
        assert Image.open(io.BytesIO(image)).size == (16, 16)


def test_metadata_with_its_bulk_data_gives_the_instance_back(client):
    """pydicom builds a dataset from the metadata, fetching each BulkDataURI through the
    client: its binary values and pixels are those sent, before and after compaction."""
    node, web, series = client
    one = series[0]
    ids = (one.StudyInstanceUID, one.SeriesInstanceUID, one.SOPInstanceUID)
    sent = _sent(one)
    for _ in ("staged", "compacted"):
        fetched = []

        def bulk(uri: str) -> bytes:
            fetched.append(uri)
            return b"".join(web.retrieve_bulkdata(uri))
        ds = Dataset.from_json(web.retrieve_instance_metadata(*ids), bulk_data_uri_handler=bulk)
        assert [uri.rsplit("/", 1)[1] for uri in fetched] == ["7FE00010"]
        assert ds.PixelData == sent.PixelData
        for elem in sent:
            if elem.VR in ("OB", "OW", "UN") and elem.tag != 0x7FE00010:
                assert ds[elem.tag].value == elem.value, elem
        node.archive.compact(stable_age=0)


def test_store_through_stow(client):
    node, web, _ = client
    ct = dcmread(TESTDATA / "CT_small.dcm")
    answer = web.store_instances([ct])
    assert answer.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ct.SOPInstanceUID
    assert "FailedSOPSequence" not in answer
    back = web.retrieve_instance(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    assert back.SOPInstanceUID == ct.SOPInstanceUID
    np.testing.assert_array_equal(back.pixel_array, ct.pixel_array)
    assert node.archive.stats()["instances"] == 4


def test_a_compressed_instance_as_stored_or_decompressed_on_request(client, tmp_path):
    node, web, _ = client
    ts, data = bundled("MR_small_jpeg_ls_lossless.dcm")
    mr = dcmread(TESTDATA / "MR_small_jpeg_ls_lossless.dcm")
    assert store_bytes(node.port, [(mr.SOPClassUID, mr.SOPInstanceUID, ts, data)],
                       tmp_path) == [0]
    ids = (mr.StudyInstanceUID, mr.SeriesInstanceUID, mr.SOPInstanceUID)
    assert web.retrieve_instance(*ids).file_meta.TransferSyntaxUID == ts
    plain = web.retrieve_instance(*ids, media_types=(("application/dicom",
                                                      "1.2.840.10008.1.2.1"),))
    assert plain.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    reference = dcmread(TESTDATA / "MR_small.dcm")
    np.testing.assert_array_equal(plain.pixel_array, reference.pixel_array)
    (octets,) = web.retrieve_instance_frames(*ids, frame_numbers=[1],
                                             media_types=("application/octet-stream",))
    assert octets == reference.PixelData          # pixels, not the JPEG-LS bitstream
    (bitstream,) = web.retrieve_instance_frames(*ids, frame_numbers=[1],
                                                media_types=("image/jls",))
    assert bitstream.startswith(b"\xff\xd8")
