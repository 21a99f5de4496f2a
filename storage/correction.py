"""Correcting what the archive holds of a patient, a study or a series, in the index and in
every stored instance: a study sent under the wrong patient (an emergency registered as
"Unknown^Trauma", a worklist mix-up), a misspelt name, a wrong accession number or study
description, a series filed in the wrong study.

What can be corrected, by level (:data:`ALLOWED`): a patient's ID, name, birth date and sex; a
study's, and its patient's; a series' number, description, date, time, body part and protocol,
and the study it belongs to (its Study Instance UID).

An instance is otherwise given back as it was received; a correction is the one deliberate
change, made by an administrator, kept in an audit trail (:class:`storage.index.Correction`:
when, what, the values before and after, why). Each instance is rebuilt and checked against its
SHA-256, the changed elements are replaced in its bytes (the top-level elements only; every
other byte stays as it was, a missing element is inserted in tag order, a group length of
group 0010 follows), and the new bytes are staged with their new SHA-256: compaction codes
them again. The order is deletion's, so that a crash loses nothing: the new files are written
durably first; one transaction then points the instances at them, updates the rows (a study
moved to its patient, found by Patient ID or made; a series moved to its study), drops a
patient or study left empty and records the old files for removal and the audit row; only
then are the old files removed.

A study moved to a Patient ID that another patient already has takes that patient's name,
birth date and sex (as the index holds them) unless given: given ones that differ are refused,
since that patient's other studies hold theirs. A study whose patient has other studies keeps
its Patient ID only if all of them are corrected together (``level="patient"``). A series moved
to a study the archive holds takes that study's patient and study attributes in the same way;
moved to a Study Instance UID it does not hold, it becomes a study of its own with its old
study's patient and attributes (correct that study next to give it another patient).

An instance that arrives after a correction, in a series or study the index holds (a modality
sending a series late, or the study again, with the old values), is brought in line with it as
it is staged (:class:`LateArrivals`, logged): the keys a correction changed take the values the
index holds where it is filed. A new study that names a corrected Patient ID is stored as sent,
unless the hospital information system reconciled that ID (:mod:`storage.reconciled`).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import struct
import threading
import time
from dataclasses import dataclass, field

from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_data_element
from pydicom.uid import UID
from pydicom.valuerep import validate_value
from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError

from storage import element_scan, instance_facts, reconciled
from storage.blobstore import BlobStore, new_key
from storage.errors import CommitOutcomeUnknown, StorageError
from storage.index import Blob, Correction, Index, Instance, Patient, Series, Study
from storage.removals import finish_removals, record_removals

log = logging.getLogger(__name__)

#: what can be corrected, by level: DICOM keyword -> column of its index row
PATIENT_KEYS = {k: c for c, k in instance_facts.PATIENT_KEYS.items()}
STUDY_KEYS = {k: c for c, k in instance_facts.STUDY_KEYS.items() if k != "StudyInstanceUID"}
SERIES_KEYS = {k: c for c, k in instance_facts.SERIES_KEYS.items()
               if k not in ("SeriesInstanceUID", "Modality")}
ALLOWED = {"patient": PATIENT_KEYS, "study": {**PATIENT_KEYS, **STUDY_KEYS},
           "series": {**SERIES_KEYS, "StudyInstanceUID": "study_uid"}}
LEVELS = tuple(ALLOWED)
ALL_KEYS = {k for keys in ALLOWED.values() for k in keys}
_CHARSET = 0x00080005
_GROUP_LENGTH = 0x00100000


class CorrectionError(StorageError):
    """A correction that cannot be made as asked (nothing was changed)."""


class CorrectionConflict(CorrectionError):
    """The archive changed between planning and committing a correction (plan it again)."""


def corrected_bytes(data: bytes, transfer_syntax: str, values: dict[str, str]) -> bytes:
    """``data`` (a dataset in ``transfer_syntax``) with the top-level elements of ``values``
    (keyword -> new value) replaced, or inserted in tag order when missing and not empty.

    Raises
    ------
    CorrectionError
        For a big-endian or deflated syntax, bytes the element walker does not take, or a value
        the dataset's character set cannot hold.
    """
    ts = UID(transfer_syntax)
    if not ts.is_little_endian or ts.is_deflated:
        raise CorrectionError(f"instances in {ts.name} cannot be corrected in place")
    elements = element_scan.scan(data, not ts.is_implicit_VR)
    if elements is None:
        raise CorrectionError("the dataset's elements could not be walked")
    by_tag = {e.tag: e for e in elements}
    charset = _charset(data, by_tag)
    edits = {}                                   # tag -> new element bytes
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        if tag in by_tag or value:
            edits[tag] = _element(tag, value, ts.is_implicit_VR, charset)
    out, pos, growth = bytearray(), 0, 0
    for tag in sorted(edits):
        old = by_tag.get(tag)
        cut = old.head if old else next((e.head for e in elements if e.tag > tag), len(data))
        end = old.end if old else cut
        out += data[pos:cut] + edits[tag]
        growth += len(edits[tag]) - (end - cut)
        pos = end
    out += data[pos:]
    return _group_length(bytes(out), by_tag, growth)


def _charset(data: bytes, by_tag: dict) -> list[str]:
    """The dataset's Specific Character Set terms (none: the default repertoire)."""
    e = by_tag.get(_CHARSET)
    if e is None:
        return []
    text = bytes(data[e.start:e.start + e.length]).decode("ascii", "replace")
    return [t.strip() for t in text.strip("\0 ").split("\\")]


