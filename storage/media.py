"""DICOM media file-sets (PS3.10): a DICOMDIR and the instances it references, for a CD, a USB
stick or a ZIP file that any DICOM viewer opens.

The directory (:mod:`storage.dicomdir`) is made from the instances' stored headers (nothing is
decoded for it), with file IDs such as ``PT000000/ST000000/SE000000/IM000000`` (components of
eight upper-case characters at most, as media profiles require). The files are the instances
as received: Part 10 files whose datasets are the received bytes, rebuilt and SHA-256 checked
by the archive, in the transfer syntax they came in.

A directory record must have some keys (Type 1, PS3.3 F.5) that an instance may lack, hold
empty or hold in a form their VR does not allow (an anonymiser's ``***`` as a date), such as
Study ID. The record then gets an invented value (:data:`INVENTED`, as DCMTK's ``dcmmkdir
--invent`` does); the instance's file is never changed.

With a media profile (:data:`PROFILES`: ``STD-GEN-CD``, the general-purpose CD of PS3.12,
which takes Explicit VR Little Endian only), each instance in another syntax is converted to
the profile's (:func:`storage.transcode.convert`: lossless only, checked element by element
and pixel by pixel) and its record names the converted syntax; an instance that cannot be
(lossy-compressed pixels) is written as received and counted in ``outside_profile``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import validate_value

from storage import transcode
from storage.dataset_parts import header_elements
from storage.dicomdir import Directory
from storage.errors import StorageError
from storage.part10 import file_head, write_file

log = logging.getLogger(__name__)

#: what a record gets for a key the instance lacks
INVENTED = {
    "PatientID": "an ID made from the patient's name and birth date",
    "StudyDate": "the first of Series, Acquisition and Content Date, else the export's date",
    "StudyTime": "the first of Series, Acquisition and Content Time, else 000000",
    "StudyID": "the study's place in the file-set (1, 2, ...)",
    "Modality": "OT",
    "SeriesNumber": "the series' place in its study",
    "InstanceNumber": "the instance's place in its series",
}
FILE_SET_ID = "VOXARC"
#: media profiles a file-set can be written for: name -> the one transfer syntax they take
PROFILES = {"STD-GEN-CD": ExplicitVRLittleEndian}
DICOMDIR = "DICOMDIR"


@dataclass(frozen=True)
class FileSetPlan:
    """A file-set to write: its DICOMDIR's bytes and, in its order, ``files``: (file ID with
    ``/`` between components, SOP Instance UID). ``left_out``: SOP Instance UID -> why it has
    no record; ``invented``: how many records carry an invented key; ``studies``: Study
    Instance UID -> how many of its instances are in the file-set; ``convert``: SOP Instance
    UID -> the syntax its file is converted to (a profile's); ``outside_profile``: SOP
    Instance UID -> the syntax of a file the profile does not take, written as received."""

    dicomdir: bytes
    files: tuple[tuple[str, str], ...]
    left_out: dict[str, str] = field(default_factory=dict)
    invented: int = 0
    studies: dict[str, int] = field(default_factory=dict)
    convert: dict[str, str] = field(default_factory=dict)
    outside_profile: dict[str, str] = field(default_factory=dict)


def _valid(ds: Dataset, keyword: str) -> bool:
    """Whether ``ds`` has a value for ``keyword`` that its VR allows (an anonymiser's ``***``
    as a date is none)."""
    try:
        value = str(ds.get(keyword, "")).strip("\0 ")
        validate_value(dictionary_VR(keyword), value, config.RAISE)
    except (ValueError, TypeError):
        return False
    return value != ""


def _first(ds: Dataset, keywords: tuple[str, ...], default: str) -> str:
    return next((str(ds.get(k)).strip("\0 ") for k in keywords if _valid(ds, k)), default)


class _Places:
    """Numbers of studies in the file-set, series in a study, instances in a series, from 1 in
    the order first seen."""

    def __init__(self):
        self._seen: dict[tuple, int] = {}
        self._counts: Counter = Counter()

    def of(self, *key) -> int:
        if key not in self._seen:
            self._counts[key[:-1]] += 1
            self._seen[key] = self._counts[key[:-1]]
        return self._seen[key]


def _record_source(header, places: _Places, syntax: str) -> tuple[Dataset, bool]:
    """The attributes the directory records ``header``'s instance by (its file in
    ``syntax``), with any missing record key invented; and whether one was."""
    ds = header_elements(header.data, header.transfer_syntax)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID = header.sop_class_uid, header.sop_uid
    study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
    numbers = {"StudyID": str(places.of("study", study)),
               "SeriesNumber": places.of("series", study, series),
               "InstanceNumber": places.of("instance", study, series, header.sop_uid)}
    made = {
        "PatientID": lambda: "VX" + hashlib.sha256(
            f"{ds.get('PatientName', '')}|{ds.get('PatientBirthDate', '')}".encode(
                "utf-8", "surrogateescape")).hexdigest()[:14].upper(),
        "StudyDate": lambda: _first(ds, ("SeriesDate", "AcquisitionDate", "ContentDate"),
                                    date.today().strftime("%Y%m%d")),
        "StudyTime": lambda: _first(ds, ("SeriesTime", "AcquisitionTime", "ContentTime"),
                                    "000000"),
        "Modality": lambda: "OT",
        **{keyword: (lambda n=n: n) for keyword, n in numbers.items()},
    }
    invented = False
    for keyword, make in made.items():
        if not _valid(ds, keyword):
            setattr(ds, keyword, make())
            invented = True
    return ds, invented


def _number(value) -> int:
    try:
        return int(str(value if value is not None else "").strip())
    except ValueError:
        return 1 << 31


def _instances(archive, study_uids: list[str]) -> list[str]:
    """SOP Instance UIDs of the studies, by study, series number and instance number."""
    out = []
    for study in study_uids:
        records = archive.find("IMAGE", {"StudyInstanceUID": study})
        records.sort(key=lambda r: (_number(r.get("SeriesNumber")), str(r["SeriesInstanceUID"]),
                                    _number(r.get("InstanceNumber")), str(r["SOPInstanceUID"])))
        out += [r["SOPInstanceUID"] for r in records]
    return out


def plan_file_set(archive, study_uids: list[str], progress=None,
                  profile: str | None = None) -> FileSetPlan:
    """The file-set of the studies' instances (an unknown study adds none), for a media
    ``profile`` of :data:`PROFILES` when given.

    An instance whose header cannot be read, or that no record can be made for (a record
    type whose other required keys it lacks), is left out and named in ``left_out``;
    ``progress`` (a :class:`~service.progress.Progress`-like object) advances per instance.
    Raises ValueError for an unknown profile.
    """
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"unknown media profile {profile!r}; known: {', '.join(PROFILES)}")
    wanted = PROFILES.get(profile)
    directory, places, left_out, invented, files = Directory(), _Places(), {}, 0, []
    studies: Counter = Counter()
    convert, outside = {}, {}
    uids = _instances(archive, study_uids)
    located = archive.locate(uids)
    for uid in uids:
        try:
            header = archive.header(uid, located.get(uid))
            syntax = header.transfer_syntax
            if wanted and syntax != wanted:
                if transcode.convertible(syntax, wanted):
                    convert[uid] = syntax = wanted
                else:
                    outside[uid] = syntax
            ds, made = _record_source(header, places, syntax)
            files.append((directory.add(ds), uid))
            studies[str(ds.StudyInstanceUID)] += 1
        except (StorageError, ValueError, KeyError) as exc:
            left_out[uid] = str(exc)
            log.warning("instance %s left out of the file-set: %s", uid, exc)
        else:
            invented += made
        if progress:
            progress.advance(note=uid[-30:])
    if not files:
        return FileSetPlan(b"", (), left_out, invented)
    kept = {uid for _, uid in files}
    return FileSetPlan(directory.encode(FILE_SET_ID), tuple(files), left_out, invented,
                       dict(studies), {u: t for u, t in convert.items() if u in kept},
                       {u: t for u, t in outside.items() if u in kept})


def _as_planned(inst, plan: FileSetPlan) -> tuple[str, tuple]:
    """The rebuilt instance's syntax and bytes in the file-set: as received, or converted to
    the profile's syntax (raises TranscodeError when that fails its checks)."""
    target = plan.convert.get(inst.sop_uid)
    if target is None:
        return inst.transfer_syntax, inst.parts
    return target, (transcode.convert(inst.joined().data, inst.transfer_syntax, target),)


