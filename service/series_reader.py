"""Read a folder of DICOM files into volumes of stored pixel values, one per stack.

Files are grouped by SeriesInstanceUID and pixel format (rows, columns, BitsAllocated,
PixelRepresentation); single-frame instances of a group are sorted along the slice normal, and
every multi-frame instance (Enhanced MR and the like) is a volume of its frames in stored order.
Values are the stored integer words, untouched: no rescale, no windowing, no masking of bits
above BitsStored. Encapsulated (compressed) pixel data is decoded with imagecodecs frame by frame,
so JPEG Lossless and JPEG 2000 series read without pydicom's optional pixel plugins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

log = logging.getLogger(__name__)

# Transfer syntax UID -> name of the imagecodecs function that decodes one of its frames.
_FRAME_DECODERS = {
    "1.2.840.10008.1.2.4.57": "jpeg8_decode",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70": "jpeg8_decode",  # JPEG Lossless, First-Order Prediction (SV1)
    "1.2.840.10008.1.2.4.80": "jpegls_decode",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "jpegls_decode",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "jpeg2k_decode",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91": "jpeg2k_decode",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "jpeg2k_decode",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "jpeg2k_decode",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "jpeg2k_decode",  # HTJ2K
}


@dataclass
class SeriesVolume:
    """One stack of stored pixel values read from a folder.

    Attributes
    ----------
    name : str
        Folder name, with ``#k`` appended when the folder holds more than one volume.
    voxels : numpy.ndarray
        ``(slices, rows, columns)`` array of the stored integer dtype.
    series_uid : str
        SeriesInstanceUID of the instances.
    modality : str
        Modality of the instances (``""`` when absent).
    transfer_syntax : str
        Name of the transfer syntax of the first instance.
    files : int
        Number of files the volume was read from.
    sorted_by : str
        ``"position"`` (along the slice normal), ``"instance"`` (InstanceNumber) or ``"frames"``;
        as the node stacks them (service.node_stacks), the order it codes them in.
    coding : dict
        ``models.encode_volume`` options the node codes this stack with (slab, max_group);
        empty: the defaults.
    """

    name: str
    voxels: np.ndarray
    series_uid: str
    modality: str
    transfer_syntax: str
    files: int
    sorted_by: str
    coding: dict = field(default_factory=dict)


def stored_dtype(ds: pydicom.Dataset) -> np.dtype:
    """Return the numpy dtype of one stored pixel word of ``ds``.

    Parameters
    ----------
    ds : pydicom.Dataset
        An image dataset with BitsAllocated and PixelRepresentation.

    Returns
    -------
    numpy.dtype
        ``uint8``, ``int8``, ``uint16``, ``int16``, ``uint32`` or ``int32``.

    Raises
    ------
    ValueError
        If BitsAllocated is not 8, 16 or 32.
    """
    bits = int(ds.BitsAllocated)
    if bits not in (8, 16, 32):
        raise ValueError(f"unsupported BitsAllocated {bits}")
    kind = "i" if int(ds.PixelRepresentation) == 1 else "u"
    return np.dtype(f"{kind}{bits // 8}")


def stored_frames(ds: pydicom.Dataset) -> np.ndarray:
    """Return the stored pixel words of ``ds`` as a ``(frames, rows, columns)`` array.

    Parameters
    ----------
    ds : pydicom.Dataset
        A single-sample (grey-level) image dataset.

    Returns
    -------
    numpy.ndarray
        Stored values in the dtype given by :func:`stored_dtype`, native byte order.
    """
    shape = (int(ds.get("NumberOfFrames") or 1), int(ds.Rows), int(ds.Columns))
    dtype = stored_dtype(ds)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if not syntax.is_encapsulated:
        order = "<" if syntax.is_little_endian else ">"
        raw = np.frombuffer(ds.PixelData, dtype=dtype.newbyteorder(order), count=int(np.prod(shape)))
        return raw.reshape(shape).astype(dtype)
    if syntax in _FRAME_DECODERS:
        return _decode_encapsulated(ds, syntax, shape, dtype)
    # Other encapsulated syntaxes (RLE Lossless, ...) through pydicom's own decoders.
    return np.asarray(ds.pixel_array, dtype=dtype).reshape(shape)


def _decode_encapsulated(ds, syntax: UID, shape, dtype: np.dtype) -> np.ndarray:
    import imagecodecs

    decode = getattr(imagecodecs, _FRAME_DECODERS[syntax])
    out = np.empty(shape, dtype)
    frames = generate_frames(ds.PixelData, number_of_frames=shape[0])
    for i, frame in enumerate(frames):
        pixels = np.asarray(decode(frame))
        out[i] = pixels.astype(dtype.str.replace("i", "u")).view(dtype).reshape(shape[1:])
    bits_stored = int(ds.get("BitsStored") or 8 * dtype.itemsize)
    if dtype.kind == "i" and bits_stored < 8 * dtype.itemsize:
        out = _sign_extend(out, bits_stored)
    return out


def _sign_extend(values: np.ndarray, bits: int) -> np.ndarray:
    """Read the low ``bits`` of each word as a two's-complement number (compressed data keeps
    only BitsStored bits, so there is no other stored word to return)."""
    shift = 64 - bits
    return ((values.astype(np.int64) << shift) >> shift).astype(values.dtype)


def read_folder(folder: str | Path) -> list[SeriesVolume]:
    """Read every grey-level image stack in ``folder`` (recursively).

    Parameters
    ----------
    folder : str or pathlib.Path
        A folder of DICOM files, or a single DICOM file. Non-DICOM files (``DIRFILE``, notes)
        and instances without pixel data are skipped; colour images are skipped with a log line.

    Returns
    -------
    list of SeriesVolume
        One volume per group of single-frame instances and one per multi-frame instance,
        in a stable order.
    """
    folder = Path(folder)
    groups: dict[tuple, list[tuple[Path, pydicom.Dataset]]] = {}
    for path, ds in read_images(folder):
        groups.setdefault(_group_key(path, ds), []).append((path, ds))
    volumes = [_volume(members) for _, members in sorted(groups.items(), key=lambda kv: str(kv[0]))]
    return named(volumes, folder.name)


NUMPY_DTYPES = ("uint8", "int8", "uint16", "int16")


def read_numpy(path: str | Path) -> list[SeriesVolume]:
    """A ``.npy`` file as one volume (a codec researcher's data: ``(slices, rows, columns)``,
    or one ``(rows, columns)`` image) of one of :data:`NUMPY_DTYPES`; raises ValueError for
    another shape or dtype."""
    path = Path(path)
    voxels = np.load(path, allow_pickle=False)
    if voxels.ndim == 2:
        voxels = voxels[None]
    if voxels.ndim != 3 or voxels.dtype.name not in NUMPY_DTYPES or 0 in voxels.shape:
        raise ValueError(f"{path}: a (slices, rows, columns) array of {', '.join(NUMPY_DTYPES)} "
                         f"is needed, not {voxels.dtype.name} {voxels.shape}")
    return [SeriesVolume(path.stem, np.ascontiguousarray(voxels), "", "", "numpy", 1,
                         "file")]


def read_path(path: str | Path, reader=None) -> list[SeriesVolume]:
    """The volumes of a ``.npy`` file (:func:`read_numpy`) or of a DICOM folder or file (by
    ``reader``, default :func:`read_folder`)."""
    if str(path).endswith(".npy"):
        return read_numpy(path)
    return (reader or read_folder)(path)


def read_images(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """``(path, dataset)`` of every grey-level image under ``folder`` (or the file itself)."""
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return [(path, ds) for path in files if (ds := _read_image(path)) is not None]


def named(volumes: list[SeriesVolume], name: str) -> list[SeriesVolume]:
    """``volumes`` named ``name``, with ``#k`` appended when there are several."""
    for k, vol in enumerate(volumes, 1):
        vol.name = f"{name}#{k}" if len(volumes) > 1 else name
    return volumes


