"""Dates relative to today in rules: ``StudyDate=-10y`` is "on or before the day ten years ago".

Rules (retention, ``voxarc delete --matching``, forwarding) are C-FIND keys written down once and
applied for years, so an absolute date (``-20151231``) goes stale. A bound of a date key's
pattern may instead be an age: a whole number of years ``y``, months ``m``, weeks ``w`` or days
``d`` before the day the rule is applied (``0d``: today). Both bounds of a range may be ages
(``2y-1y``), or one an age and the other a date. :func:`resolve` turns the ages into dates at
each use; the rest of the pattern, and every other key, is left to C-FIND matching.
"""

from __future__ import annotations

import calendar
import re
from datetime import date, timedelta

from pydicom.datadict import dictionary_VR

_AGE = re.compile(r"^(\d{1,4})([ymwd])$")


def is_date_key(keyword: str) -> bool:
    """Whether C-FIND matches ``keyword`` as a date (VR DA)."""
    try:
        return dictionary_VR(keyword) == "DA"
    except (KeyError, ValueError):      # not a DICOM keyword: voxarc's own rule keys
        return False


def days_ago(age: str, today: date) -> date:
    """The day ``age`` (``10y``, ``6m``, ``2w``, ``30d``) before ``today``; a day of the month
    the target month lacks becomes its last (29 February, 31st)."""
    match = _AGE.match(age)
    if not match:
        raise ValueError(f"{age!r} is not an age such as 10y, 6m, 2w or 30d")
    n, unit = int(match[1]), match[2]
    if unit in "wd":
        return today - timedelta(days=n * (7 if unit == "w" else 1))
    months = today.year * 12 + today.month - 1 - (n * 12 if unit == "y" else n)
    year, month = divmod(months, 12)
    if year < 1:
        raise ValueError(f"{age!r} reaches before the year 1")
    month += 1
    return date(year, month, min(today.day, calendar.monthrange(year, month)[1]))


def _bound(text: str, today: date) -> str:
    text = text.strip()
    return days_ago(text, today).strftime("%Y%m%d") if text[-1:].isalpha() else text


def resolve(criteria: dict[str, str], today: date) -> dict[str, str]:
    """``criteria`` with the ages in its date keys' patterns made dates as of ``today``.

    Raises
    ------
    ValueError
        On a date key's bound that ends in a letter but is not an age.
    """
    out = dict(criteria)
    for keyword, pattern in criteria.items():
        if not (is_date_key(keyword) and any(c.isalpha() for c in pattern)):
            continue
        if "\\" in pattern:
            raise ValueError(f"{keyword}={pattern!r}: ages go in a single value or a range, "
                             "not a list")
        low, dash, high = pattern.partition("-")
        try:
            out[keyword] = _bound(low, today) + dash + _bound(high, today) if dash \
                else _bound(low, today)
        except ValueError as exc:
            raise ValueError(f"{keyword}={pattern!r}: {exc}") from None
    return out
