"""De-identified copies of stored instances, for research and teaching files.

An instance the archive holds is given back exactly as received; a de-identified copy is a new
dataset made from it, for data that leaves the hospital's care. The rules are conservative and
apply at every depth of nested sequences:

- private elements, overlays (group 60xx), curves (50xx) and values of unknown VR are removed;
- the Patient ID and the patient's name become a pseudonym; the birth date is emptied; other
  identifying patient, visit, request and institution attributes (:data:`REMOVED`) are removed,
  and accession number and study ID emptied;
- every person name (physicians, operators) is emptied; a device serial number (which enhanced
  images must have) becomes a keyed stand-in;
- every instance UID is replaced by one derived from it with a secret key (``2.25.`` and 128
  bits of an HMAC), so references between instances still hold; UIDs the DICOM standard
  defines (SOP classes, transfer syntaxes, coding schemes) stay;
- dates (DA, and the date of a DT) are moved back by a number of days fixed per patient by the
  key (1 to :data:`MAX_SHIFT_DAYS`), so the intervals between a patient's studies hold; or kept;
- free text (LT, ST, UT, UC, UR) is removed; descriptions and protocol names (:data:`DESCRIPTIONS`)
  too, unless kept.

Pixel data is not cleaned: an instance that says its pixels carry burned-in text
(BurnedInAnnotation YES) or a face (RecognizableVisualFeatures YES), any that is not an image,
and images that are often screens or photographs (secondary capture, ultrasound, visible light)
unless they say BurnedInAnnotation NO, are left out (:func:`refusal`). The copy says what was done
(PatientIdentityRemoved YES, DeidentificationMethod, LongitudinalTemporalInformationModified).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import hmac
import io
import os
import secrets
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.sequence import Sequence
from pydicom.uid import UID, UID_dictionary

from storage.media import ChunkSink
from storage.part10 import build_file, file_meta

MAX_SHIFT_DAYS = 1096
METHOD = "voxarc de-identification 1"
#: identifying attributes removed wherever they are
REMOVED = frozenset("""
    OtherPatientIDs OtherPatientIDsSequence OtherPatientNames PatientBirthName PatientBirthTime
    PatientAddress PatientTelephoneNumbers PatientTelecomInformation PatientMotherBirthName
    MilitaryRank BranchOfService MedicalRecordLocator CountryOfResidence RegionOfResidence
    Occupation PatientReligiousPreference EthnicGroup PatientInsurancePlanCodeSequence
    IssuerOfPatientID IssuerOfPatientIDQualifiersSequence ResponsiblePerson
    ResponsiblePersonRole ResponsibleOrganization PatientComments AdditionalPatientHistory
    MedicalAlerts Allergies SmokingStatus PregnancyStatus LastMenstrualDate
    SpecialNeeds PatientState ReferencedPatientSequence ReferencedPatientPhotoSequence
    PersonIdentificationCodeSequence PersonAddress PersonTelephoneNumbers
    InstitutionName InstitutionAddress InstitutionalDepartmentName InstitutionCodeSequence
    InstitutionalDepartmentTypeCodeSequence StationName DeviceUID
    PlateID GantryID DetectorID CassetteID GeneratorID SourceSerialNumber
    RequestingService RequestingPhysicianIdentificationSequence RequestedProcedureID
    ScheduledProcedureStepID PerformedProcedureStepID PerformedLocation ScheduledStationName
    ScheduledStationAETitle PerformedStationName PerformedStationAETitle
    ScheduledProcedureStepLocation AdmissionID IssuerOfAdmissionIDSequence
    AdmittingDiagnosesDescription AdmittingDiagnosesCodeSequence ServiceEpisodeID
    ServiceEpisodeDescription CurrentPatientLocation PatientInstitutionResidence
    ReferringPhysicianAddress ReferringPhysicianTelephoneNumbers
    ReferringPhysicianIdentificationSequence ConsultingPhysicianIdentificationSequence
    PhysiciansOfRecordIdentificationSequence PerformingPhysicianIdentificationSequence
    PhysiciansReadingStudyIdentificationSequence OperatorIdentificationSequence
    FillerOrderNumberImagingServiceRequest PlacerOrderNumberImagingServiceRequest
    OrderEnteredBy OrderEntererLocation OrderCallbackPhoneNumber ReasonForStudy
    ReasonForTheRequestedProcedure RequestedProcedureComments ImagingServiceRequestComments
    StudyComments ImageComments InterpretationText ContentSequence
    ModifiedAttributesSequence OriginalAttributesSequence DigitalSignaturesSequence
    SourceApplicationEntityTitle RetrieveAETitle StorageMediaFileSetID StorageMediaFileSetUID
    TimezoneOffsetFromUTC VerifyingOrganization VerifyingObserverSequence
""".split())
#: descriptions removed unless kept (they name the patient now and then: "CT HEAD SMITH")
DESCRIPTIONS = frozenset("""
    StudyDescription SeriesDescription PerformedProcedureStepDescription
    RequestedProcedureDescription ScheduledProcedureStepDescription ProtocolName
    AcquisitionComments DerivationDescription
