"""The blob container: a small, versioned, checksummed, little-endian byte layout.

    magic "VOXARC\\x1a\\n" | u16 version | u16 header length | header | u32 header CRC
    header: 16-byte model id | u8 dtype code | 3 x u32 shape (z, y, x) | u16 slab slices |
            2 x u16 tile rows, columns | u32 slab count | per slab: u64 offset, u64 length, u32 CRC |
            u16 name length | name | u32 embedded length | embedded model (adapted weights, or empty)
    then the slab payloads (offsets are relative to the end of the header CRC).

A blob names everything its decoder needs; :func:`unpack` refuses anything truncated, corrupted
or foreign with :class:`CorruptBlobError` before a single voxel is decoded.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"VOXARC\x1a\n"
VERSION = 2        # 2: residual tokens the dtype cannot hold get no probability (models.entropy)
SUPPORTED = (1, 2)
DTYPES = {"uint8": 1, "int8": 2, "uint16": 3, "int16": 4}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_SLAB_ENTRY = 20   # bytes of a slab table entry: u64 offset, u64 length, u32 CRC


class CorruptBlobError(ValueError):
    """A blob is truncated, corrupted, foreign, or needs a model this release does not have."""


@dataclass
class BlobHeader:
    model_id: bytes
    model_name: str
    dtype: str
    shape: tuple[int, int, int]
    slab: int
    tile: tuple[int, int]
    slab_table: list[tuple[int, int, int]]  # (offset, length, crc)
    embedded: bytes = b""
    version: int = VERSION

    @property
    def within_range(self) -> bool:
        """Whether its residuals were coded within the dtype's range (format 2 on)."""
        return self.version >= 2


def pack(model_id: bytes, model_name: str, dtype: str, shape, slab: int,
         tile: tuple[int, int], payloads, embedded: bytes = b"") -> bytes:
    """Assemble a blob from its slab payloads, in slab order: a list, or an iterator (one
    payload per ``slab`` slices of ``shape``) whose payloads are written as they come and need
    not be kept, so that a large volume's blob is held once while it is assembled, not twice."""
    if len(model_id) != 16:
        raise ValueError("model id must be 16 bytes")
    count = len(payloads) if hasattr(payloads, "__len__") else -(-shape[0] // slab)
    name = model_name.encode()

    def header(table: list[bytes]) -> bytes:
        return (model_id + struct.pack("<B3IHHHI", DTYPES[dtype], *shape, slab, *tile, count)
                + b"".join(table) + struct.pack("<H", len(name)) + name
                + struct.pack("<I", len(embedded)) + embedded)

    out = io.BytesIO()      # the header's place first; it is written once the table is known
    out.write(bytes(len(MAGIC) + 6 + len(header([bytes(_SLAB_ENTRY)] * count)) + 4))
    table, offset = [], 0
    for p in payloads:
        table.append(struct.pack("<QQI", offset, len(p), zlib.crc32(p)))
        offset += len(p)
        out.write(p)
    if len(table) != count:
        raise ValueError(f"{len(table)} slab payloads for {count} slabs")
    head = header(table)
    out.seek(0)
    out.write(MAGIC + struct.pack("<HI", VERSION, len(head)) + head
              + struct.pack("<I", zlib.crc32(head)))
    return out.getvalue()


def unpack_header(blob: bytes) -> tuple[BlobHeader, int]:
    """Parse and verify the header; returns it and where the payloads start."""
    blob = memoryview(blob)
    if len(blob) < len(MAGIC) + 6 or bytes(blob[:len(MAGIC)]) != MAGIC:
        raise CorruptBlobError("not a voxarc blob (bad magic)")
    version, hlen = struct.unpack_from("<HI", blob, len(MAGIC))
    if version not in SUPPORTED:
        raise CorruptBlobError(f"blob format version {version} is not supported (have "
                               f"{', '.join(map(str, SUPPORTED))})")
    start = len(MAGIC) + 6
    if len(blob) < start + hlen + 4:
        raise CorruptBlobError("blob truncated inside its header")
    header = bytes(blob[start:start + hlen])
    (crc,) = struct.unpack_from("<I", blob, start + hlen)
    if zlib.crc32(header) != crc:
        raise CorruptBlobError("blob header checksum mismatch")
    try:
        parsed = _parse_header(header, version)
    except (struct.error, KeyError, UnicodeDecodeError) as exc:
        raise CorruptBlobError(f"malformed blob header: {exc}") from None
    base = start + hlen + 4
    end = base + sum(length for _, length, _ in parsed.slab_table)
    if len(blob) != end:
        raise CorruptBlobError(f"blob is {len(blob)} bytes, its header says {end}"
                               + (" (truncated)" if len(blob) < end else " (trailing bytes)"))
    return parsed, base


def _parse_header(h: bytes, version: int) -> BlobHeader:
    model_id = h[:16]
    code, z, y, x, slab, th, tw, n = struct.unpack_from("<B3IHHHI", h, 16)
    pos = 16 + struct.calcsize("<B3IHHHI")
    table = [struct.unpack_from("<QQI", h, pos + 20 * i) for i in range(n)]
    pos += 20 * n
    (nlen,) = struct.unpack_from("<H", h, pos)
    name = h[pos + 2:pos + 2 + nlen].decode()
    pos += 2 + nlen
    (elen,) = struct.unpack_from("<I", h, pos)
    embedded = h[pos + 4:pos + 4 + elen]
    if pos + 4 + elen != len(h) or min(slab, th, tw) < 1 or n != -(-z // slab):
        raise CorruptBlobError("inconsistent blob header")
    return BlobHeader(model_id, name, DTYPE_NAMES[code], (z, y, x), slab, (th, tw), table,
                      embedded, version)


def slab_payload(blob: bytes, header: BlobHeader, base: int, i: int) -> bytes:
    """The verified bytes of slab ``i``."""
    offset, length, crc = header.slab_table[i]
    data = bytes(memoryview(blob)[base + offset:base + offset + length])
    if len(data) != length:
        raise CorruptBlobError(f"blob truncated in slab {i}")
    if zlib.crc32(data) != crc:
        raise CorruptBlobError(f"slab {i} checksum mismatch")
    return data
