"""Closes a window in pynetdicom's pause of an association's reactor, which let the reactor take
a DIMSE response meant for the thread that waits for it.

A ``send_*`` method (a C-STORE sub-operation of a C-MOVE, say) pauses the reactor before it
sends its request: it clears the reactor's checkpoint and waits until the reactor says it is
paused. The reactor says so just before it waits at the checkpoint and unsays it just after, so
after one request's response has been taken and the checkpoint set again, the flag still reads
"paused" until the reactor thread runs again. When that thread is slow to get the GIL (two busy
cores), the next request is sent on the stale flag, and if its response arrives before the
reactor has read its message queue, the reactor reads the response, logs "Received unexpected
C-STORE service message" and drops it, and the sender waits out the DIMSE timeout (seen once in
CI: a C-MOVE to DCMTK's storescp failed after 30 s).

Here the reactor's own non-blocking reads of that queue find nothing while the checkpoint is
clear, from the moment a sender clears it until it sets it again, which is what the pause
means: every response goes to the sender waiting for it. Blocking reads (the sender's) and
reads outside a pause are unchanged.
"""

from __future__ import annotations

import threading


def guard(assoc) -> bool:
    """Keep ``assoc``'s reactor off its DIMSE messages while a sender has it paused; False when
    its pynetdicom objects are not the expected ones (nothing is changed then)."""
    is_set = getattr(getattr(assoc, "_reactor_checkpoint", None), "is_set", None)
    dimse = getattr(assoc, "dimse", None)
    get_msg = getattr(dimse, "get_msg", None)
    if not isinstance(assoc, threading.Thread) or is_set is None or get_msg is None:
        return False

    def guarded_get_msg(block: bool = False):
        # a sender pauses the reactor by clearing the checkpoint and resumes it by setting it
        if not block and not is_set() and threading.current_thread() is assoc:
            return None, None
        return get_msg(block)

    dimse.get_msg = guarded_get_msg
    return True