""".split())
EMPTIED = frozenset({"AccessionNumber", "StudyID", "PatientBirthDate"})
#: identifying values some IODs require (Enhanced General Equipment's Type 1 serial number):
#: replaced by a keyed stand-in, the same for the same value
STAND_INS = frozenset({"DeviceSerialNumber"})
FREE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UC", "UR"})
KEPT_BINARY = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})      # pixel data of any kind
IMAGE_CLASS_WORDS = ("Image Storage", "Volume Storage")
#: images that are often screens or photographs: text or faces in the pixels, unless the
#: instance says otherwise (BurnedInAnnotation NO)
SCREEN_CLASS_WORDS = ("Secondary Capture", "Ultrasound", "VL ", "Photograph", "Video",
                      "Ophthalmic")


def refusal(ds: Dataset) -> str:
    """Why an instance cannot be de-identified by these rules (its pixels may carry names), or
    "" when it can."""
    name = UID(str(ds.get("SOPClassUID", ""))).name
    burned = str(ds.get("BurnedInAnnotation", "")).strip().upper()
    if burned == "YES":
        return "its pixels carry burned-in annotation (BurnedInAnnotation YES)"
    if str(ds.get("RecognizableVisualFeatures", "")).strip().upper() == "YES":
        return "it shows recognizable visual features (RecognizableVisualFeatures YES)"
    if not any(word in name for word in IMAGE_CLASS_WORDS):
        return f"not an image ({name or 'unknown SOP class'})"
    if any(word in name for word in SCREEN_CLASS_WORDS) and burned != "NO":
        return f"a {name} without BurnedInAnnotation NO (its pixels may show names)"
    return ""


class Deidentifier:
    """Makes de-identified copies; the same ``key`` gives the same pseudonyms, UIDs and date
    shifts (a random one when None: unlinkable to any other export)."""

    def __init__(self, key: bytes | None = None, keep_dates: bool = False,
                 keep_descriptions: bool = False):
        self.key = key if key is not None else secrets.token_bytes(32)
        self.keep_dates, self.keep_descriptions = keep_dates, keep_descriptions

    def _mac(self, kind: str, value: str) -> bytes:
        return hmac.new(self.key, f"{kind}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """The replacement of an instance UID (the standard's own UIDs are kept)."""
        if uid in UID_dictionary:
            return uid
        return "2.25." + str(int.from_bytes(self._mac("uid", uid)[:16], "big"))

    def pseudonym(self, patient_id: str) -> str:
        """The Patient ID and name the patient is given."""
        return "ANON-" + self._mac("patient", patient_id).hex()[:12].upper()

    def day_shift(self, patient_id: str) -> int:
        """Days the patient's dates move back (0 with ``keep_dates``)."""
        if self.keep_dates:
            return 0
        return 1 + int.from_bytes(self._mac("days", patient_id)[:4], "big") % MAX_SHIFT_DAYS

    def dataset(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds`` (which is left as it was), with file meta."""
        patient_id = str(ds.get("PatientID", ""))
        out = self._copy(ds, self.day_shift(patient_id))
        pseudonym = self.pseudonym(patient_id)
        out.PatientID, out.PatientName = pseudonym, pseudonym
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = METHOD + ("; dates kept" if self.keep_dates else
                                               "; dates shifted") + \
            ("; descriptions kept" if self.keep_descriptions else "")
        out.LongitudinalTemporalInformationModified = \
            "UNMODIFIED" if self.keep_dates else "MODIFIED"
        out.file_meta = file_meta(out.SOPClassUID, out.SOPInstanceUID,
                                  ds.file_meta.TransferSyntaxUID)
        return out

    def _copy(self, ds: Dataset, shift: int) -> Dataset:
        out = Dataset()
        for elem in ds:
            kept = self._element(elem, shift)
            if kept is not None:
                out.add(kept)
        return out

    def _element(self, elem, shift: int):
        """The element as the copy holds it, or None when it is left out."""
        tag, vr = elem.tag, elem.VR
        group = tag >> 16
        keyword = keyword_for_tag(tag)
        if tag.is_private or group & 0xFF00 in (0x5000, 0x6000) or tag.element == 0 \
                or vr == "UN" or not keyword or keyword in REMOVED \
                or (keyword in DESCRIPTIONS and not self.keep_descriptions) \
                or vr in FREE_TEXT_VRS or (vr in ("OB", "OW", "OF", "OD", "OL", "OV")
                                           and tag not in KEPT_BINARY
                                           and "LookupTable" not in keyword):
            return None
        new = type(elem)(tag, vr, elem.value)
        if keyword in EMPTIED or vr == "PN":
            new.value = ""
        elif keyword == "PatientID":           # wherever it is: the same pseudonym
            new.value = self.pseudonym(str(elem.value))
        elif keyword in STAND_INS:
            new.value = _each(elem.value, lambda v: "X" + self._mac(keyword, v).hex()[:11])
        elif vr == "SQ":
            new.value = Sequence([self._copy(item, shift) for item in elem.value])
        elif vr == "UI":
            new.value = _each(elem.value, self.uid)
        elif vr == "DA" and shift:
            new.value = _each(elem.value, lambda v: _shifted(v, shift, 8))
        elif vr == "DT" and shift:      # the date part moved, the time kept
            new.value = _each(elem.value,
                              lambda v: (day := _shifted(v, shift, 8)) and day + v[8:])
        elif keyword == "PatientAge" and _over_89(str(elem.value)):
            new.value = "090Y"          # ages above 89 are few enough to identify: one group
        return new


def _each(value, change):
    """``change`` applied to a value or to each of a multi-valued one (empty ones kept)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [change(str(v)) if str(v) else "" for v in value]
    return change(str(value)) if value not in (None, "") else value


def _over_89(age: str) -> bool:
    return age.endswith("Y") and age[:-1].isdigit() and int(age[:-1]) > 89


@dataclass(frozen=True)
class Copy:
    """A de-identified Part 10 file, with the identifiers it replaced and their replacements."""

    sop_uid: str
    series_uid: str
    data: bytes
    replaced: dict         # (kind, original) -> replacement

    @property
    def path(self) -> str:
        """Where the copy goes in a folder or a ZIP: ``<series UID>/<SOP instance UID>.dcm``."""
        return f"{self.series_uid}/{self.sop_uid}.dcm"


def copy_of(inst, deidentifier: Deidentifier) -> Copy | str:
    """A de-identified Part 10 file of a stored instance (a
    :class:`storage.reconstruct.StoredInstance`) in its transfer syntax, or the reason it is
    left out (:func:`refusal`)."""
    ds = dcmread(io.BytesIO(build_file(inst.sop_class_uid, inst.sop_uid, inst.transfer_syntax,
                                       inst.data)))
    why = refusal(ds)
    if why:
        return why
    out = deidentifier.dataset(ds)
    buffer = io.BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    patient = str(ds.get("PatientID", ""))
    replaced = {("patient", patient): f"{out.PatientID} "
                                      f"(dates -{deidentifier.day_shift(patient)} days)"}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if keyword in ds:
            replaced[(keyword, str(ds[keyword].value))] = str(out[keyword].value)
    return Copy(str(out.SOPInstanceUID), str(out.get("SeriesInstanceUID", "none")),
                buffer.getvalue(), replaced)


class Mapping:
    """The identifiers of the copies made and their replacements, for whoever may re-identify
    them (a CSV of kind, original, replacement)."""

    def __init__(self):
        self.rows: dict = {}

    def add(self, copy: Copy) -> None:
        self.rows.update(copy.replaced)

    def write(self, path: Path) -> None:
        """Write the CSV, readable by its owner only."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["kind", "original", "replacement"])
            for (kind, original), replacement in sorted(self.rows.items()):
                out.writerow([kind, original, replacement])


def key_from(path: Path) -> bytes:
    """The secret in ``path``; a new random one is written there (owner only) when the file
    does not exist. Raises ValueError for a file too short to be a key."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 16:
            raise ValueError("a key file holds at least 16 bytes") from None
        return key
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def _shifted(value: str, days: int, width: int) -> str:
    """A DICOM date (its first ``width`` characters) moved back ``days``; a value that is not
    a full date (a year, ``***``) is emptied rather than kept."""
    try:
        day = datetime.datetime.strptime(value[:width], "%Y%m%d").date()
    except ValueError:
        return ""
    return (day - datetime.timedelta(days=days)).strftime("%Y%m%d")


def zip_copies(archive, sop_uids: list[str], deidentifier: Deidentifier) -> Iterator[bytes]:
    """The bytes of a ZIP of de-identified copies of the instances (``<new series UID>/<new
    SOP instance UID>.dcm``, stored), made as they are taken, in the order the archive decodes
    best, with a ``README.txt`` last that says what was done and what was left out."""
    sink, left_out = ChunkSink(), Counter()
    with archive.retrieval_order(list(sop_uids), "de-identified copy") as (ordered, _), \
            zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for uid in ordered:
            copy = copy_of(archive.retrieve(uid), deidentifier)
            if isinstance(copy, str):
                left_out[copy] += 1
                continue
            zf.writestr(copy.path, copy.data)
            yield from sink.take()
        zf.writestr("README.txt", _readme(deidentifier, len(sop_uids), left_out))
    yield from sink.take()


def _readme(deidentifier: Deidentifier, total: int, left_out: Counter) -> str:
    lines = [f"De-identified copies ({METHOD}): {total - sum(left_out.values())} of {total} "
             "instances.",
             "Patient ID and name are a pseudonym, instance UIDs replaced, identifying, "
             "private and free-text attributes removed, person names emptied,",
             "dates " + ("kept." if deidentifier.keep_dates else "moved back by a number of "
                         "days fixed per patient."),
             "Pixels are not cleaned: review the images before they leave your care."]
    lines += [f"Left out, {n}: {why}" for why, n in sorted(left_out.items())]
    return "\n".join(lines) + "\n"
