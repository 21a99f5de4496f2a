"""What the administrator's commands that change the archive for good (``voxarc delete``,
``voxarc correct``) share: asking before they act, telling the audit messages what they
changed, and printing their audit trails."""

from __future__ import annotations

import getpass
import json
import logging
import sys
import time
from collections.abc import Callable

from storage.retention import UID_KEYS

log = logging.getLogger(__name__)


def studies_touched(archive, level: str, uid: str) -> dict[str, tuple[str, int]]:
    """{Study Instance UID: (Patient ID, instances)} of what deleting or correcting ``uid`` at
    ``level`` touches, as the index holds it now."""
    query_level, key = UID_KEYS[level]
    query_level = "STUDY" if query_level == "PATIENT" else query_level   # a patient's studies
    asked = {"StudyInstanceUID": "", "PatientID": "", key: uid}
    counted = {"STUDY": "NumberOfStudyRelatedInstances",
               "SERIES": "NumberOfSeriesRelatedInstances"}.get(query_level)
    if counted:
        asked[counted] = ""
    return {r["StudyInstanceUID"]: (r["PatientID"], int(r[counted] or 0) if counted else 1)
            for r in archive.find(query_level, asked)}


def note_change(archive, command: str, level: str, touched: dict[str, tuple[str, int]],
                actor: str = "") -> None:
    """Tell the audit messages (not the access trail, whose table this is not) that ``command``
    ("delete", "correct") changed the studies ``touched`` (:func:`studies_touched`); the actor
    is the command's user unless given."""
    actor = actor or f"cli {command} ({getpass.getuser()})"
    for study, (patient, instances) in touched.items():
        archive.accesses.note(actor, f"{command} {level}", study, patient, instances,
                              keep=False)


def delete_noted(archive, level: str, uid: str, reason: str, keep: bool = True,
                 actor: str = "") -> dict:
    """Delete ``uid`` at ``level`` (:meth:`storage.archive.Archive.delete`) and tell the audit
    messages which studies it took (:func:`note_change`; the actor is the command's user
    unless given); return the deletion's summary."""
    touched = studies_touched(archive, level, uid)
    done = archive.delete(level, uid, reason, keep=keep)
    if done["instances"]:
        note_change(archive, "delete", level, touched, actor)
    return done


def add_trail_options(p, verb: str, changes: str, past: str) -> None:
    """The options both commands take: ``--yes``, ``--dry-run``, ``--reason``, ``--history``
    and ``--json`` (``verb``: "deleting"; ``changes``: what a dry run shows; ``past``: the
    trail's entries, "deletions")."""
    p.add_argument("--yes", action="store_true", help=f"do not ask before {verb}")
    p.add_argument("--dry-run", action="store_true", help=f"only show what would {changes}")
    p.add_argument("--reason", default="", help="note kept in the audit trail")
    p.add_argument("--history", action="store_true", help=f"print past {past} and exit")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def may_proceed(yes: bool, question: str, what: str) -> bool | None:
    """Whether to go on: True with ``yes`` or when the person at the terminal answers yes to
    ``question``; False when they do not; None (logged) without a terminal to ask on, where
    ``yes`` is required to ``what`` (a verb: "delete")."""
    if yes:
        return True
    if not sys.stdin.isatty():
        log.error("refusing to %s without --yes: no terminal to ask on", what)
        return None
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def print_trail(rows: list[dict], as_json: bool, at: str, line: Callable[[dict], str],
                nothing: str) -> int:
    """Print an audit trail's ``rows``: as JSON, or one line each, the time of ``at`` then
    ``line(row)`` and the row's reason; ``nothing`` when there are none. Returns 0."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(nothing)
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row[at]))
        print(f"{when}  {line(row)}" + (f"  ({row['reason']})" if row["reason"] else ""))
    return 0
