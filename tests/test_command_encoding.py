"""service.command_encoding: command sets packed directly equal pynetdicom's encoding."""

import queue
import threading
import time
from io import BytesIO
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from service import command_encoding

uids = st.from_regex(r"\A[1-9][0-9]{0,20}(\.[1-9][0-9]{0,10}){0,8}\Z").filter(
    lambda u: len(u) <= 64)
message_ids = st.integers(0, 0xFFFF)
titles = st.from_regex(r"\A[A-Z][A-Z0-9_]{0,15}\Z")


def _pynetdicom(primitive, message_type, context_id, max_pdu):
    message = message_type()
    message.primitive_to_message(primitive)
    return [p.presentation_data_value_list for p in message.encode_msg(context_id, max_pdu)]


def _ours(primitive, context_id, max_pdu):
    pdatas = command_encoding.p_data(primitive, context_id, max_pdu)
    assert pdatas is not None
    return [p.presentation_data_value_list for p in pdatas]


@settings(max_examples=150, deadline=None)
@given(sop_class=uids, sop_uid=uids, message_id=message_ids,
       status=st.sampled_from([0x0000, 0xA700, 0xB000, 0xC000, 0xC211]),
       context_id=st.integers(1, 255).filter(lambda i: i % 2),
       max_pdu=st.sampled_from([0, 64, 16384]))
def test_responses_are_pynetdicoms_bytes(sop_class, sop_uid, message_id, status, context_id,
                                         max_pdu):
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = sop_class, sop_uid
    rsp.Status = status
    assert _ours(rsp, context_id, max_pdu) == _pynetdicom(rsp, C_STORE_RSP, context_id, max_pdu)


@settings(max_examples=150, deadline=None)
@given(sop_class=uids, sop_uid=uids, message_id=message_ids, priority=st.sampled_from([0, 1, 2]),
       originator=st.none() | st.tuples(titles, message_ids),
       data=st.binary(min_size=0, max_size=300),
       max_pdu=st.sampled_from([0, 40, 16384]))
def test_requests_are_pynetdicoms_bytes(sop_class, sop_uid, message_id, priority, originator,
                                        data, max_pdu):
    rq = C_STORE()
    rq.MessageID, rq.Priority = message_id, priority
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = sop_class, sop_uid
    if originator is not None:
        rq.MoveOriginatorApplicationEntityTitle, rq.MoveOriginatorMessageID = originator
    rq.DataSet = BytesIO(data)
    assert _ours(rq, 3, max_pdu) == _pynetdicom(rq, C_STORE_RQ, 3, max_pdu)


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(["C_GET", "C_MOVE", "C_FIND", "C_ECHO"]), sop_class=uids,
       message_id=message_ids, status=st.sampled_from([0x0000, 0xFF00, 0xFF01, 0xB000, 0xA801]),
       counts=st.none() | st.tuples(*[st.integers(0, 0xFFFF)] * 4),
       comment=st.none() | st.from_regex(r"\A[ -~]{0,40}\Z"),
       identifier=st.none() | st.binary(min_size=1, max_size=200),
       max_pdu=st.sampled_from([0, 48, 16384]))
def test_query_and_retrieve_responses_are_pynetdicoms_bytes(kind, sop_class, message_id, status,
                                                            counts, comment, identifier,
                                                            max_pdu):
    from pynetdicom import dimse_messages, dimse_primitives
    rsp = getattr(dimse_primitives, kind)()
    rsp.MessageIDBeingRespondedTo, rsp.AffectedSOPClassUID, rsp.Status = \
        message_id, sop_class, status
    if comment is not None:
        rsp.ErrorComment = comment
    if kind in ("C_GET", "C_MOVE") and counts is not None:
        (rsp.NumberOfRemainingSuboperations, rsp.NumberOfCompletedSuboperations,
         rsp.NumberOfFailedSuboperations, rsp.NumberOfWarningSuboperations) = counts
    if kind != "C_ECHO" and identifier is not None:
        rsp.Identifier = BytesIO(identifier)
    message_type = getattr(dimse_messages, kind + "_RSP")
    assert _ours(rsp, 5, max_pdu) == _pynetdicom(rsp, message_type, 5, max_pdu)


def test_what_it_does_not_encode_is_left_to_pynetdicom():
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 1, 0xC000
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = "1.2", "1.2.3"
    rsp.OffendingElement = [0x00100010]                     # AT: not packed here
    assert command_encoding.p_data(rsp, 1, 0) is None
    rsp.OffendingElement, rsp.ErrorComment = None, "caf\u00e9"   # not plain ASCII
    assert command_encoding.p_data(rsp, 1, 0) is None
    rsp.ErrorComment = "cannot parse"
    assert command_encoding.p_data(rsp, 1, 0) is not None


