"""`voxarc delete LEVEL UID...`: remove patients, studies, series or instances for good.

Shows what each deletion removes and asks before doing it (``--yes`` skips the question; without
a terminal to ask on, ``--yes`` is required). ``--dry-run`` only shows. ``--history`` prints the
audit trail of past deletions. Works beside a running ``voxarc serve`` on the same data folder.
"""

from __future__ import annotations

import json
import logging

from service.admin_cli import (add_trail_options, may_proceed, note_change, print_trail,
                               studies_touched)
from service.ae import open_archive
from service.config import add_node_options, settings_from_args
from storage.deletion import LEVELS, history
from storage.errors import StorageError

log = logging.getLogger(__name__)
_WHAT = {"patient": "Patient ID", "study": "Study Instance UID", "series": "Series Instance UID",
         "instance": "SOP Instance UID"}


def register(subparsers) -> None:
    """Add ``delete`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("delete", help="remove patients, studies, series or instances "
                              "for good (asks first)")
    add_node_options(p)
    p.add_argument("level", nargs="?", choices=LEVELS, help="what the UIDs name")
    p.add_argument("uids", nargs="*", metavar="UID",
                   help="Patient IDs, Study, Series or SOP Instance UIDs")
    add_trail_options(p, "deleting", "be removed", "deletions")
    p.set_defaults(func=delete)


def _describe(summary: dict) -> str:
    parts = [f"{summary['instances']} instances"]
    for name in ("series", "studies", "patients"):
        if summary[name]:
            parts.append(f"{summary[name]} {name}")
    text = f"{summary['level']} {summary['uid']}: " + ", ".join(parts)
    text += f"; frees {summary['freed_bytes'] / 1e6:.2f} MB"
    if summary["restaged"]:
        text += f"; {summary['restaged']} instances that stay are staged again"
        if "restaged_bytes" in summary:      # a plan's; the audit trail does not keep it
            text += (f" ({summary['restaged_bytes'] / 1e6:.2f} MB as received, until "
                     "compaction codes them anew without the deleted ones)")
    return text


def delete(args) -> int:
    """Delete what the arguments name; exit 1 when a UID matched nothing or a deletion failed,
    2 when the command cannot ask and ``--yes`` is missing."""
    if not args.history and (args.level is None or not args.uids):
        log.error("name a level (%s) and at least one UID, or ask for --history",
                  ", ".join(LEVELS))
        return 2
    archive = open_archive(settings_from_args(args))
    try:
        if args.history:
            return print_trail(history(archive.index), args.json, "deleted_at", _describe,
                               "no deletions recorded")
        plans = [archive.deletion_plan(args.level, uid) for uid in args.uids]
        missing = [p.uid for p in plans if not p.found]
        for uid in missing:
            log.error("no %s %s in the archive", _WHAT[args.level], uid)
        plans = [p for p in plans if p.found]
        if not args.json:
            for p in plans:
                print(("would delete " if args.dry_run else "") + _describe(p.summary()))
        if args.dry_run or not plans:
            if args.json:
                print(json.dumps({"dry_run": True, "plans": [p.summary() for p in plans],
                                  "not_found": missing}, indent=2))
            return 1 if missing else 0
        go = may_proceed(args.yes, f"Delete these {sum(len(p.instances) for p in plans)} "
                         "instances for good?", "delete")
        if not go:
            if go is False:
                print("nothing deleted")
            return 2 if go is None else 0
        done, failed = [], 0
        for p in plans:
            try:
                touched = studies_touched(archive, p.level, p.uid)
                done.append(archive.delete(p.level, p.uid, args.reason))
                note_change(archive, "delete", p.level, touched)
            except StorageError as exc:
                failed += 1
                log.error("%s %s not deleted: %s", p.level, p.uid, exc)
        if args.json:
            print(json.dumps({"deleted": done, "not_found": missing, "failed": failed},
                             indent=2))
        else:
            for summary in done:
                print("deleted " + _describe(summary))
        return 1 if missing or failed else 0
    finally:
        archive.close()
