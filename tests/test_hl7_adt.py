"""The HL7 ADT feed (service.hl7_adt, service.hl7_listener): patient updates and merges from
the hospital information system correct the archive as `voxarc correct` would, acknowledged
as HL7 asks; over MLLP from a socket and from python-hl7's `mllp_send`, on SQLite and, when
configured, PostgreSQL."""

import io
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from node_helpers import archive, free_port, make_series, store_as_received  # noqa: F401
from service import hl7_adt, hl7_message
from service.config import load_settings
from service.hl7_listener import Hl7Listener
from service.hl7_message import Hl7Error
from storage.correction import history

MLLP_SEND = Path(sys.executable).parent / "mllp_send"


def message(event: str, pid: str, mrg: str = "", control: str = "MSG1", sender: str = "HIS",
            charset: str = "", kind: str = "ADT") -> bytes:
    """An ADT message: MSH (MSH-18 ``charset``), EVN, the PID fields from PID-1 on and, when
    given, the MRG fields."""
    msh = f"MSH|^~\\&|{sender}|HOSP|VOXARC|RAD|20261205120000||{kind}^{event}|{control}|P|2.5" \
          f"||||||{charset}"
    segments = [msh, f"EVN|{event}|20261205120000", f"PID|{pid}"] + ([f"MRG|{mrg}"] if mrg else [])
    text = "\r".join(segments) + "\r"
    return text.encode("utf-8" if charset == "UNICODE UTF-8" else "latin-1")


def read(block: bytes, authority: str = "") -> hl7_adt.AdtMessage:
    return hl7_adt.read_message(hl7_message.decode(block), authority)


def msa(ack: bytes) -> list[str]:
    """The MSA segment's fields of an acknowledgement."""
    segment = next(s for s in ack.decode("ascii").split("\r") if s.startswith("MSA|"))
    return segment.split("|")[1:]


# --- reading messages --------------------------------------------------------------------------

def test_an_update_reads_the_patients_values():
    adt = read(message("A08", "1||P7^^^HOSP^MR||Roe\\T\\Smith^Jane^Q^Jr^Dr||198001311230|F"))
    assert adt.event == "A08" and adt.control_id == "MSG1" and adt.sender == "HIS@HOSP"
    (change,) = adt.changes
    # XPN family^given^middle^suffix^prefix -> PN family^given^middle^prefix^suffix
    assert change == hl7_adt.PatientChange(
        "P7", {"PatientName": "Roe&Smith^Jane^Q^Dr^Jr", "PatientBirthDate": "19800131",
               "PatientSex": "F"})
    assert adt.reason == "HL7 ADT^A08 MSG1 from HIS@HOSP"


def test_empty_fields_stay_and_double_quotes_clear():
    (change,) = read(message("A08", '1||P7||Roe^Jane||""|')).changes
    assert change.values == {"PatientName": "Roe^Jane", "PatientBirthDate": ""}
    (change,) = read(message("A31", '1||P7|||||""')).changes
    assert change.values == {"PatientSex": ""}
    (change,) = read(message("A08", "1||P7|||||U")).changes
    assert change.values == {"PatientSex": ""}          # unknown: DICOM's empty value


def test_the_identifier_is_the_one_of_the_configured_authority():
    pid = "1||111^^^SSA~P7^^^HOSP^MR||Roe^Jane"
    assert read(message("A08", pid)).changes[0].patient_id == "111"
    assert read(message("A08", pid), "HOSP").changes[0].patient_id == "P7"
    with pytest.raises(Hl7Error, match="issued by 'CLINIC'") as err:
        read(message("A08", pid), "CLINIC")
    assert err.value.code == "AE"
    (change,) = read(message("A40", "1||P7^^^HOSP||Roe^Jane", "T9^^^HOSP~5^^^SSA"),
                     "HOSP").changes
    assert (change.patient_id, change.prior_id) == ("P7", "T9")


def test_the_character_set_of_msh_18():
    utf8 = message("A08", "1||P7||Müller^Jörg", charset="UNICODE UTF-8")
    assert read(utf8).changes[0].values["PatientName"] == "Müller^Jörg"
    latin = message("A08", "1||P7||Müller^Jörg", charset="8859/1")
    assert read(latin).changes[0].values["PatientName"] == "Müller^Jörg"
    # an engine that sends ISO 8859-1 without saying so: the node's hl7_charset
    plain = message("A08", "1||P7||Müller^Jörg")
    assert hl7_adt.read_message(hl7_message.decode(plain, "8859/1")).changes[0].values == \
        {"PatientName": "Müller^Jörg"}
    for block, why in ((plain, "not ASCII"),
                       (message("A08", "1||P7||X", charset="KLINGON"), "not supported")):
        with pytest.raises(Hl7Error, match=why) as err:
            read(block)
        assert err.value.code == "AR"


