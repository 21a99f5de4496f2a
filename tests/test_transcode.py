"""storage.transcode: a received dataset in Explicit or Implicit VR Little Endian, losslessly,
or a clear error."""

import io

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit,
                         JPEGLSLossless, RLELossless)

from node_helpers import (TESTDATA, bundled, dataset_bytes, iod_errors, make_series,
                          needs_dciodvfy, real_series_files, with_scanner_private_elements)
from storage import transcode
from storage.dataset_parts import parse_dataset
from storage.part10 import build_file, split_file

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


def test_private_elements_whose_vr_implicit_vr_drops_convert_both_ways():
    """Real scanners' private elements that Implicit VR gives another VR or none: empty ones
    (read back as None under one VR and '' under another), one written as OB that a private
    dictionary calls UI, private text inside a sequence item. Their bytes are the same, so the
    conversion goes through, and back to Explicit VR as well."""
    ds = with_scanner_private_elements(
        make_series(1, 8, 8, transfer_syntax=ExplicitVRLittleEndian, seed=8)[0])
    stored, data = dataset_bytes(ds)
    implicit = transcode.convert(data, stored, ImplicitVRLittleEndian)
    out = _read(implicit, ImplicitVRLittleEndian)
    assert out[0x00651031].value in (b"T1 ", b"T1", "T1")
    assert out[0x52009229][0][0x0019100C].value in (b"1000", "1000", 1000)
    assert out.PixelData == ds.PixelData
    back = _read(transcode.convert(implicit, ImplicitVRLittleEndian, ExplicitVRLittleEndian),
                 ExplicitVRLittleEndian)
    assert back.PixelData == ds.PixelData and back.SOPInstanceUID == ds.SOPInstanceUID


def _new_errors(ts: str, data: bytes, target: str, tmp_path) -> list[str]:
    """dciodvfy's errors of the dataset converted to ``target`` that it does not report of the
    dataset as received (both as the Part 10 files the node writes)."""
    ds = parse_dataset(data, ts)
    files = []
    for syntax, dataset in ((ts, data), (target, transcode.convert(data, ts, target))):
        path = tmp_path / f"{len(files)}.dcm"
        path.write_bytes(build_file(ds.SOPClassUID, ds.SOPInstanceUID, syntax, dataset))
        files.append(path)
    (iods, received), (iods_out, sent) = iod_errors(files[0]), iod_errors(files[1])
    assert iods_out == iods and iods
    return sorted(sent - received)


@needs_dciodvfy
@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm",
                                  "MR_small_implicit.dcm", "CT_small.dcm"])
@pytest.mark.parametrize("target", TARGETS)
def test_conversions_add_nothing_dciodvfy_calls_an_error(name, target, tmp_path):
    """What a peer gets converted is as valid an instance as what was received, by dicom3tools'
    IOD checker (decompressed pixels with their Photometric Interpretation, Pixel Data's VR)."""
    stored, data = bundled(name)
    assert _new_errors(stored, data, target, tmp_path) == []


def _first_instance(folder) -> tuple[str, bytes]:
    """The first image of a series folder (not the phantom's DICOMDIR)."""
    for path in real_series_files(folder):
        stored, data = split_file(path.read_bytes())
        if "SOPClassUID" in parse_dataset(data, stored):
            return stored, data
    raise AssertionError(f"no image in {folder}")


@needs_dciodvfy
def test_conversions_of_real_scanners_instances_add_nothing_dciodvfy_calls_an_error(
        shared_series, tmp_path):
    """The first instance of every test series (six scanner makes, enhanced multi-frame MRs,
    JPEG 2000 and JPEG Lossless fragments), converted to each uncompressed syntax."""
    checked = 0
    for folder in sorted(shared_series("test", "mr_uih_t1_3d_sag_B").parent.iterdir()):
        stored, data = _first_instance(folder)
        for target in TARGETS:
            assert _new_errors(stored, data, target, tmp_path) == [], (folder.name, target)
            checked += 1
    assert checked >= 2 * 11