def _provider(send_pdu, max_pdu: int, logged: bool = False, sent_queue=None):
    """A stand-in for pynetdicom's DIMSE provider: its DUL (``send_pdu``, a send queue, alive)
    and association (pynetdicom's debug handlers bound when ``logged``)."""
    from pynetdicom import evt
    dul = SimpleNamespace(to_provider_queue=sent_queue or queue.Queue(), send_pdu=send_pdu,
                          is_alive=lambda: True)
    assoc = SimpleNamespace(get_handlers=lambda event: [(print, None)]
                            if logged and event is evt.EVT_DIMSE_SENT else [])
    return SimpleNamespace(assoc=assoc, dul=dul, maximum_pdu_size=max_pdu)


@pytest.mark.parametrize("debug", [False, True])
def test_a_node_uses_it_unless_dimse_messages_are_logged(debug, monkeypatch):
    """With pynetdicom's debug handlers bound, messages go through pynetdicom (and are logged)."""
    sent, original = [], []
    monkeypatch.setattr(command_encoding, "_original_send_msg",
                        lambda self, p, cx: original.append(p))
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 7, 0
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    command_encoding._send_msg(_provider(sent.append, 16384, logged=debug), rsp, 1)
    assert (len(original), len(sent)) == ((1, 0) if debug else (0, 1))


def test_a_large_dataset_is_queued_a_few_fragments_at_a_time(monkeypatch):
    """pynetdicom's send queue is unbounded: a sender waits while it holds QUEUED_BYTES, so a
    large instance is not queued whole (a copy of it) ahead of the socket."""
    monkeypatch.setattr(command_encoding, "QUEUED_BYTES", 64 * 10)
    sent, longest, done, queued = [], [0], threading.Event(), queue.Queue()

    def send_pdu(pdata):
        queued.put(pdata)
        longest[0] = max(longest[0], queued.qsize())

    def socket():                       # the DUL thread, slower than the sender
        while not (done.is_set() and queued.empty()):
            try:
                sent.append(queued.get(timeout=0.01))
            except queue.Empty:
                continue
            time.sleep(0.0002)
    drain = threading.Thread(target=socket)
    drain.start()
    rq = C_STORE()
    rq.MessageID, rq.Priority = 5, 0
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = "1.2.3", "1.2.3.4"
    rq.DataSet = BytesIO(bytes(range(256)) * 40)         # 177 fragments of 58 bytes
    command_encoding._send_msg(_provider(send_pdu, 64, sent_queue=queued), rq, 3)
    done.set()
    drain.join()
    assert longest[0] <= 10
    assert [p.presentation_data_value_list for p in sent] == \
        _pynetdicom(rq, C_STORE_RQ, 3, 64)


def _store_request(uid: str, data: bytes) -> C_STORE:
    rq = C_STORE()
    rq.MessageID, rq.Priority = 5, 0
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = "1.2.3", uid
    rq.DataSet = BytesIO(data)
    return rq


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=700), cuts=st.lists(st.integers(0, 700), max_size=6),
       max_pdu=st.sampled_from([0, 16, 64, 100, 16384]))
def test_a_dataset_in_parts_goes_out_as_pynetdicom_sends_it_joined(data, cuts, max_pdu):
    """An instance's bytes handed over in parts (empty ones too) are cut into the same PDVs as
    the joined bytes: fragments spanning two parts included."""
    bounds = sorted([0, len(data), *(min(c, len(data)) for c in cuts)])   # repeats: empty parts
    parts = tuple(memoryview(data)[a:b] for a, b in zip(bounds, bounds[1:]))
    sent = []
    command_encoding.send_in_parts("1.2.3.4", parts)
    command_encoding._send_msg(_provider(sent.append, max_pdu), _store_request("1.2.3.4", b""), 3)
    assert [p.presentation_data_value_list for p in sent] == \
        _pynetdicom(_store_request("1.2.3.4", data), C_STORE_RQ, 3, max_pdu)


def test_parts_go_to_their_own_instance_only(monkeypatch):
    """Parts handed over for one instance are not sent as another's dataset; when pynetdicom
    sends the message itself (its debug handlers bound), they are joined into it."""
    original = []
    monkeypatch.setattr(command_encoding, "_original_send_msg",
                        lambda self, p, cx: original.append(p.DataSet.getvalue()))
    command_encoding.send_in_parts("1.2.3.4", (b"abc", memoryview(b"def")))
    command_encoding._send_msg(_provider(print, 64, logged=True), _store_request("9.9", b""), 1)
    assert original == [b""]
    command_encoding._send_msg(_provider(print, 64, logged=True),
                               _store_request("1.2.3.4", b""), 1)
    assert original == [b"", b"abcdef"]