def _file_parts(archive, plan: FileSetPlan, sop_uid: str, located=None) -> tuple[tuple, int]:
    """A Part 10 file of the instance as the plan has it, in parts, and its size."""
    inst = archive.retrieve_parts(sop_uid, located)
    syntax, data = _as_planned(inst, plan)
    parts = (file_head(inst.sop_class_uid, sop_uid, syntax), *data)
    return parts, sum(memoryview(p).nbytes for p in parts)


def write_file_set(archive, plan: FileSetPlan, folder: Path, progress=None) -> list[str]:
    """Write ``plan``'s files under ``folder`` (in the order the archive decodes best, their
    slabs decoded ahead), then its DICOMDIR. Returns the SOP Instance UIDs that could not be
    rebuilt (logged); with any, no DICOMDIR is written, so that no directory names a missing
    file."""
    failed = []
    file_ids = {uid: file_id for file_id, uid in plan.files}
    with archive.retrieval_order(list(file_ids), "file-set") as (ordered, _):
        located = archive.locate(ordered)
        for uid in ordered:
            try:
                inst = archive.retrieve_parts(uid, located.get(uid))
                syntax, data = _as_planned(inst, plan)
            except StorageError as exc:
                failed.append(uid)
                log.error("instance %s not written to the file-set: %s", uid, exc)
            else:
                write_file(folder.joinpath(*file_ids[uid].split("/")), inst.sop_class_uid, uid,
                           syntax, data)
            if progress:
                progress.advance(note=uid[-30:])
    if plan.files and not failed:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DICOMDIR).write_bytes(plan.dicomdir)
    return failed


