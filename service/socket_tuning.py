"""Tuning of each association's socket and reactor, on the node's listener and on the
associations it opens itself (C-MOVE destinations, storage commitment reports)."""

from __future__ import annotations

import logging
import socket
import types

from service import reactor_pause, reactor_wait

log = logging.getLogger(__name__)
# pynetdicom's DUL reactor sleeps this long whenever it finds nothing to do (its default, 1 ms,
# is paid on every request and every response of a C-STORE, as the client waits for each).
# Measured here, an idle association costs 8.3% of a core at 1 ms, 9.8% at 0.5 ms, 16% at 0.2 ms.
DUL_LOOP_DELAY = 0.0005


def tune_association(event) -> None:
    """Let a new association's reactors wait for events instead of polling
    (:mod:`service.reactor_wait`; where that cannot attach, shorten the DUL's poll, see
    :data:`DUL_LOOP_DELAY`), its socket read a PDU in a few large reads instead of 4 kB ones,
    and send without Nagle's delay (each PDU goes out in one call anyway); and keep its reactor
    off the responses a sender waits for (:mod:`service.reactor_pause`)."""
    dul = getattr(event.assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = DUL_LOOP_DELAY
    reactor_wait.attach(event.assoc)
    reactor_pause.guard(event.assoc)
    sock = getattr(dul, "socket", None)
    if sock is not None and hasattr(sock, "recv"):
        sock.recv = types.MethodType(_recv_exactly, sock)
    raw = getattr(sock, "socket", None)
    if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:      # not worth failing an association for
            log.debug("TCP_NODELAY not set: %s", exc)


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)     # Linux


def _quick_ack(sock) -> None:
    """Acknowledge what arrives at once instead of up to 40 ms later. A peer that writes a PDU
    in two small pieces with Nagle's algorithm on (DCMTK's default: its C-STORE and C-GET
    responses) holds the second piece until the first is acknowledged, so a delayed
    acknowledgement here stalled every message (C-GET of 100 slices: 5.3 s against 3.3 s).
    Linux leaves quick-ack mode by itself, hence before every read."""
    if _QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:         # not a TCP socket (a test's), or not supported
            pass


_FIRST_READ = 1 << 20     # bytes a read may ask for before any of them has arrived


def _recv_exactly(self, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with reads into one buffer as large as the socket allows
    (pynetdicom reads 4 kB at a time: 120 calls and copies for a 500 kB instance), and quick
    acknowledgements (:func:`_quick_ack`). Same contract: blocks until ``nr_bytes`` are read;
    on a closed connection, what was read. The buffer grows with what arrives (doubling), never
    ahead of it: ``nr_bytes`` is a PDU length as the peer wrote it, before any authentication,
    and up to 4 GiB."""
    buf, got = bytearray(min(nr_bytes, _FIRST_READ)), 0
    while got < nr_bytes:
        if got == len(buf):
            buf += bytes(min(len(buf), nr_bytes - got))
        _quick_ack(self.socket)
        with memoryview(buf) as view, view[got:] as free:
            n = self.socket.recv_into(free, len(buf) - got)
        if not n:
            return buf[:got]
        got += n
    return buf
