"""Storage Commitment Push Model, SCP role: a modality asks whether the archive has taken
responsibility for instances it sent, before it deletes its own copies.

The N-ACTION request (Action Type 1) names a Transaction UID and the instances. It is answered at
once (0x0000 when it is well formed and the requesting AE title is a configured destination, so
that the answer can reach it); the result follows as an N-EVENT-REPORT on a new association to
that destination (PS3.4 Annex J): Event Type 1 when every instance is held, 2 when some are not,
with each failed instance's reason. An instance is held when it is indexed and its staged file
or blob is present; an index row is only ever committed after its bytes are durable. Reports that
cannot be delivered are tried again after 5 and 30 seconds, then given up (logged); retries wait
by due time, so one unreachable modality never holds back the others' reports. A node stopping
makes the first attempt of the reports in hand and drops pending retries (logged).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from service.socket_tuning import tune_association

log = logging.getLogger(__name__)
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"      # Storage Commitment Push Model SOP Instance
REQUEST_COMMITMENT = 1                              # Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2                   # Event Type IDs of the report
# Failure Reasons (0008,1197)
PROCESSING_FAILURE, NO_SUCH_INSTANCE, CLASS_CONFLICT = 0x0110, 0x0112, 0x0119
# N-ACTION statuses
INVALID_ARGUMENT, NO_SUCH_ACTION, SUCCESS = 0x0115, 0x0123, 0x0000
NO_SUCH_SOP_INSTANCE = 0x0112       # PS3.7 C.4: the SOP Instance was not recognized
RETRY_DELAYS = (0.2, 5.0, 30.0)     # the first lets the N-ACTION response go out before it
CONNECTION_TIMEOUT = 10.0           # seconds to reach a destination (one that drops packets)


@dataclass(frozen=True)
class Request:
    """One commitment request: its transaction, who asked, and the (SOP Class UID, SOP Instance
    UID) pairs it names."""

    transaction_uid: str
    ae_title: str
    items: tuple


class NoSuchAction(ValueError):
    """An N-ACTION of another Action Type than Request Storage Commitment."""

    status = NO_SUCH_ACTION


class NoSuchInstance(ValueError):
    """An N-ACTION addressed to another SOP Instance than the well-known one (PS3.4 J.3.2)."""

    status = NO_SUCH_SOP_INSTANCE


def parse_request(event) -> Request:
    """The :class:`Request` of an N-ACTION event; raise ValueError when it is malformed
    (:class:`NoSuchInstance` for another SOP Instance, :class:`NoSuchAction` for another
    action type)."""
    instance = str(getattr(event.request, "RequestedSOPInstanceUID", "") or "").strip("\0 ")
    if instance != WELL_KNOWN_INSTANCE:
        raise NoSuchInstance(f"SOP Instance {instance or '(none)'} (only {WELL_KNOWN_INSTANCE})")
    if event.request.ActionTypeID != REQUEST_COMMITMENT:
        raise NoSuchAction(f"action type {event.request.ActionTypeID} (only 1 is defined)")
    info = event.action_information
    uid = str(getattr(info, "TransactionUID", "") or "").strip()
    if not uid:
        raise ValueError("no Transaction UID")
    items = []
    for item in getattr(info, "ReferencedSOPSequence", None) or []:
        sop_class = str(getattr(item, "ReferencedSOPClassUID", "") or "").strip()
        sop_uid = str(getattr(item, "ReferencedSOPInstanceUID", "") or "").strip()
        if not sop_class or not sop_uid:
            raise ValueError("a Referenced SOP Sequence item lacks its class or instance UID")
        items.append((sop_class, sop_uid))
    if not items:
        raise ValueError("an empty Referenced SOP Sequence")
    return Request(uid, str(event.assoc.requestor.ae_title).strip(), tuple(items))


def report_dataset(request: Request, held: dict, retrieve_ae_title: str) -> tuple[int, Dataset]:
    """(Event Type ID, Event Information) answering ``request``, given the held instances
    ``{SOP Instance UID: SOP Class UID}``."""
    ds = Dataset()
    ds.TransactionUID = request.transaction_uid
    ds.RetrieveAETitle = retrieve_ae_title
    committed, failed = [], []
    for sop_class, sop_uid in request.items:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
        if sop_uid not in held:
            item.FailureReason = NO_SUCH_INSTANCE
            failed.append(item)
        elif held[sop_uid] != sop_class:
            item.FailureReason = CLASS_CONFLICT
            failed.append(item)
        else:
            committed.append(item)
    if committed:
        ds.ReferencedSOPSequence = committed
    if failed:
        ds.FailedSOPSequence = failed
    return (SOME_FAILED if failed else ALL_COMMITTED), ds


@dataclass
class _Job:
    """A request being reported: how many attempts were made, and its report once checked."""

    request: Request
    attempts: int = 0
    report: tuple | None = None          # (Event Type ID, Event Information)


class Reporter:
    """Checks commitment requests against the archive and sends their reports, on a thread.

    Attempts are served in order of due time, so a report waiting to be retried never holds
    back another request's report.

    Parameters
    ----------
    archive : Archive
    settings : Settings
        ``ae_title`` (the reports' calling AE title and Retrieve AE Title) and ``destinations``
        (where each requesting AE title is reached).
    retry_delays : tuple of float
        Seconds before each attempt to deliver a report (the first counted from submission,
        the others from the failed attempt before).
    """

    def __init__(self, archive, settings, retry_delays=RETRY_DELAYS):
        self.archive, self.settings, self.retry_delays = archive, settings, retry_delays
        self._due: list = []                          # heap of (due time, sequence, _Job)
        self._sequence = itertools.count()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="voxarc-commitment", daemon=True)
        self._thread.start()
        self.delivered = self.undelivered = 0         # counters, for logs and tests

    def submit(self, request: Request) -> None:
        """Queue a request whose answer goes to its requesting AE."""
        self._schedule(_Job(request), self.retry_delays[0])

    def stop(self, timeout: float = 30.0) -> None:
        """Make the first attempt of each report in hand, drop pending retries, stop the
        thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self._thread.join(timeout)

    def _schedule(self, job: _Job, delay: float) -> None:
        with self._changed:
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._sequence), job))
            self._changed.notify()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._attempt(job)
            except Exception:     # one bad report must not stop the others
                log.exception("storage commitment %s: report failed", job.request.transaction_uid)

    def _next(self) -> _Job | None:
        """The next job whose attempt is due, waiting for it; None once stopping and done."""
        with self._changed:
            while not self._stopping:
                wait = self._due[0][0] - time.monotonic() if self._due else None
                if wait is not None and wait <= 0:
                    return heapq.heappop(self._due)[2]
                self._changed.wait(wait)
            while self._due:
                job = heapq.heappop(self._due)[2]
                if job.attempts == 0:
                    return job
                self._drop(job)
            return None

    def _drop(self, job: _Job) -> None:
        self.undelivered += 1
        log.error("storage commitment %s: report to %s dropped after %d attempts (node "
                  "stopping); the modality has to ask again", job.request.transaction_uid,
                  job.request.ae_title, job.attempts)

    def _attempt(self, job: _Job) -> None:
        """Make one attempt at delivering ``job``'s report; schedule the next one if it fails."""
        request = job.request
        if job.report is None:
            held = self.archive.held([uid for _, uid in request.items])
            job.report = report_dataset(request, held, self.settings.ae_title)
        event_type, info = job.report
        dest = self.settings.destination(request.ae_title)
        error = self._send(dest, event_type, info) if dest else "not a configured destination"
        job.attempts += 1
        if error is None:
            self.delivered += 1
            failed = len(info.get("FailedSOPSequence", []))
            log.info("storage commitment %s for %s: %d of %d instances committed, %d failed "
                     "(reported)", request.transaction_uid, request.ae_title,
                     len(request.items) - failed, len(request.items), failed)
            return
        log.warning("storage commitment %s: report to %s not delivered (attempt %d): %s",
                    request.transaction_uid, request.ae_title, job.attempts, error)
        if job.attempts < len(self.retry_delays):
            self._schedule(job, self.retry_delays[job.attempts])
            return
        self.undelivered += 1
        log.error("storage commitment %s: report to %s given up; the modality has to ask again",
                  request.transaction_uid, request.ae_title)

    def _send(self, dest, event_type: int, info: Dataset) -> str | None:
        """Deliver one report; return None on success, else what went wrong."""
        ae = AE(ae_title=self.settings.ae_title)
        ae.connection_timeout = CONNECTION_TIMEOUT
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 10, 30, 30
        ae.add_requested_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, ext_neg=[role],
                             evt_handlers=[(evt.EVT_CONN_OPEN, tune_association)])
        if not assoc.is_established:
            return f"no association with {dest.ae_title}@{dest.host}:{dest.port}"
        try:
            status, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel,
                                                  WELL_KNOWN_INSTANCE)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code is None:
            return "no answer to the N-EVENT-REPORT"
        return None if code == SUCCESS else f"N-EVENT-REPORT answered 0x{code:04X}"


def handle_action(event, reporter: Reporter, settings):
    """N-ACTION of the Storage Commitment Push Model: check the request, queue its report,
    answer at once."""
    caller = str(event.assoc.requestor.ae_title).strip()
    try:
        request = parse_request(event)
    except Exception as exc:       # anything unreadable in the request is its fault
        code = exc.status if isinstance(exc, (NoSuchAction, NoSuchInstance)) else INVALID_ARGUMENT
        log.warning("storage commitment from %s refused: %s (0x%04X)", caller, exc, code)
        return _status(code, str(exc)), None
    if settings.destination(caller) is None:
        reason = f"{caller} is not a configured destination: the report could not reach it"
        log.warning("storage commitment from %s refused: %s (0x%04X)", caller, reason,
                    PROCESSING_FAILURE)
        return _status(PROCESSING_FAILURE, reason), None
    log.info("storage commitment %s from %s: %d instances", request.transaction_uid, caller,
             len(request.items))
    reporter.submit(request)
    return _status(SUCCESS), None


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds
