"""A study downloaded from the admin page as de-identified copies, for a teaching file or a
research request: ``GET /api/studies/{uid}/deidentified.zip`` (:func:`storage.deidentify.zip_copies`;
``keep_dates=1`` and ``keep_descriptions=1`` as for ``voxarc export --deidentify``).

The pseudonyms, UIDs and date shifts come from the key in ``deidentify_key_file`` when it is set
(the same patient gets the same pseudonym in every download, as in ``voxarc export``), else from a
new key per download (no two downloads can be linked). The ZIP's name does not carry the study's
UID.
"""

from __future__ import annotations

import logging
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.web_access import http_actor
from storage import deidentify

log = logging.getLogger(__name__)
_TRUE = ("1", "true", "yes")


def routes(archive, settings) -> list[Route]:
    """The de-identified download route of the admin application."""

    def one_study(request: Request) -> Response:
        uid = request.path_params["uid"]
        if any(c in uid for c in "*?\\"):         # a UID, not a C-FIND pattern
            return JSONResponse({"error": "not a Study Instance UID"}, status_code=400)
        sop_uids = [r["SOPInstanceUID"]
                    for r in archive.find("IMAGE", {"StudyInstanceUID": uid})]
        if not sop_uids:
            return JSONResponse({"error": "no such study"}, status_code=404)
        try:
            key = deidentify.key_from(Path(settings.deidentify_key_file)) \
                if settings.deidentify_key_file else None
        except (OSError, ValueError) as exc:
            log.error("deidentify_key_file %s: %s", settings.deidentify_key_file, exc)
            return JSONResponse({"error": "the de-identification key cannot be read"},
                                status_code=500)
        params = request.query_params
        deid = deidentify.Deidentifier(key, params.get("keep_dates", "") in _TRUE,
                                       params.get("keep_descriptions", "") in _TRUE)
        archive.accesses.note(http_actor(request), "download (de-identified)", uid,
                              instances=len(sop_uids))
        log.info("study %s downloaded de-identified (%d instances)", uid, len(sop_uids))
        return StreamingResponse(
            deidentify.zip_copies(archive, sop_uids, deid), media_type="application/zip",
            headers={"content-disposition": 'attachment; filename="deidentified-study.zip"',
                     "cache-control": "no-store"})

    return [Route("/api/studies/{uid}/deidentified.zip", one_study)]
