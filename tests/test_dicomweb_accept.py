"""DICOMweb content negotiation (service.dicomweb_accept): instances go out as stored unless
the client names transfer syntaxes; then one of those (converted losslessly to Explicit VR
Little Endian when it is the one named), or 406."""

import io
import urllib.error
import urllib.request

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from admin_helpers import admin_site, http_get, http_token, metric, store_bundled  # noqa: F401
from node_helpers import TESTDATA, bundled, dataset_bytes, make_series
from scu_helpers import store_bytes
from service.dicomweb_accept import NotAcceptable, accepted_syntaxes, syntax_for
from test_dicomweb import _multipart

EXPLICIT = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'


def test_accept_headers_name_syntaxes_or_leave_them_open():
    assert accepted_syntaxes(None) is None and accepted_syntaxes("*/*") is None
    assert accepted_syntaxes('multipart/related; type="application/dicom"') is None
    assert accepted_syntaxes(
        'multipart/related; type="application/dicom"; transfer-syntax=*') is None
    assert accepted_syntaxes(EXPLICIT) == {ExplicitVRLittleEndian}
    assert accepted_syntaxes(
        f'{EXPLICIT}, multipart/related; type=application/dicom; '
        'transfer-syntax=1.2.840.10008.1.2.4.50; q=0.5') == \
        {ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.50"}
    # an entry with q=0 is refused, not offered
    assert accepted_syntaxes(f'{EXPLICIT}, multipart/related; type="application/dicom"; q=0') \
        == {ExplicitVRLittleEndian}
    with pytest.raises(NotAcceptable):
        accepted_syntaxes("application/dicom+json")
    assert syntax_for(ImplicitVRLittleEndian, {ExplicitVRLittleEndian}) == ExplicitVRLittleEndian
    assert syntax_for("1.2.840.10008.1.2.4.90", {ExplicitVRLittleEndian}) == \
        ExplicitVRLittleEndian                      # JPEG 2000 lossless: decompressed
    with pytest.raises(NotAcceptable):              # JPEG 2000 that may be lossy: never
        syntax_for("1.2.840.10008.1.2.4.91", {ExplicitVRLittleEndian})


def _store(node, tmp_path, datasets):
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in datasets]
    assert set(store_bytes(node.port, items, tmp_path)) == {0}


def test_implicit_vr_instances_go_out_as_explicit_vr_when_asked(admin_site, tmp_path):
    node, admin = admin_site
    series = make_series(3, 16, 16, transfer_syntax=ImplicitVRLittleEndian, seed=41)
    _store(node, tmp_path, series)
    assert node.archive.compact(stable_age=0) == (1, 0)
    url = f"{admin.url}/dicom-web/studies/{series[0].StudyInstanceUID}"
    as_stored = {dcmread(io.BytesIO(b)).SOPInstanceUID: (c, b) for c, b in _multipart(url)}
    asked = _multipart(url, EXPLICIT)
    assert len(asked) == 3 and len(as_stored) == 3
    for ctype, body in asked:
        assert ctype == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
        ds = dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        stored_type, stored = as_stored[ds.SOPInstanceUID]
        assert stored_type.endswith(ImplicitVRLittleEndian)
        original = dcmread(io.BytesIO(stored))
        assert [e.tag for e in ds] == [e.tag for e in original]
        assert all(ds[e.tag].value == e.value for e in original if e.VR != "SQ")
        np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
    star = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    assert {dcmread(io.BytesIO(b)).SOPInstanceUID: b for _, b in _multipart(url, star)} == \
        {uid: b for uid, (_, b) in as_stored.items()}          # '*': byte for byte as stored


def test_a_syntax_the_node_cannot_make_is_a_406(admin_site, tmp_path):
    node, admin = admin_site
    ds, ts, data, _ = store_bundled(node, admin.url, tmp_path, "JPEG2000.dcm")
    study = f"{admin.url}/dicom-web/studies/{ds.StudyInstanceUID}"
    for accept in (EXPLICIT, "application/dicom+json"):
        request = urllib.request.Request(study, headers={"Accept": accept})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 406
    ((ctype, _),) = _multipart(study, f'multipart/related; type="application/dicom"; '
                                      f'transfer-syntax={ts}')
    assert ctype.endswith(ts)
    wado = (f"{admin.url}/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}"
            f"&seriesUID={ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}"
            f"&contentType=application/dicom")
    assert http_get(f"{wado}&transferSyntax={ExplicitVRLittleEndian}")[0] == 406
    status, body = http_get(wado)
    assert status == 200 and dcmread(io.BytesIO(body)).file_meta.TransferSyntaxUID == ts


def test_frames_go_out_as_stored_unless_the_client_names_only_other_syntaxes(admin_site,
                                                                            tmp_path):
    node, admin = admin_site
    plain = make_series(1, 8, 8, transfer_syntax=ImplicitVRLittleEndian, seed=42)
    _store(node, tmp_path, plain)
    ds, ts, _, jpeg = store_bundled(node, admin.url, tmp_path, "JPEG2000.dcm")
    jpeg += "/frames/1"
    base = f"{admin.url}/dicom-web/studies"
    one = plain[0]
    raw = (f"{base}/{one.StudyInstanceUID}/series/{one.SeriesInstanceUID}/instances/"
           f"{one.SOPInstanceUID}/frames/1")
    octets = 'multipart/related; type="application/octet-stream"'
    uncompressed = f"{octets}; transfer-syntax={ExplicitVRLittleEndian}"

    def status(url, accept):
        request = urllib.request.Request(url, headers={"Accept": accept})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
    for accept in (uncompressed, octets):             # a lossy bitstream is not decoded
        assert status(jpeg, accept) == 406, accept     # (octets: Explicit VR by default)
    for accept in ("", f"{octets}; transfer-syntax=*", "*/*", "multipart/related",
                   f'multipart/related; type="image/jp2"; transfer-syntax={ts}'):
        assert status(jpeg, accept) == 200, accept
    for accept in (uncompressed, octets):              # implicit VR: the same pixel bytes
        assert status(raw, accept) == 200, accept
    for accept in ('multipart/related; type="image/jpeg"; '
                   'transfer-syntax=1.2.840.10008.1.2.4.50', 'multipart/related; type="image/jls"',
                   "image/jls"):
        assert status(raw, accept) == 406, accept      # nothing is compressed


