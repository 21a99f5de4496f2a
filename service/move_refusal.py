"""A C-MOVE refused for its identifier is answered before any association to its destination.

pynetdicom's C-MOVE service asks the handler for the destination, associates with it, and only
then takes the handler's statuses, so a request the node refuses (no Query/Retrieve Level, a
missing unique key, a wildcard in one: service.identifiers) used to open and release an empty
association to the destination before its 0xA900. This wraps pynetdicom's C-MOVE SCP so that
such a request is answered 0xA900 at once; every other request goes through pynetdicom and the
node's handler (service.handlers.handle_move) as before, which checks the identifier again.
"""

from __future__ import annotations

import logging
import weakref

from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import decode
from pynetdicom.service_class import QueryRetrieveServiceClass

from service.identifiers import IdentifierError, parse_identifier, retrieve_criteria
from service.statuses import IDENTIFIER_MISMATCH

log = logging.getLogger(__name__)
_original_move_scp = QueryRetrieveServiceClass._move_scp
_counters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # AE -> callable


def count_with(ae, counter) -> None:
    """Call ``counter()`` for each request refused here on ``ae``'s associations (the node's
    metrics: these requests never reach its wrapped handler)."""
    _counters[ae] = counter


def refusal(req: C_MOVE, context) -> str | None:
    """Why the node refuses a C-MOVE request for its identifier; None when it does not (or
    when the identifier cannot be decoded here: the handler answers that)."""
    ts = context.transfer_syntax[0]
    try:
        req.Identifier.seek(0)
        identifier = decode(req.Identifier, ts.is_implicit_VR, ts.is_little_endian,
                            ts.is_deflated)
    except Exception:
        return None
    finally:
        req.Identifier.seek(0)
    try:
        retrieve_criteria(*parse_identifier(identifier))
    except IdentifierError as exc:
        return str(exc)
    return None


def _move_scp(self, req, context):
    """pynetdicom's C-MOVE SCP, but a request refused for its identifier is answered 0xA900
    here, before any association to its destination."""
    reason = refusal(req, context)
    if reason is None:
        return _original_move_scp(self, req, context)
    peer = self.assoc.requestor
    log.warning("C-MOVE from %s@%s to %s refused (0xA900), no association opened: %s",
                peer.ae_title, peer.address, str(req.MoveDestination).strip(), reason)
    rsp = C_MOVE()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = req.MessageID
    rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
    rsp.Status = IDENTIFIER_MISMATCH
    self.dimse.send_msg(rsp, context.context_id)
    counter = _counters.get(self.ae)
    if counter is not None:
        counter()


def install() -> None:
    """Answer refused C-MOVE requests in :func:`_move_scp` (idempotent)."""
    QueryRetrieveServiceClass._move_scp = _move_scp
