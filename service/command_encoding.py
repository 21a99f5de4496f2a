"""DIMSE command sets encoded directly: the same bytes pynetdicom sends, without a pydicom Dataset.

For every message pynetdicom fills a pydicom Dataset with the primitive's parameters, encodes it
once to learn the Command Group Length, then again to send it: about 1 ms for the six to ten
elements of a C-STORE request or response, or of a C-GET pending response, on this machine,
against a 10-15 ms C-STORE round trip. A command set is always Implicit VR Little Endian
(PS3.7 6.3.1) and holds only numbers and short strings, so here it is packed from pynetdicom's
own tables of each message's elements. Messages of the types in :data:`TYPES` whose parameters
are all US, UL, UI or plain-ASCII AE/LO values take this path; anything else (an offending
element list, a dataset streamed from a file, bound ``EVT_DIMSE_SENT`` handlers, other message
types) goes through pynetdicom unchanged. Tests check the bytes against pynetdicom's encoding.

A message's dataset is cut into P-DATA as they are queued, from views of its bytes, and the
sender waits while :data:`QUEUED_BYTES` of them are queued: pynetdicom made every fragment
first and its send queue is unbounded, so a C-GET of a 192 MiB multi-frame instance held some
four copies of it at once. A retrieved instance's bytes may also come in parts (its header
bytes and decoded pixel words, :func:`send_in_parts`), so that they are never joined into one
more copy: one is held now.
"""

from __future__ import annotations

import io
import itertools
import struct
import threading
import time
from collections.abc import Iterator

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pynetdicom import dimse_messages, evt
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE, DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.pdu_primitives import P_DATA

_original_send_msg = DIMSEServiceProvider.send_msg
TYPES = (C_STORE, C_GET, C_MOVE, C_FIND, C_ECHO)
_NO_DATASET = 0x0101
_PADDING = {"UI": b"\0", "AE": b" ", "LO": b" "}


def _layout(message_class) -> tuple[int, tuple, str | None]:
    """(CommandField, ((element, VR, parameter), ...) in tag order, dataset parameter) of a
    pynetdicom message class."""
    name = message_class.__name__.replace("_", "-")
    field = next(k for k, (n, _) in dimse_messages._MESSAGE_TYPES.items() if n == name)
    elements = []
    for keyword in dimse_messages._COMMAND_SET_KEYWORDS[name]:
        if keyword != "CommandGroupLength":
            tag = tag_for_keyword(keyword)
            elements.append((tag & 0xFFFF, dictionary_VR(tag), keyword))
    dataset = dimse_messages._DATASET_KEYWORDS.get(message_class.__name__)
    return field, tuple(sorted(elements)), dataset


_LAYOUTS = {(kind, response): _layout(table[kind]) for kind in TYPES
            for response, table in ((False, _RQ_TO_MESSAGE), (True, _RSP_TO_MESSAGE))}


def _element(number: int, vr: str, value) -> bytes | None:
    if vr in ("US", "UL"):
        if not isinstance(value, int):
            return None
        body = struct.pack("<H" if vr == "US" else "<I", value)
    elif vr in _PADDING and isinstance(value, str):
        body = value.encode("ascii")
        if len(body) % 2:
            body += _PADDING[vr]
    else:
        return None
    return struct.pack("<HHI", 0, number, len(body)) + body


def encode_command(primitive) -> tuple[bytes, object] | None:
    """Return the encoded command set of a DIMSE-C primitive and its dataset (a BytesIO, or
    None), or None when the primitive has something this module does not encode."""
    layout = _LAYOUTS.get((type(primitive), primitive.MessageIDBeingRespondedTo is not None))
    if layout is None or getattr(primitive, "_dataset_path", None):
        return None
    field, elements, dataset_name = layout
    dataset = getattr(primitive, dataset_name) if dataset_name else None
    parts = []
    for number, vr, keyword in elements:
        if keyword == "CommandField":
            value = field
        elif keyword == "CommandDataSetType":
            value = 0x0001 if dataset is not None else _NO_DATASET
        else:
            value = getattr(primitive, keyword, None)
            if value is None:
                continue
        try:
            part = _element(number, vr, value)
        except (UnicodeEncodeError, struct.error):
            return None
        if part is None:
            return None
        parts.append(part)
    body = b"".join(parts)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body, dataset


