"""The node's retention rules (``[retention]`` in the settings), applied once a day.

Each rule (:mod:`storage.retention`) selects patients, studies or series by C-FIND keys, with
ages in date keys (``adults = "study: StudyDate=-10y; PatientBirthDate=-28y"``). Every day at
``retention_hour`` (local time) the running node deletes what the rules select, through the
recycle bin (restorable for ``deleted_keep_days``), with the rule named as the deletion's
reason in the audit trail and the audit messages. What arrived within ``retention_grace_days``
is held back, and what is under a legal hold (``voxarc hold``) passed over. ``voxarc
retention`` shows what the rules select now, and ``--run`` applies them at once (from cron,
say, on a node whose ``retention_hour`` is -1: never by itself).

The last run's outcome is kept in ``retention.json`` beside the index.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import date, datetime

from service import state_file
from service.admin_cli import delete_noted
from storage import holds
from storage.errors import StorageError
from storage.retention import RetentionRule, matching_uids, parse_rule, recently_received

log = logging.getLogger(__name__)
STATE = "retention.json"
LOOK_EVERY = 60.0       # seconds between two looks of the worker at the clock


@dataclass
class Selection:
    """What a rule selects now: ``uids`` to delete, ``held_back`` (received within the grace
    period), ``on_hold`` (under a legal hold, :mod:`storage.holds`), and, once applied,
    ``deleted`` (summaries) and ``failed`` (uid -> why)."""

    rule: RetentionRule
    uids: list[str]
    held_back: list[str]
    on_hold: list[str] = field(default_factory=list)
    deleted: list[dict] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        """A JSON-ready account of the selection (and of its deletions, once applied)."""
        return {"rule": self.rule.name, "text": self.rule.text, "selected": len(self.uids),
                "uids": self.uids, "held_back": len(self.held_back),
                "on_hold": len(self.on_hold),
                "deleted": len(self.deleted),
                "deleted_instances": sum(d["instances"] for d in self.deleted),
                "freed_bytes": sum(d["freed_bytes"] for d in self.deleted),
                "kept_as": [d["kept_as"] for d in self.deleted if d.get("kept_as")],
                "failed": self.failed}


def rules_of(settings) -> list[RetentionRule]:
    """The settings' ``[retention]`` rules, parsed (the settings checked them when loaded)."""
    return [parse_rule(name, text) for name, text in settings.retention.items()]


def select_all(archive, rules: list[RetentionRule], grace_days: float,
               now: float | None = None) -> list[Selection]:
    """What each rule selects at ``now`` (Unix time; ages counted from its local date),
    records received within ``grace_days`` held back and those under a legal hold passed over;
    a record two rules select goes to the first."""
    now = time.time() if now is None else now
    taken: set[tuple[str, str]] = set()
    out = []
    for rule in rules:
        uids = [u for u in matching_uids(archive, rule.level, rule.criteria,
                                         date.fromtimestamp(now))
                if (rule.level, u) not in taken]
        recent = recently_received(archive.index, rule.level, uids,
                                   now - grace_days * 86400.0) if grace_days > 0 else set()
        kept = holds.held(archive.index, rule.level, uids)
        out.append(Selection(rule, [u for u in uids if u not in recent and u not in kept],
                             [u for u in uids if u in recent and u not in kept], sorted(kept)))
        taken |= {(rule.level, u) for u in uids}
    return out


def delete_selected(archive, selection: Selection, actor: str, progress=None,
                    keep: bool = True, stopping=lambda: False) -> Selection:
    """Delete what ``selection`` holds, each record through the recycle bin (``keep=False``:
    for good at once), noted for the audit messages as ``actor``'s; a record that fails is
    logged and left (the next run tries it again), and so are those left when ``stopping()``
    turns true (the node is stopping)."""
    rule = selection.rule
    reason = f"retention rule {rule.name}: {rule.text}"
    for done_count, uid in enumerate(selection.uids):
        if stopping():
            log.warning("retention rule %s: stopped after %d of %d records; the next run "
                        "takes the others", rule.name, done_count, len(selection.uids))
            break
        try:
            done = delete_noted(archive, rule.level, uid, reason, keep, actor)
        except StorageError as exc:
            selection.failed[uid] = str(exc)
            log.error("retention rule %s: %s %s not deleted: %s", rule.name, rule.level, uid,
                      exc)
        else:
            if done["instances"]:
                selection.deleted.append(done)
                log.info("retention rule %s: deleted %s %s (%d instances)%s", rule.name,
                         rule.level, uid, done["instances"],
                         f", restorable as {done['kept_as']}" if done.get("kept_as") else "")
        if progress is not None:
            progress.advance(note=uid)
    return selection


