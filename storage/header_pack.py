"""Header packs: the non-pixel bytes of every instance of a coded stack, compressed together and
stored in front of the stack's codec blob.

The instances of a series repeat most of their header (same patient, study, protocol and often
kilobytes of identical private data), which per-instance storage cannot exploit: on an MR series
of 160 instances the headers are 2.9 MB as received and 27 kB packed (LZMA, whose window spans
many headers). Blob layout (codec :data:`CODEC`)::

    b"VXHP" | u8 version | u64 pack length | pack | codec blob (models.encode_volume)

pack = LZMA of: u32 count, ``count`` x (u32 frame_start, u64 len(before), u64 len(after)), then
the headers' bytes in that order. Blobs of the older codec ``"volume"`` hold only the codec blob;
their instances keep their header bytes in the index.
"""

from __future__ import annotations

import lzma
import struct

MAGIC = b"VXHP"
VERSION = 1
CODEC = "volume+headers"
VOLUME_CODECS = ("volume", CODEC)
_HEAD = struct.Struct("<4sBQ")
_ENTRY = struct.Struct("<IQQ")


class HeaderPackError(ValueError):
    """A header pack is malformed or does not hold the instance asked for."""


def wrap(headers: dict[int, tuple[bytes, bytes]], coded: bytes) -> bytes:
    """A blob holding ``headers`` (frame_start -> (bytes before, bytes after the pixels)) and
    the codec blob ``coded``."""
    order = sorted(headers)
    table = struct.pack("<I", len(order)) + b"".join(
        _ENTRY.pack(fs, len(headers[fs][0]), len(headers[fs][1])) for fs in order)
    body = b"".join(headers[fs][0] + headers[fs][1] for fs in order)
    pack = lzma.compress(table + body, preset=1)
    return _HEAD.pack(MAGIC, VERSION, len(pack)) + pack + coded


def _parts(data: bytes) -> tuple[bytes, bytes]:
    try:
        magic, version, length = _HEAD.unpack_from(data, 0)
    except struct.error:
        raise HeaderPackError("blob too short for a header pack") from None
    if magic != MAGIC or version != VERSION:
        raise HeaderPackError(f"not a version-{VERSION} header-pack blob")
    end = _HEAD.size + length
    if end > len(data):
        raise HeaderPackError("header pack truncated")
    return data[_HEAD.size:end], data[end:]


def describe(codec_info: str, pack_bytes: int) -> str:
    """A blob row's ``codec_info`` that also records the size of its header pack."""
    return f"{codec_info} headers={pack_bytes}"


def pack_bytes(codec_info: str) -> int:
    """Size of the header pack recorded by :func:`describe` (0 when none is)."""
    _, sep, size = (codec_info or "").rpartition(" headers=")
    return int(size) if sep and size.isdigit() else 0


def coded_view(data: bytes) -> memoryview:
    """The codec blob inside ``data`` (all of ``data`` for a plain ``"volume"`` blob), as a view
    into ``data``: no copy of a whole stack's codec blob."""
    view = memoryview(data)
    return _parts(view)[1] if bytes(view[:4]) == MAGIC else view


def coded_part(data: bytes) -> bytes:
    """:func:`coded_view` as bytes of its own."""
    return bytes(coded_view(data))


def unpack(data: bytes) -> dict[int, tuple[bytes, bytes]]:
    """frame_start -> (header before, header after) of every instance in a header-pack blob."""
    try:
        raw = lzma.decompress(_parts(data)[0])
        (count,) = struct.unpack_from("<I", raw, 0)
        pos = 4 + count * _ENTRY.size
        out = {}
        for i in range(count):
            fs, nb, na = _ENTRY.unpack_from(raw, 4 + i * _ENTRY.size)
            out[fs] = (raw[pos:pos + nb], raw[pos + nb:pos + nb + na])
            pos += nb + na
    except (lzma.LZMAError, struct.error) as exc:
        raise HeaderPackError(f"header pack unreadable: {exc}") from None
    if pos != len(raw):
        raise HeaderPackError("header pack length does not match its table")
    return out
