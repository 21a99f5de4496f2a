"""HL7 v2 messages as the node's listener takes them: bytes decoded in the character set the
message names, its header read, fields split into their parts, and the original-mode
acknowledgement made (python-hl7 parses; :mod:`service.hl7_adt` and :mod:`service.hl7_prefetch`
read what the messages ask).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import hl7

#: MSH-18 character sets -> Python codecs
CHARSETS = {"": "ascii", "ASCII": "ascii", "8859/1": "latin-1", "8859/2": "iso8859-2",
            "8859/5": "iso8859-5", "8859/7": "iso8859-7", "8859/9": "iso8859-9",
            "8859/15": "iso8859-15", "UNICODE UTF-8": "utf-8"}


class Hl7Error(ValueError):
    """A message the node does not take (``code`` "AR") or cannot apply ("AE")."""

    def __init__(self, code: str, text: str):
        super().__init__(text)
        self.code = code


@dataclass(frozen=True)
class Header:
    """What MSH says of a message: type, trigger event, control ID, sending application."""

    kind: str
    event: str
    control_id: str
    sender: str


def header(msg: hl7.Message) -> Header:
    """The message's MSH-9 (type and event), MSH-10 and MSH-3@MSH-4."""
    sender = "@".join(filter(None, (get(msg, "MSH.F3.R1.C1"), get(msg, "MSH.F4.R1.C1"))))
    return Header(get(msg, "MSH.F9.R1.C1"), get(msg, "MSH.F9.R1.C2"), get(msg, "MSH.F10"),
                  sender or "?")


def decode(block: bytes, default: str = "") -> hl7.Message:
    """Parse one MLLP block, in the character set its MSH-18 names (when it names none,
    ``default``, itself named as in MSH-18: ASCII when empty).

    Raises
    ------
    Hl7Error
        "AR": not an HL7 message, or bytes its character set cannot hold.
    """
    if not block.startswith(b"MSH") or len(block) < 8:
        raise Hl7Error("AR", "not an HL7 v2 message (no MSH segment first)")
    fields = block.split(b"\r", 1)[0].split(block[3:4])
    name = fields[17].decode("ascii", "replace").split(block[4:5].decode("ascii", "replace"))[0]\
        .strip() if len(fields) > 17 else ""
    name = name or default.strip()
    encoding = CHARSETS.get(name.upper())
    if encoding is None:
        raise Hl7Error("AR", f"character set {name!r} (MSH-18) is not supported")
    try:
        text = block.decode(encoding)
    except UnicodeDecodeError as exc:
        raise Hl7Error("AR", f"the message is not {name or 'ASCII'} (MSH-18, hl7_charset): "
                             f"{exc}") from None
    try:
        return hl7.parse(text.replace("\n", "\r").replace("\r\r", "\r"))
    except Exception as exc:                  # the parser's own errors are of many kinds
        raise Hl7Error("AR", f"not an HL7 v2 message: {exc}") from None


def get(msg, path: str) -> str:
    try:
        return str(msg[path]).strip()
    except (IndexError, KeyError):
        return ""


def segments(msg, name: str) -> list:
    try:
        return list(msg.segments(name))
    except KeyError:
        return []


def reps(msg, segment, number: int) -> list[list[str]]:
    """Field ``number`` of ``segment``: its repetitions, each a list of its components (the
    first subcomponent of each), unescaped."""
    if len(segment) <= number:
        return []
    _, _, rep_sep, comp_sep, sub_sep = msg.separators[:5]
    return [[msg.unescape(c.split(sub_sep)[0]).strip() for c in rep.split(comp_sep)]
            for rep in str(segment(number)).split(rep_sep)]


def text(msg, segment, number: int) -> str | None:
    """Field ``number`` as one value (its first component), None when empty; HL7's ``""``
    (clear the value) is kept as it is."""
    found = reps(msg, segment, number)
    return found[0][0] if found and found[0][0] else None


def identifier(msg, segment, number: int, authority: str) -> str:
    """The identifier of the CX list in ``segment``'s field ``number`` issued by
    ``authority`` (empty: the first)."""
    for cx in reps(msg, segment, number):
        issuer = cx[3] if len(cx) > 3 else ""
        if cx[0] and (not authority or issuer == authority):
            return cx[0]
    raise Hl7Error("AE", f"no patient identifier in {segment[0]}-{number}" +
                   (f" issued by {authority!r} (hl7_patient_id_authority)" if authority else ""))


def ack(msg: hl7.Message | None, code: str, text: str = "") -> bytes:
    """The original-mode acknowledgement of ``msg`` (AA, AE or AR, with ``text`` in MSA-3);
    a minimal one when the message could not be parsed."""
    text = re.sub(r"[|^~\\&\r\n]", " ", text)[:200]
    if msg is None:
        body = f"MSH|^~\\&|VOXARC||||||ACK|||2.5\rMSA|{code}||{text}\r"
    else:
        try:
            out = msg.create_ack(code)
        except Exception:        # a header too broken to answer in kind
            return ack(None, code, text)
        body = str(out).rstrip("\r") + (f"|{text}" if text else "") + "\r"
    return body.encode("ascii", "replace")
