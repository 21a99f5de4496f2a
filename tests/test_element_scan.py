"""storage.element_scan and parse_fields: the lean ingest parse agrees with pydicom's full one."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node_helpers import BUNDLED, bundled, dataset_bytes, make_series, real_series_files
from storage.dataset_parts import parse_dataset, parse_fields, pixel_layout
from storage.element_scan import scan
from storage.errors import UnparseableDatasetError
from storage.instance_facts import INDEXED_KEYWORDS, describe
from storage.part10 import split_file

FUZZ = settings(max_examples=int(os.environ.get("VOXARC_FUZZ_EXAMPLES", "250")), deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow])


def _outcome(parse, data: bytes, ts: str):
    """What ingest takes from a parse: the index facts and the pixel layout, or the refusal."""
    try:
        ds = parse(data, ts, INDEXED_KEYWORDS)
    except UnparseableDatasetError:
        return "refused"
    try:
        return describe(ds), pixel_layout(ds, ts)
    except UnparseableDatasetError:
        return "no uids"


def _with_sequences(ts: str) -> tuple[str, bytes]:
    """A generated instance with nested undefined-length sequences (implicit VR: UN items)."""
    ds = make_series(1, 6, 5, transfer_syntax=ts)[0]
    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "T-A0100", "Brain"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.AnatomicRegionSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.add_new(0x00091010, "UN", b"\x01\x02\x03\x04")
    for seq in (ds.ReferencedImageSequence, item.AnatomicRegionSequence):
        seq.is_undefined_length = True
    for it in (item, inner):
        it.is_undefined_length_sequence_item = True
    return dataset_bytes(ds)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_files_give_what_the_full_parse_gives(name):
    ts, data = bundled(name)
    assert _outcome(parse_fields, data, ts) == _outcome(parse_dataset, data, ts)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_nested_undefined_lengths_are_walked(ts):
    ts, data = _with_sequences(ts)
    elements = scan(data, ts == ExplicitVRLittleEndian)
    assert elements is not None                       # walked, not left to pydicom
    full = parse_dataset(data, ts)
    assert [e.tag for e in elements] == [int(t) for t in full.keys()]
    assert _outcome(parse_fields, data, ts) == _outcome(parse_dataset, data, ts)
    pixels = full.get_item(0x7FE00010)
    assert [e for e in elements if e.tag == 0x7FE00010][0].start == pixels.value_tell


@pytest.mark.parametrize("role,name", [("test", "ct_ge_revolution_lungbases_cptacpda"),
                                       ("test", "mr_enh_siemens_xa30_bold_s7"),
                                       ("test", "mr_siemens_xa30_T1w_j2k_frag")])
def test_real_series_give_what_the_full_parse_gives(shared_series, role, name):
    for path in real_series_files(shared_series(role, name), limit=3):
        ts, data = split_file(path.read_bytes())
        assert scan(data, ts != ImplicitVRLittleEndian) is not None
        assert _outcome(parse_fields, data, ts) == _outcome(parse_dataset, data, ts)


def test_sequences_nested_past_the_recursion_limit_are_refused_not_a_crash():
    ts, data = dataset_bytes(make_series(1, 4, 4)[0])
    item, seq_end = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\xdd\xe0\0\0\0\0"
    opener = b"\x09\x00\x10\x10SQ\0\0\xff\xff\xff\xff" + item       # (0009,1010) SQ
    closer = b"\xfe\xff\x0d\xe0\0\0\0\0" + seq_end
    deep = opener * 5000 + closer * 5000
    assert scan(deep + data, True) is None
    with pytest.raises(UnparseableDatasetError):
        parse_fields(deep + data, ts, INDEXED_KEYWORDS)


def test_unusual_bytes_are_left_to_pydicom():
    ts, data = dataset_bytes(make_series(1, 4, 4)[0])
    assert scan(data, True) is not None
    assert scan(data[:-3], True) is None                             # truncated
    assert scan(data[:4] + b"ZZ" + data[6:], True) is None           # unknown VR
    assert scan(b"\xfe\xff\x0d\xe0\0\0\0\0" + data, True) is None    # stray item delimiter
    assert scan(data, False) is None                                 # read as implicit: garbage


@FUZZ
@given(seed=st.integers(0, 3), ts=st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=4),
       cut=st.none() | st.floats(0, 1))
def test_damaged_bytes_are_never_read_differently(seed, ts, edits, cut):
    """The lean parse accepts exactly what the full one accepts, with the same facts and
    layout."""
    ts, data = _with_sequences(ts) if seed == 3 else \
        dataset_bytes(make_series(1, 4, 3, transfer_syntax=ts, seed=seed)[0])
    data = bytearray(data)
    for where, value in edits:
        data[int(where * len(data))] = value
    data = bytes(data if cut is None else data[:int(cut * len(data))])
    assert _outcome(parse_fields, data, ts) == _outcome(parse_dataset, data, ts)
