"""Leave pynetdicom's anonymous per-sub-operation lines, and pydicom's tracebacks of each
pixel decoder it tries, out of the node's log.

pynetdicom's query/retrieve service logs two INFO lines for every instance a C-GET or C-MOVE
sends ("Get SCP Response 57: 0xFF00 (Pending)", "Get SCP: Received Store SCP response 0x0000
(Success)") and one for every C-FIND match, none naming the instance: a 100-instance C-GET
filled the log with 200 such lines. The node logs each operation itself (peer, level, number of
instances), every instance that is not sent (with its UID and why: pynetdicom's own line for
it, that the dataset lacks a SOP Class UID, is left out too), and pynetdicom's final
response of each operation (its status) still goes through, as does any sub-operation that
did not succeed.

pydicom logs an ERROR with a traceback for every decoder plugin that fails on a frame before it
tries the next one (three for a 12-bit JPEG Extended image, which none of them decodes), then
raises; the node's code that asked (a preview, a conversion for a peer, DICOMweb frames) says
itself, in one line naming the instance, that it could not be decoded, so those go.
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


class DecoderAttempts(logging.Filter):
    """Drops pydicom's records of a failed decoder plugin (those with a traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


def install() -> None:
    """Filter pynetdicom's service-class logger and pydicom's decoders' (idempotent)."""
    for name, kind in (("pynetdicom.service_class", RoutineSubOperations),
                       ("pydicom.pixels.decoders.base", DecoderAttempts)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
