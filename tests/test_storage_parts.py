"""Splitting received datasets into header and pixel words, and splicing them back exactly."""

import struct

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node_helpers import BUNDLED, bundled, dataset_bytes, make_series, real_series_files
from storage.dataset_parts import join, parse_dataset, parse_fields, pixel_layout, split
from storage.errors import UnparseableDatasetError
from storage.instance_facts import INDEXED_KEYWORDS, describe
from storage.part10 import build_file, split_file


def _roundtrip(ts, data):
    layout = pixel_layout(parse_dataset(data, ts), ts)
    if layout is not None:
        before, pixels, after = split(data, layout)
        assert join(before, pixels, after) == data
    return layout


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_files_split_and_join_exactly(name):
    ts, data = bundled(name)
    _roundtrip(ts, data)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("dtype,rows,cols", [("int16", 7, 9), ("uint16", 16, 16),
                                             ("uint8", 5, 7), ("int8", 4, 4)])
def test_generated_words_are_stored_values(ts, dtype, rows, cols):
    ds = make_series(1, rows, cols, dtype=dtype, transfer_syntax=ts)[0]
    layout = _roundtrip(*dataset_bytes(ds))
    assert layout is not None and layout.dtype == dtype
    _, pixels, after = split(dataset_bytes(ds)[1], layout)
    expected = np.frombuffer(ds.PixelData[:rows * cols * np.dtype(dtype).itemsize], dtype)
    assert np.array_equal(pixels.ravel(), expected)
    assert pixels.ravel()[0] == np.iinfo(dtype).min      # no masking, no rescale
    if rows * cols * np.dtype(dtype).itemsize % 2:
        assert after.startswith(b"\x7f")                 # the padding byte is kept as received


def test_not_stackable_formats_have_no_layout():
    for name in ["MR_small_RLE.dcm", "SC_rgb_small_odd.dcm", "MR_small_bigendian.dcm",
                 "JPEG2000.dcm", "test-SR.dcm", "rtdose.dcm"]:
        ts, data = bundled(name)
        assert pixel_layout(parse_dataset(data, ts), ts) is None, name


def test_multiframe_layout():
    ts, data = bundled("MR_small.dcm")
    layout = pixel_layout(parse_dataset(data, ts), ts)
    assert layout.frames == 1
    ds = make_series(1, 8, 8)[0]
    ds.NumberOfFrames = 1
    ds.PixelData = np.arange(3 * 64, dtype=np.int16).tobytes()
    ds.NumberOfFrames = 3
    ts, data = dataset_bytes(ds)
    layout = _roundtrip(ts, data)
    assert layout.shape == (3, 8, 8)


@pytest.mark.parametrize("cut", [0.3, 0.9, 0.999])
def test_truncated_dataset_is_refused(cut):
    ts, data = dataset_bytes(make_series(1, 32, 32)[0])
    with pytest.raises(UnparseableDatasetError):
        parse_dataset(data[:int(len(data) * cut)], ts)


def test_garbage_and_unknown_syntax_are_refused():
    with pytest.raises(UnparseableDatasetError):
        parse_dataset(b"\xff" * 100, ExplicitVRLittleEndian)
    with pytest.raises(UnparseableDatasetError):
        parse_dataset(dataset_bytes(make_series(1)[0])[1], "1.2.3.4")


def test_part10_round_trip():
    ts, data = bundled("CT_small.dcm")
    again = split_file(build_file("1.2.840.10008.5.1.4.1.1.2", "1.2.3", ts, data))
    assert again == (ts, data)
    with pytest.raises(UnparseableDatasetError):
        split_file(b"not dicom" * 20)


def test_real_series_split_and_join(shared_series):
    for name in ["ct_ge_hispeed_head_tilt", "mr_enh_siemens_xa10",
                 "mr_siemens_xa30_T1w_jpegLL_frag"]:
        for path in real_series_files(shared_series("test", name), limit=5):
            ts, data = split_file(path.read_bytes())
            _roundtrip(ts, data)


def test_truncated_encapsulated_pixel_data_is_refused():
    ts, data = bundled("MR_small_RLE.dcm")
    parse_dataset(data, ts)
    with pytest.raises(UnparseableDatasetError):
        parse_dataset(data[:-20], ts)


def _with_element(tag_bytes: bytes, vr: bytes, value: bytes) -> tuple[str, bytes]:
    """Explicit VR LE dataset bytes of a generated image with one more element, written as LO
    and then given ``vr`` and ``value`` (pydicom would not write a malformed value itself)."""
    ds = make_series(1, 8, 8)[0]
    group, elem = struct.unpack("<HH", tag_bytes)
    ds.add_new((group << 16) | elem, "LO", "X")
    ts, data = dataset_bytes(ds)
    at = data.index(tag_bytes + b"LO")
    length = struct.unpack("<H", data[at + 6:at + 8])[0]
    return ts, (data[:at] + tag_bytes + vr + struct.pack("<H", len(value)) + value
                + data[at + 8 + length:])


def test_unread_malformed_value_is_kept_as_received():
    # a sequence the index never reads, with bytes that are no item: not decoded (that took
    # most of the ingest time), kept byte for byte; its length and the rest are still checked
    tag = b"\x08\x00\x40\x11"                           # Referenced Image Sequence
    ts, data = _with_element(tag, b"SQ", b"")
    at = data.index(tag + b"SQ")
    data = data[:at + 6] + b"\0\0" + struct.pack("<I", 8) + b"\xff" * 8 + data[at + 8:]
    ds = parse_dataset(data, ts, INDEXED_KEYWORDS)
    assert _roundtrip(ts, data).shape == (1, 8, 8)
    assert describe(ds).sop_uid == str(ds.SOPInstanceUID)


def test_malformed_indexed_text_is_indexed_empty():
    ts, data = dataset_bytes(make_series(1, 8, 8)[0])
    at = data.index(b"\x20\x00\x32\x00DS")                   # Image Position (Patient)
    length = struct.unpack("<H", data[at + 6:at + 8])[0]
    bad = data[:at + 8] + b"x" * length + data[at + 8 + length:]
    facts = describe(parse_dataset(bad, ts, INDEXED_KEYWORDS))
    assert facts.position is None and facts.orientation is None
    assert describe(parse_dataset(data, ts, INDEXED_KEYWORDS)).position is not None


@pytest.mark.parametrize("tag,vr,value", [
    (b"\x18\x00\x50\x00", b"US", b"\x01\x02\x03"),   # not read: structure still checked
    (b"\x18\x00\x50\x00", b"FD", b"\x00" * 6),
    (b"\x18\x00\x50\x00", b"ZZ", b"ab"),                 # unknown VR
    (b"\x20\x00\x13\x00", b"US", b"\x01"),              # Instance Number, read by the index
])
def test_element_of_wrong_structure_is_refused(tag, vr, value):
    """Unknown VR, or a binary VR whose length is no multiple of its word size."""
    ts, data = _with_element(tag, vr, value)
    for parse in (parse_dataset, parse_fields):      # the full parse and ingest's lean one
        with pytest.raises(UnparseableDatasetError):
            parse(data, ts, INDEXED_KEYWORDS)
