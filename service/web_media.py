"""Studies downloaded from the admin page as DICOM media file-sets (a ZIP holding a DICOMDIR and
the instances as received, :mod:`storage.media`): one study, a patient's studies for their CD,
or any list of studies.

- ``GET /api/studies/{uid}/media.zip``: one study;
- ``GET /api/media.zip?patient=ID&study=UID...``: every study of each named patient (the
  Patient ID exactly, oldest first) and each named study, in one file-set, at most
  :data:`MAX_STUDIES` studies.

Either takes ``profile=STD-GEN-CD`` (:data:`storage.media.PROFILES`): files converted to that
media profile's syntax.
"""

from __future__ import annotations

import logging
import re

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.web_access import http_actor
from storage import media, reports
from storage.errors import StorageError
from storage.part10 import safe_name

log = logging.getLogger(__name__)

#: the most studies one file-set is made of (a patient's CD rarely holds more)
MAX_STUDIES = 100


def download_name(text: str) -> str:
    """``text`` as a file name a Content-Disposition header carries safely: ASCII letters,
    digits, ``.``, ``-`` and ``_`` (runs of anything else become one ``_``), at most 48."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:48] or "unnamed"


def _what(study_uids: list[str]) -> str:
    """The studies as a log names them."""
    if len(study_uids) == 1:
        return f"study {study_uids[0]}"
    return f"{len(study_uids)} studies ({', '.join(study_uids[:3])}" + \
        (", ...)" if len(study_uids) > 3 else ")")


def _logged_zip(archive, plan, what: str, actor: str):
    """:func:`storage.media.zip_file_set`, its failure logged: the response is then cut off,
    which a browser shows as a failed download (the ZIP would lack its directory). The access
    trail notes each study once the ZIP is out (or cut off)."""
    finished = False
    try:
        yield from media.zip_file_set(archive, plan)
        finished = True
    except StorageError as exc:
        log.error("download of %s stopped: %s", what, exc)
        raise
    finally:        # a download left unfinished (a failure, a client gone) is noted so
        action = "download (DICOMDIR, ZIP)" + ("" if finished else ", not finished")
        for study, instances in plan.studies.items():
            archive.accesses.note(actor, action, study, instances=instances)
    log.info("%s downloaded as a file-set of %d instances", what, len(plan.files))


def file_set_response(archive, study_uids: list[str], name: str, actor: str,
                      profile: str | None = None) -> Response:
    """The studies' file-set (for a media ``profile``, when given) as a streamed ZIP named
    ``name``, for ``actor`` (the access trail's); 404 when it would be empty, 400 for an
    unknown profile. ``X-Voxarc-Left-Out`` counts the instances no directory record could be
    made for; with a profile, ``X-Voxarc-Outside-Profile`` those written as received in a
    syntax it does not take."""
    try:
        plan = media.plan_file_set(archive, study_uids, profile=profile)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    if not plan.files:
        return JSONResponse({"error": "no such study" if not plan.left_out else
                             "no instance of the studies has a directory record"},
                            status_code=404)
    what = _what(study_uids)
    if plan.left_out:
        log.warning("download of %s: %d instances left out of its DICOMDIR", what,
                    len(plan.left_out))
    headers = {"content-disposition": f'attachment; filename="{name}"',
               "x-voxarc-left-out": str(len(plan.left_out)),
               "cache-control": "no-store"}
    if profile:
        headers["x-voxarc-outside-profile"] = str(len(plan.outside_profile))
    return StreamingResponse(_logged_zip(archive, plan, what, actor),
                             media_type="application/zip", headers=headers)


def _named_studies(index, request: Request) -> tuple[list[str], str]:
    """The study UIDs a ``/api/media.zip`` request names (``patient`` and ``study``
    parameters) and the ZIP's name. Raises ValueError on none or too many."""
    params = request.query_params
    patients = list(dict.fromkeys(params.getlist("patient")))
    studies = list(dict.fromkeys(u.strip() for u in params.getlist("study") if u.strip()))
    if not patients and not studies:
        raise ValueError("name studies with study=UID or a patient with patient=ID")
    found = []
    for patient_id in patients:
        found += reports.study_uids(index, reports.StudyFilter(patient_id=patient_id),
                                    MAX_STUDIES + 1)
    found = list(dict.fromkeys(found + studies))
    if len(found) > MAX_STUDIES:
        raise ValueError(f"a file-set holds at most {MAX_STUDIES} studies")
    if len(patients) == 1 and not studies:
        name = f"patient-{download_name(patients[0])}.zip"
    elif len(found) == 1:
        name = f"study-{safe_name(found[0])}.zip"
    else:
        name = f"studies-{len(found)}.zip"
    return found, name


def routes(archive) -> list[Route]:
    """The download routes of the admin application."""
    index = archive.index

    def one_study(request: Request) -> Response:
        uid = request.path_params["uid"]
        return file_set_response(archive, [uid], f"study-{safe_name(uid)}.zip",
                                 http_actor(request), request.query_params.get("profile"))

    def named(request: Request) -> Response:
        try:
            studies, name = _named_studies(index, request)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if not studies:
            return JSONResponse({"error": "no such patient or study"}, status_code=404)
        return file_set_response(archive, studies, name, http_actor(request),
                                 request.query_params.get("profile"))

    return [Route("/api/studies/{uid}/media.zip", one_study), Route("/api/media.zip", named)]
