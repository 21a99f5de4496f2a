"""A folder's images as the storage node stacks and orders them (``voxarc bench --as-node``).

:func:`service.series_reader.read_folder` gives a volume per multi-frame instance and per group
of single frames sorted by position. The node codes some series otherwise: an fMRI's time
points, sent one instance each, as one volume coded position-major; a 4D series in one
instance position-major; images repeated at each position of another contrast a volume after
the other; each with a slab per position or volume (storage.assembly, storage.frame_order).
This reads a folder the same way, with the codec options the node uses, so that the benchmark
measures the codec on what the node stores. Compressed pixel data is decoded as read_folder
does (the node keeps such instances as received); images the node would not stack (a lone
image) are left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

from models.api import SLAB_SLICES
from service.series_reader import (SeriesVolume, named, read_images, slice_position,
                                   stored_dtype, stored_frames)
from storage.assembly import Stack, assemble, stack_order
from storage.frame_order import frame_cycle, position_major
from storage.instance_facts import MULTIFRAME, frame_places

log = logging.getLogger(__name__)


@dataclass
class _Image:
    """What storage.assembly reads of an instance (as the index row holds it), and its data."""

    sop_uid: str
    instance_number: int | None
    frames: int
    position: float | None
    stack_format: str
    ds: pydicom.Dataset


def read_folder_as_node(folder: str | Path) -> list[SeriesVolume]:
    """The volumes the node would code for the images in ``folder``, in the order and with
    the options (``SeriesVolume.coding``) it would code them with."""
    folder = Path(folder)
    images = [_image(ds) for _, ds in read_images(folder)]
    cycles = {im.sop_uid: frame_cycle(frame_places(im.ds)) for im in images if im.frames > 1}
    stacks, singles = assemble(images, cycles=cycles)
    if singles:
        log.info("%s: %d image(s) the node would store one by one, left out", folder.name,
                 len(singles))
    return named([_volume(stack) for stack in stacks], folder.name)


def _image(ds: pydicom.Dataset) -> _Image:
    frames = int(ds.get("NumberOfFrames") or 1)
    try:
        number = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        number = None
    iop = ds.get("ImageOrientationPatient")
    orient = ",".join(f"{float(v):.4f}" for v in iop) if iop and len(iop) == 6 else "none"
    fmt = f"{ds.Rows}x{ds.Columns}|{stored_dtype(ds)}|{ds.get('SeriesInstanceUID', '')}|{orient}"
    return _Image(str(ds.get("SOPInstanceUID", "")), number, frames,
                  None if frames > 1 else slice_position(ds),
                  f"{MULTIFRAME}|{fmt}" if frames > 1 else fmt, ds)


def _volume(stack: Stack) -> SeriesVolume:
    volume = np.concatenate([stored_frames(m.ds) for m in stack.members])
    single = len(volume) == len(stack.members)
    how = stack_order(stack, volume)
    if how.order is not None:
        volume = volume[how.order]
    first = stack.members[0].ds
    return SeriesVolume(
        name="", voxels=position_major(volume, how.interleave),
        series_uid=str(first.get("SeriesInstanceUID", "")),
        modality=str(first.get("Modality", "")),
        transfer_syntax=UID(first.file_meta.TransferSyntaxUID).name, files=len(stack.members),
        sorted_by=f"node: {how.why or ('position' if single else 'frames')}",
        coding=how.encode_options(SLAB_SLICES))
