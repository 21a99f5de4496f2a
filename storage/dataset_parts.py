"""Split a received dataset's bytes into header and pixel words, and splice them back.

The received bytes (the dataset after the File Meta group, in its transfer syntax) are kept
untouched: ``before + pixels + after`` is the original, byte for byte. ``pixels`` is the value of the
top-level Pixel Data element, cut to ``frames x rows x columns`` stored words when the instance can
be stacked (native little-endian pixel data, one sample, 8/16/32 bits); any padding or trailing
value bytes stay in ``after``. Stored words are never rescaled or masked.
"""

from __future__ import annotations

import functools
import io
import zlib
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.datadict import tag_for_keyword
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.values import convert_value, converters

from storage.element_scan import UNDEFINED, implicit_vr, scan
from storage.errors import UnparseableDatasetError

PIXEL_DATA = 0x7FE00010
# Uncompressed little-endian syntaxes: Pixel Data is a plain array of stored words.
NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}

# Word types the volume codec takes; other pixel formats go to the general codec.
_DTYPES = {(8, 0): "uint8", (8, 1): "int8", (16, 0): "uint16", (16, 1): "int16"}
# Elements pixel_layout reads: their values are converted (validated) by parse_dataset.
PIXEL_KEYWORDS = ("SamplesPerPixel", "BitsAllocated", "PixelRepresentation", "Rows", "Columns",
                  "NumberOfFrames")
_KNOWN_VRS = frozenset(str(vr) for vr in converters)
# Word size of the VRs whose values are fixed-size numbers (pydicom refuses other lengths; the
# O* VRs are kept as bytes whatever their length, odd lengths included).
_WORD = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "SV": 8, "UV": 8}


@dataclass(frozen=True)
class PixelLayout:
    """Where the stackable pixel words sit in the dataset bytes, and their array form."""

    offset: int
    frames: int
    rows: int
    columns: int
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.frames * self.rows * self.columns * np.dtype(self.dtype).itemsize

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.rows, self.columns)


def parse_dataset(data: bytes, transfer_syntax: str, keywords: Iterable[str] = ()):
    """Parse encoded dataset bytes (no File Meta) into a pydicom Dataset of raw elements.

    Only what is read later is decoded: the values of the pixel layout's elements and of
    ``keywords`` (what the index records) are converted now, so that a malformed one fails the
    parse instead of a later lookup. Every other top-level element is checked for its structure
    only (known VR, a value length that fits a binary VR, no truncation): it is kept as received
    bytes and never interpreted, so decoding it (sequences included) would cost most of the
    ingest time for nothing.

    Raises
    ------
    UnparseableDatasetError
        When the bytes cannot be read in the given transfer syntax.
    """
    ts, stream = _inflated(data, transfer_syntax)
    with _unparseable():
        fp = io.BytesIO(stream)
        ds = read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian)
        if fp.tell() != len(stream) or len(ds) == 0:
            raise ValueError(f"parsed {fp.tell()} of {len(stream)} bytes")
        _check_elements(ds, stream, ts.is_little_endian)
        for tag in _tags(tuple(keywords)):
            if tag in ds:
                ds[tag]                       # converts the raw value; raises when malformed
    return ds


@contextmanager
def _unparseable():
    """Any error of the block as :class:`UnparseableDatasetError` (pydicom raises many kinds
    on malformed input)."""
    try:
        yield
    except Exception as exc:
        raise UnparseableDatasetError(f"cannot parse dataset: {exc}") from exc


def header_elements(data, transfer_syntax: str):
    """The elements before Pixel Data of dataset bytes (a bytes-like object or a read-only
    mmap, read in place), as a pydicom Dataset converted on access: for the nested sequences
    that :func:`parse_fields` leaves alone (a multi-frame instance's functional groups).

    Raises
    ------
    UnparseableDatasetError
        When the bytes cannot be read in the given transfer syntax.
    """
    ts, stream = _inflated(data, transfer_syntax)
    with _unparseable():
        fp = stream if hasattr(stream, "seek") else io.BytesIO(stream)
        fp.seek(0)
        return read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian,
                            stop_when=lambda tag, vr, length: tag == PIXEL_DATA)


