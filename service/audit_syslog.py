"""IHE ATNA audit messages to an audit record repository: who stored, queried, retrieved,
exported, deleted or corrected which study, and the node's start and stop, as DICOM audit
messages (PS3.15 A.5) sent by syslog (RFC 5424) over UDP (RFC 5426), TCP or TLS (octet
counting, RFC 6587 and RFC 5425), to ``audit_syslog``.

What is told comes from the access trail's notes (:class:`storage.access_log.AccessLog`, its
``listeners``), plus what the trail does not keep as rows: stores, deletions and corrections.
Notes of one actor, action, study and detail within :data:`FLUSH_S` make one message, which
counts them. Sending never holds up the node: messages go through a bounded queue to a thread
of their own; while the repository cannot be reached they wait there, and those beyond the
queue are dropped, counted and logged.
"""

from __future__ import annotations

import base64
import datetime
import getpass
import logging
import os
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit
from xml.etree import ElementTree as ET

log = logging.getLogger(__name__)

#: notes this close together (seconds) go out as one message
FLUSH_S = 5.0
QUEUE_SIZE = 10_000
_PORTS = {"udp": 514, "tcp": 514, "tls": 6514}
_PRI = 10 * 8 + 5                   # facility authpriv (10), severity notice (5)
_MSGID = "IHE+RFC-3881"
_BOM = b"\xef\xbb\xbf"

# (code, coding scheme, meaning) of PS3.16's DCM codes and RFC 3881's
APPLICATION_ACTIVITY = ("110100", "DCM", "Application Activity")
INSTANCES_ACCESSED = ("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED = ("110105", "DCM", "DICOM Study Deleted")
EXPORT = ("110106", "DCM", "Export")
IMPORT = ("110107", "DCM", "Import")
QUERY = ("110112", "DCM", "Query")
SECURITY_ALERT = ("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = ("110114", "DCM", "User Authentication")
APPLICATION_START = ("110120", "DCM", "Application Start")
APPLICATION_STOP = ("110121", "DCM", "Application Stop")
LOGIN = ("110122", "DCM", "Login")
NODE_AUTHENTICATION = ("110126", "DCM", "Node Authentication")
RESTRICTED_FUNCTION = ("110132", "DCM", "Use of Restricted Function")
_APPLICATION = ("110150", "DCM", "Application")
_DESTINATION = ("110152", "DCM", "Destination Role ID")
_SOURCE = ("110153", "DCM", "Source Role ID")
_DESTINATION_MEDIA = ("110154", "DCM", "Destination Media")
_SOURCE_MEDIA = ("110155", "DCM", "Source Media")
_STUDY_UID = ("110180", "DCM", "Study Instance UID")
_SOP_CLASS_UID = ("110181", "DCM", "SOP Class UID")
_PATIENT_NUMBER = ("2", "RFC-3881", "Patient Number")
_ROLES = {"source": _SOURCE, "destination": _DESTINATION, "application": _APPLICATION,
          "destination media": _DESTINATION_MEDIA, "source media": _SOURCE_MEDIA}
_TRANSFERS = ("C-GET", "C-MOVE", "forward to", "send to", "WADO", "frames", "bulk data",
              "rendered", "thumbnail")


@dataclass
class Participant:
    """An active participant: a user, an application or a medium, and its part."""

    user_id: str
    requestor: bool
    role: str = ""                   # a key of _ROLES, or none
    access_point: str = ""           # host name or IP address
    alternative_id: str = ""


@dataclass
class AuditEvent:
    """One audit message's content (PS3.15 A.5.1)."""

    event_id: tuple
    action: str                      # C, R, U, D or E
    when: float
    participants: list[Participant]
    studies: dict[str, int] = field(default_factory=dict)     # Study Instance UID -> instances
    patients: dict[str, str] = field(default_factory=dict)     # Patient ID -> name
    query: tuple[str, str] | None = None                      # (SOP class UID, what was asked)
    event_type: tuple | None = None
    outcome: int = 0                 # 0 success, 4 minor, 8 serious, 12 major failure
    description: str = ""            # EventOutcomeDescription


def audit_xml(event: AuditEvent, source_id: str) -> bytes:
    """The DICOM audit message of ``event``, its audit source named ``source_id``."""
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", EventActionCode=event.action,
                          EventDateTime=_iso(event.when),
                          EventOutcomeIndicator=str(event.outcome))
    _coded(ident, "EventID", event.event_id)
    if event.event_type:
        _coded(ident, "EventTypeCode", event.event_type)
    if event.description:
        ET.SubElement(ident, "EventOutcomeDescription").text = event.description
    for p in event.participants:
        attrs = {"UserID": p.user_id, "UserIsRequestor": "true" if p.requestor else "false"}
        if p.alternative_id:
            attrs["AlternativeUserID"] = p.alternative_id
        if p.access_point:
            attrs["NetworkAccessPointID"] = p.access_point
            attrs["NetworkAccessPointTypeCode"] = "2" if _is_address(p.access_point) else "1"
        element = ET.SubElement(root, "ActiveParticipant", attrs)
        if p.role:
            _coded(element, "RoleIDCode", _ROLES[p.role])
    source = ET.SubElement(root, "AuditSourceIdentification", AuditSourceID=source_id)
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})    # application server
    if event.query is not None:
        sop_class, asked = event.query
        obj = _object(root, sop_class or "unknown", "2", "24", _SOP_CLASS_UID)
        ET.SubElement(obj, "ParticipantObjectQuery").text = _b64(asked)
        ET.SubElement(obj, "ParticipantObjectDetail", type="QueryEncoding", value=_b64("UTF-8"))
    for uid, instances in event.studies.items():
        obj = _object(root, uid, "2", "3", _STUDY_UID)
        if instances:
            ET.SubElement(obj, "ParticipantObjectDetail", type="NumberOfInstances",
                          value=_b64(str(instances)))
    for patient, name in event.patients.items():
        obj = _object(root, patient, "1", "1", _PATIENT_NUMBER)
        ET.SubElement(obj, "ParticipantObjectName").text = name
    return b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="utf-8",
                                                                   xml_declaration=False)


