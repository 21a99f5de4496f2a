"""`voxarc hold`: legal holds on patients and studies (see :mod:`storage.holds`).

``voxarc hold`` lists the holds in force (``--all``: released ones too), ``voxarc hold place
LEVEL UID... --reason TEXT`` puts patients (by Patient ID) or studies on hold, so that no
deletion, retention rule or rejection note removes anything of them, and ``voxarc hold release
LEVEL UID...`` lifts it. Works beside a running ``voxarc serve`` on the same data folder.
"""

from __future__ import annotations

import getpass
import json
import logging

from service.ae import open_archive
from service.config import add_node_options, settings_from_args
from storage import holds
from storage.holds import HoldError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add ``hold`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("hold", help="list, place or release legal holds on patients "
                              "and studies (nothing of them is deleted while held)")
    add_node_options(p)
    p.add_argument("action", nargs="?", default="list", choices=("list", "place", "release"))
    p.add_argument("level", nargs="?", choices=holds.LEVELS, help="what the UIDs name")
    p.add_argument("uids", nargs="*", metavar="UID", help="Patient IDs or Study Instance UIDs")
    p.add_argument("--reason", default="", help="place: why (the claim, the request, who "
                   "asked); required")
    p.add_argument("--all", action="store_true", help="list: released holds too")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=hold)


def hold(args) -> int:
    """Run the action; exit 1 when a UID could not be held or released, 2 for a wrong use."""
    if (args.action == "list") != (args.level is None and not args.uids) or \
            (args.action != "list" and not args.uids):
        log.error("voxarc hold [list] | place LEVEL UID... --reason TEXT | release LEVEL UID...")
        return 2
    if args.action == "place" and not args.reason.strip():
        log.error("a hold needs --reason (the claim, the request, who asked)")
        return 2
    archive = open_archive(settings_from_args(args))
    try:
        if args.action == "list":
            return _list(archive, args.all, args.json)
        actor = f"cli hold ({getpass.getuser()})"
        done, failed = [], 0
        for uid in args.uids:
            try:
                record = holds.place(archive.index, args.level, uid, args.reason, actor)[0] \
                    if args.action == "place" else holds.release(archive.index, args.level,
                                                                 uid, actor)
                done.append(record.summary())
            except HoldError as exc:
                failed += 1
                log.error("%s", exc)
        if args.json:
            print(json.dumps({args.action: done, "failed": failed}, indent=2))
        return 1 if failed else 0
    finally:
        archive.close()


def _list(archive, released: bool, as_json: bool) -> int:
    rows = holds.listing(archive.index, released)
    if as_json:
        print(json.dumps([r.summary() for r in rows], indent=2))
        return 0
    if not rows:
        print("no holds" + ("" if released else " in force"))
        return 0
    for r in rows:
        print(r.describe())
    return 0
