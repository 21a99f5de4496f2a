"""The compact form in which a blob carries a few small integer arrays (an adapted model).

``np.savez_compressed`` stores each array as a zip member of its own: about 250 bytes of
headers per member, and deflate on little-endian int16 weights whose high bytes are nearly
constant. An adapted model of 13 arrays took 11.3 kB that way. Here the arrays go into one raw
LZMA2 stream: a JSON list of names, dtypes and shapes, then each array's bytes as byte planes
(all low bytes, then the next ones), where the planes of small values are nearly constant and
pack to little: 7.8 kB for the same model (train MR A, 96 x 128 x 128, 2026-12-03).
"""

from __future__ import annotations

import json
import lzma
import math

import numpy as np

MAGIC = b"VXA1"
MAX_BYTES = 1 << 24          # an embedded model is a few kilobytes; refuse anything near this
# preset 9 with a small dictionary: an embedded model is tens of kilobytes, and preset 9's own
# 64 MiB dictionary took 76 ms to set up per call (the encoder sizes several variants)
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 1 << 17}]
_DTYPES = {"|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8"}


class PackError(ValueError):
    """Bytes that are not a well-formed packed set of arrays."""


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` (integer arrays by name) in the compact form (see the module)."""
    names = sorted(arrays)
    items = [np.asarray(arrays[k]) for k in names]     # (ascontiguousarray makes 0-d 1-d)
    items = [a.astype(a.dtype.newbyteorder("<"), order="C") for a in items]
    meta = [[k, a.dtype.str, list(a.shape)] for k, a in zip(names, items)]
    if any(m[1] not in _DTYPES for m in meta):
        raise PackError("only integer arrays are packed")
    head = json.dumps(meta, separators=(",", ":")).encode()
    body = b"".join(a.reshape(-1).view(np.uint8).reshape(-1, a.itemsize).T.tobytes()
                    for a in items)
    stream = lzma.compress(len(head).to_bytes(4, "little") + head + body,
                           format=lzma.FORMAT_RAW, filters=_FILTERS)
    return MAGIC + stream


def is_packed(data: bytes) -> bool:
    return bytes(data[:len(MAGIC)]) == MAGIC


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of :func:`pack_arrays`' bytes; :class:`PackError` for anything else."""
    if not is_packed(data):
        raise PackError("not a packed set of arrays")
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_FILTERS)
    try:
        raw = decoder.decompress(bytes(data[len(MAGIC):]), max_length=MAX_BYTES)
    except lzma.LZMAError as exc:
        raise PackError(f"its stream does not decompress: {exc}") from None
    if not decoder.eof or len(raw) < 4:
        raise PackError("its stream is truncated or too large")
    size = int.from_bytes(raw[:4], "little")
    try:
        meta = json.loads(raw[4:4 + size])
    except ValueError:
        raise PackError("its list of arrays is unreadable") from None
    arrays, pos = {}, 4 + size
    for item in meta if isinstance(meta, list) else [None]:
        name, dtype, shape = _entry(item)
        n = math.prod(shape) * dtype.itemsize
        if pos + n > len(raw):
            raise PackError("its arrays run past its stream")
        planes = np.frombuffer(raw, np.uint8, n, pos).reshape(dtype.itemsize, -1)
        arrays[name] = planes.T.copy().view(dtype).reshape(shape)
        pos += n
    if pos != len(raw):
        raise PackError("its stream holds more than its arrays")
    return arrays


def _entry(item) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
            and item[1] in _DTYPES and isinstance(item[2], list) and len(item[2]) <= 4
            and all(isinstance(d, int) and 0 <= d <= MAX_BYTES for d in item[2])):
        raise PackError("its list of arrays is malformed")
    return item[0], np.dtype(item[1]), tuple(item[2])
