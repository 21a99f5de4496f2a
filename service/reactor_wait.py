"""Event-driven idle waits for pynetdicom's two polling reactors on the node's associations.

Each association runs two loops that poll with fixed sleeps: the DUL reactor (socket in,
primitives out) and the association reactor (decoded DIMSE messages, release, abort). A poll
that finds nothing costs CPU while the link is idle (about 15% of a core per association at the
sleeps the node used), and every message waits for the next poll. Here, on the associations
:func:`attach` is given, those two sleeps wait instead for what the loop polls for: the DUL
until its socket is readable or a primitive is queued for it, the association reactor until a
DIMSE message or an A-RELEASE/A-ABORT indication arrives or the reactor is paused. A wait never
lasts more than :data:`IDLE_WAIT`, so timers (ARTIM, idle timeouts) and stop flags are still
seen. Every other sleep of pynetdicom, and every association not attached, is unchanged.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
import weakref

from pynetdicom import association as _association
from pynetdicom import dul as _dul

IDLE_WAIT = 0.01    # seconds: the longest an attached reactor waits without a poll
_REACTORS = (_association.Association._run_reactor.__code__,
             _dul.DULServiceProvider.run_reactor.__code__)


class _Clock:
    """Stands for the ``time`` module in pynetdicom's association and DUL modules: the reactor
    loops' sleeps go to their thread's waiter, everything else to ``time``."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        wait = getattr(threading.current_thread(), "_voxarc_wait", None)
        if wait is None or sys._getframe(1).f_code not in _REACTORS:
            time.sleep(seconds)
        else:
            wait(seconds)


def install() -> None:
    """Route pynetdicom's reactor sleeps through :class:`_Clock` (once per process)."""
    if not isinstance(_dul.time, _Clock):
        _dul.time = _Clock()
        _association.time = _Clock()


def _notify_on_put(q, notify) -> None:
    put = q.put

    def put_and_notify(item, block=True, timeout=None):
        put(item, block, timeout)
        notify()

    q.put = put_and_notify


class _Pipe:
    """A self-pipe: a write end to wake a ``select`` on the read end. A wake while one is
    pending writes nothing (a C-GET queues a P-DATA every few dozen microseconds)."""

    def __init__(self):
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self.pending = False

    def wake(self) -> None:
        if self.pending:
            return
        self.pending = True
        try:
            os.write(self.w, b"\0")
        except (BlockingIOError, OSError):
            pass            # already awake (pipe full) or closed

    def drain(self) -> None:
        """Empty the pipe; the waiter then looks at what it waits for (anything queued
        before this returns, its wake skipped or not, is seen)."""
        try:
            while os.read(self.r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self.pending = False

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


def _dul_waiter(dul, pipe: _Pipe):
    def wait(seconds: float) -> None:
        sock = getattr(dul.socket, "socket", None)
        if sock is None or sock.fileno() < 0:
            time.sleep(seconds)
            return
        pending = getattr(sock, "pending", None)   # TLS: bytes already decrypted
        if pending is not None and pending():
            return
        try:
            select.select([sock, pipe.r], [], [], IDLE_WAIT)
        except (OSError, ValueError):
            time.sleep(seconds)
            return
        pipe.drain()
    return wait


def _assoc_waiter(event: threading.Event):
    def wait(seconds: float) -> None:
        event.wait(IDLE_WAIT)
        event.clear()
    return wait


def attach(assoc) -> bool:
    """Make ``assoc``'s two reactors wait for events instead of polling; False when its
    pynetdicom objects are not the expected ones (it then keeps polling)."""
    dul = getattr(assoc, "dul", None)
    dimse = getattr(assoc, "dimse", None)
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    try:
        queues = (dul.to_provider_queue, dul.to_user_queue, dimse.msg_queue)
    except AttributeError:
        return False
    if checkpoint is None or not hasattr(dul, "socket"):
        return False
    install()
    pipe, event = _Pipe(), threading.Event()
    _notify_on_put(queues[0], pipe.wake)
    _notify_on_put(queues[1], event.set)
    _notify_on_put(queues[2], event.set)
    for name in ("set", "clear"):   # a pause, resume or kill request ends the wait at once
        method = getattr(checkpoint, name)
        setattr(checkpoint, name, lambda m=method: (m(), event.set()))
    dul._voxarc_wait = _dul_waiter(dul, pipe)
    assoc._voxarc_wait = _assoc_waiter(event)
    weakref.finalize(assoc, pipe.close)    # the reactors have ended by then
    return True
