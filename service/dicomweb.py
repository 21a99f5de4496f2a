"""DICOMweb, read only: QIDO-RS search and WADO-RS retrieval on the admin web server.

Routes under ``/dicom-web`` (same token rule as the rest of the server):

- QIDO-RS ``GET /studies``, ``/series``, ``/instances``, ``/studies/{study}/series``,
  ``/studies/{study}/instances``, ``/studies/{study}/series/{series}/instances``: the C-FIND
  matching of :mod:`storage.query` (attributes by keyword or tag, wildcards, ranges, UID
  lists), ``limit`` and ``offset``; answers ``application/dicom+json``. Attributes the index
  does not keep do not filter; they are named in a ``Warning`` header. Records come sorted by
  the level's UID (stable paging); a ``Warning`` says when more match than were returned (at
  most :data:`MAX_LIMIT`). Comma-separated values of a UID key are a UID list.
  ``fuzzymatching=true`` matches person names by words as well
  (:func:`storage.query.fuzzy_name_match`).
- WADO-RS ``GET /studies/{study}``, ``.../series/{series}``, ``.../instances/{sop}``:
  ``multipart/related; type="application/dicom"``, one Part 10 file per instance, its dataset
  byte for byte as received (rebuilt and SHA-256 checked). Each part names its transfer syntax:
  instances go out as stored unless ``Accept`` names syntaxes (service.dicomweb_accept: then
  an instance may go out converted losslessly to Explicit or Implicit VR Little Endian,
  decompressed when received in a lossless compressed syntax, and one that cannot be sent in a
  named syntax makes the answer a 406 before anything is sent). No instance is
  skipped: when the first cannot be rebuilt the answer is 500 (failed its SHA-256 check) or 404
  (gone); when a later one cannot, the transfer is cut off before its end, so the client sees
  a failed transfer rather than a complete multipart that lacks an instance.
- WADO-RS ``.../metadata`` of a study, series or instance: each instance's attributes as DICOM
  JSON, read from its stored header without decoding any pixels (an error status when any
  instance's header cannot be read; the SHA-256 check of a compressed instance's pixels belongs
  to the requests that send them). A value
  pydicom cannot convert (a malformed DS or IS, say) is sent as its raw bytes in
  ``InlineBinary``, named in a ``Warning`` header. The pixel data, and binary values over a
  kilobyte, are BulkDataURIs (service.dicom_json).
- WADO-RS ``.../instances/{sop}/bulkdata/{path}``: the value such a URI names, as
  ``application/octet-stream``; that of the pixel data as the frames resource gives all frames.
- WADO-RS ``.../instances/{sop}/frames/{list}``: the listed frames as stored: the pixel bytes of
  an uncompressed instance (``application/octet-stream``), the bitstream of a compressed one
  under its media type with its ``transfer-syntax`` (``image/jpeg``, ``image/jls``, ``image/jp2``,
  ...); decoded to stored words when ``Accept`` names only uncompressed syntaxes (a media type
  without ``transfer-syntax`` standing for its default one, octets for Explicit VR Little
  Endian) and the instance is monochrome and lossless compressed (else 406). Frame numbers
  start at 1 and may not repeat (400); frames are sent one at a time.
- WADO-RS ``.../instances/{sop}/rendered`` and ``.../frames/{n}/rendered``: the image (its middle
  frame, or frame n) at its own size, windowed as the admin page's previews are, as a JPEG (the
  default, also when any image will do), PNG or GIF, whichever ``Accept`` ranks first (406 for
  none); ``viewport``, ``window`` and ``quality`` as PS3.18 defines them.
- WADO-RS ``.../rendered`` of a study or series: each of its images as the instance resource
  renders it, one multipart (series, then instance number order).
- WADO-RS ``.../thumbnail`` of a study (its first series), series (its middle image) or
  instance: the same, of at most ``viewport`` pixels.
- WADO-URI ``/wado?requestType=WADO&studyUID=&seriesUID=&objectUID=`` (links in reports and
  older viewers): ``contentType=application/dicom`` gives the Part 10 file as stored;
  ``image/jpeg`` (the default, and for a wildcard) a JPEG, ``image/png`` a PNG, ``image/gif`` a
  GIF. ``contentType`` is a list: the first offered type by q-value, then order, is served.

Study, series and instance UIDs of a path or of WADO-URI must be DICOM UIDs (digits and dots,
at most 64 characters), else 400: they are not C-FIND patterns.
"""

from __future__ import annotations

import functools
import gzip
import io
import itertools
import json
import logging
import math
import re
import uuid

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.encaps import get_frame
from pydicom.pixels import pixel_array
from pydicom.uid import UID, RLELossless
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.dicom_json import (PIXEL_TAGS, BadPath, BulkLinks, element_value, header_dataset,
                                json_dataset, parse_path, pixel_reference)
from service.dicomweb_accept import (RENDERED, NotAcceptable, accepted_syntaxes, frame_syntax,
                                     octets_accepted, part10_in, rendered_type, syntax_for)
from service.identifiers import find_records, known_keyword
from service.web_cache import conditional, entity_tag
from service.web_url import dicomweb_base
from service.preview import SHAPES, PreviewError, render_image
from storage.dataset_parts import le_bytes, nbytes
from storage.errors import InstanceNotFoundError, StorageError, TranscodeError
from storage.part10 import build_file
from storage.query import ATTRIBUTES, COMPUTED, LEVELS, Matching

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
MAX_LIMIT = 5000
GZIP_ABOVE = 1400           # bytes: smaller JSON goes as it is (one packet)
GZIP_LEVEL = 6
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_IMAGE_TYPES = RENDERED + ("image/*", "*/*")      # WADO-URI: a wildcard gets RENDERED[0]
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
_NODE_KEYS = ("InstanceAvailability",)     # answered by the node (identifiers.find_records)
_LEVEL_UID = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}


class _BadRequest(ValueError):
    """A query parameter that cannot be used."""


def _criteria(request: Request, level: str, fixed: dict) -> tuple[dict, list[str]]:
    """C-FIND criteria from the query string (keywords or tags), the path's UIDs and the level's
    return keys; also the matching keys the index does not keep."""
    criteria = {k: "" for k in _LEVEL_KEYS[level] + _NODE_KEYS}
    criteria.update({k: "" for k in _included(request, level)})
    ignored = []
    for name, value in request.query_params.multi_items():
        if name in _RESERVED:
            continue
        keyword = _keyword(name)
        if keyword not in ATTRIBUTES and keyword not in COMPUTED and keyword not in _NODE_KEYS:
            ignored.append(keyword)
            continue
        if dictionary_VR(keyword) == "UI":      # a,b is a UID list, as a\\b is
            value = value.replace(",", "\\")
        criteria[keyword] = value
    criteria.update(fixed)
    return criteria, ignored


def _keyword(name: str) -> str:
    """The keyword a query parameter names (by keyword or tag)."""
    keyword = keyword_for_tag(int(name, 16)) if _TAG.match(name) else name
    if not keyword or not known_keyword(keyword) or dictionary_VR(keyword) == "SQ":
        raise _BadRequest(f"unknown or unsupported attribute {name!r}")
    return keyword


def _included(request: Request, level: str) -> list[str]:
    """The computed attributes ``includefield`` asks for (``all``: every one of the level and
    those above); stored attributes of the level and above come back anyway."""
    depth = LEVELS.index(level)
    out = []
    for value in request.query_params.getlist("includefield"):
        for name in filter(None, (n.strip() for n in value.split(","))):
            if name == "all":
                out += [k for k, lv in COMPUTED.items() if LEVELS.index(lv) <= depth]
            elif (keyword := _keyword(name)) in COMPUTED:
                out.append(keyword)
    return out


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


def _is_uid(value: str | None) -> bool:
    return bool(value) and len(value) <= 64 and _UID.fullmatch(value) is not None


class _Aborted(Exception):
    """Ends a streamed body before its end (see :class:`_Stream`)."""


class _Stream(StreamingResponse):
    """A StreamingResponse whose body may stop with :class:`_Aborted`: the end of the body is
    then never sent and the server closes the connection, so the client sees a failed transfer
    (a multipart cut short at a part boundary would otherwise look complete but for its
    closing delimiter)."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        except _Aborted:
            pass


def _multipart(parts, part_type: str, what: str, location: str = "") -> StreamingResponse:
    """A multipart/related response of ``parts``: an iterator of (content type, bytes or a
    tuple of consecutive buffers); a StorageError from it cuts the transfer off (logged with
    ``what``, the request). ``location``: each part's Content-Location (the BulkDataURI of
    bulk data, as PS3.18 asks)."""
    boundary = uuid.uuid4().hex
    where = f"Content-Location: {location}\r\n" if location else ""

    def body():
        sent = 0
        try:
            for content_type, data in parts:
                pieces = data if isinstance(data, tuple) else (data,)
                yield (f"--{boundary}\r\nContent-Type: {content_type}\r\n{where}"
                       f"Content-Length: {nbytes(pieces)}\r\n\r\n").encode()
                yield from pieces
                yield b"\r\n"
                sent += 1
        except StorageError as exc:
            log.error("%s: transfer cut off after %d parts: %s", what, sent, exc)
            raise _Aborted from exc
        yield f"--{boundary}--\r\n".encode()
    media = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return _Stream(body(), media_type=media)


class _NotServed(Exception):
    """Ends a request with an HTTP error (status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def response(self) -> Response:
        return JSONResponse({"error": str(self)}, status_code=self.status)


def _failed(exc: StorageError) -> _NotServed:
    """The HTTP error of an instance that cannot be rebuilt: 404 gone, 500 anything else."""
    return _NotServed(404 if isinstance(exc, InstanceNotFoundError) else 500, str(exc))


def _dicom_json(request: Request, content, headers: dict) -> Response:
    """``content`` as ``application/dicom+json``, gzip-compressed when the client takes gzip
    and it is over :data:`GZIP_ABOVE` bytes (a series' metadata: a viewer loads it before its
    first image)."""
    body = json.dumps(content, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode()
    headers = {**headers, "Vary": "Accept-Encoding"}
    if len(body) > GZIP_ABOVE and _takes_gzip(request.headers.get("accept-encoding", "")):
        body = gzip.compress(body, compresslevel=GZIP_LEVEL)
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=DICOM_JSON, headers=headers)


def _takes_gzip(accept_encoding: str) -> bool:
    for entry in accept_encoding.split(","):
        coding, *params = [p.strip().lower() for p in entry.split(";")]
        if coding in ("gzip", "*"):
            return not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000")
                           for p in params)
    return False


def _bad_request(message: str) -> Response:
    return JSONResponse({"error": message}, status_code=400)


def _uids_checked(endpoint):
    """``endpoint``, answering 400 when a UID of its path is not a DICOM UID (``*`` or ``\\``
    would otherwise act as C-FIND wildcards or lists)."""
    @functools.wraps(endpoint)
    def checked(request: Request) -> Response:
        for key, _ in _PATH_KEYS:
            if key in request.path_params and not _is_uid(request.path_params[key]):
                return _bad_request(f"{key} {request.path_params[key]!r} is not a UID")
        return endpoint(request)
    return checked


# media types of compressed frames (PS3.18, bulk data of each transfer syntax)
_FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/x-dicom-rle",
}


def frame_numbers(text: str) -> list[int]:
    """The frame numbers of a ``frames/{list}`` path; raises _NotServed (400) when one is not
    a number, is below 1 or is listed twice."""
    try:
        wanted = [int(n) for n in text.split(",")]
    except ValueError:
        raise _NotServed(400, "frames must be numbers") from None
    if min(wanted) < 1:
        raise _NotServed(400, "frame numbers start at 1")
    if len(set(wanted)) != len(wanted):
        raise _NotServed(400, "a frame is listed twice")
    return wanted


def frame_data(inst, wanted: list[int] | None, syntax: str | None = None):
    """(media type, iterator of frames) of an instance's frames numbered ``wanted`` (from 1,
    distinct; None: all), each taken when iterated: as stored, or decoded to uncompressed
    little-endian bytes when ``syntax`` (from :func:`frame_syntax`) is another; raises
    _NotServed (400 a frame listed twice, 404 no such frame or no pixel data, 406 bit-packed or
    big-endian, or colour frames that would change colour space in decoding)."""
    if wanted is not None and len(set(wanted)) != len(wanted):
        raise _NotServed(400, "a frame is listed twice")
    ts = UID(inst.transfer_syntax)
    ds = dcmread(io.BytesIO(build_file(inst.sop_class_uid, inst.sop_uid, ts, inst.data)))
    if "PixelData" not in ds:
        raise _NotServed(404, "the instance has no pixel data")
    count = _pixel_count(ds, "NumberOfFrames", 1)
    wanted = list(range(1, count + 1)) if wanted is None else wanted
    if not all(1 <= n <= count for n in wanted):
        raise _NotServed(404, f"frames are 1 to {count}")
    if ts.is_encapsulated and syntax not in (None, ts):
        return _decoded_frames(ds, wanted, syntax)
    if ts.is_encapsulated:
        media = f"{_FRAME_MEDIA.get(ts, 'application/octet-stream')}; transfer-syntax={ts}"
        return media, (get_frame(ds.PixelData, n - 1, number_of_frames=count) for n in wanted)
    bits = _pixel_count(ds, "BitsAllocated")
    if bits % 8 or not ts.is_little_endian:
        raise _NotServed(406, "frames of bit-packed or big-endian pixel data are not served")
    size = _pixel_count(ds, "Rows") * _pixel_count(ds, "Columns") \
        * _pixel_count(ds, "SamplesPerPixel", 1) * bits // 8
    view = memoryview(ds.PixelData)
    return "application/octet-stream", (view[(n - 1) * size:n * size] for n in wanted)


def _pixel_count(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An instance's count (frames, rows, bits) that its frames are cut by; a value that is
    not one (an IS of '1A', as received and kept) ends the request with a 500 that says so."""
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        why = f"the instance's {keyword} ({ds.get(keyword)!r}) is not a number: its frames " \
            "cannot be cut out"
        log.error("WADO-RS frames of %s: %s", ds.get("SOPInstanceUID", "?"), why)
        raise _NotServed(500, why) from None


def _decoded_frames(ds: Dataset, wanted: list[int], syntax: str):
    """Frames of a lossless compressed instance decoded to their stored words (little endian,
    laid out as the instance's Planar Configuration says, as its uncompressed frames would
    be). Colour frames only where decoding keeps the colour space the metadata names: RGB,
    and any colour space in RLE (a JPEG 2000 instance in YBR_RCT decodes to RGB, and a client
    reading the metadata would take RGB words for YBR ones)."""
    samples = _pixel_count(ds, "SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples != 1 and photometric != "RGB" and ds.file_meta.TransferSyntaxUID != RLELossless:
        raise _NotServed(406, f"{photometric} frames would change colour space in decoding; "
                              "ask for the stored syntax")
    planes = samples != 1 and _pixel_count(ds, "PlanarConfiguration", 0) == 1

    def frame(n: int) -> memoryview:
        try:
            values = pixel_array(ds, index=n - 1, raw=True)
        except Exception as exc:
            raise TranscodeError(f"frame {n} of {ds.SOPInstanceUID} does not decode: "
                                 f"{exc}") from exc
        return le_bytes(np.moveaxis(values, -1, 0) if planes else values)
    first = frame(wanted[0])            # before the answer starts: a failure is a 500
    return (f"application/octet-stream; transfer-syntax={syntax}",
            itertools.chain([first], (frame(n) for n in wanted[1:])))


def wado_content_type(value: str) -> str | None:
    """The type a WADO-URI ``contentType`` list asks for: the first offered one by q-value,
    then order, without its parameters; None when none is offered."""
    choices = []
    for order, entry in enumerate(value.split(",")):
        kind, *params = [p.strip() for p in entry.split(";")]
        q = 1.0
        for param in params:
            name, _, number = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(number)
                except ValueError:
                    raise _BadRequest(f"contentType {entry.strip()!r}: q is not a number") \
                        from None
        if q > 0:
            choices.append((-q, order, kind.lower()))
    for _, _, kind in sorted(choices):
        if kind == "application/dicom" or kind in _IMAGE_TYPES:
            return kind
    return None


def _rendering(query) -> dict:
    """:func:`service.preview.render_image`'s size, window and quality from the WADO-RS
    rendered parameters (PS3.18 8.3.5.1): ``viewport=vw,vh`` (the image shrunk to fit),
    ``window=center,width[,shape]`` (shape linear, linear-exact or sigmoid; instead of the
    instance's own window), ``quality=1..100`` (of a JPEG)."""
    out: dict = {}
    if "viewport" in query:
        parts = query["viewport"].split(",")
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() and int(p) > 0
                                      for p in parts):
            raise _BadRequest("viewport is vw,vh in pixels")
        out["size"] = (int(parts[0]), int(parts[1]))
    if "window" in query:
        fields = [f.strip() for f in query["window"].split(",")]
        try:
            center, width = float(fields[0]), float(fields[1])
        except (ValueError, IndexError):
            raise _BadRequest("window is center,width[,shape]") from None
        shape = fields[2].lower() if len(fields) > 2 else "linear"
        least = 1.0 if shape == "linear" else 0.0
        if len(fields) > 3 or shape not in SHAPES or not math.isfinite(center) \
                or not (math.isfinite(width) and width > 0 and width >= least):
            raise _BadRequest(f"window {query['window']!r}: center,width[,shape], the width "
                              f"above 0 (1 or more for linear), the shape one of "
                              f"{', '.join(SHAPES)}")
        out["window"] = (center, width, shape)
    if "quality" in query:
        value = query["quality"]
        if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 100):
            raise _BadRequest("quality is 1 to 100")
        out["quality"] = int(value)
    return out


def _pixels(request: Request, name: str) -> int:
    value = request.query_params.get(name) or "0"
    if not (value.isascii() and value.isdigit()):
        raise _BadRequest(f"{name} must be a number of pixels")
    return int(value)


def _number(value) -> tuple:
    text = str(value or "")
    return (0, int(text)) if text.isdigit() else (1, text)


def _series_order(record: dict) -> tuple:
    return _number(record.get("SeriesNumber"))


_PATH_KEYS = (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"),
              ("sop", "SOPInstanceUID"))


