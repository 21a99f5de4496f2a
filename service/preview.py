"""Previews for the admin page and DICOMweb: one image of a series, windowed, as a small PNG
(or JPEG, for DICOMweb clients that ask for it).

The image is the instance in the middle of the series (its middle frame when it has several),
rebuilt by the archive like any retrieval (SHA-256 checked), decoded by pydicom, put through its
modality and VOI LUTs (the window it carries; else, or when a LUT value cannot be read, the 1st
to 99th percentile), and shrunk to fit ``size`` pixels. Pixel data in a compressed syntax that
pydicom cannot decode here gives no preview (:class:`PreviewError`).
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing
from pydicom.valuerep import DSfloat

from storage import reports
from storage.part10 import build_file

log = logging.getLogger(__name__)
KEPT = 128     # previews kept in memory
FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}   # -> Pillow's
SHAPES = ("linear", "linear-exact", "sigmoid")      # VOI LUT functions a window may ask for


class PreviewError(ValueError):
    """The instance has no image that can be shown here."""


def render_image(sop_class_uid: str, sop_uid: str, transfer_syntax: str, data: bytes,
                 size: int | tuple[int, int] = 128, frame: int | None = None,
                 media_type: str = "image/png", window: tuple | None = None,
                 quality: int = 90) -> bytes:
    """The instance's image ``frame`` (1-based; default its middle one) as ``media_type`` (one
    of :data:`FORMATS`), shrunk to fit ``size`` pixels (``(width, height)``, or one number for
    both; 0: as it is), windowed by ``window`` (center, width, one of :data:`SHAPES`) instead
    of its own window, a JPEG at ``quality``."""
    try:
        ds = dcmread(io.BytesIO(build_file(sop_class_uid, sop_uid, transfer_syntax, data)))
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        pixels = ds.pixel_array
    except Exception as exc:     # no pixel data, or a syntax without a decoder here
        raise PreviewError(f"instance {sop_uid} has no image to show ({exc})") from exc
    if frame is not None and not 1 <= frame <= frames:
        raise PreviewError(f"instance {sop_uid} has frames 1 to {frames}")
    if frames > 1:
        pixels = pixels[frames // 2 if frame is None else frame - 1]
    if getattr(ds, "SamplesPerPixel", 1) == 1:
        image = Image.fromarray(_grey(ds, pixels, window), mode="L")
    else:
        image = Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="RGB")
    if size:
        image.thumbnail(size if isinstance(size, tuple) else (size, size),
                        Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if FORMATS[media_type] == "JPEG":
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format=FORMATS[media_type], optimize=True)
    return out.getvalue()


def _grey(ds, pixels: np.ndarray, window: tuple | None = None) -> np.ndarray:
    """8-bit grey levels of a monochrome image: ``window`` when given, else its LUTs, else its
    1st-99th percentiles."""
    uid = ds.get("SOPInstanceUID", "?")
    try:
        values = apply_modality_lut(pixels, ds).astype(np.float64)
    except Exception as exc:    # a malformed rescale value: draw the stored values
        log.warning("preview of %s: modality LUT not usable (%s)", uid, exc)
        values = pixels.astype(np.float64)
    if window is not None:
        return _scaled(ds, _voi(values, *window), 0.0, 1.0)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            windowed = apply_voi_lut(values, ds).astype(np.float64)
            return _scaled(ds, windowed, windowed.min(), windowed.max())
        except Exception as exc:    # a malformed window (e.g. "40/1"): percentiles instead
            log.warning("preview of %s: window not usable (%s)", uid, exc)
    lo, hi = np.percentile(values, [1, 99])
    return _scaled(ds, values, lo, hi)


def _voi(values: np.ndarray, center: float, width: float, shape: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2's VOI LUT function ``shape`` (pydicom's windowing), to the range 0-1."""
    window = Dataset()
    window.BitsStored, window.PixelRepresentation = 8, 0        # its output: 0 to 255
    window.PhotometricInterpretation = "MONOCHROME2"     # MONOCHROME1 is inverted after
    window.WindowCenter = DSfloat(center, auto_format=True)
    window.WindowWidth = DSfloat(width, auto_format=True)
    window.VOILUTFunction = shape.upper().replace("-", "_")
    return apply_windowing(values, window) / 255.0


def _scaled(ds, values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    grey = np.clip((values - lo) / max(hi - lo, 1e-9), 0.0, 1.0) * 255.0
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        grey = 255.0 - grey
    return np.round(grey).astype(np.uint8)


class SeriesPreviews:
    """Images of series' middle images (:func:`storage.reports.middle_instance`), the last
    :data:`KEPT` kept by (instance, its SHA-256, size, media type): the admin page and viewers
    ask for the same ones again and again."""

    def __init__(self, archive):
        self.archive, self._kept, self._lock = archive, OrderedDict(), threading.Lock()

    def get(self, series_uid: str, size: int, media_type: str = "image/png") -> bytes | None:
        """The series' middle image as ``media_type``, or None when the series is unknown;
        raises PreviewError when it has no image to show, StorageError when it cannot be
        rebuilt."""
        middle = reports.middle_instance(self.archive.index, series_uid)
        if middle is None:
            return None
        sop_uid, sha = middle
        key = (sop_uid, sha, size, media_type)      # a replaced instance is drawn again
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        inst = self.archive.retrieve(sop_uid)
        image = render_image(inst.sop_class_uid, sop_uid, inst.transfer_syntax, inst.data, size,
                             media_type=media_type)
        with self._lock:
            self._kept[key] = image
            while len(self._kept) > KEPT:
                self._kept.popitem(last=False)
        return image
