"""The admin web application: one page, its JSON API, Prometheus metrics and a health check.

``/`` is a static page (``service/static``) that draws itself from the JSON API: ``/api/stats``
(totals, savings by modality and by day), ``/api/studies`` (sortable, paginated, with series),
``/api/series/{uid}`` (and its ``preview.png``), ``/api/jobs`` (compaction queue),
``/api/deletions`` and ``/api/corrections`` (the audit trails of ``voxarc delete`` and
``voxarc correct``), ``/api/deleted`` (the recycle bin: :mod:`storage.recycle_bin`, and the
last retention run), ``/api/retention`` (what the retention rules select now), ``/api/holds`` (legal holds in force; ``?all=1``: released ones too),
``/api/accesses`` (who read what: :mod:`storage.access_log`),
``/api/forwards`` (forwarding, :mod:`service.forwarding`) and ``/api/config`` (the node's
settings, read only, secrets left out); ``/api/studies/{uid}/media.zip`` and
``/api/media.zip`` are studies as DICOM file-sets (:mod:`service.web_media`); DICOMweb under
``/dicom-web``. Beside STOW-RS (the ingest path of C-STORE) and sending a study to a
configured destination (``POST /api/studies/{uid}/send``), restoring a deletion from the
recycle bin (``POST /api/deleted/{entry}/restore``) and placing or releasing a legal hold
(``POST /api/holds``, ``POST /api/holds/release``), the application only reads: deleting and
correcting are commands run on the node's machine. Everything is read through
:mod:`storage.reports` and the archive.
"""

from __future__ import annotations

import dataclasses

import logging
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from service import dicomweb, dicomweb_store, patrol, retention, web_deidentified, web_media
from service.ae import RELOADABLE
from service.config import Settings
from service.forwarding import send_study
from service.metrics import CONTENT_TYPE, NodeMetrics
from service.preview import PreviewError, SeriesPreviews
from service.web_access import AccessTrail, http_actor
from service.web_auth import TokenAuth, role_of, user_of
from storage import access_log, correction, deletion, forwarding, holds, reports
from storage.errors import StorageError
from storage.recycle_bin import NotRestorable, RecycleBinError

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
SECRET_SETTINGS = ("http_token", "http_users")
MAX_PAGE = 500


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(request.query_params.get(name, default))
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    return min(high, max(low, value))


def _json_body(request: Request) -> bool:
    """Whether a write comes as application/json, which a cross-site page cannot send without a
    CORS preflight (a form can post anything else)."""
    return request.headers.get("content-type", "").split(";")[0].strip() == "application/json"


def _masked_url(url: str) -> str:
    """A database URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def public_settings(settings: Settings) -> dict:
    """The node's settings as shown on the page: secrets left out, passwords masked."""
    out = {k: v for k, v in vars(settings).items() if k not in SECRET_SETTINGS}
    out["database_url"] = _masked_url(settings.database_url)
    out["http_token_required"] = bool(settings.http_token or settings.http_users)
    out["http_users"] = {name: value.partition(":")[0]         # names and roles, no digests
                         for name, value in settings.http_users.items()}
    return out


def create_app(archive, settings: Settings, metrics: NodeMetrics | None = None,
               access: Settings | None = None) -> Starlette:
    """Build the admin application of a node.

    Parameters
    ----------
    archive : Archive
        The node's archive (read only here).
    settings : Settings
        The node's settings (shown read only; ``http_token`` guards every path but /healthz).
    metrics : NodeMetrics, optional
        The node's counters; by default a fresh set exporting only the archive's gauges.
    access : Settings, optional
        Where the settings a reload on SIGHUP changes (:data:`service.ae.RELOADABLE`: the
        token and users, the destinations, the rejection notes' senders, ...) are read at each
        request: the running node's own; by default ``settings``.

    Returns
    -------
    Starlette
        An ASGI application.
    """
    access = access or settings
    metrics = metrics or NodeMetrics(archive)
    index = archive.index
    previews = SeriesPreviews(archive)

    def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    def stats(request: Request) -> Response:
        out = archive.stats()
        out["saved_bytes"] = out["original_bytes"] - out["stored_bytes"]
        out.update(reports.bits_per_voxel(index))
        out["by_modality"] = reports.by_modality(index)
        out["by_day"] = reports.by_day(index)
        out["room"] = reports.room_now(index, archive.data_dir, out["stored_bytes"],
                                       settings.max_storage_bytes, out["by_day"])
        out["integrity"] = {"last_round": patrol.last_round(archive),
                            "every_days": settings.scrub_every_days}
        return JSONResponse(out)

    def studies(request: Request) -> Response:
        params = request.query_params
        try:
            where = reports.StudyFilter(params.get("q", "")[:200], params.get("modality", ""),
                                        params.get("from", ""), params.get("to", ""),
                                        params.get("patient"))
            page_ = reports.studies(
                index, sort=params.get("sort", "received"),
                descending=params.get("order", "desc") != "asc",
                offset=_int(request, "offset", 0, 0, 1 << 31),
                limit=_int(request, "limit", 50, 1, MAX_PAGE), where=where)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(page_)

    def series(request: Request) -> Response:
        found = reports.series_detail(index, request.path_params["uid"])
        if found is None:
            return JSONResponse({"error": "no such series"}, status_code=404)
        return JSONResponse(found)

    def preview(request: Request) -> Response:
        try:
            png = previews.get(request.path_params["uid"], _int(request, "size", 128, 16, 512))
        except ValueError as exc:          # a bad size, or no image to show (PreviewError)
            status = 404 if isinstance(exc, PreviewError) else 400
            return JSONResponse({"error": str(exc)}, status_code=status)
        except StorageError as exc:
            log.warning("preview of series %s: %s", request.path_params["uid"], exc)
            return JSONResponse({"error": str(exc)}, status_code=500)
        if png is None:
            return JSONResponse({"error": "no such series"}, status_code=404)
        return Response(png, media_type="image/png",
                        headers={"cache-control": "private, max-age=60"})

    def jobs(request: Request) -> Response:
        return JSONResponse(reports.jobs(index))

    def forwards(request: Request) -> Response:
        return JSONResponse(forwarding.status(index, _int(request, "limit", 100, 1, MAX_PAGE)))

    async def send(request: Request) -> Response:
        if not _json_body(request):
            return JSONResponse({"error": "send {\"destination\": NAME} as application/json"},
                                status_code=415)
        try:
            destination = str((await request.json())["destination"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "the body is {\"destination\": NAME}"}, status_code=400)
        try:
            queued = send_study(archive, access, request.path_params["uid"], destination,
                                metrics)
            archive.accesses.note(http_actor(request), f"send to {destination}",
                                  request.path_params["uid"], instances=queued["instances"])
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except LookupError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return JSONResponse(queued, status_code=202)

    def accesses(request: Request) -> Response:
        archive.accesses.flush()        # what was just noted, too
        params = request.query_params
        return JSONResponse(access_log.history(index, _int(request, "limit", 100, 1, MAX_PAGE),
                                               params.get("study"), params.get("patient")))

    def deletions(request: Request) -> Response:
        return JSONResponse(deletion.history(index, _int(request, "limit", 100, 1, MAX_PAGE)))

    def recycled(request: Request) -> Response:
        newest = _int(request, "limit", 100, 1, MAX_PAGE)
        return JSONResponse({"keep_days": archive.recycle.keep_days,
                             "entries": archive.recycle.summaries(newest),
                             "retention": retention.last_run(archive)})

    def held(request: Request) -> Response:
        released = request.query_params.get("all", "") in ("1", "true")
        return JSONResponse([h.summary() for h in holds.listing(index, released)])

    async def retention_now(request: Request) -> Response:
        """What the retention rules select now (counts per rule; nothing is deleted)."""
        selections = await run_in_threadpool(
            retention.select_all, archive, retention.rules_of(access),
            access.retention_grace_days)
        return JSONResponse([{k: v for k, v in s.summary().items()
                              if k in ("rule", "text", "selected", "held_back", "on_hold")}
                             for s in selections])

    async def hold(request: Request) -> Response:
        """Place (``/api/holds``) or release (``/api/holds/release``) a legal hold: JSON
        ``{"level": "study" or "patient", "uid": ..., "reason": ...}``, the web user the
        actor; 201 for a new hold, 200 for one already placed or released, 400 or 404 (no such
        hold to release) with the reason."""
        if not _json_body(request):
            return JSONResponse({"error": "post JSON as application/json"}, status_code=415)
        try:
            asked = await request.json()
            level, uid = str(asked.get("level", "")), str(asked.get("uid", "")).strip()
            reason = str(asked.get("reason", ""))
        except (ValueError, AttributeError):
            return JSONResponse({"error": "post {\"level\", \"uid\", \"reason\"}"},
                                status_code=400)
        actor, releasing = http_actor(request), request.url.path.endswith("/release")
        try:
            if releasing:
                record = await run_in_threadpool(holds.release, index, level, uid, actor)
                new = False
            else:
                record, new = await run_in_threadpool(holds.place, index, level, uid, reason,
                                                      actor)
        except holds.HoldError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404 if releasing else 400)
        return JSONResponse(record.summary(), status_code=201 if new else 200)

    async def restore(request: Request) -> Response:
        if not _json_body(request):
            return JSONResponse({"error": "post {} as application/json"}, status_code=415)
        name = request.path_params["entry"]
        try:
            counts = await run_in_threadpool(archive.restore_deleted, name, http_actor(request))
        except RecycleBinError as exc:
            return JSONResponse({"error": str(exc)},
                                status_code=409 if isinstance(exc, NotRestorable) else 404)
        return JSONResponse(counts, status_code=500 if counts["failed"] else 200)

    def corrections(request: Request) -> Response:
        return JSONResponse(correction.history(index, _int(request, "limit", 100, 1,
                                                           MAX_PAGE)))

    def config(request: Request) -> Response:
        you = {"user": user_of(request.scope), "role": role_of(request.scope)}
        shown = dataclasses.replace(settings, **{name: getattr(access, name)
                                                 for name in RELOADABLE})
        return JSONResponse({**public_settings(shown), "you": you})

    def prometheus(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    def healthz(request: Request) -> Response:
        try:
            ok = reports.ping(index)
        except Exception as exc:  # an unreachable index is what a health check reports
            log.warning("health check: index unreachable: %s", exc)
            ok = False
        return JSONResponse({"status": "ok" if ok else "index unreachable"},
                            status_code=200 if ok else 503)

    routes = [Route("/", page), Route("/api/stats", stats), Route("/api/studies", studies),
              Route("/api/series/{uid}", series),
              Route("/api/series/{uid}/preview.png", preview), Route("/api/jobs", jobs),
              Route("/api/forwards", forwards),
              Route("/api/studies/{uid}/send", send, methods=["POST"]),
              *web_media.routes(archive), *web_deidentified.routes(archive, settings),
              Route("/api/deletions", deletions), Route("/api/corrections", corrections),
              Route("/api/deleted", recycled), Route("/api/holds", held),
              Route("/api/holds", hold, methods=["POST"]),
              Route("/api/retention", retention_now),
              Route("/api/holds/release", hold, methods=["POST"]),
              Route("/api/deleted/{entry}/restore", restore, methods=["POST"]),
              Route("/api/accesses", accesses),
              Route("/api/config", config),
              Route("/metrics", prometheus), Route("/healthz", healthz),
              *dicomweb.routes(archive, previews, settings.http_public_url),
              *dicomweb_store.routes(archive, settings.max_dataset_bytes,
                                     settings.http_public_url, access),
              Mount("/static", StaticFiles(directory=STATIC))]
    middleware = [Middleware(TokenAuth, settings=access, accesses=archive.accesses),
                  Middleware(AccessTrail, accesses=archive.accesses)]
    origins = [o.strip() for o in settings.http_cors_origins.split(",") if o.strip()]
    if origins:     # outermost: answers a browser's preflight, which carries no token
        middleware.insert(0, Middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept", "If-None-Match"],
            expose_headers=["Warning", "Content-Type", "ETag"]))
    return Starlette(routes=routes, middleware=middleware)
