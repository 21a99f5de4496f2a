"""Fuzzing the codec's decoder with corrupted blobs: every case either raises
``models.CorruptBlobError`` or gives back exactly the encoded voxels; never another exception,
never wrong voxels. Cases: ``VOXARC_FUZZ_EXAMPLES`` (default 250 per test); the count is printed.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models

EXAMPLES = int(os.environ.get("VOXARC_FUZZ_EXAMPLES", "250"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
RNG = np.random.default_rng(6)
VOLUME = (RNG.integers(-40, 40, (12, 24, 24)) + np.arange(24) * 30).astype(np.int16)
BLOB = models.encode_volume(VOLUME)
CASES = {"whole": 0, "slices": 0, "wrong_voxels": 0, "errors": 0}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(f"\ndecode fuzz cases run: {CASES} (max_examples={EXAMPLES} per test)")


def _corrupt(flips, cut, tail) -> bytes:
    data = bytearray(BLOB[:cut] if cut < len(BLOB) else BLOB)
    for pos, bit in flips:
        if data:
            data[pos % len(data)] ^= 1 << bit
    return bytes(data) + tail


MUTATIONS = dict(
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)), max_size=6),
    cut=st.one_of(st.just(1 << 30), st.integers(0, len(BLOB))),
    tail=st.binary(max_size=8))


def _decoded_or_error(decode, expected) -> None:
    try:
        got = decode()
    except models.CorruptBlobError:
        CASES["errors"] += 1
        return
    if got.dtype != expected.dtype or not np.array_equal(got, expected):
        CASES["wrong_voxels"] += 1
        raise AssertionError("a corrupted blob decoded to wrong voxels")


@FUZZ
@given(**MUTATIONS)
def test_decode_volume_never_wrong(flips, cut, tail):
    CASES["whole"] += 1
    blob = _corrupt(flips, cut, tail)
    _decoded_or_error(lambda: models.decode_volume(blob), VOLUME)


@FUZZ
@given(start=st.integers(0, 11), length=st.integers(1, 12), **MUTATIONS)
def test_decode_slices_never_wrong(start, length, flips, cut, tail):
    CASES["slices"] += 1
    blob = _corrupt(flips, cut, tail)
    stop = min(12, start + length)
    _decoded_or_error(lambda: models.decode_slices(blob, start, stop), VOLUME[start:stop])


def test_single_bit_flips_across_the_blob_are_caught():
    """A flipped bit at about 300 positions spread over header, slab table and payloads."""
    positions = range(0, len(BLOB), max(1, len(BLOB) // 300))
    for pos in positions:
        blob = bytearray(BLOB)
        blob[pos] ^= 0x01
        with pytest.raises(models.CorruptBlobError):
            models.decode_volume(bytes(blob))
    CASES["errors"] += len(positions)
