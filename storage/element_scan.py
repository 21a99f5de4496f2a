"""The top-level element table of a little-endian dataset, found without building pydicom elements.

Ingest needs about thirty values of a received dataset, where its Pixel Data sits, and the
assurance that the bytes are well formed; pydicom's reader builds an element (and parses every
undefined-length sequence) for each of the 100-200 elements of a typical CT or MR instance,
about 1 ms here. :func:`scan` walks the same bytes with ``struct``: each top-level element's
tag, VR, length and value offset, nested items only to find where an undefined-length value
ends. It returns None on anything unusual (a VR it does not know, an implicit-VR switch inside
an explicit dataset, a length past the end, a missing delimiter); the caller then parses with
pydicom, so what it accepts is never more than pydicom would.
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple

from pydicom.datadict import dictionary_VR

UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_HEAD = struct.Struct("<HH")
_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
_ITEM_HEAD = struct.Struct("<II")


class Element(NamedTuple):
    """One top-level element: its value is ``data[start:start + length]`` (defined length) or
    ``data[start:end]``, delimiters included (undefined length); the whole element, header
    and all, is ``data[head:end]``."""

    tag: int
    vr: str | None       # None in an implicit-VR dataset
    length: int
    start: int
    end: int
    head: int


class _Unusual(Exception):
    """Something :func:`scan` leaves to pydicom."""


def scan(data, explicit_vr: bool) -> list[Element] | None:
    """Return the top-level elements of a little-endian dataset, or None when the bytes hold
    something this walker does not handle (parse them with pydicom instead)."""
    try:
        elements, end = _walk(memoryview(data), 0, explicit_vr, top=True)
    except (_Unusual, struct.error, RecursionError):    # deep nesting: pydicom's to judge
        return None
    return elements if end == len(data) and elements else None


def _header(buf, pos: int, explicit_vr: bool) -> tuple[int, str | None, int, int]:
    """(tag, VR, length, value offset) of the element at ``pos``."""
    group, number = _HEAD.unpack_from(buf, pos)
    tag = group << 16 | number
    if group == 0xFFFE:
        return tag, None, _U32.unpack_from(buf, pos + 4)[0], pos + 8
    if not explicit_vr:
        return tag, None, _U32.unpack_from(buf, pos + 4)[0], pos + 8
    vr = bytes(buf[pos + 4:pos + 6])
    if vr in _LONG:
        return tag, vr.decode(), _U32.unpack_from(buf, pos + 8)[0], pos + 12
    if vr in _SHORT:
        return tag, vr.decode(), _U16.unpack_from(buf, pos + 6)[0], pos + 8
    raise _Unusual


def _walk(buf, pos: int, explicit_vr: bool, top: bool) -> tuple[list[Element], int]:
    """Elements from ``pos`` to the end (top level) or to an item delimiter (inside an item);
    returns them (top level only) and the offset after the last one."""
    out, size = [], len(buf)
    while pos < size:
        tag, vr, length, start = _header(buf, pos, explicit_vr)
        if tag == _ITEM_END and not top:
            if length:
                raise _Unusual
            return out, start
        if tag >> 16 == 0xFFFE:
            raise _Unusual
        if length == UNDEFINED:
            kind = vr or implicit_vr(tag)
            if kind not in ("SQ", "UN") and not kind.startswith(("OB", "OW")):
                raise _Unusual
            # an undefined-length UN holds implicit-VR items (PS3.5 6.2.2)
            end = _items_end(buf, start, explicit_vr and kind != "UN")
        else:
            end = start + length
            if end > size:
                raise _Unusual
        if top:
            out.append(Element(tag, vr, length, start, end, pos))
        pos = end
    if not top:
        raise _Unusual            # an item without its delimiter
    return out, pos


def _items_end(buf, pos: int, explicit_vr: bool) -> int:
    """Offset after the sequence delimiter of the undefined-length value starting at ``pos``."""
    while True:
        tag, length = _ITEM_HEAD.unpack_from(buf, pos)
        pos += 8
        if _swap(tag) == _SEQUENCE_END:
            if length:
                raise _Unusual
            return pos
        if _swap(tag) != _ITEM:
            raise _Unusual
        if length == UNDEFINED:
            pos = _walk(buf, pos, explicit_vr, top=False)[1]
        else:
            pos += length
            if pos > len(buf):
                raise _Unusual


def _swap(raw: int) -> int:
    """The tag of a little-endian (group, element) pair read as one 32-bit word."""
    return (raw & 0xFFFF) << 16 | raw >> 16


@functools.lru_cache(maxsize=4096)
def implicit_vr(tag: int) -> str:
    """The dictionary VR of ``tag`` in an implicit-VR dataset (``"UN"`` for private or unknown
    tags)."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"