def _conversions(admin, stored: str) -> float:
    """voxarc_conversions_total of ``stored`` to Explicit VR Little Endian, made."""
    status, body = http_get(f"{admin.url}/metrics")
    assert status == 200
    return metric(body.decode(), "voxarc_conversions_total", from_syntax=stored,
                  to_syntax=ExplicitVRLittleEndian, result="ok")


def test_a_lossless_compressed_instance_goes_out_decompressed_when_asked(admin_site, tmp_path):
    """JPEG 2000 lossless and JPEG-LS lossless to a client naming Explicit VR Little Endian only
    (WADO-RS and WADO-URI): the same image, the same elements; as stored otherwise."""
    node, admin = admin_site
    reference = dcmread(TESTDATA / "MR_small.dcm")
    for name in ("MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        made = _conversions(admin, bundled(name)[0])
        ds, ts, data, instance = store_bundled(node, admin.url, tmp_path, name)
        ((ctype, body),) = _multipart(instance, EXPLICIT)
        assert ctype.endswith(ExplicitVRLittleEndian)
        wado = (f"{admin.url}/wado?requestType=WADO&objectUID={ds.SOPInstanceUID}"
                f"&contentType=application/dicom&transferSyntax={ExplicitVRLittleEndian}")
        status, uri_body = http_get(wado)
        assert status == 200 and uri_body == body
        got = dcmread(io.BytesIO(body))
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got.SOPInstanceUID == reference.SOPInstanceUID
        np.testing.assert_array_equal(got.pixel_array, reference.pixel_array)
        ((ctype, body),) = _multipart(instance)                 # no syntax named: as stored
        assert ctype.endswith(ts) and body.endswith(data)
        assert _conversions(admin, ts) == made + 2               # WADO-RS and WADO-URI
        node.archive.delete("study", ds.StudyInstanceUID)     # the next has the same UIDs


def test_lossless_compressed_frames_are_decoded_when_only_uncompressed_is_named(admin_site,
                                                                                tmp_path):
    """Frames of a JPEG-LS lossless instance: the bitstream as stored by default, its decoded
    stored words (MR_small's pixel bytes) when only Explicit VR Little Endian is named; RGB
    frames of a JPEG Lossless instance too, but not a JPEG 2000 instance's YBR_RCT frames
    (they decode to RGB)."""
    node, admin = admin_site
    reference = dcmread(TESTDATA / "MR_small.dcm")
    _, ts, _, mr = store_bundled(node, admin.url, tmp_path, "MR_small_jpeg_ls_lossless.dcm")
    _, _, _, rgb = store_bundled(node, admin.url, tmp_path, "SC_rgb_jpeg_gdcm.dcm")
    _, _, _, rct = store_bundled(node, admin.url, tmp_path, "GDCMJ2K_TextGBR.dcm")
    mr, rgb, rct = mr + "/frames/1", rgb + "/frames/1", rct + "/frames/1"
    uncompressed = ('multipart/related; type="application/octet-stream"; '
                    f'transfer-syntax={ExplicitVRLittleEndian}')
    ((ctype, body),) = _multipart(mr, uncompressed)
    assert ctype == f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
    assert body == reference.PixelData
    ((ctype, body),) = _multipart(mr)
    assert ctype.endswith(ts) and body.startswith(b"\xff\xd8")       # the JPEG-LS bitstream
    ((ctype, same),) = _multipart(mr, 'multipart/related; type="image/jls"')
    assert ctype.endswith(ts) and same == body                         # its default syntax
    ((ctype, body),) = _multipart(mr, 'multipart/related; type="application/octet-stream"')
    assert ctype == f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
    assert body == reference.PixelData           # octets named alone: Explicit VR's pixels
    ((ctype, body),) = _multipart(rgb, uncompressed)
    assert body == dcmread(TESTDATA / "SC_rgb_jpeg_gdcm.dcm").pixel_array.tobytes()
    request = urllib.request.Request(rct, headers={"Accept": uncompressed})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 406


@pytest.mark.parametrize("name", ["SC_rgb_rle_2frame.dcm", "SC_rgb_rle_16bit_2frame.dcm"])
def test_colour_frames_are_decoded_in_their_own_colour_space(admin_site, tmp_path, name):
    """RGB frames of an RLE instance asked for uncompressed: each frame's words as pydicom
    reads them from the file, in the layout its Planar Configuration names (0: interleaved)."""
    node, admin = admin_site
    reference = dcmread(TESTDATA / name)
    assert reference.PlanarConfiguration == 0 and reference.NumberOfFrames == 2
    _, _, _, instance = store_bundled(node, admin.url, tmp_path, name)
    uncompressed = ('multipart/related; type="application/octet-stream"; '
                    f'transfer-syntax={ExplicitVRLittleEndian}')
    frames = _multipart(instance + "/frames/2,1", uncompressed)
    want = reference.pixel_array.astype(reference.pixel_array.dtype.newbyteorder("<"))
    assert [body for _, body in frames] == [want[1].tobytes(), want[0].tobytes()]
    assert len(frames[0][1]) == reference.Rows * reference.Columns * 3 * \
        reference.BitsAllocated // 8