def _read_image(path: Path) -> pydicom.Dataset | None:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        log.debug("skipping %s: %s", path, exc)
        return None
    if "PixelData" not in ds or "Rows" not in ds:
        log.debug("skipping %s: no image pixel data", path)
        return None
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        log.info("skipping %s: %s samples per pixel", path, ds.SamplesPerPixel)
        return None
    return ds


def _group_key(path: Path, ds: pydicom.Dataset) -> tuple:
    fmt = (int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated), int(ds.PixelRepresentation))
    frames = int(ds.get("NumberOfFrames") or 1)
    own = str(path) if frames > 1 else ""  # each multi-frame instance is a volume of its own
    return (str(ds.get("SeriesInstanceUID", "")), *fmt, own)


def slice_position(ds: pydicom.Dataset) -> float | None:
    """Position of a single-frame instance along its slice normal, or None without geometry.

    Parameters
    ----------
    ds : pydicom.Dataset
        An instance with ImageOrientationPatient and ImagePositionPatient.

    Returns
    -------
    float or None
        ``dot(row_direction x column_direction, ImagePositionPatient)``.
    """
    orientation, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if not orientation or not position or len(orientation) != 6 or len(position) != 3:
        return None
    cosines = np.asarray([float(v) for v in orientation])
    normal = np.cross(cosines[:3], cosines[3:])
    return float(normal @ np.asarray([float(v) for v in position]))


def _volume(members: list[tuple[Path, pydicom.Dataset]]) -> SeriesVolume:
    first = members[0][1]
    if len(members) == 1 and int(first.get("NumberOfFrames") or 1) > 1:
        voxels, sorted_by = stored_frames(first), "frames"
    else:
        members, sorted_by = _sorted_slices(members)
        voxels = np.concatenate([stored_frames(ds) for _, ds in members])
    return SeriesVolume(
        name="",
        voxels=voxels,
        series_uid=str(first.get("SeriesInstanceUID", "")),
        modality=str(first.get("Modality", "")),
        transfer_syntax=UID(first.file_meta.TransferSyntaxUID).name,
        files=len(members),
        sorted_by=sorted_by,
    )


def _sorted_slices(members):
    positions = [slice_position(ds) for _, ds in members]

    def instance(item):
        return int(item[1].get("InstanceNumber") or 0), str(item[0])

    if all(p is not None for p in positions):
        order = sorted(range(len(members)), key=lambda i: (positions[i], instance(members[i])))
        return [members[i] for i in order], "position"
    return sorted(members, key=instance), "instance"
