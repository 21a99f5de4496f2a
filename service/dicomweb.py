"""DICOMweb, read only: QIDO-RS search and WADO-RS retrieval on the admin web server.

Routes under ``/dicom-web`` (same token rule as the rest of the server):

- QIDO-RS ``GET /studies``, ``/series``, ``/instances``, ``/studies/{study}/series``,
  ``/studies/{study}/instances``, ``/studies/{study}/series/{series}/instances``: the C-FIND
  matching of :mod:`storage.query` (attributes by keyword or tag, wildcards, ranges, UID
  lists), ``limit`` and ``offset``; answers ``application/dicom+json``. Attributes the index
  does not keep do not filter; they are named in a ``Warning`` header.
- WADO-RS ``GET /studies/{study}``, ``.../series/{series}``, ``.../instances/{sop}``:
  ``multipart/related; type="application/dicom"``, one Part 10 file per instance, its dataset
  byte for byte as received (rebuilt and SHA-256 checked). Each part names its transfer syntax:
  instances go out as stored, never transcoded, so an instance received compressed or in
  implicit VR comes back so (``transfer-syntax=*`` in the standard's terms).
- WADO-RS ``.../metadata`` of a study, series or instance: each instance's attributes as DICOM
  JSON, without its pixel data.
- WADO-RS ``.../instances/{sop}/frames/{list}``: the listed frames as stored: the pixel bytes of
  an uncompressed instance (``application/octet-stream``), the bitstream of a compressed one
  under its media type with its ``transfer-syntax`` (``image/jpeg``, ``image/jls``, ``image/jp2``,
  ...).
- WADO-RS ``.../instances/{sop}/rendered`` and ``.../frames/{n}/rendered``: the image (its middle
  frame, or frame n) as a PNG at its own size, windowed as the admin page's previews are.
- WADO-RS ``.../thumbnail`` of a study (its first series), series (its middle image) or
  instance: a PNG of at most ``viewport`` pixels.
- WADO-URI ``/wado?requestType=WADO&studyUID=&seriesUID=&objectUID=`` (links in reports and
  older viewers): ``contentType=application/dicom`` gives the Part 10 file as stored; an image
  type gives the PNG (asked for JPEG too: a PNG loses nothing and every client shows it).
"""

from __future__ import annotations

import io
import logging
import re
import uuid

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.encaps import get_frame
from pydicom.uid import UID
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.preview import PreviewError, render_png
from storage.errors import StorageError
from storage.part10 import build_file
from storage.query import ATTRIBUTES, COMPUTED

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
MAX_LIMIT = 5000
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_RESERVED = {"limit", "offset", "includefield", "fuzzymatching", "token"}
_LEVEL_KEYS = {   # what each QIDO level answers with, beside the matched keys
    "STUDY": ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientName",
              "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDescription",
              "ReferringPhysicianName", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
               "SeriesDescription", "SeriesDate", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
              "InstanceNumber", "NumberOfFrames"),
}


class _BadRequest(ValueError):
    """A query parameter that cannot be used."""


def _criteria(request: Request, level: str, fixed: dict) -> tuple[dict, list[str]]:
    """C-FIND criteria from the query string (keywords or tags), the path's UIDs and the level's
    return keys; also the matching keys the index does not keep."""
    criteria = {k: "" for k in _LEVEL_KEYS[level]}
    ignored = []
    for name, value in request.query_params.multi_items():
        if name in _RESERVED:
            continue
        keyword = keyword_for_tag(int(name, 16)) if _TAG.match(name) else name
        if not keyword or not _known(keyword) or dictionary_VR(keyword) == "SQ":
            raise _BadRequest(f"unknown or unsupported attribute {name!r}")
        if keyword not in ATTRIBUTES and keyword not in COMPUTED:
            ignored.append(keyword)
            continue
        criteria[keyword] = value
    criteria.update(fixed)
    return criteria, ignored


def _known(keyword: str) -> bool:
    try:
        dictionary_VR(keyword)
    except (KeyError, ValueError):
        return False
    return True


def _int(request: Request, name: str, default: int, high: int) -> int:
    try:
        value = int(request.query_params.get(name, default))
    except ValueError:
        raise _BadRequest(f"{name} must be an integer") from None
    if value < 0:
        raise _BadRequest(f"{name} must not be negative")
    return min(value, high)


def _json_record(record: dict, base: str, level: str) -> dict:
    """A C-FIND record as a DICOM JSON object, with the Retrieve URL of its level."""
    ds = Dataset()
    for keyword, value in record.items():
        if value is None or value == "":
            continue
        setattr(ds, keyword, list(value) if isinstance(value, (list, tuple)) else value)
    path = f"{base}/studies/{record['StudyInstanceUID']}"
    if level in ("SERIES", "IMAGE"):
        path += f"/series/{record['SeriesInstanceUID']}"
    if level == "IMAGE":
        path += f"/instances/{record['SOPInstanceUID']}"
    ds.RetrieveURL = path
    return ds.to_json_dict()


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/dicom-web"


def _multipart(parts, part_type: str) -> StreamingResponse:
    """A multipart/related response of ``parts``: an iterator of (content type, bytes)."""
    boundary = uuid.uuid4().hex

    def body():
        for content_type, data in parts:
            yield (f"--{boundary}\r\nContent-Type: {content_type}\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n").encode()
            yield data
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()
    media = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return StreamingResponse(body(), media_type=media)


