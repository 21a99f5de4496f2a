"""Which transfer syntax a retrieving peer's storage context gets.

A C-GET client proposes, for each storage SOP class, a presentation context in which it will
receive the instances (the SCP role); DCMTK's ``getscu +xs`` proposes JPEG Lossless, then the
uncompressed syntaxes, all in one context. pynetdicom accepts the first of them in the
acceptor's own order (explicit VR little endian first: right for a modality storing to us),
and voxarc sends every instance only in the syntax it was received in, so a series held as
JPEG Lossless could not go out on that association (every sub-operation failed). For contexts
whose peer takes the SCP role, the acceptor's order here is the archive's own: the syntaxes it
holds most instances of that class in first, so one context per class serves as many of them
as possible. Contexts in which a peer sends to us keep the default order.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Callable

from pynetdicom import acse

log = logging.getLogger(__name__)
CACHE_SECONDS = 30.0     # the archive's syntax counts are read at most this often

_original_negotiate = acse.negotiate_as_acceptor


class RetrievalOrder:
    """The archive's stored syntaxes per SOP class (``source()``), read at most every
    CACHE_SECONDS, as the acceptor's preference for retrieval contexts."""

    def __init__(self, source: Callable[[], dict[str, list[str]]]):
        self.source = source
        self._cached: tuple[float, dict] | None = None
        self._lock = threading.Lock()

    def syntaxes(self) -> dict[str, list[str]]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > CACHE_SECONDS:
                self._cached = (now, self.source())
            return self._cached[1]

    def reorder(self, contexts: list, roles: dict) -> list:
        """``contexts`` (the acceptor's), with the transfer syntaxes of every storage class
        the peer proposes the SCP role for in the archive's order (copies; the rest as is)."""
        wanted = {uid for uid, (_, scp) in (roles or {}).items() if scp}
        if not wanted:
            return contexts
        held = self.syntaxes()
        out = []
        for cx in contexts:
            order = held.get(cx.abstract_syntax) if cx.abstract_syntax in wanted else None
            if order:
                rank = {ts: i for i, ts in enumerate(order)}
                ours = list(cx.transfer_syntax)      # sorted() is stable: the rest keep order
                cx = copy.copy(cx)
                cx._transfer_syntax = sorted(ours, key=lambda ts: rank.get(ts, len(rank)))
            out.append(cx)
        return out


def attach(contexts: list, order: RetrievalOrder) -> list:
    """Mark a server's supported contexts with the archive's retrieval order (their per
    association copies keep it) and make sure the negotiation reads it."""
    install()
    for cx in contexts:
        cx.retrieval_order = order
    return contexts


def _negotiate(rq_contexts, ac_contexts, roles=None):
    """pynetdicom's acceptor negotiation, with the contexts marked by :func:`attach` in the
    archive's retrieval order."""
    marks = (getattr(cx, "retrieval_order", None) for cx in ac_contexts or ())
    order = next((mark for mark in marks if mark is not None), None)
    if order is not None and roles:
        try:
            ac_contexts = order.reorder(list(ac_contexts), roles)
        except Exception:    # never fail an association over a preference
            log.exception("retrieval syntax order unavailable; default order used")
    return _original_negotiate(rq_contexts, ac_contexts, roles)


def install() -> None:
    """Negotiate through :func:`_negotiate` (idempotent)."""
    acse.negotiate_as_acceptor = _negotiate