def _element(tag: int, value: str, implicit: bool, charset: list[str]) -> bytes:
    """The encoded element, checked to read back as ``value`` in ``charset``."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    element = DataElement(tag, dictionary_VR(tag), value)
    try:
        write_data_element(fp, element, convert_encodings(charset or None))
        back = read_dataset(DicomBytesIO(fp.getvalue()), implicit, True)
        back.SpecificCharacterSet = charset or None
        back.decode()
        same = str(back[tag].value or "") == value
    except (ValueError, LookupError, UnicodeError):
        same = False
    if not same or (not charset and not value.isascii()):    # the default is ASCII only
        raise CorrectionError(f"{value!r} cannot be written in the instance's character set "
                              f"({', '.join(charset) or 'the default repertoire'})")
    return fp.getvalue()


def _group_length(data: bytes, by_tag: dict, growth: int) -> bytes:
    """Group 0010's (retired) length element, when present, made right after the change."""
    e = by_tag.get(_GROUP_LENGTH)
    if e is None or not growth or e.length != 4:
        return data
    value = struct.unpack_from("<I", data, e.start)[0] + growth
    return data[:e.start] + struct.pack("<I", value) + data[e.start + 4:]


@dataclass
class _Planned:
    """An instance to correct, as its row stood when planned."""

    id: int
    sop_uid: str
    transfer_syntax: str
    sha256: str
    staged_key: str | None
    blob_fk: int | None
    pixel_offset: int
    size: int
    series_fk: int


@dataclass
class CorrectionPlan:
    """What a correction changes: the series' instances, the index rows, the values."""

    level: str
    uid: str
    before: dict[str, str]
    after: dict[str, str]
    study_ids: list[int]
    series_ids: list[int]
    source_patient: int
    target_patient: int | None
    target_study: int | None = None
    instances: list[_Planned] = field(default_factory=list)

    @property
    def changes(self) -> dict[str, tuple[str, str]]:
        """keyword -> (before, after) of what changes."""
        return {k: (v, self.after[k]) for k, v in self.before.items() if v != self.after[k]}

    def changed(self, keys) -> dict[str, str]:
        """Column -> new value of those of ``keys`` (keyword -> column) that change."""
        return {c: self.after[k] for k, c in keys.items() if k in self.changes}

    def summary(self) -> dict:
        return {"level": self.level, "uid": self.uid, "studies": len(self.study_ids),
                "series": len(self.series_ids), "instances": len(self.instances),
                "changes": {k: list(v) for k, v in self.changes.items()}}


