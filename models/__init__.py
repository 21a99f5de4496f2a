"""The voxarc volume codec: numpy arrays in, bytes out. Knows nothing of DICOM or databases."""

from models.api import CorruptBlobError, decode_slices, decode_volume, encode_volume, blob_info

__all__ = ["encode_volume", "decode_volume", "decode_slices", "blob_info", "CorruptBlobError"]
