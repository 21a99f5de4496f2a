"""IHE IOCM rejection notes: a Key Object Selection Document whose title says that the
instances it references are withdrawn ("Rejected for Quality Reasons", "Rejected for Patient
Safety Reasons", "Incorrect Modality Worklist Entry", "Data Retention Policy Expired"), sent by
the modality or workstation that made them.

The archive has no hidden state: a note it applies deletes the instances it references (as
``voxarc delete`` does, with the note's title, UID and sender in the deletion trail) and keeps
the note itself, a record for whoever retrieves the study. Only instances the index holds in
the study and series the note names, and of the patient it names, are deleted; any other
reference is passed over and logged.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

from pydicom.filereader import read_dataset
from pydicom.uid import UID
from sqlalchemy import select

from storage.index import Index, Instance, Patient, Series, Study

log = logging.getLogger(__name__)

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
#: (code value, coding scheme) -> meaning of the document titles that reject (PS3.16 CID 7011)
TITLES = {("113001", "DCM"): "Rejected for Quality Reasons",
          ("113037", "DCM"): "Rejected for Patient Safety Reasons",
          ("113038", "DCM"): "Incorrect Modality Worklist Entry",
          ("113039", "DCM"): "Data Retention Policy Expired"}


@dataclass
class RejectionNote:
    """What a rejection note asks: its UID and title, its patient, the instances it names."""

    sop_uid: str
    title: str
    patient_id: str
    references: list[tuple[str, str, str]] = field(default_factory=list)   # study, series, SOP


def read_note(data: bytes, transfer_syntax: str) -> RejectionNote | None:
    """The rejection note a stored Key Object Selection Document is (None: another title)."""
    ts = UID(transfer_syntax)
    ds = read_dataset(io.BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)
    if str(ds.get("SOPClassUID", "")) != KEY_OBJECT_SELECTION:
        return None
    title = next(iter(ds.get("ConceptNameCodeSequence") or []), None)
    code = (str(title.get("CodeValue", "")), str(title.get("CodingSchemeDesignator", ""))) \
        if title is not None else None
    if code not in TITLES:
        return None
    note = RejectionNote(str(ds.SOPInstanceUID), TITLES[code], str(ds.get("PatientID", "")))
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            for ref in series.get("ReferencedSOPSequence") or []:
                note.references.append((str(study.get("StudyInstanceUID", "")),
                                        str(series.get("SeriesInstanceUID", "")),
                                        str(ref.get("ReferencedSOPInstanceUID", ""))))
    return note


def rejected(index: Index, note: RejectionNote) -> tuple[list[str], list[str]]:
    """(SOP Instance UIDs the note rejects, why each other reference is passed over): an
    instance is rejected when the index holds it in the study and series the note names, under
    the note's patient."""
    held = {}
    uids = [sop for _, _, sop in note.references]
    with index.read() as s:
        for i in range(0, len(uids), 500):
            held.update({row.sop_uid: row for row in s.execute(
                select(Instance.sop_uid, Series.series_uid, Study.study_uid, Patient.patient_id)
                .join(Series, Instance.series_fk == Series.id)
                .join(Study, Series.study_fk == Study.id)
                .join(Patient, Study.patient_fk == Patient.id)
                .where(Instance.sop_uid.in_(uids[i:i + 500])))})
    out, passed, seen = [], [], set()
    for study, series, sop in note.references:
        row = held.get(sop)
        if row is None:
            passed.append(f"{sop}: not held")
        elif (row.study_uid, row.series_uid) != (study, series):
            passed.append(f"{sop}: held in study {row.study_uid}, series {row.series_uid}")
        elif row.patient_id != note.patient_id:
            passed.append(f"{sop}: held under patient {row.patient_id!r}, the note names "
                          f"{note.patient_id!r}")
        elif sop not in seen:
            seen.add(sop)
            out.append(sop)
    return out, passed
