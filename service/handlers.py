"""DIMSE event handlers: plain functions given the archive (and settings) they need.

Bound to pynetdicom events in :mod:`service.ae`. Each answers with a status from
:mod:`service.statuses`; no exception escapes unlogged or without a status.
"""

from __future__ import annotations

import logging
import time

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from service import rejection_notes, statuses
from service.access import AccessPolicy
from service.config import Settings
from service.exact_send import PreEncoded
from service.identifiers import (IdentifierError, find_records, parse_identifier, response,
                                 retrieve_criteria)
from service.socket_tuning import tune_association
from storage import transcode
from storage.dataset_parts import nbytes
from storage.archive import Archive
from storage.query import Matching

log = logging.getLogger(__name__)


def _other(event):
    """The other side of the event's association (the source, when the node pulls)."""
    assoc = event.assoc
    return assoc.acceptor if getattr(assoc, "is_requestor", False) else assoc.requestor


def _peer(event) -> str:
    other = _other(event)
    return f"{other.ae_title}@{other.address}:{other.port}"


def _calling_ae(event) -> str:
    """The AE title that sent a C-STORE (kept with the instance)."""
    try:
        return str(_other(event).ae_title).strip()
    except AttributeError:
        return ""


def _actor(event) -> str:
    """Who the access trail names for the event: the calling AE title and its host."""
    return f"{_calling_ae(event)}@{_other(event).address}"


def handle_association(event) -> None:
    """Log associations opening and closing."""
    log.info("association %s with %s", event.event.name.replace("EVT_", "").lower(), _peer(event))


def handle_rejected(event, archive: Archive, policy: AccessPolicy, require_called: bool) -> None:
    """An association request refused for who asked (its calling or called AE title, not a
    busy node): logged, and a security alert for the audit messages."""
    asked = getattr(event.assoc.requestor, "primitive", None)
    why = policy.rejection(_calling_ae(event), str(getattr(asked, "called_ae_title", "")),
                           str(event.assoc.acceptor.ae_title), require_called)
    if why:
        log.warning("association from %s rejected: %s", _peer(event), why)
        archive.accesses.note(_actor(event), "association rejected", detail=why, keep=False)


def refusals(archive: Archive):
    """``on_refused`` of :func:`service.access.guard`: an operation a peer may not use, told to
    the audit messages as a security alert."""
    def refused(event, why: str) -> None:
        archive.accesses.note(_actor(event), "refused", detail=why, keep=False)
    return refused


def handle_echo(event) -> int:
    """C-ECHO: always success."""
    log.info("C-ECHO from %s", _peer(event))
    return statuses.SUCCESS


def handle_store(event, archive: Archive, max_bytes: int = 0, settings=None) -> int:
    """C-STORE: stage the dataset as received; success only once it is durable and indexed.
    Datasets over ``max_bytes`` (0: no limit) are refused with 0xA700. An IOCM rejection note
    from a calling AE title of the ``settings``' ``rejection_notes_from`` ("A,B" or "*", read
    at each note: a reload changes it) is then applied."""
    try:
        data = event.encoded_dataset(include_meta=False)
        if max_bytes and len(data) > max_bytes:
            log.warning("C-STORE from %s refused: %d-byte dataset over max_dataset_bytes (%d)",
                        _peer(event), len(data), max_bytes)
            return statuses.OUT_OF_RESOURCES
        named_uid, named_class = (str(event.request.AffectedSOPInstanceUID or ""),
                                  str(event.request.AffectedSOPClassUID or ""))
        result = archive.store(data, str(event.context.transfer_syntax), named_uid or None,
                               _calling_ae(event))
    except Exception as exc:
        return statuses.status_for(exc, f"C-STORE from {_peer(event)}")
    log.info("C-STORE %s of %s from %s", result.outcome, result.sop_uid, _peer(event))
    # for the audit messages only: the index keeps who sent each instance
    archive.accesses.note(_actor(event), "C-STORE", result.study_uid, instances=1, keep=False)
    rejection_notes.apply_stored_note(
        archive, result, data, str(event.context.transfer_syntax), _calling_ae(event),
        _actor(event), _peer(event), settings.rejection_notes_from if settings is not None else "")
    if named_class and result.sop_class_uid != named_class:
        log.warning("C-STORE of %s from %s: stored, but its SOP class %s is not the request's "
                    "%s (0xB007)", result.sop_uid, _peer(event), result.sop_class_uid,
                    named_class)
        return statuses.CLASS_MISMATCH_WARNING
    return statuses.SUCCESS


# SOP Class Extended Negotiation (PS3.4 C.5.1.1.1, C.5.2.1.1, C.5.3.1.1): the options the node
# accepts, by SOP class, as the indices of their bytes. C-FIND: relational queries (the node
# matches any key at any level, with or without the unique keys above it), combined date-time
# matching and fuzzy semantic matching of person names; C-MOVE and C-GET: relational retrieval
# (a level's unique keys without those above it, as :func:`identifiers.retrieve_criteria` takes
# them). Timezone adjustment and enhanced multi-frame conversion are declined.
_RELATIONAL, _DATETIME, _FUZZY = 0, 1, 2
_FIND_CLASSES = {"1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1"}
_RETRIEVE_CLASSES = {"1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.1.3",
                     "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3"}
_ACCEPTED_BYTES = {**{uid: (_RELATIONAL, _DATETIME, _FUZZY) for uid in _FIND_CLASSES},
                   **{uid: (_RELATIONAL,) for uid in _RETRIEVE_CLASSES}}


def handle_extended(event) -> dict:
    """SOP Class Extended Negotiation: of the options an SCU proposes for a query/retrieve
    class, accept those of :data:`_ACCEPTED_BYTES` and decline the rest."""
    accepted = {}
    for sop_class, info in (event.app_info or {}).items():
        options = _ACCEPTED_BYTES.get(str(sop_class))
        if options and info:
            answer = bytearray(len(info))
            for byte in options:
                if len(info) > byte and info[byte] == 1:
                    answer[byte] = 1
            accepted[sop_class] = bytes(answer)
    return accepted


def _matching(event) -> Matching:
    """The matching options the association accepted for this C-FIND's class."""
    try:
        info = event.assoc.acceptor.sop_class_extended.get(event.context.abstract_syntax)
    except AttributeError:
        info = None
    info = info or b""

    def accepted(byte: int) -> bool:
        return len(info) > byte and info[byte] == 1
    return Matching(fuzzy=accepted(_FUZZY), combined_datetime=accepted(_DATETIME))


def handle_find(event, archive: Archive, max_results: int = 0):
    """C-FIND (Patient Root and Study Root): yield one pending response per match; refused
    (0xA700, nothing sent) when more than ``max_results`` (> 0) match, as dcm4chee's
    query limit does, so that the caller narrows its query rather than taking a cut list."""
    try:
        level, criteria = parse_identifier(event.identifier)
        records = find_records(archive, level, criteria, event.assoc.ae.ae_title,
                               matching=_matching(event))
    except IdentifierError as exc:
        log.warning("C-FIND from %s refused: %s", _peer(event), exc)
        yield statuses.IDENTIFIER_MISMATCH, None
        return
    except Exception as exc:
        yield statuses.status_for(exc, f"C-FIND from {_peer(event)}"), None
        return
    log.info("C-FIND %s level from %s: %d matches", level, _peer(event), len(records))
    _note_query(archive, _actor(event), "C-FIND", level, criteria, len(records),
                str(event.context.abstract_syntax))
    if 0 < max_results < len(records):
        log.warning("C-FIND from %s refused (0xA700): %d matches, max_find_results is %d",
                    _peer(event), len(records), max_results)
        yield statuses.FIND_OUT_OF_RESOURCES, None
        return
    charset = event.identifier.get("SpecificCharacterSet")
    for record in records:
        if event.is_cancelled:
            yield statuses.CANCEL, None
            return
        yield statuses.PENDING, response(level, criteria, record, charset)


def _note_query(archive: Archive, actor: str, action: str, level: str, criteria: dict,
                matches: int, sop_class: str = "") -> None:
    """Note a query in the access trail: its level and the keys it matched on; the study and
    patient when it named one exactly (``sop_class``: its information model, for the audit
    messages)."""
    asked = {k: str(v) for k, v in criteria.items() if v not in (None, "")}
    exact = {k: v for k, v in asked.items() if not any(c in v for c in "*?\\")}
    detail = " ".join([level] + [f"{k}={v}" for k, v in sorted(asked.items())])
    archive.accesses.note(actor, action, exact.get("StudyInstanceUID", ""),
                          exact.get("PatientID", ""), matches, detail, about=sop_class)


