"""The forwarding queue: which stable series hold instances a destination has not had yet.

A rule names a destination and the C-FIND keys a series must match (:mod:`storage.query`
matching, on what the index keeps of the series, its study and its patient); an empty rule
matches every series; ``Priors=2`` sends the patient's two latest earlier studies along with a
new one (those the destination has not had, whenever they came); a date key may hold an age
(``StudyDate=7d-``: studies of the last week, :mod:`storage.rule_dates`). A rule takes effect
when a node first runs with it (or with it changed): only instances received since then go by
it, so enabling one does not send the archive's past
(a C-MOVE does that). Once a series is stable (no new instance for ``stable_age`` seconds), its
instances received after the last that went to the destination (the ``forwards`` row's
``sent_until``) are due. The row keeps each outcome: sent (up to the newest instance that
went), not matched (the series is looked at again only when an instance arrives), or failed,
retried after a delay that doubles from :data:`RETRY_FIRST` to :data:`RETRY_MOST` and never
given up.

A send asked for by hand (a whole study to a destination, :func:`study_items`) is queued in the
same rows first (:func:`queue_by_hand`), so that one a node did not finish before it stopped is
sent again after its restart, and one that failed is retried whole, as forwarding is
(:func:`resends`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date

from sqlalchemy import and_, func, or_, select

from storage import query, rule_dates
from storage.index import Forward, ForwardRule, Index, Instance, Patient, Series, Study

RETRY_FIRST, RETRY_MOST = 30.0, 3600.0
SOURCE = "SourceAETitle"     # a rule key of voxarc's own: the calling AE title that sent each
PRIORS = "Priors"            # another: how many of the patient's earlier studies go along
MAX_PRIORS = 10
_RULE_LEVELS = ("PATIENT", "STUDY", "SERIES")
_HAND_PENDING = ("queued", "failed")    # states of a send by hand still to make


@dataclass(frozen=True)
class Due:
    """A series' instances due at a destination."""

    series_id: int
    series_uid: str
    destination: str
    sop_uids: tuple[str, ...]
    until: float          # the newest of their receipt times
    attempts: int         # failed attempts before this one


def parse_rule(text: str) -> dict[str, str]:
    """The C-FIND keys of a rule: ``Keyword=pattern`` terms separated by ``;``
    (``Modality=CT\\MR; StudyDescription=*HEAD*``); empty: every series. ``SourceAETitle``
    matches the calling AE title each instance came from (``CT_ER*``): only the instances of
    a series that it matches go.

    Raises
    ------
    ValueError
        On a term without ``=``, or a keyword the index does not keep of a series, its study or
        its patient.
    """
    keys = {k for k, (lv, _) in query.ATTRIBUTES.items() if lv in _RULE_LEVELS}
    criteria = query.parse_criteria(text, keys | {SOURCE, PRIORS}, "forwarding rule")
    pattern = criteria.get(PRIORS)
    if pattern is not None and not (pattern.isdigit() and int(pattern) <= MAX_PRIORS):
        raise ValueError(f"forwarding rule {PRIORS}={pattern!r}: a number of studies, 0 to "
                         f"{MAX_PRIORS}")
    rule_dates.resolve(criteria, date.today())        # its ages are well formed
    return criteria


def priors_wanted(criteria: dict) -> int:
    """How many of the patient's earlier studies a rule sends along (its ``Priors``)."""
    return int(criteria.get(PRIORS, 0))


def take_effect(index: Index, rules: dict[str, str], now: float | None = None
                ) -> dict[str, float]:
    """When each rule (destination -> its text) took effect: ``now`` for one new or changed,
    else as recorded."""
    now = time.time() if now is None else now
    out = {}
    with index.write() as s:
        for destination, text in rules.items():
            row = s.scalars(select(ForwardRule).where(
                ForwardRule.destination == destination)).first()
            if row is None:
                row = ForwardRule(destination=destination, rule=text, since=now)
                s.add(row)
            elif row.rule != text:
                row.rule, row.since = text, now
            out[destination] = row.since
    return out


def due(index: Index, rules: dict[str, dict], stable_age: float, now: float | None = None,
        since: dict[str, float] | None = None) -> list[Due]:
    """The forwarding due now under ``rules`` (destination -> C-FIND keys), of the instances
    received since each rule took effect (``since``, from :func:`take_effect`; None: all);
    the stable series a rule does not match are recorded as such (not looked at again until
    an instance comes)."""
    now = time.time() if now is None else now
    out = []
    for destination, criteria in rules.items():
        start = (since or {}).get(destination, -1.0e300)
        source = criteria.get(SOURCE)
        candidates = _candidates(index, destination, stable_age, now, start)
        keys = rule_dates.resolve({k: v for k, v in criteria.items()
                                   if k not in (SOURCE, PRIORS)}, date.fromtimestamp(now))
        matched = _matching(index, keys, [c[1] for c in candidates])
        unmatched = []
        with index.read() as s:
            for candidate in candidates:
                series_id, uid, _, sent_until, attempts = candidate
                rows = s.execute(select(Instance.sop_uid, Instance.received_at,
                                        Instance.source_ae)
                                 .where(Instance.series_fk == series_id,
                                        Instance.received_at > sent_until,
                                        Instance.received_at >= start)
                                 .order_by(Instance.received_at)).all() \
                    if uid in matched else []
                rows = [r for r in rows if source is None
                        or query.matches(r[2], source, "RetrieveAETitle")]   # an AE value
                if rows:
                    out.append(Due(series_id, uid, destination, tuple(r[0] for r in rows),
                                   max(r[1] for r in rows), attempts))
                else:
                    unmatched.append(candidate)
        _not_matched(index, destination, unmatched, now)
    return out


