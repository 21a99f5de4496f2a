"""A DICOMDIR (PS3.10, PS3.3 Annex F): the directory records of a file-set's patients, studies,
series and instances, each linked to the next of its level and to its first child by the byte
offset of that record in the file.

pydicom makes each record from the instance's attributes (``DIRECTORY_RECORDERS``, the record
types of its ``FileSet``) and encodes the file; the tree, the file IDs and the offsets are kept
here, each instance added in constant time. pydicom's ``FileSet`` would do all of it, but it
looks through every instance and sibling as each is added: 11 s for 1,000 instances, a
time that grows with the square of their number.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom import fileset as _pydicom_fileset
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import DIRECTORY_RECORDERS
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

from storage.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

_LEVELS = (("PATIENT", "PatientID", "PT"), ("STUDY", "StudyInstanceUID", "ST"),
           ("SERIES", "SeriesInstanceUID", "SE"))
_LEAF_PREFIX = "IM"
_MOST = 1_000_000           # a component is two letters and six digits


@dataclass
class _Node:
    record: Dataset
    component: str
    children: dict[str, "_Node"] = field(default_factory=dict)


def _leaf_type(ds: Dataset) -> str:
    """The record type of an instance below a SERIES record (IMAGE, SR DOCUMENT, RT DOSE...),
    as pydicom's FileSet chooses it (pydicom is pinned, see pyproject)."""
    single = _pydicom_fileset._single_level_record_type(ds)
    if single != "PATIENT":
        raise ValueError(f"a {single} record stands alone, outside patients and studies")
    return _pydicom_fileset._four_level_record_type(ds)


def _record(kind: str, ds: Dataset) -> Dataset:
    try:
        record = DIRECTORY_RECORDERS[kind](ds)
    except ValueError as exc:
        raise ValueError(f"no {kind} record: {exc}") from exc
    if "SpecificCharacterSet" in ds:
        record.SpecificCharacterSet = ds.SpecificCharacterSet
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = kind
    return record


class Directory:
    """The records of a file-set's instances, in the order they are added."""

    def __init__(self):
        self._root: dict[str, _Node] = {}

    def add(self, ds: Dataset) -> str:
        """Add an instance (its attributes, and its transfer syntax in ``ds.file_meta``);
        return its file ID, components joined by ``/``.

        Raises
        ------
        ValueError
            When a record cannot be made of ``ds`` (a Type 1 key missing or empty), or it is
            in the directory already.
        """
        steps = [(level, str(ds.get(keyword, "")), prefix) for level, keyword, prefix in _LEVELS]
        steps.append((_leaf_type(ds), str(ds.SOPInstanceUID), _LEAF_PREFIX))
        # the records of the levels met for the first time, all made before any is added
        level, found = self._root, []
        for kind, key, _ in steps:
            node = level.get(key)
            if node is None:
                break
            found.append(node)
            level = node.children
        if len(found) == len(steps):
            raise ValueError("instance already in the file-set")
        made = [_record(kind, ds) for kind, _, _ in steps[len(found):]]
        for record, (_, key, prefix) in zip(made, steps[len(found):]):
            if len(level) >= _MOST:
                raise ValueError(f"more than {_MOST} entries under one directory record")
            node = level[key] = _Node(record, f"{prefix}{len(level):06d}")
            found.append(node)
            level = node.children
        path = [node.component for node in found]
        leaf = found[-1].record
        leaf.ReferencedFileID = path
        leaf.ReferencedSOPClassUIDInFile = ds.SOPClassUID
        leaf.ReferencedSOPInstanceUIDInFile = ds.SOPInstanceUID
        leaf.ReferencedTransferSyntaxUIDInFile = ds.file_meta.TransferSyntaxUID
        return "/".join(path)

    def __len__(self) -> int:
        return sum(1 for _ in self._leaves(self._root))

    def _leaves(self, level: dict):
        for node in level.values():
            yield from (self._leaves(node.children) if node.children else (node,))

    def encode(self, file_set_id: str) -> bytes:
        """The DICOMDIR file (Explicit VR Little Endian), records depth first."""
        order: list[_Node] = []

        def walk(level: dict) -> None:
            for node in level.values():
                order.append(node)
                walk(node.children)
        walk(self._root)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.FileSetID = file_set_id
        ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
        ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
        ds.FileSetConsistencyFlag = 0
        ds.DirectoryRecordSequence = Sequence([node.record for node in order])
        # offsets are unsigned longs: filling them in moves nothing, so a first encoding
        # tells where each record starts
        placed = dcmread(io.BytesIO(_encoded(ds)))
        at = {id(node): item.seq_item_tell
              for node, item in zip(order, placed.DirectoryRecordSequence)}
        self._link(self._root, at)
        roots = [at[id(node)] for node in self._root.values()]
        ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = roots[0] if roots else 0
        ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = roots[-1] if roots else 0
        return _encoded(ds)

    def _link(self, level: dict, at: dict) -> None:
        nodes = list(level.values())
        for node, after in zip(nodes, nodes[1:] + [None]):
            node.record.OffsetOfTheNextDirectoryRecord = at[id(after)] if after else 0
            first = next(iter(node.children.values()), None)
            node.record.OffsetOfReferencedLowerLevelDirectoryEntity = \
                at[id(first)] if first else 0
            self._link(node.children, at)


def _encoded(ds: Dataset) -> bytes:
    fp = io.BytesIO()
    ds.save_as(fp, enforce_file_format=True)
    return fp.getvalue()
