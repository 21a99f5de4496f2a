"""C-FIND / C-GET / C-MOVE identifiers <-> the archive's criteria and records."""

from __future__ import annotations

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.multival import MultiValue

from storage.query import LEVELS, Matching, matches

_NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet"}
#: the unique key of each Query/Retrieve level, in LEVELS order
UNIQUE_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class IdentifierError(ValueError):
    """An identifier without a valid Query/Retrieve Level or with unreadable keys."""


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        return "\\".join(_text(v) for v in value)
    return str(value)


def parse_identifier(identifier: Dataset | None) -> tuple[str, dict[str, str]]:
    """Return ``(level, criteria)`` of a query identifier; sequences, private keys and keys of
    repeating groups (overlays, curves) are skipped. A PATIENT level under the Study Root
    model is taken as it comes (as a patient-level query), not refused.

    Raises
    ------
    IdentifierError
    """
    if identifier is None:
        raise IdentifierError("no identifier")
    try:
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        criteria = {}
        for elem in identifier:
            keyword = keyword_for_tag(elem.tag)
            if keyword and keyword not in _NOT_KEYS and elem.VR != "SQ" and known_keyword(keyword):
                criteria[keyword] = _text(elem.value).strip()
    except Exception as exc:
        raise IdentifierError(f"unreadable identifier: {exc}") from exc
    if level not in LEVELS:
        raise IdentifierError(f"Query/Retrieve Level {level!r} is not one of {LEVELS}")
    return level, criteria


def find_records(archive, level: str, criteria: dict[str, str], ae_title: str | None = None,
                 *, matching: Matching = Matching()) -> list[dict]:
    """The archive's records of ``level`` matching ``criteria``, with the keys the node answers
    itself, the same for every record: Retrieve AE Title (its own, where a C-MOVE or C-GET
    finds the instances) and Instance Availability (ONLINE: every instance is on its disks).
    None matches when a value asked for of those keys rules every record out. Without
    ``ae_title`` (DICOMweb) Retrieve AE Title is left to the index, which does not keep it;
    ``matching``: see :func:`storage.query.find`."""
    own = {"InstanceAvailability": "ONLINE"}
    if ae_title is not None:
        own["RetrieveAETitle"] = ae_title
    rest, fixed = dict(criteria), {}
    for keyword, value in own.items():
        if keyword in rest:
            pattern = rest.pop(keyword)
            if pattern and not matches(value, pattern, keyword):
                return []
            fixed[keyword] = value
    return [record | fixed for record in archive.find(level, rest, matching)]


def known_keyword(keyword: str) -> bool:
    """Whether ``keyword`` names one element (a repeating group's names several)."""
    try:
        dictionary_VR(keyword)
    except (KeyError, ValueError):
        return False
    return True


def retrieve_criteria(level: str, criteria: dict[str, str]) -> dict[str, str]:
    """The unique keys of a C-GET/C-MOVE identifier at ``level`` (PS3.4 C.4.2.2.1): the
    level's own key is required, keys of the levels above narrow it, none may hold a wildcard
    (``*`` would otherwise send the whole archive), and a key of a level below is refused.

    Raises
    ------
    IdentifierError
    """
    depth = LEVELS.index(level)
    keys = {k: v for k, v in criteria.items() if k in UNIQUE_KEYS and v}
    if not keys.get(UNIQUE_KEYS[depth]):
        raise IdentifierError(f"a {level} level retrieve needs a {UNIQUE_KEYS[depth]}")
    for key, value in keys.items():
        if "*" in value or "?" in value:
            raise IdentifierError(f"{key} {value!r}: a retrieve takes UIDs, not wildcards")
        if UNIQUE_KEYS.index(key) > depth:
            raise IdentifierError(f"{key} is below the {level} level of the retrieve")
    return keys


def response(level: str, criteria: dict[str, str], record: dict, charset=None) -> Dataset:
    """Build a C-FIND response: every requested key, filled from the matching record."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword in criteria:
        value = record.get(keyword)
        vr = dictionary_VR(keyword)
        if value is None:
            value = ""
        elif isinstance(value, list):
            value = [str(v) for v in value]
        elif vr in ("IS", "US", "UL", "SS", "SL"):
            value = int(value) if vr != "IS" else str(value)
        else:
            value = str(value)
        setattr(ds, keyword, value)
    if any(not str(v).isascii() for v in record.values()) and not _holds(charset, record):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _holds(charset, record: dict) -> bool:
    """Whether the query's single-valued character set can encode every value of ``record``
    (else the answer is in UTF-8: a name the query's set cannot hold would go as ``????``)."""
    if not charset or isinstance(charset, (list, MultiValue)):
        return bool(charset)       # code extensions (ISO 2022): pydicom switches as it must
    codec = python_encoding.get(str(charset).strip())
    if codec is None:
        return False
    try:
        for value in record.values():
            _text(value).encode(codec)
    except UnicodeEncodeError:
        return False
    return True
