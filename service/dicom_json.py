"""DICOM JSON (PS3.18 Annex F) of stored instance headers, large binary values by reference.

WADO-RS metadata gives every attribute of an instance; PS3.18 lets the origin server put a
Bulkdata URI in place of a value, which viewers fetch only when they need it. Binary values
(OB, OD, OF, OL, OV, OW, UN) longer than :data:`BULK_THRESHOLD` bytes go by reference here:
scanners' private blobs (a Siemens CSA header is 5-20 kB an instance), icon images, overlays,
and the pixel data itself. A reference names the element by its path from the instance:
``{instance URL}/bulkdata/{path}``, the path being the tag (``7FE00010``), or, inside a
sequence, the sequence's tag, the item number (from 1) and the tag within, joined by ``/``
(``00880200/1/7FE00010``). :func:`element_value` follows such a path back to the value.
"""

from __future__ import annotations

import base64
import functools
import io

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from storage.element_scan import scan
from storage.part10 import build_file

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel, Float, Double Float
BULK_THRESHOLD = 1024            # bytes: longer binary values go by Bulkdata URI
_BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_PIXEL_VR = {0x7FE00008: "OF", 0x7FE00009: "OD"}


class BadPath(ValueError):
    """A bulk data path that names no element (malformed)."""


class BulkLinks:
    """Bulkdata URIs of one instance's elements: ``base`` is the instance's URL; ``made``
    counts the URIs given out (a value that got one is not reused for another instance)."""

    def __init__(self, base: str, prefix: str = "", root: BulkLinks | None = None):
        self.base, self.prefix, self.root = base, prefix, root or self
        self.made = 0

    def uri(self, tag: int) -> str:
        self.root.made += 1
        return f"{self.base}/bulkdata/{self.prefix}{tag:08X}"

    def item(self, tag: int, number: int) -> BulkLinks:
        """The links inside item ``number`` (from 1) of the sequence ``tag``."""
        return BulkLinks(self.base, f"{self.prefix}{tag:08X}/{number}/", self.root)


def json_dataset(ds: Dataset, raw_tags: set, memo: dict | None = None,
                 links: BulkLinks | None = None) -> dict:
    """``ds`` as DICOM JSON, element by element: an element pydicom cannot convert (a malformed
    DS or IS, say) keeps its VR and goes as its raw bytes in InlineBinary; its tag is added to
    ``raw_tags``. With ``links``, binary values over :data:`BULK_THRESHOLD` bytes go as
    BulkDataURIs; without, inline. ``memo``: conversions of raw elements already seen, by
    tag, VR and bytes, shared by datasets of one encoding and character set (the instances of
    a series repeat most of their header)."""
    out = {}
    for tag in ds.keys():
        raw = ds.get_item(tag)          # before conversion: the bytes as received
        vr = _bulk_vr(ds, tag, raw) if links is not None else None
        if vr is not None:
            out[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": links.uri(tag)}
            continue
        key = (tag, raw.VR, raw.value) if memo is not None and _memoizable(raw) else None
        known = memo.get(key) if key is not None else None
        if known is None:
            made = links.root.made if links is not None else 0
            known = _json_element(ds, tag, raw, memo, links)
            if key is not None and (links is None or links.root.made == made):
                memo[key] = known
        value, failed = known
        if failed:
            raw_tags.add(f"{tag:08X}")
        out[f"{tag:08X}"] = value
    return out


def pixel_reference(tag: int, vr: str | None, transfer_syntax: str,
                    links: BulkLinks) -> dict:
    """The metadata entry of an instance's pixel data element ``tag`` (its VR as read, when
    the encoding names it)."""
    if vr is None:
        vr = _PIXEL_VR.get(tag) or ("OB" if UID(transfer_syntax).is_encapsulated else "OW")
    return {"vr": vr, "BulkDataURI": links.uri(tag)}


def _bulk_vr(ds: Dataset, tag: int, raw) -> str | None:
    """The VR of an element whose value goes by reference, None for one that goes inline."""
    value = raw.value
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) <= BULK_THRESHOLD:
        return None
    return _binary_vr(ds, tag, raw)


def _binary_vr(ds: Dataset, tag: int, raw) -> str | None:
    """The VR of a binary element (OB, OW, UN, ...), None for any other."""
    vr = raw.VR
    if vr is None or " or " in vr:
        try:
            vr = ds[tag].VR             # implicit VR: as pydicom resolves it
        except Exception:
            return None
    return vr if vr in _BULK_VRS else None


def _memoizable(raw) -> bool:
    """Whether a raw element's JSON follows from its tag, VR and bytes alone: not when its VR
    is implicit and depends on the dataset (US or SS by Pixel Representation) or on a private
    creator."""
    if not isinstance(raw, RawDataElement) or not isinstance(raw.value, (bytes, type(None))):
        return False
    return raw.VR is not None or (raw.tag.group % 2 == 0 and " or " not in _dictionary_vr(raw.tag))