@pytest.mark.parametrize("block, code, why", [
    (b"hello", "AR", "not an HL7"),
    (message("R01", "1||P7", kind="ORU"), "AR", "ORU is not ADT"),
    (message("A40", "1||P7||Roe"), "AE", "one MRG segment per PID"),
    (message("A08", "1||||Roe"), "AE", "no patient identifier in PID-3"),
    (message("A08", "1||P7||Roe||1980"), "AE", "not a full date"),
    (message("A08", "1||P7||Roe||19800101|X"), "AE", "sex 'X'"),
])
def test_what_is_refused_and_why(block, code, why):
    with pytest.raises(Hl7Error, match=why) as err:
        read(block)
    assert err.value.code == code


def test_other_events_ask_for_nothing():
    adt = read(message("A01", "1||P7||Roe^Jane"))
    assert adt.event == "A01" and adt.changes == ()


def test_acknowledgements():
    msg = hl7_message.decode(message("A08", "1||P7", control="C42"))
    ack = hl7_message.ack(msg, "AA")
    assert ack.startswith(b"MSH|^~\\&|VOXARC|RAD|HIS|HOSP|") and b"|ACK^A08^ACK|" in ack
    assert msa(ack) == ["AA", "C42"]
    assert msa(hl7_message.ack(msg, "AE", "bad|value^here")) == ["AE", "C42", "bad value here"]
    assert msa(hl7_message.ack(None, "AR", "not HL7")) == ["AR", "", "not HL7"]


# --- applied to an archive ---------------------------------------------------------------------

def _parsed(data: bytes):
    return pydicom.filereader.read_dataset(io.BytesIO(data), False, True)


def _held(arch, sop_uid: str):
    return _parsed(arch.retrieve(sop_uid).data)


def test_an_update_corrects_every_instance_once(archive):  # noqa: F811
    series = make_series(3, 8, 8, patient_id="P7", patient_name="Roe^Jnae")
    store_as_received(archive, series)
    listener = Hl7Listener(archive, load_settings())
    block = message("A08", "1||P7^^^HOSP||Roe^Jane||19800131|F", control="U1")
    assert msa(listener.handle(block)) == ["AA", "U1"]
    assert archive.patient("P7") == {"PatientID": "P7", "PatientName": "Roe^Jane",
                                     "PatientBirthDate": "19800131", "PatientSex": "F"}
    for ds in series:
        got = _held(archive, ds.SOPInstanceUID)
        assert (str(got.PatientName), got.PatientBirthDate) == ("Roe^Jane", "19800131")
        assert got.PixelData == ds.PixelData and got.StudyDescription == ds.StudyDescription
    (row,) = history(archive.index)
    assert row["reason"] == "HL7 ADT^A08 U1 from HIS@HOSP" and row["instances"] == 3
    # the HIS sends it again (its ACK was late): nothing more changes
    assert msa(listener.handle(block)) == ["AA", "U1"]
    assert len(history(archive.index)) == 1
    # a patient the archive does not hold is no error
    assert msa(listener.handle(message("A08", "1||Q1||Poe^Edgar")))[0] == "AA"
    assert archive.patient("Q1") is None


def test_a_merge_moves_the_temporary_patients_studies(archive):  # noqa: F811
    trauma = make_series(2, 8, 8, patient_id="TMP0042", patient_name="Unknown^Trauma")
    earlier = make_series(2, 8, 8, patient_id="P7", patient_name="Roe^Jane", seed=1)
    store_as_received(archive, trauma + earlier)
    told = []
    archive.accesses.listeners.append(type("Audit", (), {
        "note": lambda self, actor, action, study, patient, *rest: told.append(
            (actor, action, study, patient)),
        "close": lambda self: None})())
    listener = Hl7Listener(archive, load_settings())
    block = message("A40", "1||P7^^^HOSP||Roe^Jane^^^Mrs||19800131|F", "TMP0042^^^HOSP",
                    control="M1")
    assert msa(listener.handle(block)) == ["AA", "M1"]
    assert archive.patient("TMP0042") is None
    # the surviving patient was updated first (birth date, prefix), then took the study
    assert archive.patient("P7") == {"PatientID": "P7", "PatientName": "Roe^Jane^^Mrs",
                                     "PatientBirthDate": "19800131", "PatientSex": "F"}
    studies = archive.find("STUDY", {"PatientID": "P7", "StudyInstanceUID": ""})
    assert len(studies) == 2
    for ds in trauma + earlier:
        got = _held(archive, ds.SOPInstanceUID)
        assert (got.PatientID, str(got.PatientName)) == ("P7", "Roe^Jane^^Mrs")
    assert [r["reason"] for r in history(archive.index)] == ["HL7 ADT^A40 M1 from HIS@HOSP"] * 2
    # the audit messages hear of both corrections, the studies as they were before each
    assert told == [("hl7 HIS@HOSP", "correct patient", earlier[0].StudyInstanceUID, "P7"),
                    ("hl7 HIS@HOSP", "correct patient", trauma[0].StudyInstanceUID, "TMP0042")]
    assert msa(listener.handle(block))[0] == "AA"        # again: nothing left to merge
    assert len(history(archive.index)) == 2


