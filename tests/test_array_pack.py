"""The packed form of an adapted model's arrays (models/array_pack.py): exact round trips,
smaller than an npz, and a clear error for anything damaged or forged."""

from __future__ import annotations

import json
import lzma

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import adapt, array_pack
from models.container import CorruptBlobError
from models.registry import load_model

DTYPES = ["int8", "uint8", "<i2", ">i2", "uint16", "int32", "uint32", "int64"]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 31),
       shapes=st.lists(st.lists(st.integers(0, 7), max_size=3), min_size=0, max_size=5),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=5, max_size=5))
def test_packed_arrays_come_back_exactly(seed, shapes, dtypes):
    rng = np.random.default_rng(seed)
    arrays = {}
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes)):
        native = np.dtype(dtype).newbyteorder("=")
        info = np.iinfo(native)
        arrays[f"a{i}"] = rng.integers(info.min, info.max, tuple(shape), dtype=native,
                                       endpoint=True).astype(dtype)
    back = array_pack.unpack_arrays(array_pack.pack_arrays(arrays))
    assert sorted(back) == sorted(arrays)
    for name, a in arrays.items():
        assert back[name].shape == a.shape and back[name].dtype == a.dtype.newbyteorder("=")
        np.testing.assert_array_equal(back[name], a)


def test_float_arrays_are_not_packed():
    with pytest.raises(array_pack.PackError):
        array_pack.pack_arrays({"x": np.zeros(3, np.float32)})


def _forged(meta, body: bytes) -> bytes:
    head = json.dumps(meta).encode()
    return array_pack.MAGIC + lzma.compress(len(head).to_bytes(4, "little") + head + body,
                                            format=lzma.FORMAT_RAW,
                                            filters=array_pack._FILTERS)


@pytest.mark.parametrize("data", [
    array_pack.MAGIC,                                                 # no stream
    array_pack.MAGIC + b"\x00" * 40,                                  # not LZMA2
    _forged([["a", "<i2", [3]]], b"\x00" * 5),                        # arrays past the stream
    _forged([["a", "<i2", [3]]], b"\x00" * 8),                        # more than the arrays
    _forged([["a", "<f4", [1]]], b"\x00" * 4),                        # not an integer type
    _forged([["a", "<i8", [1 << 20, 1 << 20]]], b""),                 # a forged huge shape
    _forged({"a": 1}, b""),                                           # not a list
    _forged([["a", "<i2"]], b""),                                     # an entry cut short
])
def test_damaged_or_forged_packs_are_refused(data):
    with pytest.raises(array_pack.PackError):
        array_pack.unpack_arrays(data)
    with pytest.raises(CorruptBlobError, match="adapted model"):
        adapt.with_embedded(load_model("default"), data)


def test_a_cut_or_flipped_embedded_model_never_loads_silently_wrong():
    """Every truncation of a real embedded model is refused; a flipped byte is refused or, at
    worst, changes what the blob's CRC would already have caught (it never raises anything but
    the corrupt-blob error)."""
    base = load_model("default")
    data = adapt.embedded_bytes(base)
    assert array_pack.is_packed(data)
    for cut in range(len(array_pack.MAGIC), len(data), max(1, len(data) // 40)):
        with pytest.raises(CorruptBlobError):
            adapt.with_embedded(base, data[:cut])
    rng = np.random.default_rng(0)
    for pos in rng.integers(len(array_pack.MAGIC), len(data), 40):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        try:
            adapt.with_embedded(base, bytes(flipped))
        except CorruptBlobError:
            pass
