"""Leave pynetdicom's anonymous per-sub-operation lines out of the node's log.

pynetdicom's query/retrieve service logs two INFO lines for every instance a C-GET or C-MOVE
sends ("Get SCP Response 57: 0xFF00 (Pending)", "Get SCP: Received Store SCP response 0x0000
(Success)") and one for every C-FIND match, none naming the instance: a 100-instance C-GET
filled the log with 200 such lines. The node logs each operation itself (peer, level, number of
instances), every instance that is not sent (with its UID and why), and pynetdicom's final
response of each operation (its status) still goes through, as does any sub-operation that
did not succeed.
"""

from __future__ import annotations

import logging
import re

_ROUTINE = re.compile(r"(Find|Get|Move) SCP( Response \d+: 0x(FF00|FF01) \(Pending\)"
                      r"|: Received Store SCP response (0x0000 )?\(Success\))$")


class RoutineSubOperations(logging.Filter):
    """Drops the routine lines (pending responses, successful sub-operations)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _ROUTINE.match(record.getMessage())


def install() -> None:
    """Filter pynetdicom's service-class logger (idempotent)."""
    logger = logging.getLogger("pynetdicom.service_class")
    if not any(isinstance(f, RoutineSubOperations) for f in logger.filters):
        logger.addFilter(RoutineSubOperations())
