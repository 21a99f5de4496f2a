"""Exceptions raised by the storage layer; the service maps each one to a DICOM status."""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every storage failure."""


class StorageFullError(StorageError):
    """The archive cannot take more bytes (disk full, write error or configured limit)."""


class UnparseableDatasetError(StorageError):
    """Received bytes are not a dataset we can index (truncated, missing UIDs, bad encoding)."""


class DuplicateInstanceError(StorageError):
    """An instance with this SOP Instance UID exists and the policy rejects duplicates."""


class InstanceNotFoundError(StorageError):
    """No instance with the requested SOP Instance UID is stored."""


class IntegrityError(StorageError):
    """Reconstructed bytes do not match the SHA-256 recorded at ingest."""


class InvalidKeyError(StorageError, ValueError):
    """A blob key is not of the safe form the blob store accepts."""


class CommitOutcomeUnknown(StorageError):
    """A commit raised and the index could not be read to tell whether it took place: keep
    every file that either outcome needs."""


class DatasetMismatchError(StorageError):
    """The dataset's SOP Instance UID is not the one its C-STORE request names."""


class TranscodeError(StorageError, ValueError):
    """An instance cannot be given in the transfer syntax asked for (storage.transcode), or
    its conversion did not read back the same."""
