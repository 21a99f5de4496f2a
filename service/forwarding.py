"""Forwarding: each stable series that a rule matches goes to its destination by C-STORE.

A reading workstation or a second archive gets the studies a node receives without asking for
them: ``forward = { READING = "Modality=CT\\MR" }`` sends every CT and MR series to the
destination ``READING`` once it is stable (``stable_age``), and later instances of it when they
come. What is due and what went is kept in the index (:mod:`storage.forwarding`), so a restart
loses nothing and sends nothing twice that went through. Instances go out as C-GET and C-MOVE
send them: byte for byte as received, rebuilt and SHA-256 checked, converted only for a
destination that takes no context in the stored syntax. An instance that cannot go out at all
(no context for its class, or failing its check) is logged and passed over; any other failure
(destination unreachable, a refused association, a status other than success or warning) fails
the series' batch, which is sent again whole after a delay.

A study sent by hand (:func:`send_study`) is queued in the index before it goes; a series of it
that fails is sent again whole after the same delays, and one a node did not get to before it
stopped goes after its restart (:func:`storage.forwarding.resends`).
"""

from __future__ import annotations

import logging
import threading
import time

from pynetdicom import AE, evt

from service import commitment, exact_send
from service.exact_send import PreEncoded
from service.handlers import Receiver, store_contexts, sub_operations
from service.socket_tuning import tune_association
from storage import forwarding
from storage.forwarding import parse_rule

log = logging.getLogger(__name__)
_SENT = {0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}   # success and warnings


def send_study(archive, settings, study_uid: str, destination: str, metrics=None) -> dict:
    """Send every instance of a study to ``destination`` now, on a thread of its own (an
    administrator's "send again"); each series' outcome is recorded as forwarding's are, and a
    series that fails is retried whole by the node's :class:`Forwarder`. Returns what was
    queued.

    Raises
    ------
    ValueError
        When ``destination`` is not configured.
    LookupError
        When the study is not held.
    """
    if destination not in settings.destinations:
        raise ValueError(f"{destination!r} is not one of the destinations "
                         f"({', '.join(sorted(settings.destinations)) or 'none configured'})")
    items = forwarding.study_items(archive.index, study_uid, destination)
    if not items:
        raise LookupError(f"no study {study_uid}")
    sender = Forwarder(archive, settings, metrics, rules={})
    forwarding.queue_by_hand(archive.index, items)

    def run():
        try:
            for item in items:
                sender.deliver(item, by_hand=True)
        except Exception:       # a thread's death would go unseen otherwise
            log.exception("send of study %s to %s failed", study_uid, destination)
    threading.Thread(target=run, name="voxarc-send", daemon=True).start()
    instances = sum(len(i.sop_uids) for i in items)
    log.info("send of study %s to %s: %d series, %d instances queued", study_uid, destination,
             len(items), instances)
    return {"study": study_uid, "destination": destination, "series": len(items),
            "instances": instances}


