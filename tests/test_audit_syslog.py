"""IHE ATNA audit messages (service.audit_syslog): DICOM audit messages in RFC 5424 syslog
frames, sent by UDP, TCP and TLS to a listening repository, for a node's start and stop, its
stores, queries and retrievals, and for the deletion and correction commands; a repository that
cannot be reached holds nothing up and gets what was queued once it can."""

import base64
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from node_helpers import dataset_bytes, make_series
from scu_helpers import find, get, store_bytes
from service import audit_syslog
from service.audit_syslog import (AuditEvent, AuditTrail, Participant, SyslogSender, audit_xml,
                                  syslog_frame)

REPO = Path(__file__).resolve().parents[1]
FLUSH_WAIT = audit_syslog.FLUSH_S + 1      # long enough for a note to have gone out
_FRAME = re.compile(rb"^<85>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \S+ voxarc \d+ IHE\+RFC-3881 - "
                    rb"\xef\xbb\xbf(<\?xml .*)$", re.S)


class Repository:
    """An audit record repository listening on UDP, TCP or TLS; collects the messages' XML."""

    def __init__(self, scheme: str = "udp", port: int = 0, context=None):
        self.scheme, self.messages, self.frames = scheme, [], []
        kind = socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.context = context
        if scheme != "udp":
            self.sock.listen()
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def _serve(self):
        while not self._stop.is_set():
            try:
                if self.scheme == "udp":
                    self._take(self.sock.recv(65536))
                    continue
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            if self.context is not None:
                conn.settimeout(5)
                conn = self.context.wrap_socket(conn, server_side=True)
            threading.Thread(target=self._read_stream, args=(conn,), daemon=True).start()

    def _read_stream(self, conn):
        buf = b""
        conn.settimeout(0.2)
        while not self._stop.is_set():
            try:
                chunk = conn.recv(65536)
            except (socket.timeout, ssl.SSLError, OSError):
                continue
            if not chunk:
                break
            buf += chunk
            while b" " in buf:            # octet counting: LENGTH SP FRAME
                length, _, rest = buf.partition(b" ")
                if len(rest) < int(length):
                    break
                self._take(rest[:int(length)])
                buf = rest[int(length):]
        conn.close()

    def _take(self, frame: bytes):
        self.frames.append(frame)
        match = _FRAME.match(frame)
        assert match, frame[:120]
        self.messages.append(ET.fromstring(match[1]))

    def wait_for(self, event_code: str, count: int = 1, timeout: float = 30) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = events(self.messages, event_code)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{count} x {event_code} not received: "
                             f"{[event_id(m) for m in self.messages]}")

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


def event_id(message) -> str:
    return message.find("EventIdentification/EventID").get("csd-code")


def events(messages, code: str) -> list:
    return [m for m in messages if event_id(m) == code]


def objects(message, id_type: str) -> dict:
    """ParticipantObjectID -> its element, of those of ``id_type`` (a csd-code)."""
    return {o.get("ParticipantObjectID"): o for o in message.iter("ParticipantObjectIdentification")
            if o.find("ParticipantObjectIDTypeCode").get("csd-code") == id_type}


def participants(message) -> dict:
    """UserID -> (requestor, role code or None)."""
    out = {}
    for p in message.iter("ActiveParticipant"):
        role = p.find("RoleIDCode")
        out[p.get("UserID")] = (p.get("UserIsRequestor") == "true",
                                role.get("csd-code") if role is not None else None)
    return out


def detail(obj, kind: str) -> str:
    element = next(d for d in obj.iter("ParticipantObjectDetail") if d.get("type") == kind)
    return base64.b64decode(element.get("value")).decode()


