"""Splitting received datasets into header and pixel words, and splicing them back exactly."""

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node_helpers import BUNDLED, bundled, dataset_bytes, make_series, real_series_files
from storage.dataset_parts import join, parse_dataset, pixel_layout, split
from storage.errors import UnparseableDatasetError
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
