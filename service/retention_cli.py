"""`voxarc retention`: what the node's retention rules select now, and applying them at once.

Without ``--run`` it only shows, rule by rule, the records each would delete (and those held
back for ``retention_grace_days``), the last run and when the next is due: the look to take
before a new rule's first night. ``--run`` applies them now (asks first; ``--yes`` from cron),
through the recycle bin, as the running node does in the hour ``retention_hour``. Works beside
a running ``voxarc serve`` on the same data folder.
"""

from __future__ import annotations

import getpass
import json
import logging
import time
from datetime import datetime

from service.admin_cli import may_proceed
from service.ae import open_archive
from service.config import add_node_options, settings_from_args
from service.delete_cli import describe
from service.progress import Progress
from service.retention import delete_selected, last_run, record_run, rules_of, select_all

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add ``retention`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("retention", help="show what the retention rules select now; "
                              "--run applies them at once")
    add_node_options(p)
    p.add_argument("--run", action="store_true",
                   help="delete what the rules select now (restorable for deleted_keep_days)")
    p.add_argument("--no-keep", action="store_true",
                   help="with --run: delete for good at once, not through the recycle bin (a "
                        "first clean-up larger than the disk's room for the bin's copies)")
    p.add_argument("--yes", action="store_true", help="do not ask before deleting")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=retention)


def retention(args) -> int:
    """Show or apply the rules; exit 1 when a deletion failed, 2 when there are no rules or the
    command cannot ask and ``--yes`` is missing."""
    settings = settings_from_args(args)
    if not settings.retention:
        log.error("no retention rules in the settings ([retention] NAME = \"LEVEL: "
                  "Keyword=pattern; ...\", docs/configuration.md)")
        return 2
    archive = open_archive(settings)
    try:
        started = time.time()
        selections = select_all(archive, rules_of(settings), settings.retention_grace_days,
                                started)
        plans = _plans(archive, selections)
        if not args.run:
            return _show(archive, settings, selections, plans, args.json)
        count = sum(len(p.instances) for p in plans.values())
        if not count:
            print("the retention rules select nothing now")
            record_run(archive, started, _actor(), selections)
            return 0
        for s in selections:
            for uid in s.uids:
                print(f"{s.rule.name}: deletes " + describe(plans[s.rule.name, uid].summary()))
        keep = archive.recycle.enabled and not args.no_keep
        how = f"(restorable for {archive.recycle.keep_days:g} days)" if keep else "for good"
        go = may_proceed(args.yes, f"Delete these {count} instances {how}?", "delete")
        if not go:
            if go is False:
                print("nothing deleted")
            return 2 if go is None else 0
        progress = Progress("retention", len(plans))
        for s in selections:
            delete_selected(archive, s, _actor(), progress, keep)
        progress.finish()
        record_run(archive, started, _actor(), selections)
        if args.json:
            print(json.dumps([s.summary() for s in selections], indent=2))
        else:
            for s in selections:
                print(_outcome(s.summary()))
        return 1 if any(s.failed for s in selections) else 0
    finally:
        archive.close()


def _plans(archive, selections) -> dict:
    """What deleting each selected record removes (rule name, UID) -> DeletionPlan; with
    progress, as a first run can select tens of thousands (20,000 studies: about 50 s)."""
    progress = Progress("retention plan", sum(len(s.uids) for s in selections))
    plans = {}
    for s in selections:
        for uid in s.uids:
            plans[s.rule.name, uid] = archive.deletion_plan(s.rule.level, uid)
            progress.advance(note=uid)
    progress.finish()
    return plans


def _actor() -> str:
    return f"cli retention ({getpass.getuser()})"


def _show(archive, settings, selections, plans, as_json: bool) -> int:
    last = last_run(archive)
    rows = []
    for s in selections:
        mine = [plans[s.rule.name, uid] for uid in s.uids]
        rows.append({**s.summary(), "instances": sum(len(p.instances) for p in mine),
                     "bytes": sum(p.freed_bytes for p in mine),
                     "records": [p.summary() for p in mine]})
    if as_json:
        print(json.dumps({"rules": rows, "last_run": last, "hour": settings.retention_hour,
                          "grace_days": settings.retention_grace_days}, indent=2))
        return 0
    for row, s in zip(rows, selections):
        print(f"{row['rule']}: {row['text']}")
        print(f"  selects {row['selected']} {s.rule.level} records now: {row['instances']} "
              f"instances, {row['bytes'] / 1e6:.2f} MB stored"
              + (f"; {row['held_back']} more held back (received within "
                 f"{settings.retention_grace_days:g} days)" if row["held_back"] else "")
              + (f"; {row['on_hold']} on legal hold, passed over" if row["on_hold"] else ""))
        for record in row["records"]:
            print("    " + describe(record))
    hour = settings.retention_hour
    print("applied by the running node " + (f"daily in the hour {hour:02d}:00-{hour:02d}:59"
                                            if hour >= 0 else "never (retention_hour -1)"))
    if last:
        when = datetime.fromtimestamp(last["started"]).strftime("%Y-%m-%d %H:%M")
        print(f"last run {when} by {last['by']}: " + ("; ".join(
            _outcome(r) for r in last.get("rules", [])) or last.get("error", "nothing")))
    return 0


def _outcome(summary: dict) -> str:
    text = (f"{summary['rule']}: deleted {summary['deleted']} records, "
            f"{summary['deleted_instances']} instances, {summary['freed_bytes'] / 1e6:.2f} MB")
    if summary["failed"]:
        text += f", {len(summary['failed'])} failed"
    if summary["held_back"]:
        text += f", {summary['held_back']} held back"
    if summary.get("on_hold"):
        text += f", {summary['on_hold']} on hold"
    return text
