"""Send stored datasets as received: C-STORE sub-operations of C-GET / C-MOVE without re-encoding.

pynetdicom's retrieve services take a :class:`~pydicom.dataset.Dataset` per sub-operation and
encode it. :class:`PreEncoded` is a dataset that carries its received bytes; :func:`install`
wraps pynetdicom's encoder so that such a dataset is sent exactly as those bytes, and refused
(the sub-operation then fails) if the negotiated transfer syntax is not the one it was received in,
since converting would alter it.
"""

from __future__ import annotations

import pynetdicom.association as _association
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from service import command_encoding

_original_encode = _association.encode


class PreEncoded(Dataset):
    """A dataset known by its encoded bytes (dataset part, no File Meta).

    Parameters
    ----------
    sop_class_uid, sop_uid, transfer_syntax : str
    data : bytes or tuple
        The dataset's bytes, or its consecutive parts (sent without being joined, see
        :func:`service.command_encoding.send_in_parts`; a dataset of parts is sent once).
    """

    def __init__(self, sop_class_uid: str, sop_uid: str, transfer_syntax: str,
                 data: bytes | tuple):
        super().__init__()
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = transfer_syntax
        self.SOPClassUID, self.SOPInstanceUID = sop_class_uid, sop_uid
        self.__dict__["encoded_parts"] = (data,) if isinstance(data, bytes) else tuple(data)


def _encode(ds, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False):
    if not isinstance(ds, PreEncoded):
        return _original_encode(ds, is_implicit_vr, is_little_endian, deflated)
    ts = UID(ds.file_meta.TransferSyntaxUID)
    wanted = (ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if wanted != (is_implicit_vr, is_little_endian, deflated):
        return None        # pynetdicom then fails this sub-operation
    parts = ds.__dict__.get("encoded_parts")
    if parts is None:
        return None        # its parts were sent already
    if len(parts) == 1 and isinstance(parts[0], bytes):
        return parts[0]
    # pynetdicom wraps what this returns in a BytesIO, which would copy anything but bytes:
    # the parts go to the sender beside the (empty) dataset, and leave this one
    del ds.__dict__["encoded_parts"]
    command_encoding.send_in_parts(ds.SOPInstanceUID, parts)
    return b""


def install() -> None:
    """Make pynetdicom send :class:`PreEncoded` datasets unchanged (idempotent); installs
    :mod:`service.command_encoding` too, which sends a dataset's parts."""
    command_encoding.install()
    _association.encode = _encode