def _failed(sop_uid: str) -> Dataset:
    """A dataset the C-STORE sub-operation refuses to send, so it counts as failed."""
    ds = Dataset()
    ds.SOPInstanceUID = sop_uid
    return ds


class Receiver:
    """The association that C-STORE sub-operations go out on (this one for a C-GET; for a
    C-MOVE, the one to the destination, known once it is accepted): what it takes, and whether
    it still stands."""

    def __init__(self, assoc=None):
        self.assoc, self.gone = assoc, False
        self._taken: dict[str, set[str]] = {}      # SOP class -> accepted syntaxes
        self._taken_on = None                       # the association they were read from

    def handlers(self) -> list:
        """Event handlers of a C-MOVE's association to its destination."""
        def accepted(event):
            self.assoc = event.assoc

        def lost(event):
            self.gone = True
        return [(evt.EVT_ACCEPTED, accepted), (evt.EVT_ABORTED, lost),
                (evt.EVT_CONN_CLOSE, lost)]

    def syntax_for(self, fmt: tuple[str, str] | None) -> tuple[str | None, str | None]:
        """``(syntax, None)``: an instance of ``(SOP class, transfer syntax)`` goes out in
        ``syntax`` (the stored one whenever the receiver takes it, else one it converts to
        losslessly: storage.transcode); ``(None, why)``: it cannot go out. ``syntax`` is None
        too while the receiving association is not known yet (or the format is unknown)."""
        if self.gone:
            return None, "the receiving association is gone"
        if self.assoc is None or fmt is None:
            return None, None
        sop_class, ts = fmt
        chosen = transcode.choose(ts, self._accepted(sop_class))
        if chosen is None:
            return None, (f"no accepted context for {sop_class} in {ts} or in a syntax it "
                          "converts to losslessly")
        return chosen, None


    def _accepted(self, sop_class: str) -> set[str]:
        """The syntaxes the receiving association accepted for ``sop_class`` (read once per
        association: a C-GET's requestor proposes a context for every storage class)."""
        if self._taken_on is not self.assoc:
            self._taken, self._taken_on = {}, self.assoc
        if sop_class not in self._taken:
            self._taken[sop_class] = {
                t for cx in self.assoc.accepted_contexts
                if cx.abstract_syntax == sop_class and cx.as_scu for t in cx.transfer_syntax}
        return self._taken[sop_class]


def sub_operations(archive: Archive, records: list[dict], operation: str,
                   receiver: Receiver, peer: str, actor: str = ""):
    """Yield (status, dataset) per instance: the exact stored bytes, or a dataset that fails to
    send (so the sub-operation counts as failed) when the instance cannot be rebuilt or the
    receiver cannot take it (then it is not rebuilt at all). ``peer``: who asked (logged);
    ``actor``: who the access trail names (``peer`` when empty), with the instances handed
    over, however the operation ends."""
    handed_over: set[str] = set()
    try:
        yield from _sub_operations(archive, records, operation, receiver, peer, handed_over)
    finally:
        archive.accesses.note_records(actor or peer, operation, records, handed_over)


def _sub_operations(archive: Archive, records: list[dict], operation: str,
                    receiver: Receiver, peer: str, handed_over: set[str]):
    uids = [r["SOPInstanceUID"] for r in records]
    # one query per 500, not one per instance: each one's format, and where it is stored
    located = archive.locate(uids)
    formats = {uid: (row.sop_class_uid, row.transfer_syntax) for uid, row in located.items()}
    reasons = {u: receiver.syntax_for(formats.get(u))[1] for u in uids}
    sendable = [u for u in uids if reasons[u] is None]
    start, size = time.monotonic(), 0
    # slab by slab through compressed stacks, decoded ahead in the background
    with archive.retrieval_order(sendable, operation) as (planned, stop_prefetch):
        for uid in planned + [u for u in uids if reasons[u] is not None]:
            # again: a C-MOVE's receiver is known only now, and any may be gone meanwhile
            syntax, reason = receiver.syntax_for(formats.get(uid))
            if reason is not None:
                if receiver.gone:
                    stop_prefetch()
                log.warning("%s of %s not sent: %s", operation, uid, reason)
                yield statuses.PENDING, _failed(uid)
                continue
            try:
                inst = archive.retrieve_parts(uid, located.pop(uid, None))
                syntax, data = _in_syntax(inst, syntax or inst.transfer_syntax, operation)
            except Exception as exc:
                statuses.status_for(exc, f"{operation} of {uid}")
                yield statuses.PENDING, _failed(uid)
                continue
            handed_over.add(uid)
            size += nbytes(data)
            yield statuses.PENDING, PreEncoded(inst.sop_class_uid, uid, syntax, data)
            del inst, data      # not held while the next instance is rebuilt
        seconds = time.monotonic() - start
        log.info("%s from %s: %d of %d instances sent in %.2f s (%.2f MB, %.1f instances/s)",
                 operation, peer, len(handed_over), len(uids), seconds, size / 1e6,
                 len(handed_over) / max(seconds, 1e-3))


