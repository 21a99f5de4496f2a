"""HTTP validators for DICOMweb retrievals: a viewer that opens a study again revalidates what
its browser keeps and gets ``304 Not Modified``, with no pixels decoded and nothing sent.

What an instance-based answer (instances, metadata, frames, bulk data, rendered images,
thumbnails) holds is fixed by the instances it covers, whose SHA-256 the index took at ingest,
and by how it was asked for. Its ETag is a digest of those: the instances' UIDs and SHA-256s,
the request's path and query, what chooses the representation (``Accept``, and the base URL
that answers' own URLs are written with), and a value drawn when the node starts, so that no
tag outlives the process that gave it (an upgrade may write answers differently). A replaced
or deleted instance changes it. The tag is weak: a gzip-encoded answer and a plain one share
it. Answers carry ``Cache-Control: private, no-cache`` (a browser keeps them but asks again
each time, so a deleted study is never shown from its cache) and ``Vary: Accept``.
"""

from __future__ import annotations

import functools
import hashlib
import os

from starlette.requests import Request
from starlette.responses import Response

CACHE_CONTROL = "private, no-cache"


_STARTED = os.urandom(8).hex()     # this process's: tags from before a restart never match


def entity_tag(request: Request, digests: dict[str, str], base: str) -> str | None:
    """The weak ETag of an answer to ``request`` covering instances ``digests`` (SOP Instance
    UID -> SHA-256), its URLs written under ``base``; None when it covers none (a 404)."""
    if not digests:
        return None
    h = hashlib.sha256()
    for part in (_STARTED, base, request.url.path, str(request.url.query),
                 request.headers.get("accept", "")):
        h.update(part.encode() + b"\0")
    for uid in sorted(digests):
        h.update(f"{uid}={digests[uid]}\n".encode())
    return f'W/"{h.hexdigest()[:32]}"'


def not_modified(if_none_match: str | None, tag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``tag`` (weak comparison, RFC 9110 13.1.2)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    opaque = tag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == opaque for t in if_none_match.split(","))


def conditional(endpoint, tag_of):
    """``endpoint`` with validators: ``tag_of(request)`` gives the ETag of its answer (or
    None: answered as before); a request naming it in ``If-None-Match`` gets 304, and a 200
    answer carries it."""
    @functools.wraps(endpoint)
    def answer(request: Request) -> Response:
        tag = tag_of(request)
        headers = {"ETag": tag, "Cache-Control": CACHE_CONTROL, "Vary": "Accept"} if tag else {}
        if tag and not_modified(request.headers.get("if-none-match"), tag):
            return Response(status_code=304, headers=headers)
        response = endpoint(request)
        if tag and response.status_code == 200:
            for key, value in headers.items():
                if key == "Vary" and "vary" in response.headers:
                    value = f"{response.headers['vary']}, {value}"
                response.headers[key] = value
        return response
    return answer