def plan(index: Index, level: str, uid: str, values: dict[str, str]) -> CorrectionPlan:
    """What correcting ``uid`` (a Patient ID at ``patient`` level, a Study or Series Instance
    UID at ``study`` or ``series`` level) to ``values`` changes.

    Raises
    ------
    CorrectionError
        An unknown level, key or target; a value its VR does not allow; nothing to change; a
        move the rules above refuse.
    """
    if level not in LEVELS:
        raise CorrectionError(f"level must be one of {', '.join(LEVELS)}")
    allowed = ALLOWED[level]
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise CorrectionError(f"cannot correct {', '.join(unknown)} of a {level}: only "
                              f"{', '.join(allowed)}")
    for keyword, value in values.items():
        check_value(keyword, value)
    with index.read() as s:
        patient, study, series, study_ids, series_ids = _selection(s, level, uid)
        before = _values(patient, PATIENT_KEYS)
        if study is not None:
            before.update(_values(study, STUDY_KEYS))
        if series is not None:
            before.update(_values(series, SERIES_KEYS), StudyInstanceUID=study.study_uid)
        after = dict(before)
        out = CorrectionPlan(level, uid, before, after, study_ids, series_ids, patient.id, None)
        if series is not None and values.get("StudyInstanceUID", study.study_uid) != \
                study.study_uid:
            _move_series(s, out, values["StudyInstanceUID"])
        else:
            _patient_rules(s, out, values)
        after.update(values)
        if after == before:
            raise CorrectionError(f"nothing to change: the values are the {level}'s already")
        rows = s.execute(select(Instance.id, Instance.sop_uid, Instance.transfer_syntax,
                                Instance.sha256, Instance.staged_key, Instance.blob_fk,
                                Instance.pixel_offset, Instance.size,
                                Instance.series_fk)
                         .where(Instance.series_fk.in_(series_ids)).order_by(Instance.id)).all()
    out.instances = [_Planned(*row) for row in rows]
    return out


def check_value(keyword: str, value: str) -> None:
    """Raise CorrectionError unless ``value`` is one ``keyword``'s VR allows (an empty one
    except for the Study Instance UID)."""
    vr = dictionary_VR(tag_for_keyword(keyword))
    try:
        validate_value(vr, value, config.RAISE)
        if vr == "DA" and value:
            datetime.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError as exc:
        raise CorrectionError(f"{keyword} {value!r}: {exc}") from None
    if keyword == "PatientSex" and value not in ("", "M", "F", "O"):
        raise CorrectionError(f"PatientSex {value!r}: one of M, F, O or empty")
    if keyword == "StudyInstanceUID" and not value:
        raise CorrectionError("StudyInstanceUID: a UID, not empty")


def _values(row, keys: dict[str, str]) -> dict[str, str]:
    return {k: getattr(row, c) or "" for k, c in keys.items()}


def _selection(s, level: str, uid: str):
    """The patient, study and series rows named (None above the level) and the ids of the
    studies and series whose instances change."""
    study = series = None
    if level == "patient":
        patient = s.scalar(select(Patient).where(Patient.patient_id == uid))
        if patient is None:
            raise CorrectionError(f"no patient {uid!r}")
        study_ids = list(s.scalars(select(Study.id).where(Study.patient_fk == patient.id)))
    else:
        if level == "series":
            series = s.scalar(select(Series).where(Series.series_uid == uid))
            if series is None:
                raise CorrectionError(f"no series {uid}")
            study = s.get(Study, series.study_fk)
        else:
            study = s.scalar(select(Study).where(Study.study_uid == uid))
            if study is None:
                raise CorrectionError(f"no study {uid}")
        patient = s.get(Patient, study.patient_fk)
        study_ids = [study.id]
    series_ids = [series.id] if series is not None else \
        list(s.scalars(select(Series.id).where(Series.study_fk.in_(study_ids))))
    return patient, study, series, study_ids, series_ids


