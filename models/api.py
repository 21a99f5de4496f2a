"""Public codec API (PROVISIONAL zlib body, replaced by the neural codec; the signatures are final)."""

from __future__ import annotations

import struct
import zlib

import numpy as np


class CorruptBlobError(ValueError):
    """A blob is truncated, corrupted, foreign, or needs a model this release does not have."""


_DTYPES = {"uint8": 1, "int8": 2, "uint16": 3, "int16": 4, "uint32": 5, "int32": 6}
_MAGIC = b"VXTMP\0"


def encode_volume(volume: np.ndarray, model: str = "default") -> bytes:
    """Losslessly encode a (z, y, x) integer volume into a self-describing blob."""
    vol = np.ascontiguousarray(volume)
    if vol.ndim != 3 or vol.dtype.name not in _DTYPES:
        raise ValueError(f"need a 3-D integer volume, got {vol.dtype} {vol.shape}")
    body = zlib.compress(vol.tobytes(), 6)
    head = _MAGIC + struct.pack("<B3I", _DTYPES[vol.dtype.name], *vol.shape)
    return head + struct.pack("<I", zlib.crc32(body)) + body


def _parse(blob: bytes):
    if len(blob) < 23 or blob[:6] != _MAGIC:
        raise CorruptBlobError("not a voxarc blob")
    code, z, y, x = struct.unpack_from("<B3I", blob, 6)
    (crc,) = struct.unpack_from("<I", blob, 19)
    body = blob[23:]
    if zlib.crc32(body) != crc:
        raise CorruptBlobError("checksum mismatch")
    dtype = {v: k for k, v in _DTYPES.items()}[code]
    return np.frombuffer(zlib.decompress(body), dtype=dtype).reshape(z, y, x).copy()


def decode_volume(blob: bytes) -> np.ndarray:
    """Decode a whole blob back to the exact array that was encoded."""
    return _parse(blob)


def decode_slices(blob: bytes, start: int, stop: int) -> np.ndarray:
    """Decode slices [start, stop) only; equals decode_volume(blob)[start:stop]."""
    return _parse(blob)[start:stop]


def blob_info(blob: bytes) -> dict:
    """Header facts of a blob (dtype, shape, model id, format version) without decoding voxels."""
    vol = _parse(blob)
    return {"dtype": vol.dtype.name, "shape": vol.shape, "model": "zlib-provisional", "version": 0}
