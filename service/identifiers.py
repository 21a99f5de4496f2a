"""C-FIND / C-GET / C-MOVE identifiers <-> the archive's criteria and records."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.multival import MultiValue

from storage.query import LEVELS

_NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet"}
_UNIQUE = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class IdentifierError(ValueError):
    """An identifier without a valid Query/Retrieve Level or with unreadable keys."""


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        return "\\".join(_text(v) for v in value)
    return str(value)


def parse_identifier(identifier: Dataset | None) -> tuple[str, dict[str, str]]:
    """Return ``(level, criteria)`` of a query identifier; sequences and private keys are skipped.

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
            if keyword and keyword not in _NOT_KEYS and elem.VR != "SQ":
                criteria[keyword] = _text(elem.value).strip()
    except Exception as exc:
        raise IdentifierError(f"unreadable identifier: {exc}") from exc
    if level not in LEVELS:
        raise IdentifierError(f"Query/Retrieve Level {level!r} is not one of {LEVELS}")
    return level, criteria


def retrieve_criteria(criteria: dict[str, str]) -> dict[str, str]:
    """Keep the unique keys of a C-GET/C-MOVE identifier (the keys that select instances)."""
    return {k: v for k, v in criteria.items() if k in _UNIQUE and v}


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
    if any(not str(v).isascii() for v in record.values()) and "SpecificCharacterSet" not in ds:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds
