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

from service.admin_cli import note_change, studies_touched
from storage.correction import CorrectionError

log = logging.getLogger(__name__)

UPDATES = frozenset({"A08", "A31"})
MERGES = frozenset({"A40", "A34", "A47"})
CHARSETS = {"": "ascii", "ASCII": "ascii", "8859/1": "latin-1", "8859/2": "iso8859-2",
             "8859/5": "iso8859-5", "8859/7": "iso8859-7", "8859/9": "iso8859-9",
             "8859/15": "iso8859-15", "UNICODE UTF-8": "utf-8"}
_SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "U": ""}
_NULL = '""'


class AdtError(ValueError):
    """A message the archive does not take (``code`` "AR") or cannot apply ("AE")."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code = code


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


def decode(block: bytes, default: str = "") -> hl7.Message:
    """Parse one MLLP block, in the character set its MSH-18 names (when it names none,
    ``default``, itself named as in MSH-18: ASCII when empty).

    Raises
    ------
    AdtError
        "AR": not an HL7 message, or bytes its character set cannot hold.
    """
    if not block.startswith(b"MSH") or len(block) < 8:
        raise AdtError("AR", "not an HL7 v2 message (no MSH segment first)")
    fields = block.split(b"\r", 1)[0].split(block[3:4])
    name = fields[17].decode("ascii", "replace").split(block[4:5].decode("ascii", "replace"))[0]\
        .strip() if len(fields) > 17 else ""
    name = name or default.strip()
    encoding = CHARSETS.get(name.upper())
    if encoding is None:
        raise AdtError("AR", f"character set {name!r} (MSH-18) is not supported")
    try:
        text = block.decode(encoding)
    except UnicodeDecodeError as exc:
        raise AdtError("AR", f"the message is not {name or 'ASCII'} (MSH-18, hl7_charset): "
                             f"{exc}") from None
    try:
        return hl7.parse(text.replace("\n", "\r").replace("\r\r", "\r"))
    except Exception as exc:                  # the parser's own errors are of many kinds
        raise AdtError("AR", f"not an HL7 v2 message: {exc}") from None


def read_message(msg: hl7.Message, authority: str = "") -> AdtMessage:
    """What ``msg`` asks; ``authority`` picks the identifier (PID-3, MRG-1) whose assigning
    authority (CX.4) it names, else the first one is the DICOM Patient ID.

    Raises
    ------
    AdtError
        "AR" for a message that is not ADT, "AE" for one whose values the archive cannot take.
    """
    kind, event = _get(msg, "MSH.F9.R1.C1"), _get(msg, "MSH.F9.R1.C2")
    sender = "@".join(filter(None, (_get(msg, "MSH.F3.R1.C1"), _get(msg, "MSH.F4.R1.C1"))))
    if kind != "ADT":
        raise AdtError("AR", f"message type {kind or '(none)'} is not ADT")
    control = _get(msg, "MSH.F10")
    if event not in UPDATES | MERGES:
        return AdtMessage(event, control, sender or "?", ())
    pids = _segments(msg, "PID")
    if not pids:
        raise AdtError("AE", f"ADT^{event} without a PID segment")
    merges = _segments(msg, "MRG") if event in MERGES else []
    if event in MERGES and len(merges) != len(pids):
        raise AdtError("AE", f"ADT^{event} needs one MRG segment per PID segment")
    changes = []
    for i, pid in enumerate(pids):
        patient_id = _identifier(msg, pid, 3, authority)
        prior = _identifier(msg, merges[i], 1, authority) if merges else ""
        changes.append(PatientChange(patient_id, _values(msg, pid), prior))
    return AdtMessage(event, control, sender or "?", tuple(changes))


def _get(msg, path: str) -> str:
    try:
        return str(msg[path]).strip()
    except (IndexError, KeyError):
        return ""


def _segments(msg, name: str) -> list:
    try:
        return list(msg.segments(name))
    except KeyError:
        return []


def _reps(msg, segment, number: int) -> list[list[str]]:
    """Field ``number`` of ``segment``: its repetitions, each a list of its components (the
    first subcomponent of each), unescaped."""
    if len(segment) <= number:
        return []
    _, _, rep_sep, comp_sep, sub_sep = msg.separators[:5]
    return [[msg.unescape(c.split(sub_sep)[0]).strip() for c in rep.split(comp_sep)]
            for rep in str(segment(number)).split(rep_sep)]


def _text(msg, segment, number: int) -> str | None:
    """Field ``number`` as one value (its first component), None when empty; HL7's ``""``
    (clear the value) is kept as it is."""
    reps = _reps(msg, segment, number)
    return reps[0][0] if reps and reps[0][0] else None


def _identifier(msg, segment, number: int, authority: str) -> str:
    """The identifier of the CX list in ``segment``'s field ``number`` issued by
    ``authority`` (empty: the first)."""
    for cx in _reps(msg, segment, number):
        issuer = cx[3] if len(cx) > 3 else ""
        if cx[0] and (not authority or issuer == authority):
            return cx[0]
    raise AdtError("AE", f"no patient identifier in {segment[0]}-{number}" +
                   (f" issued by {authority!r} (hl7_patient_id_authority)" if authority else ""))


def _values(msg, pid) -> dict[str, str]:
    """The DICOM patient attributes PID-5, PID-7 and PID-8 set."""
    out = {}
    names = _reps(msg, pid, 5)
    if names and any(names[0]):
        out["PatientName"] = _person_name(names[0])
    birth = _text(msg, pid, 7)
    if birth is not None:
        out["PatientBirthDate"] = _date(birth)
    sex = _text(msg, pid, 8)
    if sex is not None:
        if sex != _NULL and sex.upper() not in _SEX:
            raise AdtError("AE", f"PID-8 sex {sex!r} is not one of M, F, O, U, A, N")
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
        raise AdtError("AE", f"PID-7 birth date {text!r} is not a full date (YYYYMMDD...)")
    return text[:8]


def apply(archive, adt: AdtMessage) -> list[str]:
    """Make the changes ``adt`` asks of ``archive``, in order; return what was done, one line
    per patient.

    Raises
    ------
    AdtError
        "AE" when a correction cannot be made (a value the instances' character set or VR
        cannot hold, ...); the changes before it stay made.
    """
    done = []
    for change in adt.changes:
        try:
            done.append(_merge(archive, change, adt) if change.prior_id
                        else _update(archive, change, adt))
        except CorrectionError as exc:
            raise AdtError("AE", f"patient {change.prior_id or change.patient_id!r}: {exc}") \
                from None
    return done


def _update(archive, change: PatientChange, adt: AdtMessage) -> str:
    held = archive.patient(change.patient_id)
    if held is None:
        return f"patient {change.patient_id!r}: not held"
    values = {k: v for k, v in change.values.items() if held.get(k, "") != v}
    if not values:
        return f"patient {change.patient_id!r}: unchanged"
    done = _correct(archive, change.patient_id, values, adt)
    return f"patient {change.patient_id!r}: {_changes(done)} in {done['instances']} instances"


def _merge(archive, change: PatientChange, adt: AdtMessage) -> str:
    if change.prior_id == change.patient_id:
        return _update(archive, PatientChange(change.patient_id, change.values), adt)
    if archive.patient(change.patient_id) is not None:
        _update(archive, PatientChange(change.patient_id, change.values), adt)
    if archive.patient(change.prior_id) is None:
        return f"patient {change.prior_id!r}: not held (nothing to merge into " \
               f"{change.patient_id!r})"
    done = _correct(archive, change.prior_id,
                    {**change.values, "PatientID": change.patient_id}, adt)
    studies = "1 study" if done["studies"] == 1 else f"{done['studies']} studies"
    return f"patient {change.prior_id!r} merged into {change.patient_id!r}: {studies}, " \
           f"{done['instances']} instances"


def _correct(archive, patient_id: str, values: dict[str, str], adt: AdtMessage) -> dict:
    """Correct the patient, telling the audit messages which studies changed."""
    touched = studies_touched(archive, "patient", patient_id)
    done = archive.correct("patient", patient_id, values, adt.reason)
    note_change(archive, "correct", "patient", touched, actor=f"hl7 {adt.sender}")
    return done


def _changes(done: dict) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in done["changes"].items())


def ack(msg: hl7.Message | None, code: str, text: str = "") -> bytes:
    """The original-mode acknowledgement of ``msg`` (AA, AE or AR, with ``text`` in MSA-3);
    a minimal one when the message could not be parsed."""
    text = re.sub(r"[|^~\\&\r\n]", " ", text)[:200]
    if msg is None:
        body = f"MSH|^~\\&|VOXARC||||||ACK|||2.5\rMSA|{code}||{text}\r"
    else:
        try:
            out = msg.create_ack(code)
        except Exception:        # a header too broken to answer in kind
            return ack(None, code, text)
        body = str(out).rstrip("\r") + (f"|{text}" if text else "") + "\r"
    return body.encode("ascii", "replace")