def _in_syntax(inst, syntax: str, operation: str) -> tuple[str, tuple]:
    """The rebuilt instance's bytes in ``syntax`` (in parts): as received, or converted
    (logged)."""
    if syntax == inst.transfer_syntax:
        return syntax, inst.parts
    data = transcode.convert(inst.joined().data, inst.transfer_syntax, syntax)
    log.info("%s of %s: sent in %s, converted from %s (the receiver does not take it)",
             operation, inst.sop_uid, UID(syntax).name, UID(inst.transfer_syntax).name)
    return syntax, (data,)


def handle_get(event, archive: Archive):
    """C-GET: count the matching instances, then send each on this association."""
    try:
        records = _select(event, archive)
    except Exception as exc:
        yield 1          # pynetdicom wants a count first, and ends at once when it is 0
        yield _refusal(exc, "C-GET", event), None
        return
    log.info("C-GET from %s: %d instances", _peer(event), len(records))
    yield len(records)
    for item in sub_operations(archive, records, "C-GET", Receiver(event.assoc),
                                _peer(event), _actor(event)):
        if event.is_cancelled:
            yield statuses.CANCEL, None
            return
        yield item


def _refusal(exc: Exception, operation: str, event) -> int:
    if isinstance(exc, IdentifierError):
        log.warning("%s from %s refused: %s", operation, _peer(event), exc)
        return statuses.IDENTIFIER_MISMATCH
    return statuses.status_for(exc, f"{operation} from {_peer(event)}")


def _select(event, archive: Archive) -> list[dict]:
    level, criteria = parse_identifier(event.identifier)
    return archive.find("IMAGE", retrieve_criteria(level, criteria))


def store_contexts(records: list[dict], archive: Archive) -> list:
    """Presentation contexts for the (SOP class, transfer syntax) pairs of the instances, then
    per class one in the uncompressed syntaxes its instances convert to (for a destination
    that refuses a stored one)."""
    syntaxes = archive.formats([r["SOPInstanceUID"] for r in records])
    contexts, fallbacks = [], []
    for sop_class, tss in sorted(syntaxes.items()):
        for ts in sorted(tss):
            contexts.append(build_context(sop_class, [ts]))
        others = [t for t in transcode.TARGETS
                  if t not in tss and any(transcode.convertible(ts, t) for ts in tss)]
        if others:
            fallbacks.append(build_context(sop_class, others))
    return (contexts + fallbacks)[:128] or [build_context(Verification)]   # one at least


def handle_move(event, archive: Archive, settings: Settings):
    """C-MOVE: open an association to a configured destination and send the instances there."""
    dest = settings.destination(str(event.move_destination or "").strip())
    try:
        records, refusal = _select(event, archive), None
    except Exception as exc:
        records, refusal = [], exc
    if dest is None:
        log.warning("C-MOVE from %s to unknown destination %r (0xA801)", _peer(event),
                    event.move_destination)
        yield None, None
        return
    log.info("C-MOVE from %s: %d instances to %s (%s@%s:%d)", _peer(event), len(records),
             dest.name, dest.ae_title, dest.host, dest.port)
    receiver = Receiver()
    yield dest.host, dest.port, {"ae_title": dest.ae_title,
                                 "contexts": store_contexts(records, archive),
                                 "evt_handlers": [(evt.EVT_CONN_OPEN, tune_association),
                                                  *receiver.handlers()]}
    yield max(len(records), refusal is not None)
    if refusal is not None:
        yield _refusal(refusal, "C-MOVE", event), None
        return
    for item in sub_operations(archive, records, f"C-MOVE to {dest.name}", receiver,
                                _peer(event), _actor(event)):
        if event.is_cancelled:
            yield statuses.CANCEL, None
            return
        yield item
