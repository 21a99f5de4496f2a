"""What the index records of one instance: its place in the patient/study/series hierarchy, the
attributes C-FIND answers with, and the geometry that decides how it stacks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from storage.dataset_parts import PixelLayout
from storage.errors import UnparseableDatasetError

PATIENT_KEYS = {"patient_id": "PatientID", "patient_name": "PatientName",
                "birth_date": "PatientBirthDate", "sex": "PatientSex"}
STUDY_KEYS = {"study_uid": "StudyInstanceUID", "study_date": "StudyDate", "study_time": "StudyTime",
              "accession_number": "AccessionNumber", "study_description": "StudyDescription",
              "study_id": "StudyID", "referring_physician": "ReferringPhysicianName",
              "patient_age": "PatientAge"}
SERIES_KEYS = {"series_uid": "SeriesInstanceUID", "modality": "Modality",
               "series_number": "SeriesNumber", "series_description": "SeriesDescription",
               "series_date": "SeriesDate", "series_time": "SeriesTime",
               "body_part": "BodyPartExamined", "protocol_name": "ProtocolName"}
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Every element describe() reads: parse_dataset(..., INDEXED_KEYWORDS) converts (validates) these
# values up front, so that a malformed one is a parse failure, not a surprise here.
INDEXED_KEYWORDS = tuple(dict.fromkeys(
    _REQUIRED + tuple(PATIENT_KEYS.values()) + tuple(STUDY_KEYS.values())
    + tuple(SERIES_KEYS.values()) + ("InstanceNumber", "ImageOrientationPatient",
                                     "ImagePositionPatient")))


@dataclass
class InstanceFacts:
    """Index attributes of one instance, taken from its parsed dataset."""

    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    patient: dict = field(default_factory=dict)
    study: dict = field(default_factory=dict)
    series: dict = field(default_factory=dict)
    position: float | None = None
    orientation: tuple | None = None


def _text(ds, keyword: str, limit: int) -> str:
    try:
        value = ds.get(keyword, "")
        text = "" if value is None else str(value)
    except Exception:  # undecodable value: index it empty, the bytes are kept anyway
        text = ""
    return text.strip()[:limit]


def _floats(ds, keyword: str, count: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in ds.get(keyword) or []], dtype=float)
    except (TypeError, ValueError):
        return None
    return values if values.size == count and np.all(np.isfinite(values)) else None


def _geometry(ds) -> tuple[float | None, tuple | None]:
    iop, ipp = _floats(ds, "ImageOrientationPatient", 6), _floats(ds, "ImagePositionPatient", 3)
    if iop is None or ipp is None:
        return None, None
    # Plain float arithmetic on 3-vectors: numpy's BLAS-backed dot/norm took milliseconds per
    # call on the loaded 2-core machine (thread wake-ups), more than the rest of describe().
    (ax, ay, az, bx, by, bz), (px, py, pz) = iop.tolist(), ipp.tolist()
    normal = (ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx)
    if math.sqrt(sum(n * n for n in normal)) < 1e-6:
        return None, None
    return px * normal[0] + py * normal[1] + pz * normal[2], tuple(np.round(iop, 4).tolist())


def describe(ds) -> InstanceFacts:
    """Return the facts of a parsed dataset.

    Raises
    ------
    UnparseableDatasetError
        When a UID needed to index the instance is missing or empty.
    """
    missing = [k for k in _REQUIRED if not _text(ds, k, 128)]
    if missing:
        raise UnparseableDatasetError(f"dataset lacks {', '.join(missing)}")
    try:
        number = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        number = None
    position, orientation = _geometry(ds)
    return InstanceFacts(
        sop_uid=_text(ds, "SOPInstanceUID", 128), sop_class_uid=_text(ds, "SOPClassUID", 128),
        instance_number=number,
        patient={k: _text(ds, kw, 500) for k, kw in PATIENT_KEYS.items()},
        study={k: _text(ds, kw, 500) for k, kw in STUDY_KEYS.items()},
        series={k: _text(ds, kw, 500) for k, kw in SERIES_KEYS.items()},
        position=position, orientation=orientation,
    )


MULTIFRAME = "multiframe"   # the start of a multi-frame instance's stack format


def stack_format(layout: PixelLayout | None, facts: InstanceFacts, transfer_syntax: str) -> str:
    """Return the key under which single-frame instances of a series may share a stack.

    Empty when the instance cannot be stacked; ``"multiframe|"`` and the frames' format when
    it is a volume by itself, which multi-frame instances of the same format may join (a
    series of one volume per time point, storage.assembly). Rows indexed before 2026-12-04
    hold ``"multiframe"`` alone: such an instance stays a stack of its own.
    """
    if layout is None:
        return ""
    orient = ",".join(f"{v:.4f}" for v in facts.orientation) if facts.orientation else "none"
    fmt = f"{layout.rows}x{layout.columns}|{layout.dtype}|{transfer_syntax}|{orient}"
    return f"{MULTIFRAME}|{fmt}" if layout.frames > 1 else fmt


def frame_places(ds) -> list[tuple] | None:
    """Each frame's place in a multi-frame dataset: its ImagePositionPatient and
    ImageOrientationPatient (rounded to 0.001 mm and 0.0001) from the per-frame functional
    groups or the shared ones; None where a frame has no position."""
    try:
        return _places(ds)
    except Exception:  # an unreadable value or sequence: no places, the frames keep their order
        return None


def _places(ds) -> list[tuple] | None:
    frames = int(ds.get("NumberOfFrames") or 1)
    shared = _group_items(ds, "SharedFunctionalGroupsSequence")[:1]
    per_frame = _group_items(ds, "PerFrameFunctionalGroupsSequence")
    if frames < 2 or len(per_frame) != frames:
        return None
    places = []
    for item in per_frame:
        groups = [item] + shared
        position = _first_value(groups, "PlanePositionSequence", "ImagePositionPatient", 3)
        if position is None:
            return None
        orientation = _first_value(groups, "PlaneOrientationSequence",
                                   "ImageOrientationPatient", 6)
        places.append((tuple(np.round(position, 3).tolist()),
                       None if orientation is None else tuple(np.round(orientation, 4).tolist())))
    return places


def _group_items(ds, keyword: str) -> list:
    value = ds.get(keyword)
    return list(value) if value else []


def _first_value(groups: list, sequence: str, keyword: str, count: int) -> np.ndarray | None:
    for group in groups:
        items = group.get(sequence)
        if items:
            values = _floats(items[0], keyword, count)
            if values is not None:
                return values
    return None