def apply_rules(archive, settings, actor: str = "retention", now: float | None = None,
                stopping=lambda: False) -> list[Selection]:
    """Apply every rule of ``settings`` once and record the outcome in ``retention.json``
    (``stopping``: see :func:`delete_selected`)."""
    started = time.time() if now is None else now
    selections = select_all(archive, rules_of(settings), settings.retention_grace_days,
                            started)
    for selection in selections:
        delete_selected(archive, selection, actor, stopping=stopping)
        if selection.held_back:
            log.info("retention rule %s: %d %s records held back, received within %g days",
                     selection.rule.name, len(selection.held_back), selection.rule.level,
                     settings.retention_grace_days)
        if selection.on_hold:
            log.info("retention rule %s: %d %s records passed over, on legal hold",
                     selection.rule.name, len(selection.on_hold), selection.rule.level)
    record_run(archive, started, actor, selections)
    return selections


def record_run(archive, started: float, actor: str, selections: list[Selection]) -> None:
    """Keep the outcome of a run in ``retention.json`` (see :func:`last_run`)."""
    rules = [{k: v for k, v in s.summary().items() if k != "uids"} for s in selections]
    _save(archive, {"started": started, "finished": time.time(), "by": actor, "rules": rules})


def run_totals(last: dict) -> dict:
    """Totals over the rules of a recorded run (:func:`last_run`): ``deleted`` records,
    ``deleted_instances``, ``failed`` records (a run that failed as a whole counts 1)."""
    rules = last.get("rules", [])
    return {"deleted": sum(r["deleted"] for r in rules),
            "deleted_instances": sum(r["deleted_instances"] for r in rules),
            "failed": sum(len(r["failed"]) for r in rules) + int("error" in last)}


def last_run(archive) -> dict | None:
    """The outcome of the last run (:func:`apply_rules`), or None before the first."""
    return state_file.read(archive, STATE)


def _save(archive, state: dict) -> None:
    state_file.write(archive, STATE, state)


class RetentionWorker(threading.Thread):
    """Background thread applying the node's rules once a day, in the hour ``retention_hour``.

    It reads the settings at each look, so a reload (SIGHUP) takes new rules, hour and grace.
    A run is due in that hour (local time) when none has started on that day
    (``retention.json``). A new rule waits for the night rather than running within a minute
    of the node's start or reload, leaving time to look at what it selects
    (``voxarc retention``); a node down all that hour skips the day."""

    def __init__(self, archive, settings, clock=time.time):
        super().__init__(name="voxarc-retention", daemon=True)
        self.archive, self.settings, self.clock = archive, settings, clock
        self._stop_event = threading.Event()

    def due(self) -> bool:
        """Whether a run is due now."""
        hour = self.settings.retention_hour
        if not self.settings.retention or hour < 0:
            return False
        now = datetime.fromtimestamp(self.clock())
        last = last_run(self.archive)
        ran_today = last is not None and \
            datetime.fromtimestamp(last["started"]).date() == now.date()
        return now.hour == hour and not ran_today

    def look(self) -> list[Selection] | None:
        """Run the rules when due; return the selections, or None when not due."""
        if not self.due():
            return None
        log.info("retention: applying %d rules", len(self.settings.retention))
        selections = apply_rules(self.archive, self.settings, "retention (node)", self.clock(),
                                 self._stop_event.is_set)
        log.info("retention: deleted %d records, %d instances; %d failed",
                 sum(len(s.deleted) for s in selections),
                 sum(d["instances"] for s in selections for d in s.deleted),
                 sum(len(s.failed) for s in selections))
        return selections

    def run(self) -> None:
        while not self._stop_event.wait(LOOK_EVERY):
            try:
                self.look()
            except Exception:  # a failed run is logged; the next day's tries again
                log.exception("retention run failed")
                _save(self.archive, {"started": self.clock(), "finished": time.time(),
                                     "by": "retention (node)", "error": "see the log"})

    def stop(self) -> None:
        """Ask the worker to exit (a run under way stops after its current record); wait for
        it."""
        self._stop_event.set()
        self.join()
