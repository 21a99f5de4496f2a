"""`voxarc delete LEVEL UID...`: remove patients, studies, series or instances.

The deleted instances stay restorable in the recycle bin for ``deleted_keep_days`` (``voxarc
deleted``); ``--no-keep`` deletes for good at once. Shows what each deletion removes and asks
before doing it (``--yes`` skips the question; without
a terminal to ask on, ``--yes`` is required). ``--dry-run`` only shows. ``--history`` prints the
audit trail of past deletions. Works beside a running ``voxarc serve`` on the same data folder.

``--matching "StudyDate=-20151231; Modality=CR"`` names what to delete by C-FIND keys instead of
UIDs (a retention period run out, say): a record without a value for one of the keys is never
selected, so a study with no date is not deleted for being old.
"""

from __future__ import annotations

import json
import logging
from datetime import date

from service.admin_cli import add_trail_options, delete_noted, may_proceed, print_trail
from service.ae import open_archive
from service.config import add_node_options, settings_from_args
from service.progress import Progress
from storage import holds, retention
from storage.deletion import LEVELS, history
from storage.errors import StorageError

log = logging.getLogger(__name__)
_WHAT = {"patient": "Patient ID", "study": "Study Instance UID", "series": "Series Instance UID",
         "instance": "SOP Instance UID"}


def register(subparsers) -> None:
    """Add ``delete`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("delete", help="remove patients, studies, series or instances "
                              "(asks first; restorable for deleted_keep_days)")
    add_node_options(p)
    p.add_argument("level", nargs="?", choices=LEVELS, help="what the UIDs name")
    p.add_argument("uids", nargs="*", metavar="UID",
                   help="Patient IDs, Study, Series or SOP Instance UIDs")
    p.add_argument("--matching", metavar="RULE",
                   help="select what to delete by C-FIND keys at the level instead of UIDs: "
                        "\"StudyDate=-20151231; PatientBirthDate=-19971231\" (the forward "
                        "rules' syntax; a record lacking a key's value is not selected)")
    p.add_argument("--no-keep", action="store_true",
                   help="delete for good at once, not through the recycle bin (when the disk "
                        "has no room for the copies, say)")
    add_trail_options(p, "deleting", "be removed", "deletions")
    p.set_defaults(func=delete)


def matching_uids(archive, level: str, rule: str) -> list[str]:
    """The UIDs (Patient IDs) at ``level`` of the records matching the C-FIND keys of ``rule``
    (``Keyword=pattern; ...``, keys of the level or above; ages in date keys as of today) that
    hold a value for every key.

    Raises
    ------
    ValueError
        A malformed rule, a key below the level, or a rule that would select everything (no
        key with a value).
    """
    criteria = retention.parse_criteria(level, rule, "--matching")
    return retention.matching_uids(archive, level, criteria, date.today())


def describe(summary: dict) -> str:
    """One line for a deletion's summary (a plan's or a done one's)."""
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
    if not args.history and (args.level is None or bool(args.uids) == bool(args.matching)):
        log.error("name a level (%s) and at least one UID or --matching RULE (not both), or "
                  "ask for --history", ", ".join(LEVELS))
        return 2
    archive = open_archive(settings_from_args(args))
    try:
        if args.history:
            return print_trail(history(archive.index), args.json, "deleted_at", describe,
                               "no deletions recorded")
        uids = args.uids
        if args.matching:
            try:
                uids = matching_uids(archive, args.level, args.matching)
            except ValueError as exc:
                log.error("%s", exc)
                return 2
            log.info("--matching %r: %d %s records", args.matching, len(uids), args.level)
        plans = [archive.deletion_plan(args.level, uid) for uid in uids]
        missing = [p.uid for p in plans if not p.found]
        for uid in missing:
            log.error("no %s %s in the archive", _WHAT[args.level], uid)
        plans = [p for p in plans if p.found]
        on_hold = {p.uid: found for p in plans
                   if (found := holds.touching(archive.index, p.series_ids))}
        for uid, found in on_hold.items():
            log.error("%s %s is not deleted: %s", args.level, uid, found[0].describe())
        plans = [p for p in plans if p.uid not in on_hold]
        if not args.json:
            for p in plans:
                print(("would delete " if args.dry_run else "") + describe(p.summary()))
            if args.matching:
                print(f"{len(plans)} {args.level} records match; "
                      f"{sum(len(p.instances) for p in plans)} instances, "
                      f"{sum(p.summary()['freed_bytes'] for p in plans) / 1e6:.2f} MB"
                      if plans else f"nothing matches {args.matching!r}")
        if args.dry_run or not plans:
            if args.json:
                print(json.dumps({"dry_run": True, "plans": [p.summary() for p in plans],
                                  "not_found": missing, "on_hold": sorted(on_hold)}, indent=2))
            return 1 if missing or on_hold else 0
        keep = archive.recycle.enabled and not args.no_keep
        how = f"(restorable for {archive.recycle.keep_days:g} days)" if keep else "for good"
        go = may_proceed(args.yes, f"Delete these {sum(len(p.instances) for p in plans)} "
                         f"instances {how}?", "delete")
        if not go:
            if go is False:
                print("nothing deleted")
            return 2 if go is None else 0
        done, failed = [], 0
        progress = Progress("delete", len(plans))
        for p in plans:
            try:
                done.append(delete_noted(archive, p.level, p.uid, args.reason, keep))
            except StorageError as exc:
                failed += 1
                log.error("%s %s not deleted: %s", p.level, p.uid, exc)
            progress.advance(note=p.uid)
        progress.finish()
        if args.json:
            print(json.dumps({"deleted": done, "not_found": missing, "failed": failed,
                              "on_hold": sorted(on_hold)}, indent=2))
        else:
            for summary in done:
                print("deleted " + describe(summary))
            kept = [d["kept_as"] for d in done if d.get("kept_as")]
            if kept:
                print(f"restorable until the recycle bin's entries expire: voxarc deleted "
                      f"restore {' '.join(kept)}")
        return 1 if missing or failed or on_hold else 0
    finally:
        archive.close()
