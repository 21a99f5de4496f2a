"""DICOMweb content negotiation: which transfer syntaxes a client's ``Accept`` header allows for
instances, and in which of them an instance goes out.

The node sends every instance in the syntax it was received in. A client that names no syntax
(no ``transfer-syntax`` parameter, ``transfer-syntax=*``, ``*/*`` or no ``Accept``) gets exactly
that. A client that names syntaxes explicitly gets one of them or a 406 (PS3.18 8.7.3.5): the
stored one when named, else Explicit (or Implicit) VR Little Endian when named and the instance
converts to it losslessly (storage.transcode: re-encoded, and decompressed when received in a
lossless compressed syntax). Frames go out as stored or, from a lossless compressed syntax,
decoded to uncompressed bytes when only uncompressed syntaxes are named. Rendered images go out
as JPEG, PNG or GIF, as the client ranks them (JPEG when any will do).
"""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from storage import transcode
from storage.part10 import file_head

NATIVE_LE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}   # frames: the same pixel bytes
RENDERED = ("image/jpeg", "image/png", "image/gif")   # PS3.18: JPEG the default, all required
# PS3.18's default transfer syntax of each media type of frames (bulk data of pixels)
FRAME_DEFAULT_SYNTAX = {
    "application/octet-stream": ExplicitVRLittleEndian, "image/jpeg": "1.2.840.10008.1.2.4.50",
    "image/jls": "1.2.840.10008.1.2.4.80", "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jphc": "1.2.840.10008.1.2.4.201", "image/x-dicom-rle": "1.2.840.10008.1.2.5",
}


class NotAcceptable(ValueError):
    """The client's Accept header allows no syntax the node can send an instance in."""


def _params(entry: str) -> tuple[str, dict]:
    kind, *rest = [p.strip() for p in entry.split(";")]
    params = {}
    for item in rest:
        name, _, value = item.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return kind.lower(), params


def _offered(accept: str | None):
    """(media type, parameters) of each entry of ``accept`` with q > 0 (an unreadable q
    refuses its entry)."""
    for entry in (accept or "").split(","):
        kind, params = _params(entry)
        try:
            if kind and float(params.get("q", "1")) > 0:
                yield kind, params
        except ValueError:
            continue


def accepted_syntaxes(accept: str | None, part_type: str = "application/dicom"
                      ) -> set[str] | None:
    """The transfer syntaxes ``accept`` allows for parts of ``part_type``; None when it allows
    any (no syntax named, ``*``, a wildcard type, or no header).

    Raises
    ------
    NotAcceptable
        Every entry (with q > 0) asks for another media type.
    """
    if not accept or not accept.strip():
        return None
    named: set[str] = set()
    offered = False
    for kind, params in _offered(accept):
        inner = params.get("type", "").lower()
        if kind in ("*/*", "multipart/*") or (kind == "multipart/related" and not inner):
            return None
        if part_type not in (kind, inner):
            continue
        offered = True
        syntax = params.get("transfer-syntax", "")
        if syntax in ("", "*"):
            return None
        named.add(syntax)
    if not offered:
        raise NotAcceptable(f"the Accept header offers no {part_type}")
    return named


def octets_accepted(accept: str | None) -> bool:
    """Whether ``accept`` takes bulk data as ``application/octet-stream`` (itself, in a
    multipart, or by a wildcard; no header takes anything)."""
    if not accept or not accept.strip():
        return True
    for kind, params in _offered(accept):
        inner = params.get("type", "").lower() if kind == "multipart/related" else kind
        if inner in ("", "*/*", "application/*", "application/octet-stream") \
                or kind in ("*/*", "multipart/*"):
            return True
    return False


def rendered_type(accept: str | None) -> str:
    """The media type of :data:`RENDERED` an image goes out as under ``accept``: the one the
    client ranks first (by q-value, then order); JPEG, the default of PS3.18, where any image
    will do (``image/*``, ``*/*``, no header).

    Raises
    ------
    NotAcceptable
        The header offers none of them (only JPEG 2000, say).
    """
    if not accept or not accept.strip():
        return RENDERED[0]
    ranked = sorted((-float(params.get("q", "1")), order, kind)
                    for order, (kind, params) in enumerate(_offered(accept)))
    for _, _, kind in ranked:
        if kind in RENDERED:
            return kind
        if kind in ("image/*", "*/*"):
            return RENDERED[0]
    raise NotAcceptable(f"rendered images are {', '.join(RENDERED)}; asked for {accept}")


def frame_syntax(accept: str | None, stored: str) -> str:
    """The syntax frames of an instance stored in ``stored`` go out in under ``accept``: as
    stored when the client takes any (``transfer-syntax=*``, a wildcard, no media type, no
    header) or names the stored one (an uncompressed little-endian one standing for the other:
    their frames are the same bytes); else an uncompressed one it takes, when the stored syntax
    is lossless compressed and decodable here (storage.transcode). A media type named without a
    ``transfer-syntax`` stands for its default syntax (PS3.18: Explicit VR Little Endian for
    ``application/octet-stream``, JPEG-LS lossless for ``image/jls``, ...), so a client asking
    for octets never gets a bitstream it would take for pixels.

    Raises
    ------
    NotAcceptable
    """
    named = set()
    for kind, params in _offered(accept):
        media = params.get("type", "").lower() if kind == "multipart/related" else kind
        syntax = params.get("transfer-syntax", "")
        if syntax == "*" or kind in ("*/*", "multipart/*") or not media:
            return stored
        named.add(syntax or FRAME_DEFAULT_SYNTAX.get(media, ""))
    named.discard("")
    if not named or stored in named or (stored in NATIVE_LE and named & NATIVE_LE):
        return stored
    chosen = transcode.choose(stored, named & NATIVE_LE)
    if chosen is None:
        raise NotAcceptable(f"frames are stored in {stored}; asked for "
                            f"{', '.join(sorted(named))} (frames of lossy syntaxes are not "
                            "decompressed, nothing is compressed)")
    return chosen


def syntax_for(stored: str, allowed: set[str] | None) -> str:
    """The syntax an instance stored in ``stored`` goes out in under ``allowed``.

    Raises
    ------
    NotAcceptable
        It cannot be sent in any allowed syntax.
    """
    if allowed is None:
        return stored
    chosen = transcode.choose(stored, allowed)
    if chosen is None:
        raise NotAcceptable(f"stored in {stored}; asked for {', '.join(sorted(allowed))} "
                            "(lossy syntaxes are not decompressed, nothing is compressed)")
    return chosen


def part10_in(sop_class_uid: str, sop_uid: str, stored: str, parts: tuple, syntax: str
              ) -> tuple:
    """The Part 10 file of a dataset received in ``stored`` (its bytes in consecutive
    ``parts``), in ``syntax`` (one that :func:`syntax_for` chose), in parts too: the file's
    head, then the dataset's (joined only when it is converted).

    Raises
    ------
    storage.transcode.TranscodeError
        The conversion failed (or did not read back the same).
    """
    if syntax != stored:
        parts = (transcode.convert(b"".join(parts), stored, syntax),)
    return (file_head(sop_class_uid, sop_uid, syntax), *parts)