class ChunkSink(io.RawIOBase):
    """An unseekable sink that keeps what is written until taken."""

    def __init__(self):
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return memoryview(data).nbytes

    def take(self) -> Iterator[bytes]:
        parts, self._parts = self._parts, []
        yield from parts


def zip_file_set(archive, plan: FileSetPlan) -> Iterator[bytes]:
    """The bytes of a ZIP file of ``plan`` (files stored, not compressed), made as they are
    taken: one instance at a time, in the order the archive decodes best, the DICOMDIR last.
    An instance that cannot be rebuilt raises :class:`StorageError` before the ZIP's directory
    is written, so the ZIP is left unreadable rather than incomplete."""
    sink = ChunkSink()
    file_ids = {uid: file_id for file_id, uid in plan.files}
    with archive.retrieval_order(list(file_ids), "file-set") as (ordered, _), \
            zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        located = archive.locate(ordered)
        for uid in ordered:
            parts, size = _file_parts(archive, plan, uid, located.get(uid))
            info = zipfile.ZipInfo(file_ids[uid], date_time=_now())
            info.file_size = size         # zipfile then knows when it needs ZIP64
            with zf.open(info, "w") as member:
                for part in parts:
                    member.write(part)
            yield from sink.take()
        zf.writestr(zipfile.ZipInfo(DICOMDIR, date_time=_now()), plan.dicomdir)
    yield from sink.take()


def _now() -> tuple:
    return datetime.now().timetuple()[:6]
