"""Prior studies sent ahead on an exam's order (service.hl7_prefetch): an ORM^O01 or OMI^O23 for
a patient queues their latest studies to the configured destinations, which the node's
forwarder then sends, once; in a running node over MLLP, to a storage SCP."""

import time

import pytest

from node_helpers import archive, free_port, make_series, store_as_received  # noqa: F401
from scu_helpers import StoreSCP
from service import hl7_message, hl7_prefetch
from service.config import load_settings
from service.forwarding import Forwarder
from service.hl7_listener import Hl7Listener
from storage import forwarding
from test_hl7_adt import _send, message, msa


def order(patient_id: str, control: str = "NW", kind: str = "ORM", event: str = "O01",
          number: str = "1") -> bytes:
    """An order message for ``patient_id`` with ORC-1 ``control``."""
    text = message(event, f"1||{patient_id}^^^HOSP||Doe^Jane", kind=kind, control=f"O{number}")
    return text + f"ORC|{control}|PL{number}\rOBR|1|PL{number}||CTHEAD^CT head\r".encode()


def test_targets_and_orders_are_read():
    assert hl7_prefetch.parse_targets("reading=2, er=1") == {"reading": 2, "er": 1}
    assert hl7_prefetch.parse_targets("") == {}
    for bad in ("reading", "reading=0", "reading=two", "=2", "reading=11"):
        with pytest.raises(ValueError, match="DESTINATION=N"):
            hl7_prefetch.parse_targets(bad)
    got = hl7_prefetch.read_order(hl7_message.decode(order("P1")))
    assert (got.patient_id, got.control, got.reason) == ("P1", "NW", "prefetch: HL7 ORM^O01 O1")
    omi = hl7_message.decode(order("P1", "XO", "OMI", "O23"))
    assert hl7_prefetch.is_order(hl7_message.header(omi))
    assert hl7_prefetch.read_order(omi).control == "XO"
    assert not hl7_prefetch.is_order(hl7_message.header(hl7_message.decode(
        message("R01", "1||P1", kind="ORU"))))


def test_the_destinations_must_be_configured():
    with pytest.raises(ValueError, match="hl7_prefetch to 'reading': not one of the dest"):
        load_settings(hl7_prefetch="reading=2")
    with pytest.raises(ValueError, match="DESTINATION=N"):
        load_settings(hl7_prefetch="reading", destination=["reading=R@127.0.0.1:104"])


def _three_studies(arch, patient_id: str, seed: int) -> dict:
    out = {}
    for n, date in enumerate(("20200301", "20240105", "20220710")):
        out[date] = make_series(2, 8, 8, patient_id=patient_id, study_date=date, seed=seed + n)
        store_as_received(arch, out[date])
    return out


def test_an_order_queues_the_latest_studies_once(archive, tmp_path):  # noqa: F811
    dest = StoreSCP("READ")
    try:
        settings = load_settings(data_dir=str(tmp_path / "n"), hl7_prefetch="reading=2",
                                 destination=[f"reading=READ@127.0.0.1:{dest.port}"])
        studies = _three_studies(archive, "P1", 40)
        other = make_series(2, 8, 8, patient_id="P2", study_date="20250101", seed=50)
        store_as_received(archive, other)
        listener = Hl7Listener(archive, settings)
        assert msa(listener.handle(order("P1")))[0] == "AA"
        rows = forwarding.status(archive.index)
        assert [(r["state"], r["reason"]) for r in rows] == \
            [("queued", "prefetch: HL7 ORM^O01 O1")] * 2
        forwarder = Forwarder(archive, settings, rules={})
        assert forwarder.run_once() == 2
        expected = {ds.SOPInstanceUID for date in ("20240105", "20220710")
                    for ds in studies[date]}
        assert set(dest.received) == expected and dest.count == 4
        # the order again, a change to it, a cancellation: nothing more goes
        for again in (order("P1", number="2"), order("P1", "XO", number="3"),
                      order("P1", "CA", number="4"), order("NOBODY", number="5")):
            assert msa(listener.handle(again))[0] == "AA"
        assert forwarder.run_once() == 0 and dest.count == 4
        # without hl7_prefetch an order is not taken
        plain = Hl7Listener(archive, load_settings())
        assert msa(plain.handle(order("P1")))[:2] == ["AR", "O1"]
        plain.settings.hl7_prefetch = "reading=2"      # as a reload (SIGHUP) sets it
        assert msa(plain.handle(order("P1", number="6")))[:2] == ["AA", "O6"]
    finally:
        dest.stop()


def appointment(patient_id: str, event: str = "S12", number: str = "1") -> bytes:
    """A scheduler's SIU message for ``patient_id`` (SCH, then the patient group's PID)."""
    msh = f"MSH|^~\\&|SCHED|HOSP|VOXARC|RAD|20261205120000||SIU^{event}|A{number}|P|2.5"
    return "\r".join([msh, f"SCH|AP{number}|||||||CT head^CT head", "TQ1|1||||||202612081000",
                      f"PID|1||{patient_id}^^^HOSP||Doe^Jane", "RGS|1",
                      "AIS|1||CTHEAD^CT head"]).encode() + b"\r"


def test_a_new_appointment_queues_the_latest_studies_and_a_change_does_not(
        archive, tmp_path):  # noqa: F811
    settings = load_settings(data_dir=str(tmp_path / "n"), hl7_prefetch="reading=1",
                             destination=["reading=READ@127.0.0.1:1"])
    _three_studies(archive, "P7", 60)
    listener = Hl7Listener(archive, settings)
    got = hl7_prefetch.read_order(hl7_message.decode(appointment("P7")))
    assert (got.patient_id, got.control) == ("P7", "")
    for event in ("S13", "S14", "S15", "S17", "S26"):     # rescheduled, modified, cancelled...
        assert msa(listener.handle(appointment("P7", event, number=event)))[0] == "AA"
    assert forwarding.status(archive.index) == []
    assert msa(listener.handle(appointment("P7")))[0] == "AA"
    assert [(r["state"], r["reason"]) for r in forwarding.status(archive.index)] == \
        [("queued", "prefetch: HL7 SIU^S12 A1")]


def test_a_running_node_sends_the_priors_before_the_exam(tmp_path):
    from service.ae import Node
    dest = StoreSCP("READ")
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             stable_age=3600.0, compaction_interval=0.2, hl7_port=free_port(),
                             hl7_prefetch="reading=1",
                             destination=[f"reading=READ@127.0.0.1:{dest.port}"])
    node = Node(settings).start()
    try:
        studies = _three_studies(node.archive, "P9", 60)
        assert msa(_send(node.hl7.port, order("P9", kind="OMI", event="O23")))[0] == "AA"
        deadline = time.monotonic() + 60
        while len(dest.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(dest.received) == {ds.SOPInstanceUID for ds in studies["20240105"]}
        for ds in studies["20240105"]:
            assert dest.received[ds.SOPInstanceUID][1] == \
                node.archive.retrieve(ds.SOPInstanceUID).data
    finally:
        node.stop()
        dest.stop()
