"""Storage Commitment Push Model (service.commitment) against a pynetdicom modality: the
N-ACTION request on one association, the N-EVENT-REPORT on another, to the modality's listener."""

import threading
import time

import pytest
from sqlalchemy import select
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StorageCommitmentPushModel

from node_helpers import dataset_bytes, free_port, make_series
from scu_helpers import store_bytes
from service import commitment
from service.ae import Node
from service.config import load_settings
from storage.index import Instance


class Modality:
    """The modality's side: an SCP of N-EVENT-REPORT for storage commitment (it takes the SCP
    role the archive proposes), collecting the reports it receives."""

    def __init__(self, ae_title: str = "MODALITY", answer: int = 0x0000):
        self.ae_title, self.answer, self.port = ae_title, answer, free_port()
        self.reports: list = []
        self.arrived = threading.Event()
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])

    def _on_report(self, event):
        self.reports.append((event.request.EventTypeID, event.event_information,
                             str(event.assoc.requestor.ae_title).strip()))
        self.arrived.set()
        return self.answer, None

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def modality():
    running = Modality()
    yield running
    running.stop()


def _node(tmp_path, modality, **extra):
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             stable_age=3600.0, destination=[
                                 f"MOD={modality.ae_title}@127.0.0.1:{modality.port}"], **extra)
    return Node(settings, compaction=False).start()


