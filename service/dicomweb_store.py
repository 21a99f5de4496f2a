"""DICOMweb STOW-RS: ``POST /dicom-web/studies[/{study}]`` with a ``multipart/related;
type="application/dicom"`` body of Part 10 files, each stored through the same ingest path as a
C-STORE (durable and indexed before it counts as stored, the same duplicate policy and limits).

The answer is DICOM JSON: the Referenced SOP Sequence of the stored instances (with their Retrieve
URLs) and the Failed SOP Sequence with a Failure Reason per refused part (the C-STORE status it
would have had: 0xA700 no room or over ``max_dataset_bytes``, 0xC210 cannot parse, 0xC220
duplicate refused; 0xA900 an instance of another study than the URL names). HTTP 200 when every
part was stored, 202 when some were, 409 when none was, 415 for another media type.
"""

from __future__ import annotations

import logging
import re

from pydicom import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import statuses
from storage.dataset_parts import parse_fields
from storage.part10 import split_file

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
WRONG_STUDY = 0xA900
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)
_TYPE = re.compile(r'type="?application/dicom"?(;|$)', re.I)


class _BadBody(ValueError):
    """A request body that is not a multipart/related of DICOM files."""


def split_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of the ``application/dicom`` parts of a multipart/related request."""
    if not content_type.lower().startswith("multipart/related") or not _TYPE.search(
            content_type):
        raise LookupError('expected multipart/related; type="application/dicom"')
    match = _BOUNDARY.search(content_type)
    if not match:
        raise _BadBody("no boundary in the Content-Type")
    delimiter = b"--" + match.group(1).encode()
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise _BadBody("no closing boundary: the body is truncated or not multipart")
    parts = []
    for chunk in chunks[1:-1]:
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise _BadBody("a part without headers")
        kind = re.search(rb"content-type:\s*([^\r\n;]+)", head, re.I)
        if kind and kind.group(1).strip().lower() != b"application/dicom":
            raise LookupError(f"a part of type {kind.group(1).decode(errors='replace')}")
        parts.append(data[:-2] if data.endswith(b"\r\n") else data)
    return parts


def _identity(dataset: bytes, ts: str) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, Study Instance UID) as far as they can be read."""
    try:
        ds = parse_fields(dataset, ts, ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"))
        return tuple(str(ds.get(k) or "").strip()
                     for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"))
    except Exception:       # unparseable: the store below says so with its status
        return "", "", ""


def _store_all(archive, parts: list[bytes], study: str | None, max_bytes: int, base: str):
    stored, failed = [], []
    for part in parts:
        try:
            ts, dataset = split_file(part)
        except Exception as exc:
            failed.append(("", "", statuses.status_for(exc, "STOW-RS part")))
            continue
        if study or (max_bytes and len(dataset) > max_bytes):      # refused before storing
            sop_class, sop_uid, study_uid = _identity(dataset, ts)
            if study and study_uid and study_uid != study:
                log.warning("STOW-RS: instance %s of study %s refused (the URL names %s)",
                            sop_uid, study_uid, study)
                failed.append((sop_class, sop_uid, WRONG_STUDY))
                continue
            if max_bytes and len(dataset) > max_bytes:
                failed.append((sop_class, sop_uid, statuses.OUT_OF_RESOURCES))
                continue
        try:
            result = archive.store(dataset, ts)
        except Exception as exc:
            sop_class, sop_uid, _ = _identity(dataset, ts)     # as far as it can be read
            failed.append((sop_class, sop_uid, statuses.status_for(exc, f"STOW-RS of {sop_uid}")))
            continue
        log.info("STOW-RS %s of %s", result.outcome, result.sop_uid)
        stored.append((result.sop_class_uid, result.sop_uid,
                       f"{base}/studies/{result.study_uid}/series/{result.series_uid}"
                       f"/instances/{result.sop_uid}"))
    return stored, failed


def _answer(stored: list, failed: list, study: str | None, base: str) -> dict:
    ds = Dataset()
    if study:
        ds.RetrieveURL = f"{base}/studies/{study}"
    if stored:
        ds.ReferencedSOPSequence = []
        for sop_class, sop_uid, url in stored:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
            item.RetrieveURL = url
            ds.ReferencedSOPSequence.append(item)
    if failed:
        ds.FailedSOPSequence = []
        for sop_class, sop_uid, reason in failed:
            item = Dataset()
            if sop_class:
                item.ReferencedSOPClassUID = sop_class
            if sop_uid:
                item.ReferencedSOPInstanceUID = sop_uid
            item.FailureReason = reason
            ds.FailedSOPSequence.append(item)
    return ds.to_json_dict()


def routes(archive, max_bytes: int = 0) -> list[Route]:
    """The STOW-RS routes of a node's archive (``max_bytes``: its ``max_dataset_bytes``)."""

    async def store(request: Request) -> Response:
        study = request.path_params.get("study")
        body = await request.body()
        try:
            parts = split_parts(request.headers.get("content-type", ""), body)
        except LookupError as exc:
            return JSONResponse({"error": str(exc)}, status_code=415)
        except _BadBody as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        base = str(request.base_url).rstrip("/") + "/dicom-web"
        stored, failed = await run_in_threadpool(_store_all, archive, parts, study, max_bytes,
                                                 base)
        log.info("STOW-RS: %d instances stored, %d refused", len(stored), len(failed))
        status = 200 if not failed else (202 if stored else 409)
        return JSONResponse(_answer(stored, failed, study, base), status_code=status,
                            media_type=DICOM_JSON)

    return [Route("/dicom-web/studies", store, methods=["POST"]),
            Route("/dicom-web/studies/{study}", store, methods=["POST"])]
