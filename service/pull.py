"""Copy studies from another DICOM archive into this one: C-FIND there, C-GET (or C-MOVE) here.

What a site replacing a PACS (or gathering studies from a modality's store) needs: the source
is asked for its studies (Study Root C-FIND at STUDY level, with the caller's filters), then for
each study's instances (IMAGE level: their SOP classes and UIDs); what the archive already
holds is left out, so an interrupted pull resumes where it stopped; the rest comes by C-GET on
one association per study, each instance through the same ingest path as a C-STORE (durable
and indexed before it is acknowledged). Each SOP class is offered in every common transfer
syntax in contexts of their own, so that the source sends instances in the syntax it holds them
in rather than converting them. A source without C-GET can instead be asked to C-MOVE them to
a running node of this archive.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         UID)
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind as FIND,
                                  StudyRootQueryRetrieveInformationModelGet as GET,
                                  StudyRootQueryRetrieveInformationModelMove as MOVE)

from service import reactor_pause
from service.config import Destination, Settings, parse_destination
from service.handlers import handle_store

log = logging.getLogger(__name__)
_UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
# compressed syntaxes offered in contexts of their own, most common first
_COMPRESSED = [
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",
    "1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112",
    "1.2.840.10008.1.2.1.99",
]
# storage classes proposed for instances whose class the source's answers do not give (DCMTK's
# dcmqrscp answers IMAGE-level queries without SOP Class UID): the common image and document
# classes, CT and MR first
_COMMON_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
    "1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.12.2", "1.2.840.10008.5.1.4.1.1.128",
    "1.2.840.10008.5.1.4.1.1.130", "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.13.1.3",
    "1.2.840.10008.5.1.4.1.1.481.1", "1.2.840.10008.5.1.4.1.1.481.2",
    "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.481.5",
    "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.59",
    "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.77.1.4",
]
_MAX_CONTEXTS = 127          # 128 an association, one of them for C-GET itself
TIMEOUT = 120.0
CONNECTION_TIMEOUT = 10.0


class PullError(RuntimeError):
    """The source cannot be reached or refuses a query or retrieval."""


@dataclass
class StudyPlan:
    """A study at the source and what of it this archive lacks."""

    study_uid: str
    patient: str
    description: str
    instances: dict = field(default_factory=dict)   # SOP Instance UID -> (series, SOP class)
    missing: list = field(default_factory=list)     # SOP Instance UIDs not held here


@dataclass
class StudyResult:
    """What a retrieval of a study brought: its final status and sub-operation counts."""

    status: int
    completed: int = 0
    failed: int = 0
    warning: int = 0


def resolve_source(settings: Settings, name: str) -> Destination:
    """The source a ``pull`` names: a configured destination (by name or AE title), or
    ``AET@HOST:PORT``; raises ValueError."""
    known = settings.destination(name)
    if known is not None:
        return known
    try:
        return parse_destination(f"source={name}")
    except ValueError:
        raise ValueError(f"source {name!r} is neither a configured destination nor "
                         "AET@HOST:PORT") from None


class Puller:
    """Pull studies from ``source`` into ``archive`` (see the module's docstring), as the AE
    ``ae_title``; ``max_bytes``: the archive's ``max_dataset_bytes``."""

    def __init__(self, archive, source: Destination, ae_title: str, max_bytes: int = 0):
        self.archive, self.source, self.max_bytes = archive, source, max_bytes
        self.ae = AE(ae_title=ae_title)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = TIMEOUT
        self.ae.connection_timeout = CONNECTION_TIMEOUT   # a source switched off: not minutes

    def studies(self, filters: dict[str, str]) -> list[StudyPlan]:
        """The source's studies matching ``filters`` (C-FIND keys), not yet planned (see
        :meth:`plan`: one query a study, made as the pull reaches it)."""
        query = {"StudyInstanceUID": "", "PatientName": "", "PatientID": "",
                 "StudyDescription": "", **filters}
        return [StudyPlan(str(found.StudyInstanceUID), str(found.get("PatientName", "") or ""),
                          str(found.get("StudyDescription", "") or ""))
                for found in self._find("STUDY", query) if found.get("StudyInstanceUID")]

    def plan(self, plan: StudyPlan) -> StudyPlan:
        """Fill in the study's instances at the source and those this archive lacks."""
        for inst in self._find("IMAGE", {"StudyInstanceUID": plan.study_uid,
                                         "SeriesInstanceUID": "", "SOPInstanceUID": "",
                                         "SOPClassUID": ""}):
            sop = str(inst.get("SOPInstanceUID", "") or "")
            if sop:
                plan.instances[sop] = (str(inst.get("SeriesInstanceUID", "") or ""),
                                       str(inst.get("SOPClassUID", "") or ""))
        held = self.archive.held(list(plan.instances))
        plan.missing = [sop for sop in plan.instances if sop not in held]
        return plan

    def pull(self, plan: StudyPlan, move_to: str | None = None) -> StudyResult:
        """Retrieve what ``plan`` lacks: the whole study when nothing of it is here, else the
        missing instances series by series (a UID list at IMAGE level). By C-GET, or with
        ``move_to`` by C-MOVE to that AE title (a running node of this archive, which the
        source must know), for sources that do not serve C-GET."""
        if not plan.missing:
            return StudyResult(0x0000)
        if len(plan.missing) == len(plan.instances):
            requests = [{"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": plan.study_uid}]
        else:
            by_series: dict[str, list[str]] = {}
            for sop in plan.missing:
                by_series.setdefault(plan.instances[sop][0], []).append(sop)
            requests = [{"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": plan.study_uid,
                         "SeriesInstanceUID": series, "SOPInstanceUID": "\\".join(sops)}
                        for series, sops in by_series.items()]
        if move_to:
            assoc = self._associate([build_context(MOVE)])
            send = functools.partial(assoc.send_c_move, move_aet=move_to, query_model=MOVE)
        else:
            classes = _storage_classes({plan.instances[sop][1] for sop in plan.missing})
            assoc = self._associate(_get_contexts(classes),
                                    ext_neg=[build_role(c, scp_role=True) for c in classes],
                                    evt_handlers=[(evt.EVT_C_STORE, handle_store,
                                                   [self.archive, self.max_bytes])])
            send = functools.partial(assoc.send_c_get, query_model=GET)
        total = StudyResult(0x0000)
        try:
            for keys in requests:
                result = self._retrieve(send, keys)
                total.completed += result.completed
                total.failed += result.failed
                total.warning += result.warning
                if result.status != 0x0000:
                    total.status = result.status
        finally:
            assoc.release()
        return total

    def _find(self, level: str, keys: dict[str, str]) -> list[Dataset]:
        query = _dataset({"QueryRetrieveLevel": level, **keys})
        assoc = self._associate([build_context(FIND)])
        found = []
        try:
            for status, identifier in assoc.send_c_find(query, FIND):
                if status is None:
                    raise PullError(f"C-FIND at {self._name()}: no answer (timed out or "
                                    "aborted)")
                if status.Status in (0xFF00, 0xFF01):
                    found.append(identifier)
                elif status.Status != 0x0000:
                    raise PullError(f"C-FIND at {self._name()} failed: status "
                                    f"0x{status.Status:04X}")
        finally:
            assoc.release()
        return found

    def _retrieve(self, send, keys: dict[str, str]) -> StudyResult:
        """One C-GET or C-MOVE request (``send``): its final status and counts."""
        result = None
        for status, _ in send(_dataset(keys)):
            if status is None:
                raise PullError(f"retrieval from {self._name()}: no answer (timed out or "
                                "aborted)")
            if status.Status not in (0xFF00, 0xFF01):
                result = StudyResult(
                    status.Status, int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                    int(status.get("NumberOfFailedSuboperations", 0) or 0),
                    int(status.get("NumberOfWarningSuboperations", 0) or 0))
        if result is None:
            raise PullError(f"retrieval from {self._name()}: no final status")
        return result

    def _associate(self, contexts, **kwargs):
        src = self.source
        assoc = self.ae.associate(src.host, src.port, contexts=contexts,
                                  ae_title=src.ae_title, **kwargs)
        if not assoc.is_established:
            raise PullError(f"{self._name()} refused or did not answer the association")
        reactor_pause.guard(assoc)
        return assoc

    def _name(self) -> str:
        return f"{self.source.ae_title}@{self.source.host}:{self.source.port}"


def _storage_classes(known: set[str]) -> list[str]:
    """The storage classes a C-GET proposes: those the source named, and the common ones
    when it left some instance's class out (``""``)."""
    classes = sorted(known - {""})
    if "" in known:
        classes += [c for c in _COMMON_CLASSES if c not in classes]
    return classes


def _get_contexts(classes: list[str]) -> list:
    """The C-GET context and, for each storage SOP class, one context of the uncompressed
    syntaxes and one per compressed syntax (fewer of them when many classes must share the
    association's 128 contexts)."""
    room = max(0, _MAX_CONTEXTS // max(1, len(classes)) - 1)
    syntaxes = _COMPRESSED[:room]
    contexts = [build_context(GET)]
    for sop_class in classes[:_MAX_CONTEXTS]:
        contexts.append(build_context(sop_class, _UNCOMPRESSED))
        contexts += [build_context(sop_class, [UID(ts)]) for ts in syntaxes]
    return contexts


def _dataset(keys: dict[str, str]) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds
