"""`voxarc accesses [--patient ID] [--study UID] [--user NAME] [--since DATE] [--csv | --json]`:
the access trail (:mod:`storage.access_log`), for a privacy officer's questions "who read this
patient's images?" and "what did this user read?", as a table, CSV or JSON. Works beside a running node (what it noted in the last
few seconds may not be written yet)."""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from datetime import datetime

from service.ae import open_archive
from service.config import add_node_options, settings_from_args
from storage.access_log import history

log = logging.getLogger(__name__)
COLUMNS = ("first_at", "last_at", "actor", "action", "patient_id", "study_uid", "requests",
           "instances", "detail")


def register(subparsers) -> None:
    """Add ``accesses`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("accesses", help="who read which study, how and when (the "
                              "access trail)")
    add_node_options(p)
    p.add_argument("--patient", metavar="PATIENT_ID", help="one patient's (Patient ID exactly)")
    p.add_argument("--study", metavar="STUDY_UID", help="one study's")
    p.add_argument("--user", metavar="NAME", help="one user's: a named web user (http_users), "
                   "a calling AE title, or the user who ran a command")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="from this day on (local time)")
    p.add_argument("--limit", type=int, default=0, help="the latest N only (default: all)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="CSV, times in ISO 8601")
    out.add_argument("--json", action="store_true", help="JSON, times in seconds")
    p.set_defaults(func=accesses)


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).isoformat(sep=" ", timespec="seconds")


def accesses(args) -> int:
    """Print the access trail; exit 2 on a bad --since."""
    since = None
    if args.since:
        try:
            since = time.mktime(datetime.strptime(args.since, "%Y-%m-%d").timetuple())
        except ValueError:
            log.error("--since is a day, YYYY-MM-DD, not %r", args.since)
            return 2
    archive = open_archive(settings_from_args(args))
    try:
        rows = history(archive.index, args.limit or None, args.study, args.patient, since,
                       args.user)
    finally:
        archive.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([_when(r[c]) if c.endswith("_at") else r[c] for c in COLUMNS])
    else:
        if not rows:
            print("no access recorded")
        for r in rows:
            read = f"{r['instances']} instances" if r["instances"] else ""
            if r["requests"] > 1:
                read += (", " if read else "") + f"{r['requests']} requests"
            print(f"{_when(r['first_at'])} .. {_when(r['last_at'])[11:]}  {r['actor']}  "
                  f"{r['action']}  patient {r['patient_id'] or '-'}  study "
                  f"{r['study_uid'] or '-'}  {read}  {r['detail']}".rstrip())
    return 0
