"""C-STORE command sets encoded directly: the same bytes pynetdicom sends, without a pydicom Dataset.

For every message pynetdicom fills a pydicom Dataset with the primitive's parameters, encodes it
once to learn the Command Group Length, then again to send it: about 1 ms for the six or seven
elements of a C-STORE request or response on this machine, against a 10-15 ms C-STORE round
trip. A command set is always Implicit VR Little Endian (PS3.7 6.3.1), so these few elements
are packed here instead. Only C-STORE messages whose parameters are all of the kinds below take
this path (a status with an error comment or an offending element, a dataset streamed from a
file, bound ``EVT_DIMSE_SENT`` handlers and every other message go through pynetdicom
unchanged); tests check the bytes against pynetdicom's own encoding.
"""

from __future__ import annotations

import struct
from math import ceil

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

_original_send_msg = DIMSEServiceProvider.send_msg
_NO_DATASET = 0x0101
# (element number in group 0000, VR, primitive parameter), in tag order
_REQUEST = ((0x0002, "UI", "AffectedSOPClassUID"), (0x0100, "US", None),
            (0x0110, "US", "MessageID"), (0x0700, "US", "Priority"), (0x0800, "US", None),
            (0x1000, "UI", "AffectedSOPInstanceUID"),
            (0x1030, "AE", "MoveOriginatorApplicationEntityTitle"),
            (0x1031, "US", "MoveOriginatorMessageID"))
_RESPONSE = ((0x0002, "UI", "AffectedSOPClassUID"), (0x0100, "US", None),
             (0x0120, "US", "MessageIDBeingRespondedTo"), (0x0800, "US", None),
             (0x0900, "US", "Status"), (0x1000, "UI", "AffectedSOPInstanceUID"))
_COMMAND_FIELD = {_REQUEST: 0x0001, _RESPONSE: 0x8001}


def _element(number: int, vr: str, value) -> bytes:
    if vr == "US":
        body = struct.pack("<H", value)
    else:
        body = str(value).encode("ascii")
        if len(body) % 2:
            body += b"\0" if vr == "UI" else b" "
    return struct.pack("<HHI", 0, number, len(body)) + body


def encode_command(primitive: C_STORE) -> tuple[bytes, bool] | None:
    """Return the encoded command set of a C-STORE primitive and whether a dataset follows, or
    None when the primitive has a parameter this module does not encode."""
    response = primitive.MessageIDBeingRespondedTo is not None
    if response and (primitive.ErrorComment is not None
                     or primitive.OffendingElement is not None):
        return None
    if getattr(primitive, "_dataset_path", None):
        return None
    fields = _RESPONSE if response else _REQUEST
    dataset = None if response else primitive.DataSet
    has_dataset = dataset is not None
    parts = []
    for number, vr, name in fields:
        if name is None:
            value = _COMMAND_FIELD[fields] if number == 0x0100 else \
                (0x0001 if has_dataset else _NO_DATASET)
        else:
            value = getattr(primitive, name)
            if value is None:
                continue
        try:
            parts.append(_element(number, vr, value))
        except (UnicodeEncodeError, struct.error):
            return None
    body = b"".join(parts)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body, has_dataset


def _fragments(data: bytes, max_pdu: int):
    if max_pdu == 0:
        yield data
        return
    size = max_pdu - 6
    for i in range(ceil(len(data) / size)):
        yield data[i * size:(i + 1) * size]


def _pdata(context_id: int, control: int, fragment: bytes) -> P_DATA:
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, bytes((control,)) + fragment))
    return pdata


def p_data(primitive: C_STORE, context_id: int, max_pdu: int) -> list[P_DATA] | None:
    """The P-DATA primitives pynetdicom would send for a C-STORE primitive, or None when this
    module does not encode it."""
    encoded = encode_command(primitive)
    if encoded is None:
        return None
    command, has_dataset = encoded
    pieces = list(_fragments(command, max_pdu))
    out = [_pdata(context_id, 0x01, piece) for piece in pieces[:-1]]
    out.append(_pdata(context_id, 0x03, pieces[-1]))
    data = primitive.DataSet.getvalue() if has_dataset else b""
    if data:
        pieces = list(_fragments(data, max_pdu))
        out += [_pdata(context_id, 0x00, piece) for piece in pieces[:-1]]
        out.append(_pdata(context_id, 0x02, pieces[-1]))
    return out


def _send_msg(self, primitive, context_id: int) -> None:
    if type(primitive) is C_STORE and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        pdatas = p_data(primitive, context_id, self.maximum_pdu_size)
        if pdatas is not None:
            for pdata in pdatas:
                self.dul.send_pdu(pdata)
            return
    _original_send_msg(self, primitive, context_id)


def install() -> None:
    """Send C-STORE messages through :func:`p_data` (idempotent)."""
    DIMSEServiceProvider.send_msg = _send_msg