def _json_element(ds: Dataset, tag, raw, memo, links) -> tuple[dict, bool]:
    """(DICOM JSON of one element, whether it went as InlineBinary)."""
    try:
        elem = ds[tag]
        if elem.VR == "SQ":
            items, failed = [], set()
            for number, item in enumerate(elem.value, 1):
                inner = links.item(tag, number) if links is not None else None
                items.append(json_dataset(item, failed, memo, inner))
            return {"vr": "SQ", "Value": items}, bool(failed)
        return elem.to_json_dict(None, 0), False     # binary values inline, base64
    except Exception:
        return _inline(tag, raw), True


def header_dataset(transfer_syntax: str, data: bytes, trailer: bytes | None = None
                   ) -> tuple[Dataset, tuple | None]:
    """(the elements of a dataset's bytes but its pixel data, (tag, VR) of the pixel data
    element or None); the VR is None where the encoding does not name it. ``data`` may end
    inside the pixel data element, as a compressed instance's stored header does: the
    elements after it are then ``trailer``'s; with ``trailer`` None they are found in
    ``data``. Data Set Trailing Padding is left out."""
    ts = UID(transfer_syntax)
    if ts == DeflatedExplicitVRLittleEndian or not ts.is_transfer_syntax:
        ds = dcmread(io.BytesIO(build_file("1.2.3", "1.2.3", ts, data)),
                     stop_before_pixels=True)
        return ds, None
    stopped = []

    def at_pixels(tag, vr, length) -> bool:
        if tag in PIXEL_TAGS:
            stopped.append((int(tag), vr))
            return True
        return False
    fp = io.BytesIO(data)
    ds = read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=at_pixels)
    if stopped:
        if trailer is None:               # pydicom stopped at the pixel data element's start
            trailer = _after_pixels(data, fp.tell(), ts)
        if trailer:
            after = read_dataset(io.BytesIO(trailer), ts.is_implicit_VR, ts.is_little_endian)
            for tag in after.keys():
                if tag not in PIXEL_TAGS and tag != _TRAILING_PADDING:
                    ds[tag] = after.get_item(tag)
    return ds, (stopped[0] if stopped else None)


_TRAILING_PADDING = 0xFFFCFFFC


def _after_pixels(data: bytes, start: int, ts: UID) -> bytes:
    """The bytes after the pixel data element that begins at ``start`` of a whole
    little-endian dataset (b"" when they cannot be walked: big endian, or something
    :func:`storage.element_scan.scan` declines); only the elements from ``start`` on are
    walked, not the header before them again."""
    if not ts.is_little_endian:
        return b""
    elements = scan(memoryview(data)[start:], not ts.is_implicit_VR)
    if not elements or elements[0].tag not in PIXEL_TAGS:
        return b""
    return bytes(data[start + elements[0].end:])


def parse_path(text: str) -> list[int]:
    """The steps of a bulk data path: tags at even places, item numbers (from 1) between."""
    steps = text.strip("/").split("/")
    if len(steps) % 2 == 0:
        raise BadPath(f"bulk data path {text!r}: tag, or tag/item/tag...")
    try:
        out = [int(s, 16) if i % 2 == 0 else int(s) for i, s in enumerate(steps)]
    except ValueError:
        raise BadPath(f"bulk data path {text!r}: tags are 8 hex digits, items numbers") \
            from None
    if any(len(steps[i]) != 8 for i in range(0, len(steps), 2)) or \
            any(out[i] < 1 for i in range(1, len(steps), 2)):
        raise BadPath(f"bulk data path {text!r}: tags are 8 hex digits, items from 1")
    return out


def element_value(ds: Dataset, steps: list[int]) -> bytes | None:
    """The value bytes (as encoded) of the binary element at ``steps`` (:func:`parse_path`),
    None when there is none."""
    for i in range(0, len(steps) - 1, 2):
        if steps[i] not in ds:
            return None
        try:
            items = ds[steps[i]].value
            ds = items[steps[i + 1] - 1]
        except (IndexError, TypeError, AttributeError, KeyError):
            return None
        if not isinstance(ds, Dataset):
            return None
    if steps[-1] not in ds:
        return None
    raw = ds.get_item(steps[-1])
    if not isinstance(raw.value, (bytes, bytearray, memoryview)) or \
            (steps[-1] not in PIXEL_TAGS and _binary_vr(ds, steps[-1], raw) is None):
        return None
    return bytes(raw.value)


def _inline(tag, elem) -> dict:
    """An element as its VR and raw value bytes (InlineBinary)."""
    vr = getattr(elem, "VR", None) or _vr_of(tag)
    data = elem.value
    if not isinstance(data, bytes):      # converted already: its text as it would be written
        values = data if isinstance(data, (list, tuple)) else [data]
        data = "\\".join(str(v) for v in values).encode()
    return {"vr": vr, "InlineBinary": base64.b64encode(data).decode()}


def _vr_of(tag) -> str:
    return _dictionary_vr(tag).split(" or ")[0]


@functools.lru_cache(maxsize=4096)
def _dictionary_vr(tag) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"