def test_a_changed_identifier_for_a_patient_not_yet_held(archive):  # noqa: F811
    series = make_series(2, 8, 8, patient_id="TMP1", patient_name="Unknown^Trauma")
    store_as_received(archive, series)
    listener = Hl7Listener(archive, load_settings())
    assert msa(listener.handle(message("A47", "1||P9||Poe^Edgar", "TMP1")))[0] == "AA"
    assert archive.patient("TMP1") is None
    assert archive.patient("P9")["PatientName"] == "Poe^Edgar"
    assert _held(archive, series[0].SOPInstanceUID).PatientID == "P9"


def test_what_cannot_be_applied_changes_nothing(archive):  # noqa: F811
    series = make_series(2, 8, 8, patient_id="P7", patient_name="Roe^Jane")
    sent = store_as_received(archive, series)
    listener = Hl7Listener(archive, load_settings(hl7_senders="HIS,ADT"))
    # the instances have no Specific Character Set: a non-ASCII name does not fit
    code, _, text = msa(listener.handle(message("A08", "1||P7||Müller^Jörg",
                                                charset="UNICODE UTF-8")))
    assert code == "AE" and "character set" in text
    code, _, text = msa(listener.handle(message("A08", "1||P7||Poe", sender="LAB")))
    assert code == "AR" and "'LAB@HOSP' is not one of hl7_senders" in text
    assert msa(listener.handle(b"\x00garbage"))[0] == "AR"
    for uid, (_, data) in sent.items():
        assert archive.retrieve(uid).data == data
    assert history(archive.index) == []


# --- over MLLP, in a running node --------------------------------------------------------------

def _send(port: int, block: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"\x0b" + block + b"\x1c\r")
        answer = b""
        while not answer.endswith(b"\x1c\r"):
            chunk = s.recv(65536)
            assert chunk, "the listener closed without an answer"
            answer += chunk
    assert answer.startswith(b"\x0b")
    return answer[1:-2]


def test_a_node_applies_the_feed_over_mllp(tmp_path):
    from service.ae import Node
    from service.config import load_settings
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             stable_age=3600.0, hl7_port=free_port())
    node = Node(settings, compaction=False).start()
    try:
        series = make_series(2, 8, 8, patient_id="TMP5", patient_name="Unknown^Trauma")
        store_as_received(node.archive, series)
        assert msa(_send(node.hl7.port, message("A40", "1||P5||Poe^Edgar", "TMP5")))[0] == "AA"
        assert node.archive.patient("P5")["PatientName"] == "Poe^Edgar"
        # two messages on one connection, answered in order
        with socket.create_connection(("127.0.0.1", node.hl7.port), timeout=60) as s:
            s.sendall(b"".join(b"\x0b" + message("A08", f"1||P5||Poe^Edgar^{m}",
                                                  control=f"C{m}") + b"\x1c\r"
                               for m in ("A", "B")))
            answer = b""
            while answer.count(b"\x1c\r") < 2:
                answer += s.recv(65536)
        assert [msa(a.strip(b"\x0b"))[1] for a in answer.split(b"\x1c\r")[:2]] == ["CA", "CB"]
        assert node.archive.patient("P5")["PatientName"] == "Poe^Edgar^B"
        assert msa(_send(node.hl7.port, message("R01", "1||P5", kind="ORU")))[0] == "AR"
        scraped = node.metrics.exposition().decode()
        assert 'voxarc_hl7_messages_total{ack="AA"} 3.0' in scraped
        assert 'voxarc_hl7_messages_total{ack="AR"} 1.0' in scraped
    finally:
        node.stop()


