"""Prior studies sent ahead when an exam is ordered or booked: the radiology information
system's order messages (HL7 v2 ``ORM^O01``, ``OMI^O23``, ``OMG^O19``) and a scheduler's new
appointments (``SIU^S12``) name the patient of an exam to come, and the patient's latest
studies go to the reading workstations at once, so that the radiologist who opens the new study
finds the comparison already there.

``hl7_prefetch = "reading=2, er=1"`` names destinations and how many of the patient's latest
studies each gets. A new order (ORC-1 ``NW``, or no ORC) queues those studies' series that the
destination has not had, as sends by hand (:func:`storage.forwarding.queue_latest`): the node's
forwarder sends them on its next pass, retried as any send by hand, listed on the admin page.
Other order controls (changes, cancellations), and the scheduler's other ``SIU`` events
(rescheduled, modified, cancelled, ...), ask for nothing and are acknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass

import hl7

from service import hl7_message
from service.hl7_message import Hl7Error
from storage import forwarding

ORDERS = frozenset({("ORM", "O01"), ("OMI", "O23"), ("OMG", "O19")})
NEW_ORDER = frozenset({"NW", ""})
#: the scheduler's messages; S12 (a new appointment) is a new order, the others change one
SCHEDULE, NEW_APPOINTMENT = "SIU", "S12"
MAX_STUDIES = forwarding.MAX_PRIORS


@dataclass(frozen=True)
class Order:
    """An order message: its header, the ordered exam's patient and the order control."""

    head: hl7_message.Header
    patient_id: str
    control: str

    @property
    def reason(self) -> str:
        """The note on the queued sends."""
        return f"prefetch: HL7 {self.head.kind}^{self.head.event} {self.head.control_id}"


def parse_targets(text: str) -> dict[str, int]:
    """``"reading=2, er=1"`` as {destination: studies}; ValueError when malformed."""
    out = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        name, equals, count = (p.strip() for p in term.partition("="))
        if not equals or not name or not count.isdigit() or \
                not 1 <= int(count) <= MAX_STUDIES:
            raise ValueError(f"hl7_prefetch term {term!r} is not DESTINATION=N with N from 1 "
                             f"to {MAX_STUDIES}")
        out[name] = int(count)
    return out


def is_order(head: hl7_message.Header) -> bool:
    """Whether the message is one of the order or scheduling messages taken."""
    return (head.kind, head.event) in ORDERS or head.kind == SCHEDULE


def read_order(msg: hl7.Message, authority: str = "") -> Order:
    """The order ``msg`` (see :func:`is_order`) names; ``authority`` as for ADT messages.
    Raises Hl7Error "AE" without a patient identifier."""
    head = hl7_message.header(msg)
    pid = hl7_message.segments(msg, "PID")
    if not pid:
        raise Hl7Error("AE", f"{head.kind}^{head.event} without a PID segment")
    if head.kind == SCHEDULE:     # no ORC: the event says whether the exam is new
        control = "" if head.event == NEW_APPOINTMENT else head.event
    else:
        orc = hl7_message.segments(msg, "ORC")
        control = (hl7_message.text(msg, orc[0], 1) or "").upper() if orc else ""
    return Order(head, hl7_message.identifier(msg, pid[0], 3, authority), control)


def prefetch(archive, order: Order, targets: dict[str, int]) -> list[str]:
    """Queue the patient's latest studies for each destination of ``targets``; return what
    was queued, one line per destination."""
    if order.control not in NEW_ORDER:
        return [f"order control {order.control}: nothing to send"
                if order.head.kind != SCHEDULE else
                f"{order.head.kind}^{order.head.event}: not a new appointment, nothing to send"]
    done = []
    for destination, count in targets.items():
        items = forwarding.queue_latest(archive.index, order.patient_id, destination, count,
                                        order.reason)
        done.append(f"{len(items)} series of patient {order.patient_id!r} queued to "
                    f"{destination}")
    return done