def study_items(index: Index, study_uid: str, destination: str) -> list[Due]:
    """Every instance of a study as items for ``destination``, a series each (a send asked for
    by hand, whatever the rules say); [] when the study is not held."""
    stmt = (select(Series.id, Series.series_uid, Instance.sop_uid, Instance.received_at)
            .join(Instance, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
            .where(Study.study_uid == study_uid)
            .order_by(Series.id, Instance.received_at))
    with index.read() as s:
        return _whole_series((series_id, uid, destination, 0, sop_uid, received) for
                             series_id, uid, sop_uid, received in s.execute(stmt).all())


def _whole_series(rows) -> list[Due]:
    """Items of ``(series id, series UID, destination, attempts, SOP UID, receipt)`` rows, an
    item per series and destination, its instances in the rows' order."""
    found: dict = {}
    for *key, sop_uid, received in rows:
        found.setdefault(tuple(key), []).append((sop_uid, received))
    return [Due(series_id, uid, destination, tuple(u for u, _ in instances),
                max(r for _, r in instances), attempts)
            for (series_id, uid, destination, attempts), instances in found.items()]


def prior_items(index: Index, series_id: int, destination: str, count: int) -> list[Due]:
    """The series of the ``count`` latest other studies of the patient of series
    ``series_id`` (by study date and time) that ``destination`` has not been sent, as items
    of all their instances."""
    with index.read() as s:
        found = s.execute(select(Study.id, Study.patient_fk)
                          .join(Series, Series.study_fk == Study.id)
                          .where(Series.id == series_id)).first()
        if found is None:                         # deleted meanwhile
            return []
        study_id, patient_id = found
        priors = _latest_studies(s, patient_id, count, study_id)
        sent = _sent_series(s, destination)
    return [item for uid in priors for item in study_items(index, uid, destination)
            if item.series_id not in sent]


def _latest_studies(s, patient_fk: int, count: int, besides: int | None = None) -> list[str]:
    """UIDs of the patient's ``count`` latest studies (by study date and time), ``besides``
    (a study id) left out."""
    stmt = select(Study.study_uid).where(Study.patient_fk == patient_fk)
    if besides is not None:
        stmt = stmt.where(Study.id != besides)
    return list(s.scalars(stmt.order_by(Study.study_date.desc(), Study.study_time.desc())
                          .limit(count)))


def _sent_series(s, destination: str) -> set[int]:
    return set(s.scalars(select(Forward.series_fk).where(Forward.destination == destination,
                                                         Forward.state == "sent")))


def queue_latest(index: Index, patient_id: str, destination: str, count: int, reason: str,
                 now: float | None = None) -> list[Due]:
    """Queue the series of the patient's ``count`` latest studies that ``destination`` has
    not been sent (or is not being sent) as sends by hand due now (a prefetch: the node's
    :func:`resends` takes them on its next pass); return them. None when the patient is not
    held."""
    now = time.time() if now is None else now
    with index.read() as s:
        patient = s.scalar(select(Patient.id).where(Patient.patient_id == patient_id))
        if patient is None:
            return []
        studies = _latest_studies(s, patient, count)
        skip = _sent_series(s, destination) | set(s.scalars(
            select(Forward.series_fk).where(Forward.destination == destination,
                                            Forward.state.in_(_HAND_PENDING))))
    items = [item for uid in studies for item in study_items(index, uid, destination)
             if item.series_id not in skip]
    with index.write() as s:
        for item in items:
            _queue(_row(s, item.series_id, destination), now, now, reason)
    return items


def _not_matched(index: Index, destination: str, candidates: list, now: float) -> None:
    """Record that a rule does not match these series, as received up to now."""
    if not candidates:
        return
    with index.write() as s:
        for series_id, _, last, _, _ in candidates:
            row = _row(s, series_id, destination)
            row.state, row.sent_until, row.reason = "not matched", last, ""
            row.attempts, row.updated_at = 0, now


def _candidates(index: Index, destination: str, stable_age: float, now: float,
                start: float) -> list:
    """(series id, UID, last receipt, watermark, failed attempts) of the stable series with an
    instance received since ``start`` and newer than what ``destination`` has had, and not
    waiting for a retry (nor for a send by hand, which sends the series whole)."""
    watermark = func.coalesce(Forward.sent_until, -1.0)
    hand_pending = and_(func.coalesce(Forward.by_hand, 0) == 1, Forward.state.in_(_HAND_PENDING))
    stmt = (select(Series.id, Series.series_uid, Series.last_received, watermark,
                   func.coalesce(Forward.attempts, 0))
            .outerjoin(Forward, and_(Forward.series_fk == Series.id,
                                     Forward.destination == destination))
            .where(Series.last_received <= now - stable_age, Series.last_received > watermark,
                   Series.last_received >= start,
                   or_(Forward.state.is_(None), Forward.state != "failed",
                       Forward.next_attempt <= now),
                   ~hand_pending))
    with index.read() as s:
        return [tuple(r) for r in s.execute(stmt).all()]


def _matching(index: Index, criteria: dict, series_uids: list[str]) -> set[str]:
    """Those of ``series_uids`` whose series, study and patient match ``criteria``."""
    if not criteria:
        return set(series_uids)
    found = set()
    for i in range(0, len(series_uids), 200):
        chunk = "\\".join(series_uids[i:i + 200])
        found |= {r["SeriesInstanceUID"] for r in
                  query.find(index, "SERIES", {**criteria, "SeriesInstanceUID": chunk})}
    return found


def _row(s, series_id: int, destination: str) -> Forward:
    row = s.scalars(select(Forward).where(Forward.series_fk == series_id,
                                          Forward.destination == destination)).first()
    if row is None:
        row = Forward(series_fk=series_id, destination=destination, sent_until=-1.0,
                      instances=0, attempts=0, next_attempt=0.0, reason="", state="pending")
        s.add(row)
    return row


def _queue(row: Forward, now: float, due: float, reason: str) -> None:
    """Make ``row`` a send by hand, queued (``due``: when :func:`resends` takes it; 0: its
    sender sends it itself)."""
    row.state, row.by_hand, row.attempts = "queued", 1, 0
    row.updated_at, row.next_attempt, row.reason = now, due, reason


def queue_by_hand(index: Index, items: list[Due], now: float | None = None) -> None:
    """Note ``items`` (a send asked for by hand) as queued before they are sent."""
    now = time.time() if now is None else now
    with index.write() as s:
        for item in items:
            _queue(_row(s, item.series_id, item.destination), now, 0.0, "sent by hand: queued")


def destinations_of(index: Index, sop_uids: list[str]) -> set[str]:
    """The destinations that had any of the series these instances belong to."""
    with index.read() as s:
        return {d for i in range(0, len(sop_uids), 500) for d in s.scalars(
            select(Forward.destination).distinct()
            .join(Instance, Instance.series_fk == Forward.series_fk)
            .where(Instance.sop_uid.in_(sop_uids[i:i + 500]), Forward.instances > 0))}


def queue_series_of(index: Index, sop_uid: str, destinations, reason: str,
                    now: float | None = None) -> list[str]:
    """Queue the series that instance ``sop_uid`` belongs to (an applied rejection note's) to
    ``destinations``, whole, as a send by hand due now; return them."""
    now = time.time() if now is None else now
    with index.write() as s:
        series = s.scalar(select(Instance.series_fk).where(Instance.sop_uid == sop_uid))
        if series is None:
            return []
        for destination in sorted(destinations):
            _queue(_row(s, series, destination), now, now, reason)
    return sorted(destinations)


def queue_again(index: Index, series_ids: list[int], reason: str,
                now: float | None = None) -> list[tuple[str, str]]:
    """Queue each of the series to every destination that had any of it, whole, as a send by
    hand due now (a corrected study: the running node's :func:`resends` takes it on its next
    pass); return (Series Instance UID, destination) of each."""
    now = time.time() if now is None else now
    with index.write() as s:
        rows = s.execute(select(Forward, Series.series_uid)
                         .join(Series, Forward.series_fk == Series.id)
                         .where(Forward.series_fk.in_(series_ids),
                                Forward.instances > 0)).all()
        for row, _ in rows:
            _queue(row, now, now, reason)
        return [(uid, row.destination) for row, uid in rows]


def record(index: Index, item: Due, error: str | None = None, now: float | None = None,
           passed_over: int = 0, retry: bool = True, by_hand: bool = False) -> None:
    """Record how forwarding ``item`` went: sent (``error`` None; ``passed_over`` of its
    instances could not go out at all, which the row's reason notes) or failed (retried
    later, unless ``retry`` is false: a prior, tried again with the patient's next series).
    ``by_hand``: the item was a send asked for by hand, which a retry sends whole."""
    now = time.time() if now is None else now
    with index.write() as s:
        if s.get(Series, item.series_id) is None:        # deleted meanwhile
            return
        row = _row(s, item.series_id, item.destination)
        if not by_hand and row.by_hand and row.state in _HAND_PENDING:
            return      # the whole series, asked for by hand, goes again anyway
        row.updated_at, row.reason, row.by_hand = now, error or "", int(by_hand)
        if error is None:
            row.state, row.sent_until, row.attempts = "sent", item.until, 0
            row.instances += len(item.sop_uids) - passed_over
            if passed_over:
                row.reason = (f"{passed_over} of {len(item.sop_uids)} instances could not go "
                              "out (no context for them, or their check failed: see the log)")
        else:
            row.state, row.attempts = "failed", item.attempts + 1
            row.next_attempt = now + min(RETRY_MOST, RETRY_FIRST * 2 ** item.attempts) \
                if retry else 0.0


def resends(index: Index, now: float, started: float) -> list[Due]:
    """Sends by hand to make again, each series whole: those that failed and whose retry is
    due, those queued before ``started`` (the start of this node: a send it did not finish)
    and those queued to go at a time now past (:func:`queue_again`)."""
    stmt = (select(Forward.series_fk, Series.series_uid, Forward.destination, Forward.attempts,
                   Instance.sop_uid, Instance.received_at)
            .join(Series, Forward.series_fk == Series.id)
            .join(Instance, Instance.series_fk == Series.id)
            .where(Forward.by_hand == 1,
                   or_(and_(Forward.state.in_(_HAND_PENDING), Forward.next_attempt > 0,
                            Forward.next_attempt <= now),
                       and_(Forward.state == "queued", Forward.updated_at < started)))
            .order_by(Forward.id, Instance.received_at))
    with index.read() as s:
        return _whole_series(s.execute(stmt).all())


def failed_count(index: Index) -> dict[str, int]:
    """Destination -> the series whose forwarding failed and waits for another attempt."""
    stmt = (select(Forward.destination, func.count()).where(Forward.state == "failed")
            .group_by(Forward.destination))
    with index.read() as s:
        return dict(s.execute(stmt).all())


def status(index: Index, limit: int = 100) -> list[dict]:
    """The forwarding rows, failed first, then the latest: what the admin page lists."""
    failed_first = (Forward.state != "failed").asc()
    stmt = (select(Forward, Series.series_uid, Series.modality, Study.study_uid,
                   Patient.patient_name)
            .join(Series, Forward.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
            .join(Patient, Study.patient_fk == Patient.id)
            .where(Forward.state != "not matched")
            .order_by(failed_first, Forward.updated_at.desc()).limit(limit))
    with index.read() as s:
        return [{"destination": f.destination, "state": f.state, "series_uid": uid,
                 "study_uid": study, "modality": modality, "patient_name": name,
                 "instances": f.instances, "attempts": f.attempts, "reason": f.reason,
                 "next_attempt": f.next_attempt if f.state == "failed" and f.next_attempt
                 else None,
                 "updated_at": f.updated_at, "by_hand": bool(f.by_hand)}
                for f, uid, modality, study, name in s.execute(stmt).all()]
