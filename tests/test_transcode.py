"""storage.transcode: a received dataset in Explicit or Implicit VR Little Endian, losslessly,
or a clear error."""

import io

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit,
                         JPEGLSLossless, RLELossless)

from node_helpers import TESTDATA, bundled, dataset_bytes, make_series
from storage import transcode
from storage.part10 import build_file

TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _read(data: bytes, syntax: str):
    return dcmread(io.BytesIO(build_file("1.2.3", "1.2.3", syntax, data)))


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_RLE.dcm", "MR_small_implicit.dcm",
                                  "MR_small_bigendian.dcm"])
@pytest.mark.parametrize("target", TARGETS)
def test_compressed_and_other_encodings_convert_to_the_same_image(name, target):
    """The bundled MR_small in five encodings gives MR_small's pixels and elements."""
    reference = dcmread(TESTDATA / "MR_small.dcm")
    stored, data = bundled(name)
    if name == "MR_small_bigendian.dcm":            # retired: not converted (byte swapping)
        assert not transcode.convertible(stored, target)
        with pytest.raises(transcode.TranscodeError, match="cannot convert"):
            transcode.convert(data, stored, target)
        return
    out = transcode.convert(data, stored, target)
    assert (out == data) == (stored == target)
    ds = _read(out, target)
    assert ds.file_meta.TransferSyntaxUID == target
    np.testing.assert_array_equal(ds.pixel_array, reference.pixel_array)
    for keyword in ("SOPInstanceUID", "PatientName", "Rows", "BitsStored", "WindowCenter"):
        assert ds[keyword].value == reference[keyword].value, keyword


def test_colour_and_multi_frame_sources_keep_every_sample():
    for name in ("SC_rgb_rle_2frame.dcm", "rtdose_rle.dcm"):
        stored, data = bundled(name)
        original = _read(data, stored)
        ds = _read(transcode.convert(data, stored, ExplicitVRLittleEndian),
                   ExplicitVRLittleEndian)
        assert ds.get("NumberOfFrames") == original.get("NumberOfFrames")
        np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)


def test_generated_series_keep_private_and_odd_elements():
    for ds in make_series(2, 8, 8, transfer_syntax=ImplicitVRLittleEndian, seed=5):
        stored, data = dataset_bytes(ds)
        out = _read(transcode.convert(data, stored, ExplicitVRLittleEndian),
                    ExplicitVRLittleEndian)
        assert out[0x00091011].value == b"\x01\x02\x03\x00"      # padded to even length
        assert out.PixelData == ds.PixelData                 # padding byte and all


def test_lossy_syntaxes_and_others_are_refused_plainly():
    for stored in (JPEGBaseline8Bit, "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.81"):
        assert not transcode.convertible(stored, ExplicitVRLittleEndian)
    assert not transcode.convertible(ExplicitVRLittleEndian, RLELossless)   # nothing compressed
    assert transcode.convertible(JPEGLSLossless, ImplicitVRLittleEndian)
    assert transcode.choose(JPEGLSLossless, {JPEGLSLossless, ExplicitVRLittleEndian}) == \
        JPEGLSLossless                                     # as received whenever taken
    assert transcode.choose(JPEGLSLossless, {ImplicitVRLittleEndian}) == ImplicitVRLittleEndian
    assert transcode.choose(JPEGLSLossless, TARGETS) == ExplicitVRLittleEndian
    assert transcode.choose(JPEGBaseline8Bit, TARGETS) is None
    stored, data = bundled("JPEG2000.dcm")
    with pytest.raises(transcode.TranscodeError, match="cannot convert"):
        transcode.convert(data, stored, ExplicitVRLittleEndian)


def test_a_damaged_bitstream_is_an_error_not_an_image():
    stored, data = bundled("MR_small_jpeg_ls_lossless.dcm")
    start = data.index(b"\xff\xd8")                          # the JPEG-LS codestream
    damaged = data[:start + 40] + bytes(200) + data[start + 240:]
    with pytest.raises(transcode.TranscodeError):
        transcode.convert(damaged, stored, ExplicitVRLittleEndian)


def test_a_conversion_that_changes_an_element_is_refused(monkeypatch):
    """The read-back check catches a decoder that alters more than the pixel encoding (as
    pydicom's decompress does by default: a new SOP Instance UID)."""
    from pydicom.dataset import Dataset
    original = Dataset.decompress

    def renaming(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.SOPInstanceUID = "1.2.3.4"
    monkeypatch.setattr(Dataset, "decompress", renaming)
    stored, data = bundled("MR_small_RLE.dcm")
    with pytest.raises(transcode.TranscodeError, match="does not read back the same"):
        transcode.convert(data, stored, ExplicitVRLittleEndian)


def _with_sequence_and_private_text(ds):
    from pydicom.dataset import Dataset
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, "1.2.3.9"
    ds.ReferencedImageSequence = [item]
    ds.add_new(0x00091012, "LO", "50")          # VR known only from the explicit encoding
    return ds


def test_explicit_sources_keep_private_text_and_sequences_in_implicit_vr():
    """A private text element has no VR in Implicit VR (a reader sees bytes): its value bytes
    are kept and the conversion goes through; a sequence, re-encoded, keeps its values."""
    ds = _with_sequence_and_private_text(
        make_series(1, 8, 8, transfer_syntax=ExplicitVRLittleEndian, seed=6)[0])
    stored, data = dataset_bytes(ds)
    out = _read(transcode.convert(data, stored, ImplicitVRLittleEndian), ImplicitVRLittleEndian)
    assert out[0x00091012].value in (b"50", "50")
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.9"
    assert out.PixelData == ds.PixelData


def test_a_sequence_changed_in_writing_is_refused(monkeypatch):
    ds = _with_sequence_and_private_text(
        make_series(1, 8, 8, transfer_syntax=ExplicitVRLittleEndian, seed=7)[0])
    stored, data = dataset_bytes(ds)
    original = transcode._write

    def altering(ds, implicit):
        ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.10"
        return original(ds, implicit)
    monkeypatch.setattr(transcode, "_write", altering)
    with pytest.raises(transcode.TranscodeError, match="does not read back the same"):
        transcode.convert(data, stored, ImplicitVRLittleEndian)