def _coded(parent, tag: str, code: tuple) -> None:
    ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1],
                                "originalText": code[2]})


def _object(root, object_id: str, type_code: str, role: str, id_type: tuple):
    obj = ET.SubElement(root, "ParticipantObjectIdentification", ParticipantObjectID=object_id,
                        ParticipantObjectTypeCode=type_code,
                        ParticipantObjectTypeCodeRole=role)
    _coded(obj, "ParticipantObjectIDTypeCode", id_type)
    return obj


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _iso(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def _is_address(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


def syslog_frame(message: bytes, when: float, hostname: str, app: str = "voxarc") -> bytes:
    """``message`` as an RFC 5424 syslog message (PRI authpriv.notice, MSGID IHE+RFC-3881,
    the XML after a UTF-8 byte order mark)."""
    host = "".join(c for c in hostname if 33 <= ord(c) <= 126)[:255] or "-"
    header = f"<{_PRI}>1 {_iso(when)} {host} {app} {os.getpid()} {_MSGID} - "
    return header.encode("ascii") + _BOM + message


class SyslogSender:
    """Sends syslog messages to ``url`` (``udp://``, ``tcp://`` or ``tls://HOST[:PORT]``) from
    a thread of its own, through a bounded queue; never blocks its callers.

    ``cafile``: PEM authorities the repository's certificate must chain to (TLS; none: the
    system's); ``certfile`` and ``keyfile``: this node's certificate, for a repository that
    asks for one (ATNA's node authentication).
    """

    def __init__(self, url: str, cafile: str = "", certfile: str = "", keyfile: str = "",
                 queue_size: int = QUEUE_SIZE, retry_s: float = 2.0):
        parts = urlsplit(url)
        if parts.scheme not in _PORTS or not parts.hostname:
            raise ValueError(f"audit_syslog {url!r} is not udp://, tcp:// or tls://HOST[:PORT]")
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or _PORTS[parts.scheme]
        self.retry_s = retry_s
        self._context = None
        if self.scheme == "tls":
            self._context = ssl.create_default_context(cafile=cafile or None)
            if certfile:
                self._context.load_cert_chain(certfile, keyfile or None)
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._sock = None
        self._stop = threading.Event()
        self.sent = self.dropped = 0
        self._dropped_logged = 0.0
        self._thread = threading.Thread(target=self._run, name="voxarc-audit", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Messages waiting to be sent."""
        return self._queue.qsize()

    def send(self, frame: bytes) -> None:
        """Queue one message; dropped (counted, logged once a minute) when the queue is full."""
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self.dropped += 1
            if time.monotonic() - self._dropped_logged > 60:
                self._dropped_logged = time.monotonic()
                log.error("audit messages dropped: %s:%d cannot take them (%d so far)",
                          self.host, self.port, self.dropped)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for at most ``timeout`` seconds), then stop."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline and \
                self._thread.is_alive():
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self._disconnect()
        if not self._queue.empty():
            log.warning("audit: %d messages not sent to %s:%d", self._queue.qsize(), self.host,
                        self.port)

    def _run(self) -> None:
        frame = None
        while not self._stop.is_set():
            if frame is None:
                try:
                    frame = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
            try:
                self._write(frame)
                self.sent += 1
                frame = None
            except OSError as exc:
                log.warning("audit: %s:%d not reached (%s); trying again in %g s", self.host,
                            self.port, exc, self.retry_s)
                self._disconnect()
                self._stop.wait(self.retry_s)

    def _write(self, frame: bytes) -> None:
        if self._sock is None:
            self._sock = self._connect()
        if self.scheme == "udp":
            self._sock.send(frame)
        else:
            self._sock.sendall(f"{len(frame)} ".encode("ascii") + frame)

    def _connect(self):
        if self.scheme == "udp":
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                                 socket.SOCK_DGRAM)
            sock.connect((self.host, self.port))
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=10)
        if self._context is not None:
            sock = self._context.wrap_socket(sock, server_hostname=self.host)
        return sock

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


@dataclass
class _Pending:
    first: float
    patient_id: str
    requests: int = 0
    instances: int = 0


class AuditTrail:
    """Turns the access trail's notes (an :class:`storage.access_log.AccessLog` listener) and
    the node's own events into audit messages for a :class:`SyslogSender`.

    Parameters
    ----------
    sender : SyslogSender
    node_ae : str
        The node's AE title: the archive's participant in every message.
    source_id : str
        The audit source's name (default: ``AE@host name``).
    patients_of : callable
        ``patients_of(study_uids)`` -> {Study Instance UID: (Patient ID, name)}: each study's
        patient, and the patient of notes that did not name one.
    """

    def __init__(self, sender: SyslogSender, node_ae: str, source_id: str = "",
                 patients_of=None, flush_s: float = FLUSH_S):
        self.sender, self.node_ae = sender, node_ae
        self.hostname = socket.gethostname()
        self.source_id = source_id or f"{node_ae}@{self.hostname}"
        self.patients_of, self.flush_s = patients_of, flush_s
        self._pending: dict[tuple, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="voxarc-audit-notes",
                                        daemon=True)
        self._thread.start()

    def note(self, actor: str, action: str, study_uid: str = "", patient_id: str = "",
             instances: int = 0, detail: str = "", now: float | None = None,
             about: str = "") -> None:
        """One request of ``actor`` (see :meth:`storage.access_log.AccessLog.note`)."""
        now = time.time() if now is None else now
        key = (actor, action, study_uid or "", detail, about)
        with self._lock:
            row = self._pending.get(key)
            if row is None:
                row = self._pending[key] = _Pending(now, patient_id or "")
            row.requests += 1
            row.instances += instances
            row.patient_id = row.patient_id or patient_id or ""

    def application(self, started: bool) -> None:
        """The node started or stopped (Application Activity)."""
        self.emit(AuditEvent(APPLICATION_ACTIVITY, "E", time.time(), [
            Participant(self.node_ae, False, "application", self.hostname, str(os.getpid())),
            Participant(getpass.getuser(), True)],
            event_type=APPLICATION_START if started else APPLICATION_STOP))

    def emit(self, event: AuditEvent) -> None:
        """Send one message."""
        self.sender.send(syslog_frame(audit_xml(event, self.source_id), event.when,
                                      self.hostname))

    def flush(self) -> None:
        """Send what was noted, one message per actor, action, study and detail."""
        with self._lock:
            todo, self._pending = self._pending, {}
        studies = {key[2] for key in todo if key[2]}
        found = {}
        if studies and self.patients_of is not None:
            try:
                found = self.patients_of(sorted(studies))
            except Exception as exc:        # the message goes without the patient
                log.warning("audit: patients of %d studies not found: %s", len(studies), exc)
        for (actor, action, study, detail, about), row in todo.items():
            held_id, name = found.get(study, ("", ""))
            patient = row.patient_id or held_id
            patients = {patient: name if patient == held_id else ""} if patient else {}
            event = self._event(actor, action, study, patients, row, detail, about)
            if event is not None:
                self.emit(event)

    def close(self) -> None:
        """Send what is noted and queued, then stop."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
        self.sender.close()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:           # never the node's problem
                log.exception("audit: notes not sent")

    def _event(self, actor: str, action: str, study: str, patients: dict, row: _Pending,
               detail: str, about: str) -> AuditEvent | None:
        """The message of one coalesced note (None: an action not audited)."""
        user, host = _who(actor, self.hostname)
        caller = Participant(user, True, "", host)
        alert = _ALERTS.get(action)
        if alert is not None:                   # what was refused, how often
            times = f" ({row.requests} times)" if row.requests > 1 else ""
            return AuditEvent(alert[0], "E", row.first, [caller, self._node("")],
                              event_type=alert[1], outcome=4, description=detail + times)
        what = self._what(action, caller, detail or actor)
        if what is None:
            return None
        event_id, code, parts = what
        query = (about, detail or action) if event_id == QUERY else None
        return AuditEvent(event_id, code, row.first, parts,
                          {study: row.instances} if study else {}, patients, query,
                          outcome=4 if "not finished" in action else 0)

    def _what(self, action: str, caller: Participant, media: str):
        """(EventID, EventActionCode, participants) of a note on data (None: not audited);
        ``media``: where an import came from or an export went."""
        source = Participant(caller.user_id, True, "source", caller.access_point)
        if action in ("C-FIND", "QIDO-RS"):
            return QUERY, "E", [source, self._node("destination")]
        if action in ("C-STORE", "STOW-RS"):
            return INSTANCES_TRANSFERRED, "C", [source, self._node("destination")]
        if action in ("import", "restore"):      # a restore: from the recycle bin
            return IMPORT, "C", [caller, self._node("destination"),
                                 Participant(media, False, "source media")]
        if action.startswith(("download", "export")):
            to = media if action.startswith("export") else caller.user_id
            return EXPORT, "R", [caller, self._node("source"),
                                 Participant(to, False, "destination media")]
        if action.startswith(("delete", "correct")):
            deleted = action in ("delete study", "delete patient")
            return (STUDY_DELETED if deleted else INSTANCES_ACCESSED,
                    "D" if action.startswith("delete") else "U", [caller, self._node("")])
        if not action.startswith(_TRANSFERS):
            return None
        _, to, name = action.partition(" to ")
        if action.startswith("forward to"):         # the node's own doing
            return INSTANCES_TRANSFERRED, "R", [self._node("source", True),
                                                Participant(name, False, "destination")]
        if to:                                     # C-MOVE, a send by hand: to a third party
            return INSTANCES_TRANSFERRED, "R", [self._node("source"),
                                                Participant(name, False, "destination"),
                                                caller]
        return INSTANCES_TRANSFERRED, "R", [   # the caller takes them
            self._node("source"), Participant(caller.user_id, True, "destination",
                                              caller.access_point)]

    def _node(self, role: str, requestor: bool = False) -> Participant:
        return Participant(self.node_ae, requestor, role, self.hostname, str(os.getpid()))


_ALERTS = {"association rejected": (SECURITY_ALERT, NODE_AUTHENTICATION),
           "refused": (SECURITY_ALERT, RESTRICTED_FUNCTION),
           "authentication failed": (USER_AUTHENTICATION, LOGIN)}


def _who(actor: str, hostname: str) -> tuple[str, str]:
    """(user ID, network access point) of an access-trail actor: ``AE@host``, ``http
    ADDRESS``, ``http USER@ADDRESS``, ``cli NAME (USER)``, ``AE (forwarding)``."""
    if actor.startswith("http "):
        user, _, address = actor[5:].strip().rpartition("@")
        return user or address, address
    if actor.startswith("cli ") and actor.endswith(")"):
        return actor[actor.rindex("(") + 1:-1], hostname
    if actor.endswith(" (forwarding)"):
        return actor[:-len(" (forwarding)")], hostname
    user, _, host = actor.rpartition("@")
    return (user, host) if user else (actor, "")


def attach(archive, settings) -> AuditTrail | None:
    """Tell the audit record repository of ``settings`` (``audit_syslog``; none: None) what
    ``archive``'s access trail is told."""
    if not settings.audit_syslog:
        return None
    sender = SyslogSender(settings.audit_syslog, settings.audit_syslog_ca,
                          settings.tls_certificate, settings.tls_private_key)
    trail = AuditTrail(sender, settings.ae_title, settings.audit_source_id,
                       archive.accesses.patients_of)
    archive.accesses.listeners.append(trail)
    return trail


def attached(archive) -> AuditTrail | None:
    """The audit trail :func:`attach` gave ``archive``, if any."""
    return next((t for t in archive.accesses.listeners if isinstance(t, AuditTrail)), None)
