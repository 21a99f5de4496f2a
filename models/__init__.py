"""The voxarc volume codec: numpy arrays in, bytes out. Knows nothing of DICOM or databases."""

from models.api import (CorruptBlobError, blob_info, decode_slab_slices, decode_slices,
                        decode_stream, decode_volume, decode_with_slab_slices, encode_volume)

__all__ = ["encode_volume", "decode_volume", "decode_slices", "decode_slab_slices",
           "decode_with_slab_slices", "decode_stream", "blob_info", "CorruptBlobError"]
