"""A received dataset in another transfer syntax, losslessly, for a peer that cannot take the
one it was received in.

Instances go out as received whenever the peer takes that syntax. A peer that does not (a C-GET
client or C-MOVE destination that accepted only uncompressed syntaxes for the class, a
DICOMweb client naming its syntaxes) can get the dataset in Explicit or Implicit VR Little
Endian instead: parsed and written again by pydicom, and decompressed first when it was
received in a lossless compressed syntax that one of pydicom's decoders installed here reads
(GDCM, pylibjpeg-openjpeg, its own RLE). Lossy syntaxes are never decompressed (the peer would
get pixels whose loss it was not told of in the syntax) and nothing is compressed.

Every conversion is read back before it is returned: the same values of every top-level
element (bar the pixel data and, when decompressed, its Photometric Interpretation and Planar
Configuration; group lengths are dropped) as the dataset received, compared as value bytes
and, where those differ, as values; the same pixel bytes as were written (those of the one
decode when decompressed); or :class:`TranscodeError`.
"""

from __future__ import annotations

import io
import threading
import zlib
from collections import Counter

from pydicom.datadict import dictionary_VR
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, HTJ2KLossless,
    HTJ2KLosslessRPCL, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1,
    JPEGLSLossless, RLELossless, JPEGLossless,
)

from storage.errors import TranscodeError

TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)    # in order of preference
_NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
_LOSSLESS = {JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, HTJ2KLossless,
             HTJ2KLosslessRPCL, RLELossless}
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = {_PIXEL_DATA, 0x00280004, 0x00280006}   # + Photometric, Planar Configuration


def _decodable(syntax: str) -> bool:
    if syntax not in _LOSSLESS:
        return False
    try:
        return get_decoder(UID(syntax)).is_available
    except (NotImplementedError, ValueError):
        return False


def convertible(stored: str, target: str) -> bool:
    """Whether a dataset received in ``stored`` can be given in ``target`` (itself, or a
    lossless conversion this node can make)."""
    if stored == target:
        return True
    return target in TARGETS and (stored in _NATIVE or _decodable(stored))


def choose(stored: str, taken) -> str | None:
    """The syntax to send a dataset received in ``stored`` in, to a peer that takes the
    syntaxes ``taken``: ``stored`` when it is among them, else the first of :data:`TARGETS`
    it takes and the dataset converts to; None when there is none."""
    taken = set(taken)
    if stored in taken:
        return stored
    return next((t for t in TARGETS if t in taken and convertible(stored, t)), None)


_counts: Counter = Counter()
_counts_lock = threading.Lock()


def counts() -> dict[tuple[str, str, str], int]:
    """Conversions made in this process: ``(stored, target, "ok" or "failed") -> count``."""
    with _counts_lock:
        return dict(_counts)


def convert(data: bytes, stored: str, target: str) -> bytes:
    """The dataset bytes ``data`` (no File Meta) received in ``stored``, encoded in ``target``
    (counted: :func:`counts`).

    Raises
    ------
    TranscodeError
        The conversion is not one :func:`convertible` allows, the dataset cannot be parsed or
        decoded, or what was written does not read back the same.
    """
    if stored == target:
        return data
    try:
        out = _convert(data, stored, target)
    except TranscodeError:
        _count(stored, target, "failed")
        raise
    _count(stored, target, "ok")
    return out


def _count(stored: str, target: str, result: str) -> None:
    with _counts_lock:
        _counts[(stored, target, result)] += 1


def _convert(data: bytes, stored: str, target: str) -> bytes:
    if not convertible(stored, target):
        raise TranscodeError(f"cannot convert {UID(stored).name} to {UID(target).name}")
    try:
        ds = _read(data, stored)
        received = _as_read(ds)
        if UID(stored).is_encapsulated:     # native pixels, Photometric Interpretation to match
            ds.decompress(generate_instance_uid=False)
        for tag in list(ds.keys()):         # group lengths would be wrong in the new encoding
            if tag.element == 0:
                del ds[tag]
        pixels = _pixel_bytes(ds)
        out = _write(ds, implicit=target == ImplicitVRLittleEndian)
        back = _read(out, target)
        same = _same_elements(received, back, lambda: _read(data, stored)) and \
            _pixel_bytes(back) == pixels
    except TranscodeError:
        raise
    except Exception as exc:
        raise TranscodeError(f"cannot convert {UID(stored).name} to {UID(target).name}: "
                             f"{type(exc).__name__}: {exc}") from exc
    if not same:
        raise TranscodeError(f"conversion to {UID(target).name} does not read back the same")
    return out


def _read(data: bytes, syntax: str):
    """A full pydicom Dataset of dataset bytes in ``syntax`` (File Meta made up)."""
    ts = UID(syntax)
    if ts.is_deflated:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    ds = read_dataset(io.BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian)
    return ds


def _as_read(ds) -> dict:
    """Every top-level element but the pixel data and what decompressing it may change (and
    the group lengths), as read: raw, not converted to values."""
    return {tag: ds.get_item(tag) for tag in ds.keys()
            if tag not in _PIXEL_TAGS and tag.element != 0}


def _same_elements(received: dict, back, original) -> bool:
    """True when ``back`` holds the elements of ``received`` (:func:`_as_read`) with the same
    values: the same value bytes, or else (a sequence re-encoded, a value padded, a private
    element whose VR Implicit VR does not carry) the same bytes once both are written in one
    encoding (``original()``: the received dataset read again, since decompressing converted
    some of its elements in place). Comparing bytes first spares converting the hundreds of
    unchanged elements of a typical header (most of the time a conversion took)."""
    written = _as_read(back)
    if written.keys() != received.keys():
        return False
    differ = [tag for tag, elem in written.items()
              if (value := _value_bytes(elem)) is None or value != _value_bytes(received[tag])]
    if not differ:
        return True
    first = original()
    return all(_written(first[tag]) == _written(back[tag]) for tag in differ)


def _value_bytes(elem) -> bytes | None:
    """A raw element's value bytes; None when they are not comparable across encodings
    (already converted, a sequence, an undefined length)."""
    if not getattr(elem, "is_raw", False) or elem.length == 0xFFFFFFFF:
        return None
    vr = elem.VR or _dictionary_vr(elem.tag)
    return None if vr == "SQ" else elem.value


def _dictionary_vr(tag) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:        # private or unknown: not a sequence pydicom would re-encode
        return None


def _written(elem) -> bytes:
    """An element as Implicit VR Little Endian writes it: its value bytes, item by item for a
    sequence, whichever VR each encoding gave it. Values compared as pydicom converts them
    differ where they are the same bytes: an empty private text read as ``None`` under one VR
    and ``''`` under another, a private string Implicit VR gives as raw bytes."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_data_element(fp, elem)
    return fp.getvalue()


def _pixel_bytes(ds) -> bytes | None:
    """The (native, little-endian) Pixel Data bytes; None without any."""
    return bytes(ds[_PIXEL_DATA].value) if _PIXEL_DATA in ds else None


def _write(ds, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()
