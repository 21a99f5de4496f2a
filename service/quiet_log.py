"""Leave pynetdicom's anonymous per-sub-operation lines out of the node's log.

pynetdicom's query/retrieve service logs two INFO lines for every instance a C-GET or C-MOVE
sends ("Get SCP Response 57: 0xFF00 (Pending)", "Get SCP: Received Store SCP response 0x0000
(Success)") and one for every C-FIND match, none naming the instance: a 100-instance C-GET
filled the log with 200 such lines. The node logs each operation itself (peer, level, number of
instances), every instance that is not sent (with its UID and why: pynetdicom's own line for
it, that the dataset lacks a SOP Class UID, is left out too), and pynetdicom's final
response of each operation (its status) still goes through, as does any sub-operation that
did not succeed.
"""

from __future__ import annotations

import logging
import re

_ROUTINE = re.compile(r"(Find|Get|Move) SCP( Response \d+: 0x(FF00|FF01) \(Pending\)"
                      r"|: Received Store SCP response (0x0000 )?\(Success\))$")
# what pynetdicom says of the dataset the node hands it for an instance it does not send (it
# has no SOP Class UID, so that the sub-operation fails): the node has logged the instance and
# why just before, and every stored instance has a SOP Class UID
_NOT_SENT = "Unable to send the dataset as one or more required element are missing: SOPClassUID"


class RoutineSubOperations(logging.Filter):
    """Drops the routine lines (pending responses, successful sub-operations) and the
    misleading one for an instance the node does not send."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (_ROUTINE.match(message) or message == _NOT_SENT)


def install() -> None:
    """Filter pynetdicom's service-class logger (idempotent)."""
    logger = logging.getLogger("pynetdicom.service_class")
    if not any(isinstance(f, RoutineSubOperations) for f in logger.filters):
        logger.addFilter(RoutineSubOperations())
