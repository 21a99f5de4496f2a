"""DICOMweb reads in the access trail (:mod:`storage.access_log`).

:class:`AccessTrail` is an ASGI middleware that notes each answered (2xx or 304) read of the
DICOMweb paths: QIDO-RS searches (their query as detail), WADO-RS retrievals, metadata,
frames, bulk data, rendered images and thumbnails, and WADO-URI. The study comes from the path
(or WADO-URI's ``studyUID``); its patient from the index, when the trail is written. Writes
(STOW-RS) are not reads and are not noted; the ingest records who sent each instance.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote

from service.web_auth import user_of

_STUDY_PATH = re.compile(r"^/dicom-web/studies/([^/]+)(?:/series/[^/]+)?(?:/instances/[^/]+)?"
                         r"(?:/(metadata|frames|bulkdata|rendered|thumbnail|series|instances)"
                         r"\b.*)?$")
_SEARCH_PATH = re.compile(r"^/dicom-web/(studies|series|instances)/?$")
_WHAT = {None: "WADO-RS", "metadata": "WADO-RS metadata", "frames": "WADO-RS frames",
         "bulkdata": "WADO-RS bulk data", "rendered": "WADO-RS rendered",
         "thumbnail": "WADO-RS thumbnail", "series": "QIDO-RS", "instances": "QIDO-RS"}


def http_actor(scope_or_request) -> str:
    """Who the access trail names for an HTTP request: ``http`` and the client's address,
    after the user's name when ``http_users`` named one (``http alice@10.0.0.5``)."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    client = scope.get("client") or ("?", 0)
    user = user_of(scope)
    return f"http {user}@{client[0]}" if user else f"http {client[0]}"


def _patient(params: dict) -> str:
    """The Patient ID a query names exactly (no wildcard, no list), else empty."""
    value = (params.get("PatientID") or params.get("00100020") or [""])[0]
    return "" if any(c in value for c in "*?\\,") else value


def classify(path: str, query: bytes) -> tuple[str, str, str, str] | None:
    """(action, study UID, Patient ID, detail) of a DICOMweb read, or None for another path.
    A search's Patient ID is the one its query names exactly."""
    text = query.decode("latin-1")       # the query is parsed only where it is used
    if path == "/wado":
        return "WADO-URI", (parse_qs(text).get("studyUID") or [""])[0], "", ""
    search = _SEARCH_PATH.match(path)
    if search:
        return ("QIDO-RS", "", _patient(parse_qs(text)),
                f"{search.group(1)} {unquote(text)}".strip())
    m = _STUDY_PATH.match(path)
    if m:
        action = _WHAT[m.group(2)]
        if action == "QIDO-RS":
            return action, unquote(m.group(1)), _patient(parse_qs(text)), unquote(text)
        return action, unquote(m.group(1)), "", ""
    return None


class AccessTrail:
    """ASGI middleware: DICOMweb reads that were answered go to ``accesses`` (an
    :class:`~storage.access_log.AccessLog`)."""

    def __init__(self, app, accesses):
        self.app, self.accesses = app, accesses

    async def __call__(self, scope, receive, send):
        what = None
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            what = classify(scope["path"], scope.get("query_string", b""))
        if what is None:
            return await self.app(scope, receive, send)

        async def noting(message):
            if message["type"] == "http.response.start" and \
                    (200 <= message["status"] < 300 or message["status"] == 304):
                action, study, patient, detail = what
                self.accesses.note(http_actor(scope), action, study, patient, detail=detail)
            await send(message)
        return await self.app(scope, receive, noting)