class Forwarder(threading.Thread):
    """Sends what :func:`storage.forwarding.due` names, every ``interval`` seconds, and makes
    again the sends by hand that :func:`storage.forwarding.resends` names."""

    def __init__(self, archive, settings, metrics=None, interval: float | None = None,
                 rules: dict[str, str] | None = None):
        super().__init__(name="voxarc-forward", daemon=True)
        self.archive, self.settings, self.metrics = archive, settings, metrics
        self.interval = settings.compaction_interval if interval is None else interval
        self.use_rules(settings.forward if rules is None else rules)
        self.started = time.time()
        self._stop_event = threading.Event()
        exact_send.install()      # without it pynetdicom would send PreEncoded's few elements

    def use_rules(self, texts: dict[str, str]) -> None:
        """Forward by these rules (destination -> rule text) from now on; a new or changed
        rule takes effect for what arrives from now (:func:`storage.forwarding.take_effect`)."""
        since = forwarding.take_effect(self.archive.index, texts)
        # one assignment: a pass reads both together (a rule without its time would forward
        # everything ever received)
        self._rules = ({name: parse_rule(t) for name, t in texts.items()}, since)

    @property
    def rules(self) -> dict[str, dict]:
        """Destination -> C-FIND keys of each rule."""
        return self._rules[0]

    @property
    def since(self) -> dict[str, float]:
        """Destination -> when its rule took effect."""
        return self._rules[1]

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.run_once()
            except Exception:        # a bad pass must not end forwarding for good
                log.exception("forwarding pass failed")

    def stop(self) -> None:
        """Finish the series being sent, then stop."""
        self._stop_event.set()
        if self.is_alive():
            self.join()

    def run_once(self, now: float | None = None) -> int:
        """Send everything due now; return the number of series sent."""
        sent = 0
        rules, since = self._rules
        for item in forwarding.due(self.archive.index, rules, self.settings.stable_age, now,
                                   since):
            if self._stop_event.is_set():
                return sent
            if self.deliver(item, now):
                sent += 1
                self._send_priors(item, now)
        resends = forwarding.resends(self.archive.index, time.time() if now is None else now,
                                     self.started)
        for item in resends:
            if self._stop_event.is_set():
                break
            log.info("send by hand of series %s to %s: %s", item.series_uid, item.destination,
                     f"again (attempt {item.attempts + 1})" if item.attempts else "queued")
            sent += self.deliver(item, now, by_hand=True)
        return sent

    def deliver(self, item: forwarding.Due, now: float | None = None, retry: bool = True,
                by_hand: bool = False) -> bool:
        """:meth:`send` ``item`` and record how it went (see
        :func:`storage.forwarding.record`); return whether it went."""
        error, passed_over = self.send(item)
        forwarding.record(self.archive.index, item, error, now, passed_over, retry, by_hand)
        return error is None

    def _send_priors(self, item: forwarding.Due, now: float | None) -> None:
        """The patient's earlier studies the rule asks for along with ``item``'s, those the
        destination has not had (a failed one is tried again with the patient's next
        series)."""
        count = forwarding.priors_wanted(self.rules.get(item.destination, {}))
        if not count:
            return
        for prior in forwarding.prior_items(self.archive.index, item.series_id,
                                            item.destination, count):
            self.deliver(prior, now, retry=False)

    def send(self, item: forwarding.Due) -> tuple[str | None, int]:
        """Send one series' due instances: (None when they went, else what went wrong; how
        many could not go out at all and were passed over)."""
        dest = self.settings.destination(item.destination)
        if dest is None:
            return f"destination {item.destination} is not configured", 0
        records = [{"SOPInstanceUID": uid} for uid in item.sop_uids]
        start = time.monotonic()
        assoc = self._associate(dest, records)
        if not assoc.is_established:
            return self._failed(item, f"no association with {dest.ae_title}@{dest.host}:"
                                      f"{dest.port}"), 0
        try:
            count, skipped, failed = self._store_each(assoc, records, dest.name)
        finally:
            if assoc.is_established:
                assoc.release()
        self._count(dest.name, count, len(failed))
        if failed or count + skipped < len(records):
            what = ", ".join(f"{uid} ({'no answer' if s is None else f'0x{s:04X}'})"
                             for uid, s in failed[:3])
            return self._failed(item, f"{len(records) - count - skipped} of {len(records)} "
                                      f"instances not stored: {what or 'association lost'}"), \
                skipped
        log.info("forward of series %s to %s: %d instances in %.2f s%s", item.series_uid,
                 dest.name, count, time.monotonic() - start,
                 f" ({skipped} could not go out)" if skipped else "")
        return None, skipped

    def _store_each(self, assoc, records: list[dict], name: str) -> tuple[int, int, list]:
        """C-STORE each instance as C-MOVE would send it: (stored, passed over, [(UID,
        status)] of those the destination did not store); stops when the association is
        lost."""
        failed, skipped, count = [], 0, 0
        for _, ds in sub_operations(self.archive, records, f"forward to {name}",
                                    Receiver(assoc), self.settings.ae_title,
                                    f"{self.settings.ae_title} (forwarding)"):
            if not isinstance(ds, PreEncoded):         # cannot go out: logged there
                skipped += 1
                continue
            status = getattr(assoc.send_c_store(ds), "Status", None)
            if status in _SENT:
                count += 1
            else:
                failed.append((ds.SOPInstanceUID, status))
                if not assoc.is_established:
                    break
        return count, skipped, failed

    @staticmethod
    def _failed(item: forwarding.Due, error: str) -> str:
        log.warning("forward of series %s to %s: %s (attempt %d)", item.series_uid,
                    item.destination, error, item.attempts + 1)
        return error

    def _associate(self, dest, records: list[dict]):
        ae = AE(ae_title=self.settings.ae_title)
        ae.connection_timeout = commitment.CONNECTION_TIMEOUT    # as C-MOVE destinations
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 30, 60, 60
        return ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                            contexts=store_contexts(records, self.archive),
                            evt_handlers=[(evt.EVT_CONN_OPEN, tune_association)])

    def _count(self, destination: str, sent: int, failed: int) -> None:
        if self.metrics is not None:
            self.metrics.forwarded(destination, sent, failed)