def _part10(inst, syntax: str) -> tuple[str, tuple]:
    return (f"application/dicom; transfer-syntax={syntax}",
            part10_in(inst.sop_class_uid, inst.sop_uid, inst.transfer_syntax, inst.parts, syntax))


class DicomWeb:
    """The DICOMweb endpoints of a node's archive (see the module's docstring)."""

    def __init__(self, archive, previews, public_url: str = ""):
        self.archive, self.previews, self.public_url = archive, previews, public_url

    def routes(self) -> list[Route]:
        """The routes, under ``/dicom-web`` (and ``/wado``)."""
        study = "/dicom-web/studies/{study}"
        series = study + "/series/{series}"
        instance = series + "/instances/{sop}"
        search, checked = self.search, _uids_checked

        def cached(endpoint):           # answers fixed by their instances: ETag, 304
            return _uids_checked(conditional(endpoint, self.entity_tag))
        return [
            Route("/dicom-web/studies", search("STUDY")),
            Route("/dicom-web/series", search("SERIES")),
            Route("/dicom-web/instances", search("IMAGE")),
            Route(study + "/series", checked(search("SERIES"))),
            Route(study + "/instances", checked(search("IMAGE"))),
            Route(series + "/instances", checked(search("IMAGE"))),
            *(Route(path, cached(self.retrieve)) for path in (study, series, instance)),
            *(Route(path + "/metadata", cached(self.metadata))
              for path in (study, series, instance)),
            Route(instance + "/frames/{frames}", cached(self.frames)),
            Route(instance + "/bulkdata/{path:path}", cached(self.bulkdata)),
            *(Route(path + "/rendered", cached(self.rendered_all)) for path in (study, series)),
            Route(instance + "/rendered", cached(self.rendered)),
            Route(instance + "/frames/{frame}/rendered", cached(self.rendered)),
            *(Route(path + "/thumbnail", cached(self.thumbnail))
              for path in (study, series, instance)),
            Route("/wado", self.wado_uri),
        ]

    # --- helpers ----------------------------------------------------------------------------
    def instances_of(self, params: dict) -> list[str]:
        """SOP Instance UIDs under the study / series / instance UIDs of a path."""
        criteria = {kw: params[key] for key, kw in _PATH_KEYS if params.get(key)}
        return [r["SOPInstanceUID"] for r in self.archive.find("IMAGE", criteria)]

    def entity_tag(self, request: Request) -> str | None:
        """The ETag of an answer about the instances a path names (:mod:`service.web_cache`)."""
        params = request.path_params
        digests = self.archive.digests(params["study"], params.get("series"), params.get("sop"))
        return entity_tag(request, digests, dicomweb_base(request, self.public_url))

    def one(self, params: dict, uids: list[str] | None = None):
        """The instance a path names (``uids``: what it names, when looked up already),
        rebuilt; raises _NotServed (404, 500)."""
        uids = self.instances_of(params) if uids is None else uids
        if not uids:
            raise _NotServed(404, "no such instance")
        try:
            return self.archive.retrieve(uids[0])
        except StorageError as exc:
            raise _failed(exc) from exc

    def rebuilt(self, uids: list[str]):
        """Yield each instance as stored (in the order the archive decodes best); the first
        that cannot be rebuilt is logged and its StorageError raised: none is skipped."""
        with self.archive.retrieval_order(uids, "DICOMweb") as (ordered, _):
            for uid in ordered:
                try:
                    inst = self.archive.retrieve_parts(uid)
                except StorageError as exc:
                    log.error("DICOMweb: instance %s not sent: %s", uid, exc)
                    raise
                yield inst

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
                return _bad_request(str(exc))
            fuzzy = request.query_params.get("fuzzymatching", "").lower() == "true"
            records = sorted(find_records(self.archive, level, criteria,
                                          matching=Matching(fuzzy=fuzzy)),
                             key=lambda r: str(r.get(_LEVEL_UID[level]) or ""))
            page = records[offset:offset + limit] if limit else records[offset:]
            base = dicomweb_base(request, self.public_url)
            warnings = []
            if ignored:
                warnings.append(f'299 voxarc "not used for matching: '
                                f'{", ".join(sorted(set(ignored)))}"')
            if offset + len(page) < len(records):       # PS3.18: say that more match
                warnings.append(f'299 {request.url.netloc}: '
                                '"There are additional results that can be requested"')
            headers = {"Warning": ", ".join(warnings)} if warnings else {}
            return _dicom_json(request, [_json_record(r, base, level) for r in page], headers)
        return endpoint

    def retrieve(self, request: Request) -> Response:
        """WADO-RS: the Part 10 files of a study, series or instance, each in its stored syntax
        unless ``Accept`` names others (service.dicomweb_accept: 406 when an instance cannot be
        sent in one). The first is rebuilt before the answer starts, so that its failure is an
        error status."""
        uids = self.instances_of(request.path_params)
        if not uids:
            return JSONResponse({"error": "nothing matches"}, status_code=404)
        try:
            allowed = accepted_syntaxes(request.headers.get("accept"))
            syntax = {uid: syntax_for(ts, allowed)
                      for uid, (_, ts) in self.archive.instance_formats(uids).items()}
        except NotAcceptable as exc:
            log.warning("WADO-RS %s: 406 (%s)", request.url.path, exc)
            return JSONResponse({"error": str(exc)}, status_code=406)
        log.info("WADO-RS %s: %d instances", request.url.path, len(uids))
        instances = self.rebuilt(uids)
        try:
            first = next(instances)
        except StorageError as exc:
            return _failed(exc).response()
        parts = (_part10(inst, syntax.get(inst.sop_uid, inst.transfer_syntax))
                 for inst in itertools.chain([first], instances))
        return _multipart(parts, "application/dicom", f"WADO-RS {request.url.path}")

    def metadata(self, request: Request) -> Response:
        """WADO-RS metadata: each instance's attributes without its pixel data, read from its
        stored header (no pixels are decoded); an error status when any cannot be read."""
        uids = self.instances_of(request.path_params)
        if not uids:
            return JSONResponse({"error": "nothing matches"}, status_code=404)
        base, raw_tags, memos = dicomweb_base(request, self.public_url), set(), {}
        out = []
        for uid in uids:
            try:
                out.append(self._metadata_of(self.archive.header(uid), base, raw_tags, memos))
            except StorageError as exc:
                log.error("DICOMweb metadata: instance %s not read: %s", uid, exc)
                return _failed(exc).response()
        headers = {}
        if raw_tags:
            headers["Warning"] = (f'299 voxarc "not convertible, sent as InlineBinary: '
                                  f'{", ".join(sorted(raw_tags))}"')
        return _dicom_json(request, out, headers)

    @staticmethod
    def _metadata_of(inst, base: str, raw_tags: set, memos: dict) -> dict:
        ds, pixels = header_dataset(inst.transfer_syntax, inst.data, inst.trailer)
        charset = ds.get_item(0x00080005)
        memo = memos.setdefault((inst.transfer_syntax, getattr(charset, "value", None)), {})
        url = (f"{base}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
               f"/instances/{inst.sop_uid}")
        links, mine = BulkLinks(url), set()
        item = json_dataset(ds, mine, memo, links)
        if mine:
            log.warning("DICOMweb metadata of %s: %s sent as InlineBinary (not convertible)",
                        inst.sop_uid, ", ".join(sorted(mine)))
            raw_tags |= mine
        if pixels is not None:
            item[f"{pixels[0]:08X}"] = pixel_reference(*pixels, inst.transfer_syntax, links)
        item["00083002"] = {"vr": "UI", "Value": [inst.transfer_syntax]}
        item["00081190"] = {"vr": "UR", "Value": [url]}
        return item

    def frames(self, request: Request) -> Response:
        """WADO-RS frames: the listed frames' pixel data as stored: raw bytes of an
        uncompressed instance, the compressed bitstream of an encapsulated one (its media type
        and transfer syntax on each part)."""
        try:
            wanted = frame_numbers(request.path_params["frames"])
            media, frames = self._frames_of(request, self.instances_of(request.path_params),
                                            wanted)
        except _NotServed as exc:
            return exc.response()
        return _multipart(((media, f) for f in frames), media.split(";")[0],
                          f"WADO-RS {request.url.path}")

    def bulkdata(self, request: Request) -> Response:
        """WADO-RS bulk data: the value of the element a metadata BulkDataURI names (see
        :mod:`service.dicom_json`) as ``application/octet-stream``; the pixel data as the
        frames resource gives all frames (one part of uncompressed words, or a part per
        compressed frame)."""
        what = f"WADO-RS {request.url.path}"
        try:
            steps = parse_path(request.path_params["path"])
            uids = self.instances_of(request.path_params)
            if steps == [0x7FE00010]:
                media, frames = self._frames_of(request, uids, None)
                parts = [(media, tuple(frames))] if media == "application/octet-stream" \
                    else ((media, f) for f in frames)
                return _multipart(parts, media.split(";")[0], what, self._url(request))
            if not octets_accepted(request.headers.get("accept")):
                raise _NotServed(406, "bulk data goes as application/octet-stream")
            value = self._element_value(uids, steps)
        except BadPath as exc:
            return _bad_request(str(exc))
        except _NotServed as exc:
            return exc.response()
        return _multipart([("application/octet-stream", value)], "application/octet-stream",
                          what, self._url(request))

    def _url(self, request: Request) -> str:
        """The request's own URL as the answers name it (Host header or ``public_url``)."""
        return dicomweb_base(request, self.public_url) + \
            request.url.path.removeprefix("/dicom-web")

    def _element_value(self, uids: list[str], steps: list[int]) -> bytes:
        """The value of a binary element of the first instance (404 when it has none there)."""
        if not uids:
            raise _NotServed(404, "no such instance")
        try:
            if steps[0] in PIXEL_TAGS:      # float pixel data: kept as received, read whole
                inst = self.archive.retrieve(uids[0])
                ds = dcmread(io.BytesIO(build_file(inst.sop_class_uid, inst.sop_uid,
                                                   inst.transfer_syntax, inst.data)))
            else:
                inst = self.archive.header(uids[0])
                ds = header_dataset(inst.transfer_syntax, inst.data, inst.trailer)[0]
        except StorageError as exc:
            raise _failed(exc) from exc
        value = element_value(ds, steps)
        if value is None:
            raise _NotServed(404, "no binary element at that path")
        return value

    def _frames_of(self, request: Request, uids: list[str], wanted: list[int] | None):
        """(media type, frames) of the first instance's frames ``wanted`` (all for None) in
        the syntax ``Accept`` asks for; raises _NotServed."""
        try:
            syntax = None
            for _, stored in self.archive.instance_formats(uids[:1]).values():
                syntax = frame_syntax(request.headers.get("accept"), stored)
            frames = self._coded_frames(uids, wanted)
            media = "application/octet-stream"
            if frames is None:                  # kept as received: taken from its bytes
                inst = self.one(request.path_params, uids)
                media, frames = frame_data(inst, wanted, syntax or inst.transfer_syntax)
            return media, frames
        except NotAcceptable as exc:
            raise _NotServed(406, str(exc)) from exc
        except StorageError as exc:
            log.error("WADO-RS %s: %s", request.url.path, exc)
            raise _failed(exc) from exc

    def _coded_frames(self, uids: list[str], wanted: list[int] | None) -> list | None:
        """The frames of a coded instance, only their slabs decoded (a viewer walking a
        multi-frame instance frame by frame does not wait for all of it each time); None when
        the instance is kept as received (or none matches); raises _NotServed."""
        if not uids:
            return None
        try:
            return self.archive.frames(uids[0], wanted)
        except ValueError as exc:
            raise _NotServed(404, str(exc)) from exc
        except StorageError as exc:
            raise _failed(exc) from exc

    def rendered(self, request: Request) -> Response:
        """WADO-RS rendered: the image (middle frame, or the path's frame) as JPEG, PNG or GIF,
        with the ``viewport``, ``window`` and ``quality`` parameters of PS3.18."""
        try:
            frame = int(request.path_params["frame"]) if "frame" in request.path_params \
                else None
        except ValueError:
            return _bad_request("the frame must be a number")
        try:
            options = _rendering(request.query_params)
        except _BadRequest as exc:
            return _bad_request(str(exc))
        return self._image(request, request.path_params, frame=frame, **options)

    def rendered_all(self, request: Request) -> Response:
        """WADO-RS rendered study or series: each image instance as :meth:`rendered` gives it
        (the same ``Accept`` and parameters), one multipart, in series then instance number
        order; instances without an image (reports, say) are left out."""
        try:
            options = _rendering(request.query_params)
            media_type = rendered_type(request.headers.get("accept"))
        except _BadRequest as exc:
            return _bad_request(str(exc))
        except NotAcceptable as exc:
            return JSONResponse({"error": str(exc)}, status_code=406)
        criteria = {kw: request.path_params[key] for key, kw in _PATH_KEYS[:2]
                    if key in request.path_params}
        records = self.archive.find("IMAGE", criteria | {"SeriesNumber": "",
                                                         "InstanceNumber": ""})
        if not records:
            return JSONResponse({"error": "no such study or series"}, status_code=404)
        records.sort(key=lambda r: (_series_order(r), r.get("SeriesInstanceUID") or "",
                                    _number(r.get("InstanceNumber"))))

        def images():
            for record in records:
                inst = self.archive.retrieve(record["SOPInstanceUID"])
                try:
                    yield media_type, render_image(inst.sop_class_uid, inst.sop_uid,
                                                   inst.transfer_syntax, inst.data,
                                                   media_type=media_type,
                                                   **({"size": 0} | options))
                except PreviewError as exc:
                    log.info("WADO-RS %s: %s left out: %s", request.url.path, inst.sop_uid, exc)
        return _multipart(images(), media_type, f"WADO-RS {request.url.path}")

    def thumbnail(self, request: Request) -> Response:
        """WADO-RS thumbnail of a study (its first series), series (its middle image) or
        instance, as a JPEG, PNG or GIF (as for :meth:`rendered`) of at most ``viewport``
        pixels (``w,h``; default 128)."""
        params = request.path_params
        try:
            size = max(int(v) for v in request.query_params.get("viewport", "128").split(","))
        except ValueError:
            return _bad_request("viewport is w,h in pixels")
        size = min(max(size, 16), 512)
        if "sop" in params:
            return self._image(request, params, size)
        try:
            media_type = rendered_type(request.headers.get("accept"))
        except NotAcceptable as exc:
            return JSONResponse({"error": str(exc)}, status_code=406)
        criteria = {kw: params[key] for key, kw in _PATH_KEYS[:2] if key in params}
        found = self.archive.find("SERIES", criteria | {"SeriesNumber": ""})
        if not found:
            return JSONResponse({"error": "no such study or series"}, status_code=404)
        try:
            image = self.previews.get(min(found, key=_series_order)["SeriesInstanceUID"], size,
                                      media_type)
        except PreviewError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except StorageError as exc:
            return _failed(exc).response()
        if image is None:                   # deleted in the meantime
            return JSONResponse({"error": "no such series"}, status_code=404)
        return Response(image, media_type=media_type)

    def wado_uri(self, request: Request) -> Response:
        """WADO-URI (PS3.18 chapter 9): ``?requestType=WADO&studyUID=&seriesUID=&objectUID=``,
        ``contentType`` application/dicom (the Part 10 file, as stored) or an image (PNG of at
        most ``rows`` x ``columns``)."""
        q = request.query_params
        if q.get("requestType") != "WADO" or not q.get("objectUID"):
            return _bad_request("requestType=WADO and objectUID are required")
        params = {"study": q.get("studyUID"), "series": q.get("seriesUID"),
                  "sop": q["objectUID"]}
        for name, key in (("studyUID", "study"), ("seriesUID", "series"), ("objectUID", "sop")):
            if params[key] and not _is_uid(params[key]):
                return _bad_request(f"{name} {params[key]!r} is not a UID")
        try:
            kind = wado_content_type(q.get("contentType", "image/jpeg"))
            size = min((n for n in (_pixels(request, "rows"), _pixels(request, "columns"))
                        if n), default=0)
        except _BadRequest as exc:
            return _bad_request(str(exc))
        if kind == "application/dicom":
            asked = q.get("transferSyntax")
            try:
                inst = self.one(params)
                syntax = syntax_for(inst.transfer_syntax, {asked} if asked else None)
            except _NotServed as exc:
                return exc.response()
            except NotAcceptable as exc:
                return JSONResponse({"error": str(exc)}, status_code=406)
            try:
                body = part10_in(inst.sop_class_uid, inst.sop_uid, inst.transfer_syntax,
                                 (inst.data,), syntax)
            except StorageError as exc:           # the conversion failed (logged there)
                log.error("WADO-URI %s: %s", inst.sop_uid, exc)
                return _failed(exc).response()
            return _Stream(iter(body), media_type="application/dicom",
                           headers={"Content-Length": str(nbytes(body))})
        if kind is None:
            return JSONResponse({"error": f"contentType {q.get('contentType')} is not offered"},
                                status_code=406)
        return self._image(request, params, size,
                           media_type=kind if kind in RENDERED else RENDERED[0])

    def _image(self, request: Request, params: dict, size: int | tuple = 0,
               frame: int | None = None, media_type: str | None = None, **options) -> Response:
        """An instance's image as ``media_type``, else as its ``Accept`` ranks the rendered
        types (``options``: :func:`service.preview.render_image`'s window and quality)."""
        try:
            media_type = media_type or rendered_type(request.headers.get("accept"))
            inst = self.one(params)
            image = render_image(inst.sop_class_uid, inst.sop_uid, inst.transfer_syntax,
                                 inst.data, size, frame, media_type, **options)
        except NotAcceptable as exc:
            return JSONResponse({"error": str(exc)}, status_code=406)
        except _NotServed as exc:
            return exc.response()
        except PreviewError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return Response(image, media_type=media_type)


def routes(archive, previews, public_url: str = "") -> list[Route]:
    """The DICOMweb routes of a node's archive (``previews``: its
    :class:`service.preview.SeriesPreviews`, shared with the admin page; ``public_url``: see
    :mod:`service.web_url`)."""
    return DicomWeb(archive, previews, public_url).routes()
