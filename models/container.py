"""The blob container: a small, versioned, checksummed, little-endian byte layout.

    magic "VOXARC\\x1a\\n" | u16 version | u32 header length | header | u32 header CRC (from
    format 3 on, of the version and length too)
    header: 16-byte model id | u8 dtype code | 3 x u32 shape (z, y, x) | u16 slab slices |
            2 x u16 tile rows, columns | u32 slab count | per payload: u64 offset, u64 length,
            u32 CRC | u16 name length | name | u32 embedded length | embedded model (adapted
            weights and tables: an npz, or since 2026-12-03 models.array_pack's packed
            arrays; or empty) | from format 4 on: 4 x i32 value range lo, hi, padding,
            its stand-in (models.value_range) | from format 6 on: u16 slices per stream group
    then the payloads (offsets are relative to the end of the header CRC).

From format 3 on a slab is coded as column bands, one tile wide (:func:`band_spans`), each
its own payload, slab by slab and band by band: tiles never look across a tile column, so a
band decodes on its own and a slab's bands decode on several cores. Formats 1 and 2 hold one
payload per slab (one band).

Format 4 codes within the volume's own value range (its padding standing just below its
floor) instead of the dtype's; older formats decode as they were written.

Format 5 codes each residual token in two stages, over a third stream per slice
(models.entropy): the same layout, other payloads.

Format 6 lets consecutive slices of a slab share their streams, ``group`` slices a stream group
(the encoder chooses more than one for small slices, whose per-slice streams would cost the
decoder a range-decoder call per slice and wavefront step for a few dozen voxels; see
models.codec). With one slice a group its payloads are those of format 5.

A blob names everything its decoder needs; :func:`unpack` refuses anything truncated, corrupted
or foreign with :class:`CorruptBlobError` before a single voxel is decoded.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import cached_property

from models.value_range import ValueRange

MAGIC = b"VOXARC\x1a\n"
VERSION = 6        # 2: residual tokens the dtype cannot hold get no probability (models.entropy)
SUPPORTED = (1, 2, 3, 4, 5, 6)  # 3: a payload per column band of a slab; 4: the volume's value
#                              range; 5: tokens in two stages, three streams per slice;
#                              6: slices sharing streams in groups
DTYPES = {"uint8": 1, "int8": 2, "uint16": 3, "int16": 4}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_SLAB_ENTRY = 20   # bytes of a slab table entry: u64 offset, u64 length, u32 CRC


def codes_two_stage(version: int) -> bool:
    """Whether blobs of this format code their tokens in two stages (format 5 on)."""
    return version >= 5


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
    slab_table: list[tuple[int, int, int]]  # (offset, length, crc) of each payload
    embedded: bytes = b""
    version: int = VERSION
    value_range: ValueRange | None = None   # format 4 on (else the dtype's, see :attr:`values`)
    group: int = 1      # slices per stream group (format 6 on; one before)

    @property
    def values(self) -> ValueRange:
        """The range its residuals were coded within, and the padding's stand-in."""
        return self.value_range or ValueRange.of_dtype(self.dtype)

    @property
    def within_range(self) -> bool:
        """Whether its residuals were coded within the dtype's range (format 2 on)."""
        return self.version >= 2

    @property
    def two_stage(self) -> bool:
        """Whether its tokens were coded in two stages (format 5 on, models.entropy)."""
        return codes_two_stage(self.version)

    @cached_property
    def bands(self) -> list[tuple[int, int]]:
        """Column spans ``[x0, x1)`` of the bands every slab's payloads hold, in order."""
        return band_spans(self.shape[2], self.tile[1], self.version)

    @property
    def slabs(self) -> int:
        return -(-self.shape[0] // self.slab)


def band_count(nx: int, tile_columns: int, version: int = VERSION) -> int:
    """How many column bands a slice ``nx`` wide is coded in: one per tile column (format 3
    on), else one."""
    return -(-nx // tile_columns) if version >= 3 else 1


def band_spans(nx: int, tile_columns: int, version: int = VERSION) -> list[tuple[int, int]]:
    """The column spans ``[x0, x1)`` of those bands (:func:`band_count`), in order."""
    if version < 3:
        return [(0, nx)]
    return [(x, min(x + tile_columns, nx)) for x in range(0, nx, tile_columns)]


def pack(model_id: bytes, model_name: str, dtype: str, shape, slab: int,
         tile: tuple[int, int], payloads, embedded: bytes = b"", version: int = VERSION,
         values: ValueRange | None = None, group: int = 1) -> bytes:
    """Assemble a blob from its payloads, slab by slab and, in each, band by band
    (:func:`band_spans`): a list, or an iterator whose payloads are written as they come and
    need not be kept, so that a large volume's blob is held once while it is assembled, not
    twice. ``values``: the range the payloads were coded within (format 4; default the
    dtype's). ``version``: an older format (for tests that older blobs still read).
    ``group``: slices per stream group (format 6 on)."""
    if len(model_id) != 16:
        raise ValueError("model id must be 16 bytes")
    if version not in SUPPORTED:
        raise ValueError(f"cannot write blob format {version}")
    values = values or ValueRange.of_dtype(dtype)
    if version < 4 and values != ValueRange.of_dtype(dtype):
        raise ValueError(f"blob format {version} codes within the dtype's range only")
    values.check(dtype)
    if not 1 <= group <= 65535 or (version < 6 and group != 1):
        raise ValueError(f"blob format {version} cannot hold stream groups of {group} slices")
    tail = struct.pack("<4i", values.lo, values.hi, values.pad, values.stand_in) \
        if version >= 4 else b""
    if version >= 6:
        tail += struct.pack("<H", group)
    count = -(-shape[0] // slab) * band_count(shape[2], tile[1], version)
    name = model_name.encode()

    def header(table: list[bytes]) -> bytes:
        return (model_id + struct.pack("<B3IHHHI", DTYPES[dtype], *shape, slab, *tile, count)
                + b"".join(table) + struct.pack("<H", len(name)) + name
                + struct.pack("<I", len(embedded)) + embedded + tail)

    out = io.BytesIO()      # the header's place first; it is written once the table is known
    out.write(bytes(len(MAGIC) + 6 + len(header([bytes(_SLAB_ENTRY)] * count)) + 4))
    table, offset = [], 0
    for p in payloads:
        table.append(struct.pack("<QQI", offset, len(p), zlib.crc32(p)))
        offset += len(p)
        out.write(p)
    if len(table) != count:
        raise ValueError(f"{len(table)} payloads for {count} slab bands")
    head = header(table)
    out.seek(0)
    lead = struct.pack("<HI", version, len(head))
    out.write(MAGIC + lead + head + struct.pack("<I", _header_crc(version, lead, head)))
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
    if _header_crc(version, bytes(blob[len(MAGIC):start]), header) != crc:
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


def _header_crc(version: int, lead: bytes, header: bytes) -> int:
    """The header's CRC; from format 3 on it covers the version and header length too (a
    flipped version bit could otherwise turn a blob into a valid older format)."""
    return zlib.crc32(lead + header) if version >= 3 else zlib.crc32(header)


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
    pos += 4 + elen
    values = None
    if version >= 4:
        values = ValueRange(*struct.unpack_from("<4i", h, pos))
        pos += 16
    group = 1
    if version >= 6:
        (group,) = struct.unpack_from("<H", h, pos)
        pos += 2
    if pos != len(h) or min(slab, th, tw, x, group) < 1 \
            or n != -(-z // slab) * band_count(x, tw, version):
        raise CorruptBlobError("inconsistent blob header")
    dtype = DTYPE_NAMES[code]
    if values is not None:
        try:
            values.check(dtype)
        except ValueError as exc:
            raise CorruptBlobError(f"inconsistent blob header: {exc}") from None
    return BlobHeader(model_id, name, dtype, (z, y, x), slab, (th, tw), table, embedded,
                      version, values, group)


def slab_payload(blob: bytes, header: BlobHeader, base: int, i: int, band: int = 0) -> bytes:
    """The verified bytes of band ``band`` of slab ``i``."""
    bands = len(header.bands)
    offset, length, crc = header.slab_table[i * bands + band]
    data = bytes(memoryview(blob)[base + offset:base + offset + length])
    where = f"slab {i}" + (f" band {band}" if bands > 1 else "")
    if len(data) != length:
        raise CorruptBlobError(f"blob truncated in {where}")
    if zlib.crc32(data) != crc:
        raise CorruptBlobError(f"{where} checksum mismatch")
    return data
