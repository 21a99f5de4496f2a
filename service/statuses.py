"""Our exceptions -> DICOM status codes, in one place, with the exception logged."""

from __future__ import annotations

import logging

from storage.errors import (CommitOutcomeUnknown, DatasetMismatchError, DuplicateInstanceError,
                            InstanceNotFoundError, IntegrityError, StorageFullError,
                            TranscodeError, UnparseableDatasetError)

log = logging.getLogger(__name__)

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700          # C-STORE: cannot store (disk full, write error, limit)
FIND_OUT_OF_RESOURCES = 0xA700
IDENTIFIER_MISMATCH = 0xA900       # C-FIND/GET/MOVE: identifier does not match the SOP class
UNKNOWN_DESTINATION = 0xA801
CANNOT_PARSE = 0xC210              # C-STORE: cannot understand the dataset
DUPLICATE_REFUSED = 0xC220         # C-STORE: SOP Instance UID stored and policy is reject
UNABLE_TO_PROCESS = 0xC211         # anything we did not foresee (logged with its traceback)
SUBOPERATIONS_FAILED = 0xB000
DATASET_MISMATCH = 0xA900          # C-STORE: the dataset is not the instance the request names
CLASS_MISMATCH_WARNING = 0xB007    # C-STORE: stored, but its SOP class is not the request's

_STATUS = (
    (StorageFullError, OUT_OF_RESOURCES),
    (UnparseableDatasetError, CANNOT_PARSE),
    (DuplicateInstanceError, DUPLICATE_REFUSED),
    (InstanceNotFoundError, UNABLE_TO_PROCESS),
    (IntegrityError, UNABLE_TO_PROCESS),
    (TranscodeError, UNABLE_TO_PROCESS),          # a sub-operation's conversion failed
    (DatasetMismatchError, DATASET_MISMATCH),
    (CommitOutcomeUnknown, OUT_OF_RESOURCES),     # the modality sends it again
)


def status_for(exc: BaseException, operation: str) -> int:
    """Return the DICOM status of ``exc`` raised during ``operation`` and log it."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            log.warning("%s failed with 0x%04X: %s", operation, status, exc)
            return status
    log.exception("%s failed unexpectedly (0x%04X)", operation, UNABLE_TO_PROCESS, exc_info=exc)
    return UNABLE_TO_PROCESS
