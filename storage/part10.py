"""DICOM Part 10 files <-> (transfer syntax, dataset bytes): the File Meta group around a dataset."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info

from storage.errors import UnparseableDatasetError

#: who wrote a file (its File Meta) and who speaks on an association (A-ASSOCIATE)
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1437.1"
IMPLEMENTATION_VERSION_NAME = "VOXARC_010"
_PLAIN_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def split_file(data: bytes) -> tuple[str, bytes]:
    """Return ``(transfer syntax UID, dataset bytes)`` of a Part 10 file's bytes.

    Raises
    ------
    UnparseableDatasetError
        When the bytes have no DICM preamble or no Transfer Syntax UID in their File Meta.
    """
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                            stop_when=lambda tag, vr, length: tag.group != 2)
        ts = str(meta.get("TransferSyntaxUID", "")).strip("\0 ")
    except Exception as exc:
        raise UnparseableDatasetError(f"not a DICOM Part 10 file: {exc}") from exc
    if not ts:
        raise UnparseableDatasetError("File Meta has no Transfer Syntax UID")
    return ts, data[fp.tell():]


def build_file(sop_class_uid: str, sop_uid: str, transfer_syntax: str, dataset: bytes) -> bytes:
    """Return a Part 10 file: preamble, File Meta for the given UIDs, then ``dataset`` unchanged."""
    return file_head(sop_class_uid, sop_uid, transfer_syntax) + dataset


def file_meta(sop_class_uid: str, sop_uid: str, transfer_syntax: str) -> FileMetaDataset:
    """The File Meta voxarc writes for an instance: its UIDs, its syntax, voxarc's own
    implementation class and version."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def file_head(sop_class_uid: str, sop_uid: str, transfer_syntax: str) -> bytes:
    """What :func:`build_file` puts before the dataset: the preamble and the File Meta."""
    fp = io.BytesIO()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, file_meta(sop_class_uid, sop_uid, transfer_syntax),
                         enforce_standard=True)
    return fp.getvalue()


def write_file(path: Path, sop_class_uid: str, sop_uid: str, transfer_syntax: str,
               parts) -> None:
    """Write at ``path`` (its folder made when missing) the Part 10 file of a dataset given in
    consecutive ``parts`` (bytes-like), never joined into one copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fp:
        fp.write(file_head(sop_class_uid, sop_uid, transfer_syntax))
        for part in parts:
            fp.write(part)


def safe_name(uid: str) -> str:
    """A file or folder name for ``uid``: the UID itself when it is a plain DICOM UID (digits
    and dots, at most 64 characters), else ``x`` and the first 32 hex digits of its SHA-256."""
    uid = uid.strip("\0 ")
    if _PLAIN_UID.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:32]