def _inflated(data, transfer_syntax: str) -> tuple[UID, bytes]:
    """(transfer syntax, the dataset's bytes, inflated when the syntax is deflated)."""
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax:
        raise UnparseableDatasetError(f"unknown transfer syntax {transfer_syntax!r}")
    if ts not in DEFLATED:
        return ts, data
    try:
        return ts, zlib.decompress(data, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise UnparseableDatasetError(f"cannot inflate deflated dataset: {exc}") from exc


def parse_fields(data: bytes, transfer_syntax: str, keywords: Iterable[str] = ()):
    """Like :func:`parse_dataset`, checking the same, but returning only what ingest reads:
    SpecificCharacterSet, the pixel layout's elements, ``keywords`` (converted) and Pixel Data.
    Little-endian datasets are walked by :func:`storage.element_scan.scan` and their values
    converted by pydicom without building a Dataset (a :class:`Fields` is returned); anything
    the walk leaves, and other transfer syntaxes, go through :func:`parse_dataset` (a Dataset
    with those elements only is returned).

    Raises
    ------
    UnparseableDatasetError
        When the bytes cannot be read in the given transfer syntax.
    """
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax or not ts.is_little_endian or ts.is_deflated \
            or (ts.is_implicit_VR and _looks_explicit(data)):
        return _only(parse_dataset(data, transfer_syntax, keywords), keywords)
    elements = scan(data, not ts.is_implicit_VR)
    if elements is None:
        return _only(parse_dataset(data, transfer_syntax, keywords), keywords)
    with _unparseable():
        return _from_scan(data, elements, ts.is_implicit_VR, _tags(tuple(keywords)))


def _from_scan(data: bytes, elements, implicit: bool, tags: tuple[int, ...]) -> Fields:
    """The :class:`Fields` of scanned elements (every element checked, the wanted converted)."""
    wanted, view, raw = set(tags) | {PIXEL_DATA}, memoryview(data), {}
    for e in {e.tag: e for e in elements}.values():   # a repeated tag: the last counts
        _check_vr(e.tag, e.vr, e.length, e.length == UNDEFINED)   # scan saw the bytes are there
        if e.tag in wanted:
            # an element sent as UN whose tag the dictionary knows reads as that VR, as
            # pydicom reads it (pydicom's rtdose_rle.dcm sends every element so)
            vr = implicit_vr(e.tag) if not e.vr or e.vr == "UN" else e.vr
            value = view[e.start:e.end] if e.tag == PIXEL_DATA else \
                bytes(view[e.start:e.end]) if e.length else empty_value_for_VR(vr, raw=True)
            raw[e.tag] = RawDataElement(BaseTag(e.tag), vr, e.length, value, e.start,
                                        implicit, True, True)
    charset = raw.get(0x00080005)
    encodings = convert_encodings(convert_value("CS", charset) if charset else None)
    values = {tag: convert_value(raw[tag].VR, raw[tag], encodings)
              for tag in tags if tag in raw}
    return Fields(values, raw.get(PIXEL_DATA))


class Fields:
    """What :func:`parse_fields` read of a dataset: the converted values of the elements it was
    asked for (``get`` by keyword, as on a pydicom Dataset) and the raw Pixel Data element
    (``get_item``), which is all that :func:`~storage.instance_facts.describe` and
    :func:`pixel_layout` ask of a Dataset."""

    __slots__ = ("_values", "_pixels")

    def __init__(self, values: dict, pixels):
        self._values, self._pixels = values, pixels

    def get(self, keyword: str, default=None):
        return self._values.get(_tag(keyword), default)

    def __contains__(self, tag) -> bool:
        return tag in self._values or (tag == PIXEL_DATA and self._pixels is not None)

    def get_item(self, tag):
        return self._pixels if tag == PIXEL_DATA else None


@functools.lru_cache(maxsize=256)
def _tag(keyword: str) -> int | None:
    return tag_for_keyword(keyword)


def _looks_explicit(data: bytes) -> bool:
    """Whether an implicit-VR dataset starts like an explicit one (pydicom then reads it as
    explicit; so does the caller, through pydicom)."""
    return len(data) >= 6 and b"AA" <= data[4:6] <= b"ZZ"


def _only(ds, keywords):
    """The elements of a full parse that :func:`parse_fields` would keep."""
    keep = set(_tags(tuple(keywords))) | {PIXEL_DATA}
    for tag in [t for t in ds.keys() if t not in keep]:
        del ds[tag]
    return ds


def _check_vr(tag: int, vr: str | None, length: int, undefined: bool) -> str:
    """Return the element's VR (the dictionary's in an implicit-VR dataset); raise when it is
    unknown, or when a defined ``length`` is no multiple of its binary VR's word size."""
    vr = vr or implicit_vr(tag)
    if vr not in _KNOWN_VRS:
        raise ValueError(f"element {BaseTag(tag)} has unknown VR {vr!r}")
    if not undefined and length % _WORD.get(vr, 1):
        raise ValueError(f"element {BaseTag(tag)} ({vr}) has {length} bytes, not a multiple "
                         f"of {_WORD[vr]}")
    return vr


@functools.lru_cache(maxsize=64)
def _tags(keywords: tuple[str, ...]) -> tuple[int, ...]:
    """Tags of the pixel layout's elements, SpecificCharacterSet and ``keywords``."""
    names = ("SpecificCharacterSet",) + PIXEL_KEYWORDS + keywords
    return tuple(dict.fromkeys(tag_for_keyword(k) for k in names))


def _check_elements(ds, stream: bytes, little_endian: bool) -> None:
    """Raise when a top-level element has an unknown VR, a value length that is no multiple of
    its binary VR's word size, a value shorter than its declared length, or an undefined-length
    value without its delimiter (truncation)."""
    delimiter = (b"\xfe\xff\xdd\xe0" if little_endian else b"\xff\xfe\xe0\xdd") + b"\0" * 4
    for raw in ds.values():
        value = getattr(raw, "value", None)
        if not isinstance(value, bytes) or not hasattr(raw, "value_tell"):
            continue                          # already an element (an undefined-length sequence)
        _check_vr(raw.tag, raw.VR, len(value), raw.length == UNDEFINED)   # raises
        if raw.length == UNDEFINED:
            end = raw.value_tell + len(value)
            if stream[end:end + 8] != delimiter:
                raise ValueError(f"element {raw.tag} of undefined length has no delimiter")
            continue
        if len(value) != raw.length:
            raise ValueError(f"element {raw.tag} declares {raw.length} bytes, has {len(value)}")


def _int(ds, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return default


def pixel_layout(ds, transfer_syntax: str) -> PixelLayout | None:
    """Return the stackable pixel layout of a parsed dataset, or None when it cannot be stacked."""
    raw = ds.get_item(PIXEL_DATA) if PIXEL_DATA in ds else None
    if raw is None or transfer_syntax not in NATIVE_LE or getattr(raw, "value_tell", None) is None:
        return None
    if raw.length == 0xFFFFFFFF or _int(ds, "SamplesPerPixel", 1) != 1:
        return None
    dtype = _DTYPES.get((_int(ds, "BitsAllocated", 0), _int(ds, "PixelRepresentation", 0)))
    rows, cols, frames = _int(ds, "Rows", 0), _int(ds, "Columns", 0), _int(ds, "NumberOfFrames", 1)
    if dtype is None or rows <= 0 or cols <= 0 or frames <= 0:
        return None
    layout = PixelLayout(raw.value_tell, frames, rows, cols, dtype)
    return layout if 0 < layout.nbytes <= raw.length else None


def split(data: bytes, layout: PixelLayout) -> tuple[bytes, np.ndarray, bytes]:
    """Return ``(before, pixels, after)``; ``pixels`` is a (frames, rows, columns) array."""
    end = layout.offset + layout.nbytes
    words = np.frombuffer(data, dtype=np.dtype(layout.dtype).newbyteorder("<"),
                          count=layout.nbytes // np.dtype(layout.dtype).itemsize,
                          offset=layout.offset)
    return data[:layout.offset], words.reshape(layout.shape), data[end:]


def join(before: bytes, pixels: np.ndarray | list[np.ndarray], after: bytes) -> bytes:
    """Splice stored words (an array, or consecutive parts of one) back between the header
    parts: the inverse of :func:`split`, copying each word once."""
    return b"".join(spliced(before, pixels, after))


def spliced(before: bytes, pixels: np.ndarray | list[np.ndarray], after: bytes) -> tuple:
    """What :func:`join` joins: the header parts and views of the stored words between them."""
    parts = pixels if isinstance(pixels, list) else [pixels]
    return (before, *map(le_bytes, parts), after)


def nbytes(parts) -> int:
    """The length of consecutive byte buffers (bytes, memoryviews) together."""
    return sum(memoryview(p).nbytes for p in parts)


def le_bytes(pixels: np.ndarray) -> memoryview:
    """The stored words of ``pixels`` as little-endian bytes (a view where they are already)."""
    return memoryview(np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<"))
                      ).cast("B")