def test_a_message_and_its_frame():
    event = AuditEvent(audit_syslog.INSTANCES_TRANSFERRED, "R", 1_700_000_000.25, [
        Participant("VOXARC", False, "source", "pacs1", "42"),
        Participant("VIEWER", True, "destination", "10.0.0.7")], {"1.2.3": 5},
        {"P&1": "Doe^Jane"})
    frame = syslog_frame(audit_xml(event, "VOXARC@pacs1"), event.when, "pacs 1")
    match = _FRAME.match(frame)
    assert match and frame.startswith(b"<85>1 2023-11-14T22:13:20.250Z pacs1 voxarc ")
    root = ET.fromstring(match[1])
    ident = root.find("EventIdentification")
    assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator"),
            ident.get("EventDateTime")) == ("R", "0", "2023-11-14T22:13:20.250Z")
    assert ident.find("EventID").attrib == {"csd-code": "110104", "codeSystemName": "DCM",
                                            "originalText": "DICOM Instances Transferred"}
    assert participants(root) == {"VOXARC": (False, "110153"), "VIEWER": (True, "110152")}
    viewer = [p for p in root.iter("ActiveParticipant") if p.get("UserID") == "VIEWER"][0]
    assert (viewer.get("NetworkAccessPointID"), viewer.get("NetworkAccessPointTypeCode")) == \
        ("10.0.0.7", "2")
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "VOXARC@pacs1"
    study = objects(root, "110180")["1.2.3"]
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole"),
            detail(study, "NumberOfInstances")) == ("2", "3", "5")
    patient = objects(root, "2")["P&1"]
    assert (patient.get("ParticipantObjectTypeCodeRole"),
            patient.find("ParticipantObjectName").text) == ("1", "Doe^Jane")
    # the children in the schema's order
    assert [c.tag for c in root] == ["EventIdentification", "ActiveParticipant",
                                     "ActiveParticipant", "AuditSourceIdentification",
                                     "ParticipantObjectIdentification",
                                     "ParticipantObjectIdentification"]


def test_notes_of_a_few_seconds_are_one_message_each():
    repo = Repository("udp")
    trail = AuditTrail(SyslogSender(repo.url), "VOXARC", patients_of=lambda uids: {
        u: ("PAT9", "Roe^Rick") for u in uids}, flush_s=3600)
    try:
        for _ in range(3):
            trail.note("http 10.1.1.1", "WADO-RS", "1.2.3")
        trail.note("VIEWER@10.1.1.2", "C-FIND", "", "PAT9", 4, "STUDY PatientID=PAT9",
                   about=StudyRootQueryRetrieveInformationModelFind)
        trail.note("VIEWER@10.1.1.2", "C-MOVE to WS", "1.2.3", "", 7)
        trail.note("cli export (ann)", "export", "1.2.3", "", 7, "/media/usb")
        trail.note("someone", "an action not audited", "1.2.3")
        trail.flush()
        wado, moved = repo.wait_for("110104", 2)
        assert participants(wado) == {"VOXARC": (False, "110153"), "10.1.1.1": (True, "110152")}
        (patient,) = objects(wado, "2").items()              # looked up: the note had none
        assert (patient[0], patient[1].find("ParticipantObjectName").text) == \
            ("PAT9", "Roe^Rick")
        assert participants(moved) == {"VOXARC": (False, "110153"), "WS": (False, "110152"),
                                       "VIEWER": (True, None)}
        assert detail(objects(moved, "110180")["1.2.3"], "NumberOfInstances") == "7"
        (query,) = repo.wait_for("110112")
        (model,) = objects(query, "110181").values()
        assert model.get("ParticipantObjectID") == StudyRootQueryRetrieveInformationModelFind
        assert base64.b64decode(model.find("ParticipantObjectQuery").text) == \
            b"STUDY PatientID=PAT9"
        (export,) = repo.wait_for("110106")
        assert participants(export) == {"ann": (True, None), "VOXARC": (False, "110153"),
                                        "/media/usb": (False, "110154")}
        time.sleep(0.3)
        assert len(repo.messages) == 4
    finally:
        trail.close()
        repo.close()


