"""The codecs the benchmark compares: voxarc models and classical lossless anchors.

Every codec has the same two functions: ``encode(volume) -> Encoded`` and
``decode(Encoded) -> volume``. Anchor image codecs code each slice in 2-D after shifting the
stored values by the volume minimum to unsigned (8 bits when the span allows, 16 otherwise, with
the bit depth the span needs), as ``shared/data/BASELINES.md`` was measured; zstd codes the raw
words of the whole volume. The few bytes of side information (offset, dtype, shape) that a real
container would add are not counted for the anchors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

VOXARC_PREFIX = "voxarc:"


@dataclass
class Encoded:
    """What a codec produced for one volume.

    Attributes
    ----------
    chunks : list of bytes
        The compressed streams (one per slice, or one for the volume).
    dtype : numpy.dtype
        Dtype of the original volume.
    shape : tuple of int
        Shape of the original volume.
    offset : int
        Value that was subtracted before coding (the volume minimum), 0 if none.
    """

    chunks: list[bytes]
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def nbytes(self) -> int:
        """Total compressed size in bytes."""
        return sum(len(c) for c in self.chunks)


@dataclass(frozen=True)
class Codec:
    """A named lossless codec with its encoder and decoder."""

    name: str
    encode: Callable[..., Encoded]
    """``encode(volume)``; voxarc's also takes ``models.encode_volume``'s slab and max_group."""
    decode: Callable[[Encoded], np.ndarray]
    decode_slice: Callable[[Encoded, int], np.ndarray] | None = None
    """Random access: decode slice ``i`` alone as a ``(1, rows, columns)`` array, if supported."""
    prepare: Callable[[], None] | None = None
    """What a long-running user pays once, done before anything is timed (voxarc: starting
    its worker processes, as a running node has them)."""


def shift_to_unsigned(volume: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Shift ``volume`` by its minimum into the smallest unsigned dtype that holds its span.

    Parameters
    ----------
    volume : numpy.ndarray
        Integer array.

    Returns
    -------
    shifted : numpy.ndarray
        ``volume - minimum`` as uint8 or uint16.
    offset : int
        The minimum that was subtracted.
    bits : int
        Bits needed for the span (at least 1).

    Raises
    ------
    ValueError
        If the span exceeds 16 bits (the anchors' limit).
    """
    offset = int(volume.min()) if volume.size else 0
    span = int(volume.max()) - offset if volume.size else 0
    if span >= 1 << 16:
        raise ValueError(f"value span {span} needs more than 16 bits")
    dtype = np.uint8 if span < 256 else np.uint16
    shifted = (volume.astype(np.int64) - offset).astype(dtype)
    return shifted, offset, max(1, span.bit_length())


def _unshift(shifted: np.ndarray, offset: int, dtype: np.dtype) -> np.ndarray:
    return (shifted.astype(np.int64) + offset).astype(dtype)


def _slice_codec(name: str, encode2d: Callable[[np.ndarray, int], bytes],
                 decode2d: Callable[[bytes], np.ndarray]) -> Codec:
    """A codec that codes each slice of the shifted volume as a 2-D grey image."""

    def encode(volume: np.ndarray) -> Encoded:
        shifted, offset, bits = shift_to_unsigned(volume)
        chunks = [bytes(encode2d(np.ascontiguousarray(s), bits)) for s in shifted]
        return Encoded(chunks, volume.dtype, volume.shape, offset)

    def decode(enc: Encoded) -> np.ndarray:
        out = np.empty(enc.shape, enc.dtype)
        for i, chunk in enumerate(enc.chunks):
            out[i] = _unshift(np.asarray(decode2d(chunk)).reshape(enc.shape[1:]), enc.offset,
                              enc.dtype)
        return out

    return Codec(name, encode, decode)


def _imagecodecs():
    import imagecodecs

    return imagecodecs


def _jpegls() -> Codec:
    ic = _imagecodecs()
    return _slice_codec("jpegls", lambda s, bits: ic.jpegls_encode(s), ic.jpegls_decode)


def _jpeg2k() -> Codec:
    ic = _imagecodecs()
    return _slice_codec(
        "jpeg2k",
        lambda s, bits: ic.jpeg2k_encode(s, reversible=True, bitspersample=bits, codecformat="J2K"),
        ic.jpeg2k_decode,
    )


def _htj2k() -> Codec:
    ic = _imagecodecs()
    return _slice_codec("htj2k", lambda s, bits: ic.htj2k_encode(s, reversible=True),
                        ic.htj2k_decode)


def _jpegxl_e7() -> Codec:
    ic = _imagecodecs()
    return _slice_codec(
        "jpegxl-e7",
        lambda s, bits: ic.jpegxl_encode(s, lossless=True, effort=7, bitspersample=bits),
        ic.jpegxl_decode,
    )


def _zstd19() -> Codec:
    import zstandard

    def encode(volume: np.ndarray) -> Encoded:
        raw = np.ascontiguousarray(volume, volume.dtype.newbyteorder("<")).tobytes()
        return Encoded([zstandard.ZstdCompressor(level=19).compress(raw)], volume.dtype,
                       volume.shape)

    def decode(enc: Encoded) -> np.ndarray:
        raw = zstandard.ZstdDecompressor().decompress(enc.chunks[0])
        words = np.frombuffer(raw, enc.dtype.newbyteorder("<"))
        return words.astype(enc.dtype).reshape(enc.shape)

    return Codec("zstd-19", encode, decode)


NO_ADAPT = "/no-adapt"   # model-name suffix: encode without per-volume adaptation


def voxarc_codec(model: str) -> Codec:
    """The voxarc codec with one named model, through :mod:`models`' public API.

    Parameters
    ----------
    model : str
        Model name passed to ``models.encode_volume``; with the suffix ``/no-adapt``, encoded
        without per-volume adaptation (the shipped model as it is: faster to encode).

    Returns
    -------
    Codec
        Named ``"voxarc:<model>"``.
    """
    name = model.removesuffix(NO_ADAPT)
    adapt = not model.endswith(NO_ADAPT)
    options = {} if adapt else {"adapt": False}

    def encode(volume: np.ndarray, **coding) -> Encoded:
        import models  # here, so that a broken or missing codec fails its row, not the bench

        return Encoded([models.encode_volume(volume, model=name, **options, **coding)],
                       volume.dtype, volume.shape)

    def decode(enc: Encoded) -> np.ndarray:
        import models

        return models.decode_volume(enc.chunks[0])

    def decode_slice(enc: Encoded, index: int) -> np.ndarray:
        import models

        return models.decode_slices(enc.chunks[0], index, index + 1)

    def prepare() -> None:
        from models import parallel, tune_workers

        parallel.warm()
        if adapt:       # the fine-tuning's processes
            tune_workers.warm()

    return Codec(VOXARC_PREFIX + model, encode, decode, decode_slice, prepare)


ANCHORS: dict[str, Callable[[], Codec]] = {
    "jpegls": _jpegls,
    "jpeg2k": _jpeg2k,
    "htj2k": _htj2k,
    "jpegxl-e7": _jpegxl_e7,
    "zstd-19": _zstd19,
}
"""Anchor codec factories by name, in table order."""

ANCHOR_LABELS = {
    "jpegls": "JPEG-LS",
    "jpeg2k": "JPEG 2000 rev",
    "htj2k": "HTJ2K rev",
    "jpegxl-e7": "JPEG-XL e7",
    "zstd-19": "zstd -19",
}


def codec_versions() -> dict[str, Any]:
    """Versions of the libraries behind the anchors (for the JSON report)."""
    versions: dict[str, Any] = {}
    try:
        ic = _imagecodecs()
        versions["imagecodecs"] = ic.__version__
        for lib in ("jpegls", "jpeg2k", "htj2k", "jpegxl"):
            versions[lib] = getattr(ic, f"{lib}_version")()
    except ImportError:
        versions["imagecodecs"] = None
    try:
        import zstandard

        versions["zstandard"] = zstandard.__version__
    except ImportError:
        versions["zstandard"] = None
    return versions
