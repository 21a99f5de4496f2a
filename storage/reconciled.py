"""Patients the hospital information system reconciles (HL7 ADT updates and merges): what it
last said of each Patient ID, so that instances a modality sends afterwards with the old
demographics, or under a temporary ID the HIS has since merged away, are filed as the HIS has
the patient.

A row per Patient ID (:class:`storage.index.ReconciledPatient`) keeps the demographics the HIS
gave (PatientName, PatientBirthDate, PatientSex: those its message set) and, for a merged-away
ID, the ID it was merged into. A new study that names such an ID takes, in its bytes, the
surviving Patient ID and the demographics the index holds for that patient (those the HIS gave
while the archive holds none of the patient's studies). Only IDs the HIS named are followed:
placeholder IDs a modality makes up ("UNKNOWN") are never merged by the HIS, so they are never
rewritten.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import func, select

from storage.index import Index, Patient, ReconciledPatient
from storage.instance_facts import PATIENT_KEYS

#: the demographics the HIS gives: the index's patient attributes but the ID
PATIENT_KEYWORDS = tuple(k for k in PATIENT_KEYS.values() if k != "PatientID")
_MAX_CHAIN = 16


def record(index: Index, patient_id: str, values: dict[str, str], reason: str,
           merged_from: str = "", now: float | None = None) -> None:
    """Keep what the HIS said of ``patient_id`` (its ``values``; kept values it did not give
    stay) and, with ``merged_from``, that that ID was merged into it."""
    now = time.time() if now is None else now
    given = {k: v for k, v in values.items() if k in PATIENT_KEYWORDS}
    with index.write() as s:
        row = _row(s, patient_id, now, reason)
        row.patient_values = json.dumps({**json.loads(row.patient_values or "{}"), **given},
                                        sort_keys=True)
        row.merged_into = None                   # the HIS names it as a patient of its own
        if merged_from and merged_from != patient_id:
            prior = _row(s, merged_from, now, reason)
            prior.merged_into = patient_id


def _row(s, patient_id: str, now: float, reason: str) -> ReconciledPatient:
    row = s.scalar(select(ReconciledPatient).where(ReconciledPatient.patient_id == patient_id))
    if row is None:
        row = ReconciledPatient(patient_id=patient_id, patient_values="{}")
        s.add(row)
    row.updated_at, row.reason = now, reason
    return row


def last_change(s) -> float | None:
    """A value that changes whenever a row is written (for a cache to know it is stale)."""
    return s.scalar(select(func.max(ReconciledPatient.updated_at)))


def load(s) -> dict[str, tuple[str | None, dict[str, str]]]:
    """{Patient ID: (merged into, the HIS's values)} of every row."""
    return {r.patient_id: (r.merged_into, json.loads(r.patient_values or "{}"))
            for r in s.scalars(select(ReconciledPatient))}


def target(s, rows: dict, patient_id: str) -> dict[str, str]:
    """Keyword -> value a new study naming ``patient_id`` must take ({}: the HIS never named
    it): the surviving Patient ID when it was merged away, and the demographics the HIS gave,
    as the index holds them for the surviving patient when it holds that patient."""
    if patient_id not in rows:
        return {}
    final = patient_id
    for _ in range(_MAX_CHAIN):                  # merges of merges; a cycle stops here
        merged_into = rows.get(final, (None, {}))[0]
        if not merged_into or merged_into == final:
            break
        final = merged_into
    out = {"PatientID": final, **rows.get(final, (None, {}))[1]}
    held = s.scalar(select(Patient).where(Patient.patient_id == final))
    if held is not None:
        out.update({k: getattr(held, c) for c, k in PATIENT_KEYS.items() if k in out})
    return {k: v or "" for k, v in out.items()}