def test_a_repository_down_holds_nothing_up_and_gets_the_queue_later():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]               # nobody listens here yet
    sender = SyslogSender(f"tcp://127.0.0.1:{port}", queue_size=3, retry_s=0.2)
    try:
        started = time.monotonic()
        for n in range(8):
            sender.send(syslog_frame(f'<?xml version="1.0"?><m n="{n}"/>'.encode(),
                                     time.time(), "h"))
        assert time.monotonic() - started < 0.5          # never waits for the repository
        time.sleep(0.5)
        assert sender.sent == 0 and sender.dropped >= 4
        repo = Repository("tcp", port)
        deadline = time.monotonic() + 20
        while len(repo.frames) < 8 - sender.dropped and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(repo.frames) == 8 - sender.dropped == sender.sent
        repo.close()
    finally:
        sender.close(timeout=0.5)


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
def test_tls_to_a_repository_that_asks_for_the_nodes_certificate(tmp_path):
    def certificate(name):
        key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                       capture_output=True)
        return key, cert
    repo_key, repo_cert = certificate("arr")
    node_key, node_cert = certificate("node")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(repo_cert, repo_key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(node_cert)
    repo = Repository("tls", context=context)
    sender = SyslogSender(repo.url, str(repo_cert), str(node_cert), str(node_key))
    trail = AuditTrail(sender, "VOXARC")
    try:
        trail.application(started=True)
        (start,) = repo.wait_for("110100")
        assert start.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"
    finally:
        trail.close()
        repo.close()


def test_a_node_tells_its_start_stores_queries_retrievals_and_stop(tmp_path):
    from service.ae import Node
    from service.config import load_settings
    repo = Repository("udp")
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             stable_age=3600.0, audit_syslog=repo.url)
    node = Node(settings, compaction=False).start()
    try:
        repo.wait_for("110100")
        series = make_series(3, 8, 8, patient_id="PAT5")
        items = [(CTImageStorage, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
        assert store_bytes(node.port, items, tmp_path) == [0, 0, 0]
        study = series[0].StudyInstanceUID
        assert len(find(node.port, {"QueryRetrieveLevel": "SERIES",
                                    "StudyInstanceUID": study})[1]) == 1
        _, got = get(node.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                     [(CTImageStorage, ExplicitVRLittleEndian)])
        assert len(got) == 3
        scraped = node.metrics.exposition().decode()
        sent = re.search(r'voxarc_audit_messages_total\{result="sent"\} (\S+)', scraped)
        assert sent and float(sent[1]) >= 1                                 # the start, ...
        assert 'voxarc_audit_messages_total{result="dropped"} 0.0' in scraped
    finally:
        node.stop()
    try:
        start, stop = repo.wait_for("110100", 2)
        assert [m.find("EventIdentification/EventTypeCode").get("csd-code")
                for m in (start, stop)] == ["110120", "110121"]
        stored, retrieved = repo.wait_for("110104", 2)
        for message, action in ((stored, "C"), (retrieved, "R")):
            assert message.find("EventIdentification").get("EventActionCode") == action
            assert detail(objects(message, "110180")[study], "NumberOfInstances") == "3"
            assert list(objects(message, "2")) == ["PAT5"]
        assert participants(stored) == {"TESTSCU": (True, "110153"),
                                        "VOXARC": (False, "110152")}
        assert participants(retrieved) == {"VOXARC": (False, "110153"),
                                           "TESTSCU": (True, "110152")}
        (query,) = repo.wait_for("110112")
        assert list(objects(query, "110181")) == [StudyRootQueryRetrieveInformationModelFind]
        assert list(objects(query, "110180")) == [study]
    finally:
        repo.close()


def test_the_delete_and_correct_commands_are_audited(tmp_path):
    from storage.archive import Archive
    from node_helpers import store_as_received
    arch = Archive(tmp_path / "data")
    one, two = make_series(2, 8, 8, patient_id="P1", seed=1), make_series(1, 8, 8, seed=2)
    store_as_received(arch, one + two)
    arch.close()
    repo = Repository("udp")
    config = tmp_path / "node.toml"
    config.write_text(f'audit_syslog = "{repo.url}"\naudit_source_id = "PACS-A"\n')

    def voxarc(*args):
        return subprocess.run([sys.executable, "-m", "service.cli", *args, "--config",
                               str(config), "--data-dir", str(tmp_path / "data"), "--yes"],
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
    try:
        proc = voxarc("correct", "study", one[0].StudyInstanceUID, "--set",
                      "AccessionNumber=A77")
        assert proc.returncode == 0, proc.stderr
        proc = voxarc("delete", "study", two[0].StudyInstanceUID)
        assert proc.returncode == 0, proc.stderr
        (corrected,) = repo.wait_for("110103")
        (deleted,) = repo.wait_for("110105")
        for message, study, patient, action in (
                (corrected, one[0].StudyInstanceUID, "P1", "U"),
                (deleted, two[0].StudyInstanceUID, "PAT1", "D")):
            assert message.find("EventIdentification").get("EventActionCode") == action
            assert list(objects(message, "110180")) == [study]
            assert list(objects(message, "2")) == [patient]
            assert message.find("AuditSourceIdentification").get("AuditSourceID") == "PACS-A"
        # brought back from the recycle bin: an import, from the bin's entry
        (entry,) = json.loads(voxarc("deleted", "--json").stdout)["entries"]
        assert voxarc("deleted", "restore", entry["entry"]).returncode == 0
        (restored,) = repo.wait_for("110107")
        assert list(objects(restored, "110180")) == [two[0].StudyInstanceUID]
        assert f"recycle bin entry {entry['entry']}" in ET.tostring(restored, "unicode")
    finally:
        repo.close()


def test_a_malformed_repository_url_is_refused(tmp_path):
    from service.config import load_settings
    config = tmp_path / "node.toml"
    config.write_text('audit_syslog = "syslog.example.org:514"\n')
    with pytest.raises(ValueError, match="audit_syslog must be udp://HOST"):
        load_settings(config)


def test_refused_associations_and_operations_are_security_alerts(tmp_path):
    """A calling AE title not among the peers, a wrong called AE title, and an operation a peer
    may not use each make a Security Alert; a busy node's refusal makes none."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification
    from service.ae import Node
    from service.config import load_settings
    repo = Repository("udp")
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             audit_syslog=repo.url, peers={"TESTSCU": "store"},
                             max_associations=1)
    node = Node(settings, compaction=False).start()

    def associate(calling, called="VOXARC"):
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        return ae.associate("127.0.0.1", node.port, ae_title=called)
    def idle():
        deadline = time.monotonic() + 10
        while node.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        status, _ = find(node.port, {"QueryRetrieveLevel": "STUDY", "PatientID": "X"})
        assert status == 0x0124
        for calling, called in (("INTRUDER", "VOXARC"), ("TESTSCU", "NOTVOXARC")):
            idle()
            assert associate(calling, called).is_rejected
        idle()
        held = associate("TESTSCU")
        assert held.is_established and associate("TESTSCU").is_rejected      # busy
        held.release()
        alerts = repo.wait_for("110113", 3)
        time.sleep(FLUSH_WAIT)
    finally:
        node.stop()
        repo.close()
    assert len(events(repo.messages, "110113")) == 3
    seen = {}
    for alert in alerts:
        ident = alert.find("EventIdentification")
        assert ident.get("EventOutcomeIndicator") == "4"
        seen[ident.find("EventOutcomeDescription").text] = \
            (ident.find("EventTypeCode").get("csd-code"), list(participants(alert)))
    assert seen == {
        "calling AE title 'INTRUDER' is not among the peers": ("110126", ["INTRUDER", "VOXARC"]),
        "called AE title 'NOTVOXARC' is not 'VOXARC'": ("110126", ["TESTSCU", "VOXARC"]),
        "EVT_C_FIND refused to TESTSCU: no 'query' permission": ("110132",
                                                                  ["TESTSCU", "VOXARC"])}


def test_failed_logins_and_dicomweb_reads_of_the_admin_server(tmp_path):
    """Requests without the admin token are failed logins (one message for the five, counted
    in its description); a WADO-RS read of a study is a transfer to the HTTP client."""
    import urllib.error
    import urllib.request
    from service.ae import Node
    from service.config import load_settings
    from service.web_server import start_admin
    repo = Repository("udp")
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             http_port=0, http_token="s3cret", audit_syslog=repo.url)
    node = Node(settings, compaction=False).start()
    admin = start_admin(node)
    try:
        series = make_series(2, 8, 8, patient_id="PAT7")
        items = [(CTImageStorage, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
        assert store_bytes(node.port, items, tmp_path) == [0, 0]
        study = series[0].StudyInstanceUID
        for _ in range(5):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{admin.url}/api/stats?token=guess", timeout=30)
            assert refused.value.code == 401
        request = urllib.request.Request(
            f"{admin.url}/dicom-web/studies/{study}/metadata",
            headers={"Authorization": "Bearer s3cret", "Accept": "application/dicom+json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert answer.status == 200
        (login,) = repo.wait_for("110114")
        stored, read = repo.wait_for("110104", 2)
    finally:
        admin.stop()
        node.stop()
        repo.close()
    ident = login.find("EventIdentification")
    assert (ident.get("EventOutcomeIndicator"), ident.find("EventTypeCode").get("csd-code"),
            ident.find("EventOutcomeDescription").text) == \
        ("4", "110122", "GET /api/stats: no valid token (5 times)")
    assert participants(login)["127.0.0.1"] == (True, None)
    assert read.find("EventIdentification").get("EventActionCode") == "R"
    assert participants(read) == {"VOXARC": (False, "110153"), "127.0.0.1": (True, "110152")}
    assert list(objects(read, "110180")) == [study] and list(objects(read, "2")) == ["PAT7"]


def _free_port(kind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not shutil.which("rsyslogd"), reason="needs rsyslog")
def test_rsyslog_takes_the_messages_over_udp_and_tcp(tmp_path):
    """rsyslogd, as a hospital's syslog relay or repository runs it, parses what the node sends
    as RFC 5424 (facility authpriv, severity notice, app voxarc, MSGID IHE+RFC-3881) over UDP
    and over TCP with octet counting, and keeps the audit message whole."""
    udp, tcp = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
    out = tmp_path / "audit.log"
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(f"""
global(workDirectory="{tmp_path}" maxMessageSize="64k")
module(load="imudp")
module(load="imtcp")
template(name="fields" type="string"
         string="%syslogfacility-text%|%syslogseverity-text%|%app-name%|%msgid%|%msg%\\n")
ruleset(name="audit") {{ action(type="omfile" file="{out}" template="fields") }}
input(type="imudp" address="127.0.0.1" port="{udp}" ruleset="audit")
input(type="imtcp" address="127.0.0.1" port="{tcp}" ruleset="audit")
""")
    daemon = subprocess.Popen(["rsyslogd", "-n", "-f", str(conf), "-i", str(tmp_path / "pid")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:             # listening once TCP connects
            try:
                socket.create_connection(("127.0.0.1", tcp), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        for scheme, port in (("udp", udp), ("tcp", tcp)):
            trail = AuditTrail(SyslogSender(f"{scheme}://127.0.0.1:{port}"), "VOXARC")
            trail.note(f"VIEWER@{scheme}", "C-GET", "1.2.3", "P&<1>", 12)
            trail.close()
        lines = []
        while time.monotonic() < deadline and len(lines) < 2:
            time.sleep(0.1)
            lines = out.read_text(encoding="utf-8").splitlines() if out.exists() else []
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    assert len(lines) == 2, daemon.stdout.read()
    for line, scheme in zip(sorted(lines, key=lambda l: "tcp" in l), ("udp", "tcp")):
        facility, severity, app, msgid, msg = line.split("|", 4)
        assert (facility, severity, app, msgid) == ("authpriv", "notice", "voxarc",
                                                    "IHE+RFC-3881")
        root = ET.fromstring(msg.lstrip("\ufeff").strip().encode())
        assert event_id(root) == "110104"
        assert participants(root)["VIEWER"] == (True, "110152")
        assert list(objects(root, "2")) == ["P&<1>"]
        assert detail(objects(root, "110180")["1.2.3"], "NumberOfInstances") == "12"
        assert [p.get("NetworkAccessPointID") for p in root.iter("ActiveParticipant")
                if p.get("UserID") == "VIEWER"] == [scheme]