def _request(port: int, items, transaction_uid: str, action_type: int = 1,
             calling: str = "MODALITY", instance: str = commitment.WELL_KNOWN_INSTANCE):
    """Send one N-ACTION; return its status Dataset."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="VOXARC")
    assert assoc.is_established
    info = Dataset()
    if transaction_uid:
        info.TransactionUID = transaction_uid
    info.ReferencedSOPSequence = []
    for sop_class, sop_uid in items:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
        info.ReferencedSOPSequence.append(item)
    status, _ = assoc.send_n_action(info, action_type, StorageCommitmentPushModel, instance)
    assoc.release()
    return status


def _stored(node, tmp_path, n=3):
    series = make_series(n, seed=1)
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    assert set(store_bytes(node.port, items, tmp_path)) == {0}
    return [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in series]


def _eventually(check, seconds=30.0) -> bool:
    for _ in range(int(seconds * 20)):
        if check():
            return True
        threading.Event().wait(0.05)
    return check()


def _pairs(seq):
    return sorted((str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                  for i in seq)


def test_every_held_instance_is_committed_in_a_report_to_the_modality(tmp_path, modality):
    node = _node(tmp_path, modality)
    try:
        held = _stored(node, tmp_path)
        uid = generate_uid()
        assert _request(node.port, held, uid).Status == 0x0000
        assert modality.arrived.wait(30)
        ((event_type, info, caller),) = modality.reports
        assert event_type == commitment.ALL_COMMITTED and caller == "VOXARC"
        assert info.TransactionUID == uid and info.RetrieveAETitle == "VOXARC"
        assert _pairs(info.ReferencedSOPSequence) == sorted(held)
        assert "FailedSOPSequence" not in info
        assert _eventually(lambda: node.reporter.delivered == 1)
    finally:
        node.stop()


def test_unknown_and_mismatched_instances_fail_with_their_reasons(tmp_path, modality):
    node = _node(tmp_path, modality)
    try:
        held = _stored(node, tmp_path)
        node.archive.compact(stable_age=0)                   # compressed ones are held too
        unknown = (CTImageStorage, generate_uid())
        wrong_class = (MRImageStorage, held[0][1])
        assert _request(node.port, held[1:] + [unknown, wrong_class],
                        generate_uid()).Status == 0
        assert modality.arrived.wait(30)
        ((event_type, info, _),) = modality.reports
        assert event_type == commitment.SOME_FAILED
        assert _pairs(info.ReferencedSOPSequence) == sorted(held[1:])
        reasons = {str(i.ReferencedSOPInstanceUID): i.FailureReason
                   for i in info.FailedSOPSequence}
        assert reasons == {unknown[1]: commitment.NO_SUCH_INSTANCE,
                           wrong_class[1]: commitment.CLASS_CONFLICT}
    finally:
        node.stop()


def test_malformed_requests_and_unknown_callers_are_refused_at_once(tmp_path, modality):
    node = _node(tmp_path, modality)
    try:
        held = _stored(node, tmp_path, 1)
        assert _request(node.port, held, "").Status == commitment.INVALID_ARGUMENT
        assert _request(node.port, [], generate_uid()).Status == commitment.INVALID_ARGUMENT
        assert _request(node.port, held, generate_uid(), action_type=2).Status == \
            commitment.NO_SUCH_ACTION
        assert _request(node.port, held, generate_uid(), calling="STRANGER").Status == \
            commitment.PROCESSING_FAILURE                # its report could reach no one
        assert not modality.arrived.wait(1.0) and node.reporter.delivered == 0
    finally:
        node.stop()


def test_another_sop_instance_than_the_well_known_one_is_refused(tmp_path, modality):
    node = _node(tmp_path, modality)
    try:
        held = _stored(node, tmp_path, 1)
        assert _request(node.port, held, generate_uid(), instance=generate_uid()).Status == \
            commitment.NO_SUCH_SOP_INSTANCE
        assert not modality.arrived.wait(1.0) and node.reporter.delivered == 0
    finally:
        node.stop()


def test_a_peer_without_store_permission_is_not_authorised(tmp_path, modality):
    node = _node(tmp_path, modality, peers={"MODALITY": "query"})
    try:
        assert _request(node.port, [(CTImageStorage, generate_uid())], generate_uid()).Status \
            == 0x0124
    finally:
        node.stop()


def test_a_report_the_modality_cannot_take_is_retried_then_given_up(tmp_path):
    modality = Modality(answer=0x0110)
    node = _node(tmp_path, modality)
    node.reporter.retry_delays = (0.0, 0.2, 0.2)
    try:
        held = _stored(node, tmp_path, 1)
        assert _request(node.port, held, generate_uid()).Status == 0
        assert _eventually(lambda: node.reporter.undelivered == 1)
        assert len(modality.reports) == 3 and node.reporter.delivered == 0
    finally:
        node.stop()
        modality.stop()


def _two_modality_node(tmp_path, good, dead_port):
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             stable_age=3600.0, destination=[
                                 f"GOOD={good.ae_title}@127.0.0.1:{good.port}",
                                 f"DEAD=DEAD@127.0.0.1:{dead_port}"])
    return Node(settings, compaction=False).start()


def test_an_unreachable_modality_does_not_delay_another_ones_report(tmp_path):
    good = Modality("GOOD")
    node = _two_modality_node(tmp_path, good, free_port())      # nothing listens at DEAD
    node.reporter.retry_delays = (0.2, 3.0, 3.0)
    try:
        held = _stored(node, tmp_path, 1)
        assert _request(node.port, held, generate_uid(), calling="DEAD").Status == 0
        started = time.monotonic()
        assert _request(node.port, held, generate_uid(), calling="GOOD").Status == 0
        assert good.arrived.wait(30)
        assert time.monotonic() - started < 2.0
        assert node.reporter.undelivered == 0                   # DEAD's retries still pending
        assert _eventually(lambda: node.reporter.undelivered == 1)
        assert node.reporter.delivered == 1
    finally:
        node.stop()
        good.stop()


def test_stopping_drops_pending_retries_at_once(tmp_path):
    good = Modality("GOOD")
    node = _two_modality_node(tmp_path, good, free_port())
    node.reporter.retry_delays = (0.0, 60.0, 60.0)
    try:
        held = _stored(node, tmp_path, 1)
        assert _request(node.port, held, generate_uid(), calling="DEAD").Status == 0
        time.sleep(0.5)                                         # its first attempt fails
        started = time.monotonic()
        node.reporter.stop()
        assert time.monotonic() - started < 2.0
        assert node.reporter.undelivered == 1 and node.reporter.delivered == 0
    finally:
        node.stop()
        good.stop()


def test_report_dataset_without_a_node():
    request = commitment.Request("1.2.3", "MOD", ((CTImageStorage, "1.1"),
                                                  (CTImageStorage, "1.2")))
    event_type, info = commitment.report_dataset(request, {"1.1": CTImageStorage}, "ARCHIVE")
    assert event_type == commitment.SOME_FAILED
    assert _pairs(info.ReferencedSOPSequence) == [(CTImageStorage, "1.1")]
    assert [i.FailureReason for i in info.FailedSOPSequence] == [commitment.NO_SUCH_INSTANCE]
    event_type, info = commitment.report_dataset(
        request, {"1.1": CTImageStorage, "1.2": CTImageStorage}, "ARCHIVE")
    assert event_type == commitment.ALL_COMMITTED and "FailedSOPSequence" not in info


def test_held_needs_the_file(tmp_path, modality):
    node = _node(tmp_path, modality)
    try:
        held = _stored(node, tmp_path, 2)
        with node.archive.index.read() as s:
            key = s.scalar(select(Instance.staged_key).where(Instance.sop_uid == held[0][1]))
        node.archive.blobs.delete(key)
        assert node.archive.held([u for _, u in held]) == {held[1][1]: held[1][0]}
    finally:
        node.stop()

