"""Event-driven reactor waits (service.reactor_wait): attached to the node's associations, they
wake on what the reactors poll for, and leave every other sleep alone."""

import contextlib
import os
import socket
import threading
import time

from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from node_helpers import node  # noqa: F401 (fixture)
from scu_helpers import associate
from service import reactor_wait


def _server_associations(node, count=1, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = list(node.server.active_associations)
        if len(found) >= count:
            return found
        time.sleep(0.01)
    raise AssertionError("the node holds no association")


def test_an_idle_association_waits_instead_of_polling(node):
    assoc = associate(node.port, [build_context(Verification)])
    try:
        assert assoc.send_c_echo().Status == 0x0000
        (served,) = _server_associations(node)
        calls = {"assoc": 0, "dul": 0}
        for name, owner in (("assoc", served), ("dul", served.dul)):
            wait = owner._voxarc_wait            # set by attach() on every node association

            def counted(seconds, wait=wait, name=name):
                calls[name] += 1
                wait(seconds)
            owner._voxarc_wait = counted
        time.sleep(0.5)
        # polling would sleep 1 ms (association) and 0.5 ms (DUL) per round: 500-1000 rounds
        for name, n in calls.items():
            assert 1 <= n <= 0.5 / reactor_wait.IDLE_WAIT * 3, (name, n)
        for _ in range(20):                      # and it still answers at once
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_other_sleeps_are_plain_sleeps(monkeypatch):
    slept, waited = [], []
    monkeypatch.setattr(reactor_wait.time, "sleep", slept.append)
    thread = threading.current_thread()
    monkeypatch.setattr(thread, "_voxarc_wait", waited.append, raising=False)
    reactor_wait._Clock().sleep(0.0001)          # called from a function that is no reactor
    assert slept == [0.0001] and waited == []
    assert reactor_wait._Clock().monotonic() <= time.monotonic()   # the rest is ``time``


class _FakeDul:
    def __init__(self, sock):
        self.socket = type("S", (), {"socket": sock})()


@contextlib.contextmanager
def _dul_wait(monkeypatch):
    """(the DUL's wait, its pipe, its socket, the peer's socket), closed afterwards."""
    monkeypatch.setattr(reactor_wait, "IDLE_WAIT", 30.0)
    a, b = socket.socketpair()
    pipe = reactor_wait._Pipe()
    try:
        yield reactor_wait._dul_waiter(_FakeDul(a), pipe), pipe, a, b
    finally:
        a.close()
        b.close()
        pipe.close()


def _ends_when(wait, trigger, *args) -> None:
    threading.Timer(0.05, trigger, args).start()
    start = time.monotonic()
    wait(0.001)
    assert time.monotonic() - start < 10


def test_the_dul_wait_ends_when_data_arrives_or_a_primitive_is_queued(monkeypatch):
    with _dul_wait(monkeypatch) as (wait, pipe, a, b):
        _ends_when(wait, b.send, b"x")
        a.recv(1)
        _ends_when(wait, pipe.wake)


def test_a_wake_writes_only_when_none_is_pending(monkeypatch):
    """A sender queueing P-DATA wakes the DUL once per wait, not once per PDU; a wake after the
    waiter drained the pipe ends its next wait."""
    with _dul_wait(monkeypatch) as (wait, pipe, a, b):
        for _ in range(50):
            pipe.wake()
        assert os.read(pipe.r, 4096) == b"\0"
        os.write(pipe.w, b"\0")           # (put back what was read, for the waiter)
        wait(0.001)                         # drains: the next wake writes again
        _ends_when(wait, pipe.wake)


def test_the_association_wait_ends_on_its_event(monkeypatch):
    monkeypatch.setattr(reactor_wait, "IDLE_WAIT", 30.0)
    event = threading.Event()
    wait = reactor_wait._assoc_waiter(event)
    threading.Timer(0.05, event.set).start()
    start = time.monotonic()
    wait(0.001)
    assert time.monotonic() - start < 10 and not event.is_set()