@pytest.mark.skipif(not MLLP_SEND.exists(), reason="python-hl7's mllp_send is installed with "
                    "the hl7 package voxarc depends on")
def test_python_hl7_mllp_send_as_the_his(tmp_path):
    """python-hl7's own MLLP client, as an interface engine would send a file of messages."""
    from service.ae import Node
    from service.config import load_settings
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             stable_age=3600.0, hl7_port=free_port())
    node = Node(settings, compaction=False).start()
    try:
        store_as_received(node.archive, make_series(2, 8, 8, patient_id="P3",
                                                    patient_name="Doe^Jane"))
        feed = tmp_path / "feed.hl7"
        feed.write_bytes(message("A08", "1||P3||Doe^Janet||19750505|F", control="F1")
                         .replace(b"\r", b"\n"))
        out = subprocess.run([str(MLLP_SEND), "--port", str(node.hl7.port), "--file",
                              str(feed), "--loose", "127.0.0.1"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "MSA|AA|F1" in out.stdout
        assert node.archive.patient("P3") == {"PatientID": "P3", "PatientName": "Doe^Janet",
                                              "PatientBirthDate": "19750505",
                                              "PatientSex": "F"}
    finally:
        node.stop()


def test_the_hl7_settings_are_checked():
    from service.config import load_settings
    with pytest.raises(ValueError, match="hl7_port must be a TCP port"):
        load_settings(hl7_port=70000)
    assert load_settings(hl7_charset="8859/1").hl7_charset == "8859/1"
    with pytest.raises(ValueError, match="hl7_charset must be one of 8859/1"):
        load_settings(hl7_charset="latin-1")


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
def test_the_feed_over_tls(tmp_path):
    """``hl7_tls``: the listener takes TLS only, with the DICOM listener's certificate, and
    checks the engine's certificate against tls_ca_certificates."""
    import ssl
    from service.ae import Node

    def certificate(name):
        key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        key, "-out", cert, "-days", "2", "-subj", f"/CN={name}"], check=True,
                       capture_output=True)
        return key, cert
    server_key, server_cert = certificate("localhost")
    engine_key, engine_cert = certificate("engine")
    with pytest.raises(ValueError, match="hl7_tls needs tls_certificate"):
        load_settings(hl7_tls=True)
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             stable_age=3600.0, hl7_port=free_port(), hl7_tls=True,
                             tls_certificate=str(server_cert), tls_private_key=str(server_key),
                             tls_ca_certificates=str(engine_cert))
    node = Node(settings, compaction=False).start()
    try:
        store_as_received(node.archive, make_series(1, 8, 8, patient_id="P6"))
        context = ssl.create_default_context(cafile=str(server_cert))
        context.load_cert_chain(engine_cert, engine_key)
        with socket.create_connection(("127.0.0.1", node.hl7.port), timeout=60) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"\x0b" + message("A08", "1||P6||Poe^Edgar") + b"\x1c\r")
            answer = b""
            while not answer.endswith(b"\x1c\r"):
                answer += s.recv(65536)
        assert msa(answer[1:-2])[0] == "AA"
        assert node.archive.patient("P6")["PatientName"] == "Poe^Edgar"
        with pytest.raises((ConnectionError, socket.timeout, AssertionError)):
            _send(node.hl7.port, message("A08", "1||P6||Roe^Plain"))     # plain TCP: no answer
        assert node.archive.patient("P6")["PatientName"] == "Poe^Edgar"
    finally:
        node.stop()


def test_any_bytes_get_an_acknowledgement(tmp_path):
    """Whatever arrives in an MLLP block (noise, a message cut or garbled anywhere), the
    listener answers with an ACK and changes nothing it should not."""
    from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
    from storage.archive import Archive
    arch = Archive(tmp_path / "data")
    store_as_received(arch, make_series(1, 8, 8, patient_id="P7", patient_name="Roe^Jane"))
    listener = Hl7Listener(arch, load_settings())
    valid = message("A40", "1||P7^^^HOSP||Roe^Jane||19800131|F", "T1")

    @hsettings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=300),
                     st.tuples(st.integers(0, len(valid)), st.integers(0, len(valid)),
                               st.binary(max_size=20)).map(
                         lambda t: valid[:t[0]] + t[2] + valid[t[1]:])))
    def answered(block):
        ack = listener.handle(block)
        assert ack.startswith(b"MSH|") and b"\rMSA|A" in ack
        assert msa(ack)[0] in ("AA", "AE", "AR")

    try:
        answered()
        held = arch.patient("P7")
        assert held is None or held["PatientID"] == "P7"
    finally:
        arch.close()


