"""Fuzzing the C-STORE path (handle_store -> Archive.store) with malformed datasets.

Every case must end in a status, never an exception: 0x0000 only when the instance is stored and
retrievable byte-exact, otherwise a classified failure (0xC210 cannot parse, 0xA700 cannot store;
never the catch-all 0xC211) with no index row and no file left behind. Cases per run:
``VOXARC_FUZZ_EXAMPLES`` (default 250 per strategy, 3 strategies); the count is printed.
"""

import os
import struct
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import func, select

from node_helpers import dataset_bytes, make_series
from service import handlers, statuses
from storage.archive import Archive
from storage.index import Instance

EXAMPLES = int(os.environ.get("VOXARC_FUZZ_EXAMPLES", "250"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
FAILURES = {statuses.CANNOT_PARSE, statuses.OUT_OF_RESOURCES}
VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
       b"OB", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"TM", b"UI", b"UL", b"UN",
       b"US", b"UT", b"XX", b"\x00\x00"]
CASES = {"bytes": 0, "fields": 0, "vr": 0}


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    archive = Archive(tmp_path_factory.mktemp("fuzz"))
    yield archive
    archive.close()
    print(f"\nC-STORE fuzz cases run: {CASES} (max_examples={EXAMPLES} each)")


def _event(data: bytes, ts: str):
    return SimpleNamespace(
        encoded_dataset=lambda include_meta=False: data,
        context=SimpleNamespace(transfer_syntax=ts),
        request=SimpleNamespace(AffectedSOPInstanceUID=None, AffectedSOPClassUID=None),
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="FUZZ", address="x", port=0)))


def _state(archive):
    with archive.index.read() as s:
        rows = s.scalar(select(func.count(Instance.id)))
    return rows, set(archive.blobs.keys())


def _check(archive, data: bytes, ts: str) -> None:
    rows, files = _state(archive)
    status = handlers.handle_store(_event(data, ts), archive)
    after_rows, after_files = _state(archive)
    if status == statuses.SUCCESS:
        assert after_rows - rows <= 1 and len(after_files - files) <= 1
        if after_rows > rows:                                     # not a duplicate
            with archive.index.read() as s:
                uid = s.scalar(select(Instance.sop_uid).order_by(Instance.id.desc()))
            assert archive.retrieve(uid).data == data
    else:
        assert status in FAILURES, hex(status)
        assert (after_rows, after_files) == (rows, files)        # nothing partial


def _base(ts=ExplicitVRLittleEndian, frames=1, **fields):
    ds = make_series(1, 8, 8, transfer_syntax=ts)[0]
    if frames != 1:
        ds.NumberOfFrames = frames
    for name, value in fields.items():
        setattr(ds, name, value)
    return dataset_bytes(ds)


BASE = {ts: _base(ts) for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)}


@FUZZ
@given(ts=st.sampled_from(sorted(BASE)), cut=st.integers(0, 700), edits=st.lists(
    st.tuples(st.integers(0, 700), st.binary(min_size=1, max_size=8)), max_size=4),
    tail=st.binary(max_size=16))
def test_fuzz_bytes(arch, ts, cut, edits, tail):
    """Truncations, overwritten bytes (lengths, tags, values) and trailing garbage."""
    CASES["bytes"] += 1
    data = bytearray(BASE[ts][1][:max(cut, 1)] if cut < 600 else BASE[ts][1])
    for pos, chunk in edits:
        pos = pos % max(len(data), 1)
        data[pos:pos + len(chunk)] = chunk
    _check(arch, bytes(data) + tail, ts)


SIZES = st.sampled_from([0, 1, 2, 7, 8, 9, 255, 4096, 65535])


@FUZZ
@given(rows=SIZES, cols=SIZES, frames=st.sampled_from([1, 2, 0, 1000000]),
       bits=st.sampled_from([1, 8, 12, 16, 32, 64]), stored=st.sampled_from([8, 12, 16, 40]),
       samples=st.sampled_from([1, 3, 0]), pixel_delta=st.integers(-200, 200))
def test_fuzz_pixel_fields(arch, rows, cols, frames, bits, stored, samples, pixel_delta):
    """Pixel data shorter or longer than Rows x Columns x frames, inconsistent BitsAllocated,
    absurd sizes."""
    CASES["fields"] += 1
    ts, data = _base(Rows=rows, Columns=cols, frames=frames, BitsAllocated=bits,
                     BitsStored=stored, HighBit=stored - 1, SamplesPerPixel=samples)
    ds_pixels = 8 * 8 * 2
    if pixel_delta < 0:
        data = _resize_pixels(data, max(0, ds_pixels + pixel_delta))
    elif pixel_delta > 0:
        data = _resize_pixels(data, ds_pixels + pixel_delta)
    _check(arch, data, ts)


def _resize_pixels(data: bytes, length: int) -> bytes:
    """Rewrite the trailing (explicit VR, OW) Pixel Data element with ``length`` value bytes."""
    tag = struct.pack("<HH", 0x7FE0, 0x0010)
    at = data.rindex(tag)
    value = (data[at + 12:] * (length // max(len(data) - at - 12, 1) + 1))[:length]
    return data[:at] + tag + b"OW\x00\x00" + struct.pack("<I", len(value)) + value


@FUZZ
@given(hit=st.integers(0, 60), vr=st.sampled_from(VRS))
def test_fuzz_value_representations(arch, hit, vr):
    """A wrong VR written over an element's VR field (explicit VR little endian)."""
    CASES["vr"] += 1
    data = bytearray(BASE[ExplicitVRLittleEndian][1])
    spots = [i for i in range(0, len(data) - 6) if bytes(data[i + 4:i + 6]) in VRS[:-2]
             and data[i + 1] in (0, 0x7F) and data[i] % 2 == 0 or False][:61]
    pos = spots[hit % len(spots)] + 4
    data[pos:pos + 2] = vr
    _check(arch, bytes(data), ExplicitVRLittleEndian)
