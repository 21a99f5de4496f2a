"""Patient updates and merges from the hospital's HL7 v2 ADT feed (IHE Patient Information
Reconciliation): what a message asks the archive to change, and the change made.

The hospital information system (HIS) is where a patient's identity is decided. When it
corrects a name or a birth date, or merges a temporary registration ("Unknown^Trauma",
``TMP0042``) into the patient's real record, it sends an ADT message; the archive then makes the
same correction it would make for ``voxarc correct`` (:meth:`storage.archive.Archive.correct`:
the index and every stored instance's bytes, audited).

- ``A08`` (update patient information) and ``A31`` (update person information): the patient
  of PID-3 takes the name (PID-5), birth date (PID-7) and sex (PID-8) the message gives.
- ``A40`` (merge patient: identifier list), ``A34`` (merge patient ID only) and ``A47``
  (change patient identifier list): every study held under the prior identifier (MRG-1) moves
  to the patient of PID-3, who takes the PID segment's values (a patient already held is
  updated first, as by an A08).

What a merge or a change of demographics told is kept (:mod:`storage.reconciled`): a new study
that comes later under the merged-away ID, or with the old name, is filed under the patient as
the HIS has them.

HL7's conventions for absent values hold: an empty field leaves the value as it is, ``""``
clears it. A patient the archive does not hold is no error: the feed tells every system of
every patient. Other ADT events are acknowledged and passed over; other message types are
rejected.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import hl7

from service import hl7_message
from service.admin_cli import note_change, studies_touched
from service.hl7_message import Hl7Error
from storage.correction import CorrectionError

log = logging.getLogger(__name__)

UPDATES = frozenset({"A08", "A31"})
MERGES = frozenset({"A40", "A34", "A47"})
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "U": ""}
_NULL = '""'


@dataclass(frozen=True)
class PatientChange:
    """One patient as the HIS now has them: the DICOM values the message sets (keyword ->
    value; a key left out stays as held) and, for a merge, the identifier merged into them."""

    patient_id: str
    values: dict = field(default_factory=dict)
    prior_id: str = ""


@dataclass(frozen=True)
class AdtMessage:
    """What an ADT message asks: its event, its control ID, its sender, the changes in order."""

    event: str
    control_id: str
    sender: str
    changes: tuple[PatientChange, ...]

    @property
    def reason(self) -> str:
        """The note kept in the corrections' audit trail."""
        return f"HL7 ADT^{self.event} {self.control_id} from {self.sender}"


def read_message(msg: hl7.Message, authority: str = "") -> AdtMessage:
    """What the ADT message ``msg`` asks; ``authority`` picks the identifier (PID-3, MRG-1)
    whose assigning authority (CX.4) it names, else the first one is the DICOM Patient ID.

    Raises
    ------
    Hl7Error
        "AR" for a message that is not ADT, "AE" for one whose values the archive cannot take.
    """
    head = hl7_message.header(msg)
    if head.kind != "ADT":
        raise Hl7Error("AR", f"message type {head.kind or '(none)'} is not ADT")
    if head.event not in UPDATES | MERGES:
        return AdtMessage(head.event, head.control_id, head.sender, ())
    pids = hl7_message.segments(msg, "PID")
    if not pids:
        raise Hl7Error("AE", f"ADT^{head.event} without a PID segment")
    merges = hl7_message.segments(msg, "MRG") if head.event in MERGES else []
    if head.event in MERGES and len(merges) != len(pids):
        raise Hl7Error("AE", f"ADT^{head.event} needs one MRG segment per PID segment")
    changes = []
    for i, pid in enumerate(pids):
        patient_id = hl7_message.identifier(msg, pid, 3, authority)
        prior = hl7_message.identifier(msg, merges[i], 1, authority) if merges else ""
        changes.append(PatientChange(patient_id, _values(msg, pid), prior))
    return AdtMessage(head.event, head.control_id, head.sender, tuple(changes))


def _values(msg, pid) -> dict[str, str]:
    """The DICOM patient attributes PID-5, PID-7 and PID-8 set."""
    out = {}
    names = hl7_message.reps(msg, pid, 5)
    if names and any(names[0]):
        out["PatientName"] = _person_name(names[0])
    birth = hl7_message.text(msg, pid, 7)
    if birth is not None:
        out["PatientBirthDate"] = _date(birth)
    sex = hl7_message.text(msg, pid, 8)
    if sex is not None:
        if sex != _NULL and sex.upper() not in _SEX:
            raise Hl7Error("AE", f"PID-8 sex {sex!r} is not one of M, F, O, U, A, N")
        out["PatientSex"] = "" if sex == _NULL else _SEX[sex.upper()]
    return out


def _person_name(xpn: list[str]) -> str:
    """An HL7 XPN (family^given^middle^suffix^prefix) as a DICOM PN
    (family^given^middle^prefix^suffix; PN's delimiters inside a part become spaces)."""
    if xpn[0] == _NULL:
        return ""
    family, given, middle, suffix, prefix = (re.sub(r"[\\^=]", " ", p).strip()
                                             for p in (xpn + [""] * 5)[:5])
    return "^".join((family, given, middle, prefix, suffix)).rstrip("^")


def _date(text: str) -> str:
    """An HL7 TS or DTM birth date as a DICOM DA (its first eight digits)."""
    if text == _NULL:
        return ""
    if not re.match(r"^\d{8}", text):
        raise Hl7Error("AE", f"PID-7 birth date {text!r} is not a full date (YYYYMMDD...)")
    return text[:8]


def apply(archive, adt: AdtMessage, resend: bool = False) -> list[str]:
    """Make the changes ``adt`` asks of ``archive``, in order; return what was done, one line
    per patient. With ``resend``, each corrected series is queued again to every destination
    that had it.

    Raises
    ------
    Hl7Error
        "AE" when a correction cannot be made (a value the instances' character set or VR
        cannot hold, ...); the changes before it stay made.
    """
    done = []
    for change in adt.changes:
        try:
            done.append(_merge(archive, change, adt, resend) if change.prior_id
                        else _update(archive, change, adt, resend))
        except CorrectionError as exc:
            raise Hl7Error("AE", f"patient {change.prior_id or change.patient_id!r}: {exc}") \
                from None
    return done


def _update(archive, change: PatientChange, adt: AdtMessage, resend: bool = False) -> str:
    held = archive.patient(change.patient_id)
    if held is None:
        return f"patient {change.patient_id!r}: not held"
    values = {k: v for k, v in change.values.items() if held.get(k, "") != v}
    if not values:
        return f"patient {change.patient_id!r}: unchanged"
    done = _correct(archive, change.patient_id, values, adt, resend)
    archive.reconcile(change.patient_id, change.values, adt.reason)
    return f"patient {change.patient_id!r}: {_changes(done)} in {done['instances']} instances"


def _merge(archive, change: PatientChange, adt: AdtMessage, resend: bool = False) -> str:
    survivor = _update(archive, PatientChange(change.patient_id, change.values), adt, resend)
    if change.prior_id == change.patient_id:
        return survivor
    held = archive.patient(change.prior_id) is not None
    if held:
        done = _correct(archive, change.prior_id,
                        {**change.values, "PatientID": change.patient_id}, adt, resend)
    # images still to come under the prior ID (the trauma CT's reformats) follow the merge
    archive.reconcile(change.patient_id, change.values, adt.reason, change.prior_id)
    if not held:
        return f"patient {change.prior_id!r}: not held (images that come under it will go " \
               f"to {change.patient_id!r})"
    studies = "1 study" if done["studies"] == 1 else f"{done['studies']} studies"
    return f"patient {change.prior_id!r} merged into {change.patient_id!r}: {studies}, " \
           f"{done['instances']} instances"


def _correct(archive, patient_id: str, values: dict[str, str], adt: AdtMessage,
             resend: bool = False) -> dict:
    """Correct the patient, telling the audit messages which studies changed."""
    touched = studies_touched(archive, "patient", patient_id)
    done = archive.correct("patient", patient_id, values, adt.reason, resend)
    note_change(archive, "correct", "patient", touched, actor=f"hl7 {adt.sender}")
    return done


def _changes(done: dict) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in done["changes"].items())