def test_studies_that_come_later_follow_the_his(archive):  # noqa: F811
    """After a merge, a new study under the merged-away ID (the trauma CT's reformats, sent
    from the 3D lab an hour later) is filed under the surviving patient, in its bytes too;
    after a name's correction, a new study with the old name takes the new one. A patient
    the HIS never reconciled is stored as sent."""
    store_as_received(archive, make_series(1, 8, 8, patient_id="P7", patient_name="Roe^Jnae"))
    listener = Hl7Listener(archive, load_settings())
    # the merged-away ID was never held here: the merge is kept all the same
    assert msa(listener.handle(message("A40", "1||P7||Roe^Jane||19800131|F", "TMP9")))[0] == \
        "AA"
    later = make_series(2, 8, 8, patient_id="TMP9", patient_name="Unknown^Trauma", seed=3)
    store_as_received(archive, later)
    stale = make_series(1, 8, 8, patient_id="P7", patient_name="Roe^Jnae", seed=4)
    store_as_received(archive, stale)
    for ds in later + stale:
        got = _held(archive, ds.SOPInstanceUID)
        assert (got.PatientID, str(got.PatientName), got.PatientBirthDate) == \
            ("P7", "Roe^Jane", "19800131")
        assert got.PixelData == ds.PixelData and got.StudyInstanceUID == ds.StudyInstanceUID
    assert archive.patient("TMP9") is None
    assert len(archive.find("STUDY", {"PatientID": "P7", "StudyInstanceUID": ""})) == 3
    # merges of merges: P7 itself merged into P8 later
    assert msa(listener.handle(message("A40", "1||P8||Roe^Jane||19800131|F", "P7",
                                       control="M2")))[0] == "AA"
    latest = make_series(1, 8, 8, patient_id="TMP9", patient_name="Unknown^Trauma", seed=5)
    store_as_received(archive, latest)
    assert _held(archive, latest[0].SOPInstanceUID).PatientID == "P8"
    # an update of a patient the archive does not hold, and a placeholder: stored as sent
    assert msa(listener.handle(message("A08", "1||Q1||Poe^Edgar")))[0] == "AA"
    for pid in ("Q1", "UNKNOWN"):
        (ds,) = make_series(1, 8, 8, patient_id=pid, patient_name="Other^Name", seed=6)
        sent = store_as_received(archive, [ds])
        assert archive.retrieve(ds.SOPInstanceUID).data == sent[ds.SOPInstanceUID][1]


def test_hl7_resend_sends_the_corrected_series_where_they_went(archive, tmp_path):  # noqa: F811
    """``hl7_resend``: a series the reading workstation had goes there again, corrected."""
    from scu_helpers import StoreSCP
    from service.forwarding import Forwarder
    from storage import forwarding
    dest = StoreSCP("READ")
    try:
        settings = load_settings(data_dir=str(tmp_path / "n"), hl7_resend=True,
                                 destination=[f"reading=READ@127.0.0.1:{dest.port}"],
                                 forward=["reading=Modality=CT"])
        forwarder = Forwarder(archive, settings)
        series = make_series(2, 8, 8, patient_id="TMP3", patient_name="Unknown^Trauma")
        store_as_received(archive, series)
        assert forwarder.run_once(time.time() + 3600) == 1
        dest.received.clear()
        listener = Hl7Listener(archive, settings)
        assert msa(listener.handle(message("A40", "1||P3||Poe^Edgar", "TMP3")))[0] == "AA"
        (row,) = forwarding.status(archive.index)
        assert (row["state"], row["reason"]) == ("queued", "corrected: to be sent again")
        assert forwarder.run_once() == 1
        for ds in series:
            got = _parsed(dest.received[ds.SOPInstanceUID][1])
            assert (got.PatientID, str(got.PatientName)) == ("P3", "Poe^Edgar")
        # without it, nothing is queued
        store_as_received(archive, make_series(1, 8, 8, patient_id="TMP4", seed=8))
        assert forwarder.run_once(time.time() + 3600) == 1
        plain = Hl7Listener(archive, load_settings())
        assert msa(plain.handle(message("A40", "1||P4||Poe^Edgar", "TMP4")))[0] == "AA"
        assert [r["state"] for r in forwarding.status(archive.index)] == ["sent", "sent"]
    finally:
        dest.stop()
