"""DICOMweb STOW-RS: ``POST /dicom-web/studies[/{study}]`` with a ``multipart/related;
type="application/dicom"`` body of Part 10 files, each stored through the same ingest path as a
C-STORE (durable and indexed before it counts as stored, the same duplicate policy and limits).

The answer is DICOM JSON: the Referenced SOP Sequence of the stored instances (with their Retrieve
URLs) and the Failed SOP Sequence with a Failure Reason per refused part (the C-STORE status it
would have had: 0xA700 no room or over ``max_dataset_bytes``, 0xC210 cannot parse, 0xC220
duplicate refused; 0xA900 an instance of another study than the URL names). HTTP 200 when every
part was stored, 202 when some were, 409 when none was, 415 for another media type.

An IOCM rejection note among the parts is applied as one sent by C-STORE would be, when
``rejection_notes_from`` names the uploading web user (``@NAME``, or ``@*`` for anyone allowed
to write; :mod:`service.rejection_notes`).

A request body is held in memory while its parts are stored, so its size is capped
(:func:`body_limit`: :data:`MAX_REQUEST_BYTES`, or one dataset of ``max_dataset_bytes`` when
that is larger): a larger ``Content-Length`` is refused with 413 before anything is read, and
a chunked body is refused as soon as it passes the cap. Send large studies in several requests.
"""

from __future__ import annotations

import logging
import re
from email.message import Message
from email.utils import collapse_rfc2231_value

from pydicom import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import statuses
from service.rejection_notes import apply_stored_note
from service.web_access import http_actor
from service.web_auth import user_of
from service.web_url import dicomweb_base
from storage.dataset_parts import parse_fields
from storage.part10 import split_file

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
WRONG_STUDY = 0xA900
MAX_REQUEST_BYTES = 1 << 30     # largest STOW-RS body (unless max_dataset_bytes is larger)
_PART_SLACK = 1 << 16           # part headers and File Meta beside one dataset


class _BadBody(ValueError):
    """A request body that is not a multipart/related of DICOM files."""


class _TooLarge(ValueError):
    """A request body over :func:`body_limit`."""


def body_limit(max_bytes: int) -> int:
    """The largest body a STOW-RS request may have: :data:`MAX_REQUEST_BYTES`, or room for one
    dataset of ``max_bytes`` (``max_dataset_bytes``) when that is larger."""
    return max(MAX_REQUEST_BYTES, max_bytes + _PART_SLACK)


def _boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` Content-Type; raises
    LookupError for another media type, _BadBody when it has no boundary."""
    header = Message()
    header["content-type"] = content_type
    kind = header.get_param("type")
    if header.get_content_type() != "multipart/related" or not kind or \
            collapse_rfc2231_value(kind).strip().lower() != "application/dicom":
        raise LookupError('expected multipart/related; type="application/dicom"')
    boundary = header.get_param("boundary")
    if not boundary:
        raise _BadBody("no boundary in the Content-Type")
    return collapse_rfc2231_value(boundary).encode()


def split_parts(content_type: str, body) -> list[memoryview]:
    """The bodies of the ``application/dicom`` parts of a multipart/related request, as views
    of ``body`` (bytes or bytearray; nothing is copied)."""
    delimiter = b"--" + _boundary(content_type)
    starts, at = [], body.find(delimiter)
    while at != -1:
        starts.append(at)
        at = body.find(delimiter, at + len(delimiter))
    closing = starts[-1] + len(delimiter) if starts else 0
    if len(starts) < 2 or body[closing:closing + 2] != b"--":
        raise _BadBody("no closing boundary: the body is truncated or not multipart")
    view, parts = memoryview(body), []
    for begin, end in zip(starts, starts[1:]):
        begin += len(delimiter)
        sep = body.find(b"\r\n\r\n", begin, end)
        if sep == -1:
            raise _BadBody("a part without headers")
        kind = re.search(rb"content-type:\s*([^\r\n;]+)", bytes(view[begin:sep]), re.I)
        if kind and kind.group(1).strip().lower() != b"application/dicom":
            raise LookupError(f"a part of type {kind.group(1).decode(errors='replace')}")
        if view[end - 2:end] == b"\r\n" and end - 2 >= sep + 4:
            end -= 2
        parts.append(view[sep + 4:end])
    return parts


async def _read_body(request: Request, limit: int) -> bytearray:
    """The request body; raises _TooLarge (before reading) when its Content-Length is over
    ``limit``, or as soon as a body sent in chunks passes it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge(f"a body of {declared} bytes is over the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge(f"the body is over the {limit}-byte limit")
    return body


def _identity(dataset: bytes, ts: str) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, Study Instance UID) as far as they can be read."""
    try:
        ds = parse_fields(dataset, ts, ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"))
        return tuple(str(ds.get(k) or "").strip()
                     for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"))
    except Exception:       # unparseable: the store below says so with its status
        return "", "", ""


def _store_all(archive, parts: list[memoryview], study: str | None, max_bytes: int,
               base: str, actor: str, sender: str = "@", reject_from: str = ""):
    stored, failed = [], []
    for part in parts:
        try:
            ts, dataset = split_file(bytes(part))      # one part copied at a time
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
        archive.accesses.note(actor, "STOW-RS", result.study_uid, instances=1, keep=False)
        apply_stored_note(archive, result, dataset, ts, sender, actor, actor, reject_from)
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


def routes(archive, max_bytes: int = 0, public_url: str = "", settings=None) -> list[Route]:
    """The STOW-RS routes of a node's archive (``max_bytes``: its ``max_dataset_bytes``; the
    body cap is :func:`body_limit` of it; ``public_url``: see :mod:`service.web_url`;
    ``settings``: the node's, whose ``rejection_notes_from`` says which web users' rejection
    notes are applied, read at each request)."""

    async def store(request: Request) -> Response:
        study = request.path_params.get("study")
        try:
            body = await _read_body(request, body_limit(max_bytes))
        except _TooLarge as exc:
            log.warning("STOW-RS refused: %s", exc)
            return JSONResponse({"error": f"{exc}; send fewer instances per request"},
                                status_code=413, headers={"Connection": "close"})
        try:
            parts = split_parts(request.headers.get("content-type", ""), body)
        except LookupError as exc:
            return JSONResponse({"error": str(exc)}, status_code=415)
        except _BadBody as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        base = dicomweb_base(request, public_url)
        reject_from = settings.rejection_notes_from if settings is not None else ""
        stored, failed = await run_in_threadpool(_store_all, archive, parts, study, max_bytes,
                                                 base, http_actor(request),
                                                 "@" + user_of(request.scope), reject_from)
        log.info("STOW-RS: %d instances stored, %d refused", len(stored), len(failed))
        status = 200 if not failed else (202 if stored else 409)
        return JSONResponse(_answer(stored, failed, study, base), status_code=status,
                            media_type=DICOM_JSON)

    return [Route("/dicom-web/studies", store, methods=["POST"]),
            Route("/dicom-web/studies/{study}", store, methods=["POST"])]
