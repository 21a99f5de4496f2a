"""The reactor pause guard (service.reactor_pause): a response arriving while the reactor's
"paused" flag is stale goes to the sender that waits for it, not to the reactor."""

import threading
import time

from pynetdicom import AE
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from node_helpers import node  # noqa: F401 (fixture)
from scu_helpers import associate
from service import reactor_pause


def _widen_the_window(assoc) -> None:
    """Make pynetdicom's race certain: the reactor lingers after each wake-up with its flag
    still saying "paused", and the sender lingers after sending, so the response is queued
    before the sender reads it and the reactor reads its queue in between."""
    checkpoint, dimse = assoc._reactor_checkpoint, assoc.dimse
    wait, send = checkpoint.wait, dimse.send_msg

    def slow_wake(timeout=None):
        woke = wait(timeout)
        if threading.current_thread() is assoc:
            time.sleep(0.1)
        return woke

    def slow_send(msg, context_id):
        send(msg, context_id)
        if threading.current_thread() is not assoc:
            time.sleep(0.3)

    checkpoint.wait, dimse.send_msg = slow_wake, slow_send


def _echoes(guarded: bool, count: int = 3) -> list:
    scp = AE(ae_title="ECHOSCP")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False)
    try:
        scu = AE(ae_title="ECHOSCU")
        scu.add_requested_context(Verification)
        scu.dimse_timeout = 2
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="ECHOSCP")
        assert assoc.is_established
        if guarded:
            assert reactor_pause.guard(assoc)
        _widen_the_window(assoc)
        statuses = []
        while len(statuses) < count and assoc.is_established:
            statuses.append(getattr(assoc.send_c_echo(), "Status", None))
        if assoc.is_established:
            assoc.release()
        return statuses
    finally:
        server.shutdown()


def test_every_response_reaches_its_sender():
    # without the guard the reactor takes the first response ("Received unexpected C-ECHO
    # service message"), the sender waits out the DIMSE timeout and aborts: [None] (checked)
    assert _echoes(guarded=True) == [0x0000] * 3


def test_the_node_guards_its_associations(node):
    assoc = associate(node.port, [build_context(Verification)])
    try:
        assert assoc.send_c_echo().Status == 0x0000
        served = list(node.server.active_associations)
        assert served and all(a.dimse.get_msg.__name__ == "guarded_get_msg" for a in served)
    finally:
        assoc.release()


def test_foreign_objects_are_left_alone():
    class NotAnAssociation:
        dimse = None
    assert reactor_pause.guard(NotAnAssociation()) is False
