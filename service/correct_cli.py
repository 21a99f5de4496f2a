"""`voxarc correct LEVEL UID --set KEY=VALUE...`: correct a patient (all their studies), a
study (its attributes, or its patient) or a series (its attributes, or the study it is filed
in), in the index and in every instance.

Shows what changes and asks first (``--yes`` skips the question; without a terminal to ask on,
``--yes`` is required); ``--dry-run`` only shows; ``--history`` prints the audit trail of past
corrections. Works beside a running ``voxarc serve`` on the same data folder. What it does to
the stored bytes: :mod:`storage.correction`.
"""

from __future__ import annotations

import json
import logging

from service.admin_cli import (add_trail_options, may_proceed, note_change, print_trail,
                               studies_touched)
from service.ae import open_archive
from service.config import add_node_options, settings_from_args
from storage.correction import ALLOWED, LEVELS, CorrectionError, history
from storage.errors import StorageError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add ``correct`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("correct", help="correct a patient, a study or a series in the "
                              "index and in its instances (asks first)")
    add_node_options(p)
    p.add_argument("level", nargs="?", choices=LEVELS,
                   help="patient (a Patient ID), study or series (an Instance UID)")
    p.add_argument("uid", nargs="?", help="Patient ID, Study or Series Instance UID")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="values",
                   help="a new value, repeatable; "
                   + "; ".join(f"{level}: {', '.join(keys)}" for level, keys in ALLOWED.items()))
    p.add_argument("--resend", action="store_true",
                   help="send the corrected series again to every destination that had them")
    add_trail_options(p, "correcting", "change", "corrections")
    p.set_defaults(func=correct)


def _values(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: write KEY=VALUE")
        out[key.strip()] = value
    return out


def _describe(summary: dict) -> str:
    changes = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in summary["changes"].items())
    studies = "" if summary["level"] == "series" else \
        f" of {summary['studies']} {'study' if summary['studies'] == 1 else 'studies'}"
    return f"{summary['level']} {summary['uid']}: {summary['instances']} instances{studies}; " \
        f"{changes}"


def _trail_line(row: dict) -> str:
    return (f"{row['level']} {row['uid']}: {row['instances']} instances of {row['studies']} "
            f"studies; {row['changes']}")


def correct(args) -> int:
    """Correct what the arguments name; exit 1 when it cannot be done as asked, 2 when the
    arguments are incomplete or the command cannot ask and ``--yes`` is missing."""
    try:
        values = _values(args.values)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if not args.history and (args.level is None or args.uid is None or not values):
        log.error("name a level (%s), a UID and at least one --set KEY=VALUE, or ask for "
                  "--history", ", ".join(LEVELS))
        return 2
    archive = open_archive(settings_from_args(args))
    try:
        if args.history:
            return print_trail(history(archive.index), args.json, "corrected_at", _trail_line,
                               "no corrections recorded")
        try:
            summary = archive.correction_plan(args.level, args.uid, values).summary()
        except CorrectionError as exc:
            log.error("%s", exc)
            return 1
        if args.dry_run:
            print(json.dumps({"dry_run": True, **summary}, indent=2) if args.json
                  else "would correct " + _describe(summary))
            return 0
        if not args.yes:
            print("will correct " + _describe(summary))
        go = may_proceed(args.yes, f"Rewrite these {summary['instances']} instances?",
                         "correct")
        if not go:
            if go is False:
                print("nothing changed")
            return 2 if go is None else 0
        try:
            touched = studies_touched(archive, args.level, args.uid)
            done = archive.correct(args.level, args.uid, values, args.reason, args.resend)
        except StorageError as exc:     # refused, or a commit whose outcome is unknown
            log.error("%s", exc)
            return 1
        note_change(archive, "correct", args.level, touched)
        print(json.dumps(done, indent=2) if args.json else "corrected " + _describe(done))
        if done.get("originals") and not args.json:
            print(f"the held instances' originals are kept as recycle bin entry "
                  f"{done['originals']} while on hold (voxarc deleted)")
        if args.resend and not args.json:
            print(f"{len(done['resent'])} series queued to be sent again"
                  + "".join(f"\n  {series} to {dest}" for series, dest in done["resent"])
                  + "\n(a running node sends them on its next forwarding pass; a stopped "
                  "one once it starts)")
        return 0
    finally:
        archive.close()