def _patient_rules(s, todo: CorrectionPlan, values: dict[str, str]) -> None:
    """The patient a study or patient goes to (see the module's docstring), in ``todo``."""
    new_id = values.get("PatientID", todo.before["PatientID"])
    if new_id != todo.before["PatientID"]:
        target = s.scalar(select(Patient).where(Patient.patient_id == new_id))
        if target is not None:
            todo.target_patient = target.id
            todo.after.update(_values(target, PATIENT_KEYS))
            clash = {k: v for k, v in values.items() if k in PATIENT_KEYS and v != todo.after[k]}
            if clash:
                raise CorrectionError(
                    f"patient {new_id!r} is held with "
                    f"{_listed({k: todo.after[k] for k in clash})}: leave those out to take "
                    "them, or correct that patient first")
    renamed = any(values.get(k, todo.before[k]) != todo.before[k] for k in PATIENT_KEYS)
    if renamed and new_id == todo.before["PatientID"] and s.scalar(select(exists().where(
            Study.patient_fk == todo.source_patient, Study.id.not_in(todo.study_ids)))):
        raise CorrectionError(f"patient {new_id!r} has other studies: correct the patient "
                              "(all its studies), or give this study another Patient ID")


def _move_series(s, todo: CorrectionPlan, new_uid: str) -> None:
    """A series moved to the study ``new_uid``: its instances take that study's patient and
    study attributes as the index holds them; a study not yet held is made with this one's."""
    target = s.scalar(select(Study).where(Study.study_uid == new_uid))
    if target is None:
        return                      # made by _write, with the series' study's attributes
    todo.target_study = target.id
    todo.target_patient = target.patient_fk
    todo.after.update(_values(s.get(Patient, target.patient_fk), PATIENT_KEYS),
                      **_values(target, STUDY_KEYS))


def _listed(values: dict) -> str:
    return ", ".join(f"{k} {v!r}" for k, v in values.items())


class Corrector:
    """Carries out corrections on an archive's index and blob store.

    Parameters
    ----------
    index : Index
    blobs : BlobStore
    retrieve : callable
        ``retrieve(sop_uid)`` -> a :class:`storage.reconstruct.StoredInstance` (SHA-256
        checked).
    originals : storage.recycle_bin.EntryWriter, optional
        Where each instance's bytes before the correction are kept (instances on legal
        hold); sealed before the index changes, abandoned when the correction fails.
    """

    def __init__(self, index: Index, blobs: BlobStore, retrieve, originals=None):
        self.index, self.blobs, self.retrieve = index, blobs, retrieve
        self.originals = originals

    def correct(self, todo: CorrectionPlan, reason: str = "") -> dict:
        """Carry out ``todo`` (see the module's docstring for the order); return its summary.

        Raises
        ------
        CorrectionError
            An instance could not be rebuilt or corrected, or the archive changed under the
            plan (plan again); nothing was changed.
        """
        try:
            staged = self._stage(todo)
        except BaseException:
            if self.originals is not None:
                self.originals.abandon()
            raise
        try:
            if self.originals is not None:
                self.originals.seal()           # durable before the originals go
            removals = self.index.write_checked(
                lambda s: self._write(s, todo, staged, reason),
                lambda s: s.scalar(select(Instance.staged_key).where(
                    Instance.id == todo.instances[0].id)) == staged[todo.instances[0].id][0])
        except CommitOutcomeUnknown:
            # the rows may point at the new files: removing them could lose the instances
            log.error("correcting %s %s: the commit's outcome is unknown; the %d corrected files "
                      "stay (the next start removes them if the commit did not take place)",
                      todo.level, todo.uid, len(staged))
            raise
        except BaseException as exc:
            for key, *_ in staged.values():
                self.blobs.delete(key)
            if self.originals is not None:
                self.originals.abandon()
            if isinstance(exc, IntegrityError):    # a patient made meanwhile (PostgreSQL)
                raise CorrectionConflict(f"{todo.level} {todo.uid}: the index changed meanwhile "
                                      f"({exc.orig or exc}); plan the correction again") from None
            raise
        finish_removals(self.index, self.blobs, removals)
        summary = todo.summary()
        log.warning("corrected %s %s: %d instances of %d studies, %s%s", todo.level, todo.uid,
                    summary["instances"], summary["studies"],
                    "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in todo.changes.items()),
                    f" ({reason})" if reason else "")
        return summary

    def _stage(self, todo: CorrectionPlan) -> dict:
        """Write each instance's corrected bytes as a staged file; return {instance id:
        (key, SHA-256, size, growth)}."""
        values = {k: todo.after[k] for k in todo.changes}
        written: dict = {}
        try:
            for inst in todo.instances:
                stored = self.retrieve(inst.sop_uid)          # checked against its SHA-256
                if self.originals is not None and self.originals.covers(inst.id):
                    self.originals.add(inst.id, stored)
                data = stored.data
                new = corrected_bytes(data, inst.transfer_syntax, values)
                digest = hashlib.sha256(new).hexdigest()
                # a name recovery does not index again: uncommitted, the file is an orphan
                # (removed at the next start) rather than a duplicate of the original
                key = new_key("s")
                self.blobs.put_new(key, new)
                written[inst.id] = (key, digest, len(new), len(new) - len(data))
        except (StorageError, OSError) as exc:
            for key, *_ in written.values():
                self.blobs.delete(key)
            if isinstance(exc, CorrectionError):
                raise CorrectionError(f"{todo.level} {todo.uid}: {exc}; nothing changed") \
                    from None
            raise CorrectionError(f"{todo.level} {todo.uid}: an instance could not be "
                                  f"rebuilt ({exc}); nothing changed") from exc
        return written

    @staticmethod
    def _write(s, todo: CorrectionPlan, staged: dict, reason: str) -> list[str]:
        """In the transaction of ``s``: instances pointed at their new files, the studies
        moved, removals and audit recorded; return the keys to remove."""
        keys, blob_ids = [], set()
        for inst in todo.instances:
            key, digest, size, growth = staged[inst.id]
            moved = s.execute(update(Instance).where(
                Instance.id == inst.id, Instance.sha256 == inst.sha256,
                Instance.staged_key.is_(None) if inst.staged_key is None
                else Instance.staged_key == inst.staged_key,
                Instance.blob_fk.is_(None) if inst.blob_fk is None
                else Instance.blob_fk == inst.blob_fk).values(
                sha256=digest, size=size, staged_key=key, blob_fk=None, frame_start=0,
                header_before=None, header_after=None,
                pixel_offset=inst.pixel_offset + growth if inst.pixel_offset else 0))
            if moved.rowcount != 1:
                raise CorrectionConflict(f"instance {inst.sop_uid} changed meanwhile (compacted "
                                      "or replaced); plan the correction again")
            if inst.staged_key:
                keys.append(inst.staged_key)
            if inst.blob_fk is not None:
                blob_ids.add(inst.blob_fk)
        for blob_id in blob_ids:
            if s.scalar(select(exists().where(Instance.blob_fk == blob_id))):
                raise CorrectionConflict(f"blob {blob_id} holds instances this correction "
                                         "does not cover")
            keys.append(s.get(Blob, blob_id).key)
            s.execute(delete(Blob).where(Blob.id == blob_id))
        if "StudyInstanceUID" in todo.changes:
            _move_rows(s, todo)
        elif todo.changed(PATIENT_KEYS):
            _repatient_rows(s, todo)
        if todo.changed(STUDY_KEYS) and "StudyInstanceUID" not in todo.changes:
            s.execute(update(Study).where(Study.id.in_(todo.study_ids)).values(
                **todo.changed(STUDY_KEYS)))
        if todo.changed(SERIES_KEYS):
            s.execute(update(Series).where(Series.id.in_(todo.series_ids)).values(
                **todo.changed(SERIES_KEYS)))
        record_removals(s, keys)
        s.add(Correction(corrected_at=time.time(), level=todo.level, uid=todo.uid,
                         studies=len(todo.study_ids), instances=len(todo.instances),
                         changes="; ".join(f"{k}: {a!r} -> {b!r}"
                                           for k, (a, b) in todo.changes.items()),
                         reason=reason[:500]))
        return keys