def _fragments(parts, max_pdu: int) -> Iterator:
    """The bytes of ``parts`` cut into PDV values of at most ``max_pdu - 6`` bytes: views of
    a part, copies only of a value that spans two parts."""
    views = [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]
    size = max_pdu - 6 if max_pdu else sum(map(len, views))
    carry: list = []
    carried = 0
    for view in views:
        at = 0
        if carried:
            at = min(size - carried, len(view))
            carry.append(view[:at])
            carried += at
            if carried < size:
                continue
            yield b"".join(carry)
            carry, carried = [], 0
        while len(view) - at >= size:
            yield view[at:at + size]
            at += size
        if at < len(view):
            carry, carried = [view[at:]], len(view) - at
    if carried:
        yield carry[0] if len(carry) == 1 else b"".join(carry)


def _pdata(context_id: int, control: int, fragment) -> P_DATA:
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, bytes((control,)) + fragment))
    return pdata


def _marked(parts, context_id: int, max_pdu: int, more: int, last: int) -> Iterator[P_DATA]:
    pending = None
    for piece in _fragments(parts, max_pdu):
        if pending is not None:
            yield _pdata(context_id, more, pending)
        pending = piece
    if pending is not None:
        yield _pdata(context_id, last, pending)


def p_data(primitive, context_id: int, max_pdu: int, parts: tuple | None = None
           ) -> Iterator[P_DATA] | None:
    """The P-DATA primitives pynetdicom would send for a DIMSE-C primitive, made one at a time
    as they are taken, or None when this module does not encode it. ``parts``: the dataset's
    bytes in consecutive parts, instead of the primitive's own."""
    encoded = encode_command(primitive)
    if encoded is None:
        return None
    command, dataset = encoded
    if parts is None:
        parts = (dataset.getvalue(),) if dataset is not None else ()
    chained = [_marked((command,), context_id, max_pdu, 0x01, 0x03)]
    if any(len(memoryview(p)) for p in parts):
        chained.append(_marked(parts, context_id, max_pdu, 0x00, 0x02))
    return itertools.chain(*chained)


_next_parts = threading.local()


def send_in_parts(sop_uid: str, parts: tuple) -> None:
    """Have the next C-STORE request of ``sop_uid`` sent from this thread carry ``parts`` as
    its dataset (instead of the empty one pynetdicom holds for it), so that an instance's
    bytes need not be joined into one object: pynetdicom takes one bytes object per dataset."""
    _next_parts.value = (sop_uid, parts)


def _taken_parts(primitive) -> tuple | None:
    pending = getattr(_next_parts, "value", None)
    if (pending is None or not isinstance(primitive, C_STORE)
            or primitive.MessageIDBeingRespondedTo is not None
            or primitive.AffectedSOPInstanceUID != pending[0]
            or primitive.DataSet is None or primitive.DataSet.getvalue()):
        return None
    _next_parts.value = None
    return pending[1]


#: bytes of P-DATA a sender may have queued for its association's DUL before it waits: pynetdicom's
#: queue is unbounded, so a large instance would otherwise be queued whole, a copy of it in
#: fragments, while the socket sends the first ones
QUEUED_BYTES = 4 << 20
_QUEUE_POLL = 0.0005


def _send_msg(self, primitive, context_id: int) -> None:
    parts = _taken_parts(primitive)
    if type(primitive) in TYPES and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        pdatas = p_data(primitive, context_id, self.maximum_pdu_size, parts)
        if pdatas is not None:
            queue, dul = self.dul.to_provider_queue, self.dul
            most = max(8, QUEUED_BYTES // max(self.maximum_pdu_size, 1))
            waits = threading.current_thread() is not dul     # the DUL cannot drain for itself
            for pdata in pdatas:
                while waits and queue.qsize() >= most and dul.is_alive():
                    time.sleep(_QUEUE_POLL)
                dul.send_pdu(pdata)
            return
    if parts is not None:
        primitive.DataSet = io.BytesIO(b"".join(parts))
    _original_send_msg(self, primitive, context_id)


def install() -> None:
    """Send DIMSE-C messages through :func:`p_data` (idempotent)."""
    DIMSEServiceProvider.send_msg = _send_msg
