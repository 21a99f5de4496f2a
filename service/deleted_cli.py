"""`voxarc deleted`: the recycle bin of deleted instances (see :mod:`storage.recycle_bin`).

``voxarc deleted`` lists its entries (one per deletion: what, why, when it expires),
``voxarc deleted restore ENTRY...`` stores an entry's instances again byte for byte (the
running node compacts them as any new ones), ``voxarc deleted empty`` removes every entry for
good (asks first; ``--expired``: only those past ``deleted_keep_days``). Works beside a running
``voxarc serve`` on the same data folder.
"""

from __future__ import annotations

import getpass
import json
import logging
import time

from service.admin_cli import may_proceed
from service.ae import open_archive
from service.config import add_node_options, settings_from_args
from service.progress import Progress
from storage.errors import StorageError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add ``deleted`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("deleted", help="list, restore or empty the recycle bin of "
                              "deleted instances")
    add_node_options(p)
    p.add_argument("action", nargs="?", default="list", choices=("list", "restore", "empty"))
    p.add_argument("entries", nargs="*", metavar="ENTRY", help="entries to restore")
    p.add_argument("--expired", action="store_true",
                   help="empty: only the entries older than deleted_keep_days")
    p.add_argument("--yes", action="store_true", help="do not ask before emptying")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=deleted)


def deleted(args) -> int:
    """Run the action; exit 1 when an entry is unknown or an instance failed to come back, 2
    for a wrong use."""
    if (args.action == "restore") != bool(args.entries):
        log.error("name the entries to restore (and only to restore): voxarc deleted restore "
                  "ENTRY...")
        return 2
    archive = open_archive(settings_from_args(args))
    try:
        if args.action == "restore":
            return _restore(archive, args)
        if args.action == "empty":
            return _empty(archive, args)
        return _list(archive, args.json)
    finally:
        archive.close()


def _list(archive, as_json: bool) -> int:
    rows = archive.recycle.summaries()
    if as_json:
        print(json.dumps({"keep_days": archive.recycle.keep_days, "entries": rows}, indent=1))
        return 0
    if not rows:
        print("the recycle bin is empty" + ("" if archive.recycle.enabled else
                                            " (off: deleted_keep_days = 0)"))
        return 0
    width = max(len("entry"), *(len(r["entry"]) for r in rows)) + 2
    print(f"{'entry':<{width}}{'deleted (UTC)':<18}{'instances':>10}{'MB':>9}  {'expires':<11}what")
    for r in rows:
        expires = "while held" if r["held"] else \
            _day(r["expires_at"]) if r["expires_at"] else "when emptied"
        patients = ", ".join(r["patients"][:3]) + (" ..." if len(r["patients"]) > 3 else "")
        print(f"{r['entry']:<{width}}{_minute(r['deleted_at']):<18}{r['instances']:>10}"
              f"{r['bytes'] / 1e6:>9.1f}  {expires:<11}{r['level']} {r['uid']} "
              f"(patient {patients}){': ' + r['reason'] if r['reason'] else ''}")
    print(f"{len(rows)} entries, {sum(r['bytes'] for r in rows) / 1e6:.1f} MB; restore with "
          "voxarc deleted restore ENTRY" + ("; entries of originals (a correction of held "
                                            "instances) are not restored, their files are "
                                            "plain DICOM" if any(r["kind"] == "original"
                                                                 for r in rows) else ""))
    return 0


def _restore(archive, args) -> int:
    done, bad = [], 0
    progress = Progress("restore", len(args.entries))
    actor = f"cli deleted restore ({getpass.getuser()})"
    for name in args.entries:
        try:
            counts = archive.restore_deleted(name, actor)
        except StorageError as exc:
            log.error("%s", exc)
            bad += 1
            progress.advance(note=name)
            continue
        bad += bool(counts["failed"])
        done.append(counts)
        progress.advance(note=name)
    progress.finish()
    if args.json:
        print(json.dumps({"restored": done, "failed_entries": bad}, indent=1))
    for c in done if not args.json else ():
        print(f"{c['entry']}: {c['restored']} instances restored, {c['present']} already "
              f"present, {c['failed']} failed" + ("" if c["failed"] else "; entry removed"))
    return 1 if bad else 0


def _empty(archive, args) -> int:
    bin_ = archive.recycle
    if not args.expired:
        entries = bin_.entries()
        if not entries:
            print("the recycle bin is empty")
            return 0
        go = may_proceed(args.yes, f"Remove the {len(entries)} entries of the recycle bin "
                         f"({sum(e.bytes for e in entries) / 1e6:.1f} MB) for good?", "empty it")
        if not go:
            return 2 if go is None else 0
    gone = bin_.purge(everything=not args.expired)
    held = [r["entry"] for r in bin_.summaries() if r["held"]]
    if args.json:
        print(json.dumps({"removed": gone, "kept_while_held": held}))
    else:
        print(f"{len(gone)} entries removed for good"
              + (f"; {len(held)} kept while on hold: {', '.join(held)}" if held else ""))
    return 0


def _minute(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))