class _NotServed(Exception):
    """Ends a request with an HTTP error (status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def response(self) -> Response:
        return JSONResponse({"error": str(self)}, status_code=self.status)


# media types of compressed frames (PS3.18, bulk data of each transfer syntax)
_FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/x-dicom-rle",
}


def frame_data(inst, wanted: list[int]) -> tuple[str, list[bytes]]:
    """(media type, frames) of an instance's frames numbered ``wanted`` (from 1), as stored;
    raises _NotServed (404 no such frame or no pixel data, 406 bit-packed or big-endian)."""
    ts = UID(inst.transfer_syntax)
    ds = dcmread(io.BytesIO(build_file(inst.sop_class_uid, inst.sop_uid, ts, inst.data)))
    if "PixelData" not in ds:
        raise _NotServed(404, "the instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if not all(1 <= n <= count for n in wanted):
        raise _NotServed(404, f"frames are 1 to {count}")
    if ts.is_encapsulated:
        media = f"{_FRAME_MEDIA.get(ts, 'application/octet-stream')}; transfer-syntax={ts}"
        return media, [get_frame(ds.PixelData, n - 1, number_of_frames=count) for n in wanted]
    bits = int(ds.BitsAllocated)
    if bits % 8 or not ts.is_little_endian:
        raise _NotServed(406, "frames of bit-packed or big-endian pixel data are not served")
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
    view = memoryview(ds.PixelData)
    return "application/octet-stream", [bytes(view[(n - 1) * size:n * size]) for n in wanted]


def _series_order(record: dict) -> tuple:
    number = str(record.get("SeriesNumber") or "")
    return (0, int(number)) if number.isdigit() else (1, number)


_PATH_KEYS = (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"),
              ("sop", "SOPInstanceUID"))


class DicomWeb:
    """The DICOMweb endpoints of a node's archive (see the module's docstring)."""

    def __init__(self, archive, previews):
        self.archive, self.previews = archive, previews

    def routes(self) -> list[Route]:
        """The routes, under ``/dicom-web`` (and ``/wado``)."""
        study = "/dicom-web/studies/{study}"
        series = study + "/series/{series}"
        instance = series + "/instances/{sop}"
        search = self.search
        return [
            Route("/dicom-web/studies", search("STUDY")),
            Route("/dicom-web/series", search("SERIES")),
            Route("/dicom-web/instances", search("IMAGE")),
            Route(study + "/series", search("SERIES")),
            Route(study + "/instances", search("IMAGE")),
            Route(series + "/instances", search("IMAGE")),
            Route(study, self.retrieve), Route(series, self.retrieve),
            Route(instance, self.retrieve),
            Route(study + "/metadata", self.metadata), Route(series + "/metadata", self.metadata),
            Route(instance + "/metadata", self.metadata),
            Route(instance + "/frames/{frames}", self.frames),
            Route(instance + "/rendered", self.rendered),
            Route(instance + "/frames/{frame}/rendered", self.rendered),
            Route(study + "/thumbnail", self.thumbnail),
            Route(series + "/thumbnail", self.thumbnail),
            Route(instance + "/thumbnail", self.thumbnail),
            Route("/wado", self.wado_uri),
        ]

    # --- helpers ----------------------------------------------------------------------------
    def instances_of(self, params: dict) -> list[str]:
        """SOP Instance UIDs under the study / series / instance UIDs of a path."""
        criteria = {kw: params[key] for key, kw in _PATH_KEYS if params.get(key)}
        return [r["SOPInstanceUID"] for r in self.archive.find("IMAGE", criteria)]

    def one(self, params: dict):
        """The instance a path names, rebuilt; raises _NotServed (404, 500)."""
        uids = self.instances_of(params)
        if not uids:
            raise _NotServed(404, "no such instance")
        try:
            return self.archive.retrieve(uids[0])
        except StorageError as exc:
            raise _NotServed(500, str(exc)) from exc

    def rebuilt(self, uids: list[str]):
        """Yield each instance as stored (in the order the archive decodes best)."""
        try:
            ordered, prefetch = self.archive.plan_retrieval(uids)
        except Exception as exc:        # no plan: decode on demand, as C-GET does
            log.warning("DICOMweb: no retrieval plan (%s)", exc)
            ordered, prefetch = uids, None
        try:
            for uid in ordered:
                try:
                    yield self.archive.retrieve(uid)
                except StorageError as exc:
                    log.error("DICOMweb: instance %s not sent: %s", uid, exc)
        finally:
            if prefetch is not None:
                prefetch.cancel()

    # --- endpoints --------------------------------------------------------------------------
    def search(self, level: str):
        """A QIDO-RS endpoint of ``level``, its path's UIDs matched too."""
        def endpoint(request: Request) -> Response:
            fixed = {kw: request.path_params[key] for key, kw in _PATH_KEYS
                     if key in request.path_params}
            try:
                criteria, ignored = _criteria(request, level, fixed)
                offset = _int(request, "offset", 0, 1 << 31)
                limit = _int(request, "limit", MAX_LIMIT, MAX_LIMIT)
            except _BadRequest as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            records = self.archive.find(level, criteria)
            page = records[offset:offset + limit] if limit else records[offset:]
            base = _base(request)
            headers = {}
            if ignored:
                headers["Warning"] = (f'299 voxarc "not used for matching: '
                                      f'{", ".join(sorted(set(ignored)))}"')
            return JSONResponse([_json_record(r, base, level) for r in page],
                                media_type=DICOM_JSON, headers=headers)
        return endpoint

    def retrieve(self, request: Request) -> Response:
        """WADO-RS: the Part 10 files of a study, series or instance."""
        uids = self.instances_of(request.path_params)
        if not uids:
            return JSONResponse({"error": "nothing matches"}, status_code=404)
        log.info("WADO-RS %s: %d instances", request.url.path, len(uids))
        parts = ((f'application/dicom; transfer-syntax={inst.transfer_syntax}',
                  build_file(inst.sop_class_uid, inst.sop_uid, inst.transfer_syntax, inst.data))
                 for inst in self.rebuilt(uids))
        return _multipart(parts, "application/dicom")

    def metadata(self, request: Request) -> Response:
        """WADO-RS metadata: each instance's attributes without its pixel data."""
        uids = self.instances_of(request.path_params)
        if not uids:
            return JSONResponse({"error": "nothing matches"}, status_code=404)
        base = _base(request)
        out = []
        for inst in self.rebuilt(uids):
            ds = dcmread(io.BytesIO(build_file(inst.sop_class_uid, inst.sop_uid,
                                               inst.transfer_syntax, inst.data)),
                         stop_before_pixels=True)
            item = ds.to_json_dict()            # small binary values inline, base64
            item["00083002"] = {"vr": "UI", "Value": [inst.transfer_syntax]}
            item["00081190"] = {"vr": "UR", "Value": [
                f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{inst.sop_uid}"]}
            out.append(item)
        return JSONResponse(out, media_type=DICOM_JSON)

    def frames(self, request: Request) -> Response:
        """WADO-RS frames: the listed frames' pixel data as stored: raw bytes of an
        uncompressed instance, the compressed bitstream of an encapsulated one (its media type
        and transfer syntax on each part)."""
        try:
            wanted = [int(n) for n in request.path_params["frames"].split(",")]
        except ValueError:
            return JSONResponse({"error": "frames must be numbers"}, status_code=400)
        try:
            inst = self.one(request.path_params)
            media, frames = frame_data(inst, wanted)
        except _NotServed as exc:
            return exc.response()
        return _multipart(((media, f) for f in frames), media.split(";")[0])

    def rendered(self, request: Request) -> Response:
        """WADO-RS rendered: the image (middle frame, or the path's frame) as a PNG."""
        try:
            frame = int(request.path_params["frame"]) if "frame" in request.path_params \
                else None
        except ValueError:
            return JSONResponse({"error": "the frame must be a number"}, status_code=400)
        return self._png(request.path_params, 0, frame)

    def thumbnail(self, request: Request) -> Response:
        """WADO-RS thumbnail of a study (its first series), series (its middle image) or
        instance, as a PNG of at most ``viewport`` pixels (``w,h``; default 128)."""
        params = request.path_params
        try:
            size = max(int(v) for v in request.query_params.get("viewport", "128").split(","))
        except ValueError:
            return JSONResponse({"error": "viewport is w,h in pixels"}, status_code=400)
        size = min(max(size, 16), 512)
        if "sop" in params:
            return self._png(params, size, None)
        criteria = {kw: params[key] for key, kw in _PATH_KEYS[:2] if key in params}
        found = self.archive.find("SERIES", criteria | {"SeriesNumber": ""})
        if not found:
            return JSONResponse({"error": "no such study or series"}, status_code=404)
        try:
            png = self.previews.get(min(found, key=_series_order)["SeriesInstanceUID"], size)
        except PreviewError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except StorageError as exc:
            return JSONResponse({"error": str(exc)}, status_code=500)
        if png is None:                     # deleted in the meantime
            return JSONResponse({"error": "no such series"}, status_code=404)
        return Response(png, media_type="image/png")

    def wado_uri(self, request: Request) -> Response:
        """WADO-URI (PS3.18 chapter 9): ``?requestType=WADO&studyUID=&seriesUID=&objectUID=``,
        ``contentType`` application/dicom (the Part 10 file, as stored) or an image (PNG)."""
        q = request.query_params
        if q.get("requestType") != "WADO" or not q.get("objectUID"):
            return JSONResponse({"error": "requestType=WADO and objectUID are required"},
                                status_code=400)
        params = {"study": q.get("studyUID"), "series": q.get("seriesUID"),
                  "sop": q["objectUID"]}
        kind = q.get("contentType", "image/jpeg").split(",")[0].strip()
        if kind == "application/dicom":
            try:
                inst = self.one(params)
            except _NotServed as exc:
                return exc.response()
            return Response(build_file(inst.sop_class_uid, inst.sop_uid, inst.transfer_syntax,
                                       inst.data), media_type="application/dicom")
        if kind not in ("image/png", "image/jpeg", "*/*"):
            return JSONResponse({"error": f"contentType {kind} is not offered"},
                                status_code=406)
        try:
            rows = int(q.get("rows", 0) or 0)
        except ValueError:
            return JSONResponse({"error": "rows must be a number"}, status_code=400)
        return self._png(params, rows, None)

    def _png(self, params: dict, size: int, frame: int | None) -> Response:
        try:
            inst = self.one(params)
            png = render_png(inst.sop_class_uid, inst.sop_uid, inst.transfer_syntax, inst.data,
                             size, frame)
        except _NotServed as exc:
            return exc.response()
        except PreviewError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return Response(png, media_type="image/png")


def routes(archive, previews) -> list[Route]:
    """The DICOMweb routes of a node's archive (``previews``: its
    :class:`service.preview.SeriesPreviews`, shared with the admin page)."""
    return DicomWeb(archive, previews).routes()