def _repatient_rows(s, todo: CorrectionPlan) -> None:
    """The studies' patient row corrected, or the studies moved to their new patient (made
    when new); the patient left without studies dropped."""
    target = todo.target_patient
    if target is not None and s.get(Patient, target) is None:
        raise CorrectionConflict(f"patient {todo.after['PatientID']!r} was deleted meanwhile")
    if target is None and todo.after["PatientID"] != todo.before["PatientID"]:
        made = Patient(**{c: todo.after[k] for k, c in PATIENT_KEYS.items()})
        s.add(made)
        s.flush()
        target = made.id
    if target is None:
        s.execute(update(Patient).where(Patient.id == todo.source_patient).values(
            **todo.changed(PATIENT_KEYS)))
        return
    s.execute(update(Study).where(Study.id.in_(todo.study_ids)).values(patient_fk=target))
    _drop_emptied(s, todo)


def _move_rows(s, todo: CorrectionPlan) -> None:
    """The series moved to their new study (made, with their old study's patient and
    attributes, when new); the study and patient left empty dropped."""
    target = todo.target_study
    if target is not None and s.get(Study, target) is None:
        raise CorrectionConflict(f"study {todo.after['StudyInstanceUID']} was deleted meanwhile")
    if target is None:
        old = s.get(Study, todo.study_ids[0])
        made = Study(study_uid=todo.after["StudyInstanceUID"], patient_fk=old.patient_fk,
                     **{c: getattr(old, c) for c in STUDY_KEYS.values()})
        s.add(made)
        s.flush()
        target = made.id
    s.execute(update(Series).where(Series.id.in_(todo.series_ids)).values(study_fk=target))
    s.execute(delete(Study).where(Study.id.in_(todo.study_ids),
                                  ~exists().where(Series.study_fk == Study.id)))
    _drop_emptied(s, todo)


def _drop_emptied(s, todo: CorrectionPlan) -> None:
    s.execute(delete(Patient).where(Patient.id == todo.source_patient,
                                    ~exists().where(Study.patient_fk == Patient.id)))


def patient_values(index: Index, patient_id: str) -> dict[str, str] | None:
    """The patient attributes the index holds for ``patient_id`` (keyword -> value; the
    Patient ID matched exactly), or None when it holds no such patient."""
    with index.read() as s:
        row = s.scalar(select(Patient).where(Patient.patient_id == patient_id))
        return None if row is None else _values(row, PATIENT_KEYS)


def history(index: Index, limit: int = 100) -> list[dict]:
    """The latest corrections, newest first (the audit trail)."""
    with index.read() as s:
        rows = s.scalars(select(Correction).order_by(Correction.id.desc()).limit(limit))
        return [{"corrected_at": r.corrected_at, "level": r.level, "uid": r.uid,
                 "studies": r.studies, "instances": r.instances, "changes": r.changes,
                 "reason": r.reason} for r in rows]


class LateArrivals:
    """Brings an instance that arrives after its series, study or patient was corrected (a
    modality sending a series late, or again) in line with the correction: the keys a
    correction changed take the values the index holds for the series or study it is filed in,
    so that it does not bring the old patient back into a corrected study.

    Only a series or study the index holds (found by its UID) is followed: a new study that
    names a corrected Patient ID is stored as sent (such IDs, "UNKNOWN" ones among them, can
    be given again). The corrections are read again at most every ``ttl`` seconds, when one
    was made since: a correction committed in another process applies to instances that
    arrive from then on.
    """

    def __init__(self, index: Index, ttl: float = 1.0):
        self.index, self.ttl = index, ttl
        self._checked, self._last_id, self._last_reconciled = 0.0, None, None
        self._keys: dict[str, set[str]] = {}      # corrected UID or Patient ID -> keywords
        self._reconciled: dict = {}               # storage.reconciled.load
        self._lock = threading.Lock()

    def values_for(self, facts) -> dict[str, str]:
        """Keyword -> value of what an instance with ``facts`` (InstanceFacts) must take
        ({}: nothing; almost always)."""
        keys, reconciled_rows = self._corrected()
        if not keys and not reconciled_rows:
            return {}
        own = {**{k: facts.patient[c] for k, c in PATIENT_KEYS.items()},
               **{k: facts.study[c] for k, c in STUDY_KEYS.items()},
               **{k: facts.series[c] for k, c in SERIES_KEYS.items()},
               "StudyInstanceUID": facts.study["study_uid"]}
        named = (facts.series["series_uid"], facts.study["study_uid"],
                 facts.patient["patient_id"])
        wanted = set().union(*(keys.get(uid, set()) for uid in named))
        if not wanted and facts.patient["patient_id"] not in reconciled_rows:
            return {}
        target = {}
        if facts.patient["patient_id"] in reconciled_rows:     # the HIS decides these keys
            with self.index.read() as s:
                target = reconciled.target(s, reconciled_rows, facts.patient["patient_id"])
        held = self._held(facts.series["series_uid"], facts.study["study_uid"])
        if held is not None:              # as filed: its series' or study's values
            wanted |= set(target)
            return {k: held[k] for k in sorted(wanted) if k in held and own.get(k) != held[k]}
        return {k: v for k, v in sorted(target.items()) if own.get(k) != v}

    def invalidate(self) -> None:
        """Read the corrections again at the next instance (one was just made here)."""
        self._checked = 0.0

    def _corrected(self) -> tuple[dict[str, set[str]], dict]:
        """The corrected keys by UID, and the reconciled patients (read again when stale)."""
        now = time.monotonic()
        if now - self._checked < self.ttl:
            return self._keys, self._reconciled
        with self._lock:
            if now - self._checked < self.ttl:
                return self._keys, self._reconciled
            with self.index.read() as s:
                last = s.scalar(select(func.max(Correction.id)))
                if last != self._last_id:
                    self._keys = _corrected_keys(s.execute(
                        select(Correction.uid, Correction.changes)).all())
                    self._last_id = last
                last = reconciled.last_change(s)
                if last != self._last_reconciled:
                    self._reconciled, self._last_reconciled = reconciled.load(s), last
            self._checked = now
        return self._keys, self._reconciled

    def _held(self, series_uid: str, study_uid: str) -> dict[str, str] | None:
        """The values the index holds where the instance is filed (its series, else its
        study), or None when neither is held."""
        with self.index.read() as s:
            series = s.scalar(select(Series).where(Series.series_uid == series_uid))
            study = s.get(Study, series.study_fk) if series is not None else \
                s.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is None:
                return None
            out = {**_values(s.get(Patient, study.patient_fk), PATIENT_KEYS),
                   **_values(study, STUDY_KEYS), "StudyInstanceUID": study.study_uid}
            if series is not None:
                out.update(_values(series, SERIES_KEYS))
            return out


def _corrected_keys(rows) -> dict[str, set[str]]:
    """{corrected UID or Patient ID: keywords changed}, from the audit rows' ``changes``
    ("Key: 'before' -> 'after'; ...")."""
    out: dict[str, set[str]] = {}
    for uid, changes in rows:
        for part in (changes or "").split("; "):
            keyword = part.partition(":")[0].strip()
            if keyword in ALL_KEYS:
                out.setdefault(uid, set()).add(keyword)
    return out
