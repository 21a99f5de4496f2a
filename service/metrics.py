"""Prometheus metrics of a node: what it received, what compaction did, what failed.

Counters live in a :class:`NodeMetrics` (one registry per node, so that nodes in one process do
not mix their numbers). They are fed from two hook points wired in by :class:`service.ae.Node`:
:meth:`NodeMetrics.instrument` wraps the DIMSE event handlers (and listens to association
events), :meth:`NodeMetrics.watch_compactor` times each series compaction. What the index holds
(instances, bytes original and stored, compaction queue) is read from the archive at each scrape.
"""

from __future__ import annotations

import functools
import inspect
import shutil
import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pynetdicom import evt

from models import parallel
from service import audit_syslog, patrol, retention, statuses
from storage import forwarding, reports, transcode

CONTENT_TYPE = CONTENT_TYPE_LATEST
_OPERATIONS = {evt.EVT_C_ECHO: "C-ECHO", evt.EVT_C_STORE: "C-STORE", evt.EVT_C_FIND: "C-FIND",
               evt.EVT_C_GET: "C-GET", evt.EVT_C_MOVE: "C-MOVE", evt.EVT_N_ACTION: "N-ACTION"}
_ASSOCIATION_EVENTS = {evt.EVT_ACCEPTED: "accepted", evt.EVT_REJECTED: "rejected",
                       evt.EVT_RELEASED: "released", evt.EVT_ABORTED: "aborted"}
_NOT_FAILURES = (statuses.SUCCESS, statuses.PENDING, 0xFF01, statuses.CANCEL)


def _status_of(item) -> int | None:
    """The DIMSE status a handler's yielded item carries, if any."""
    if item == (None, None):                 # C-MOVE to an unknown destination
        return statuses.UNKNOWN_DESTINATION
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int):
        return item[0]
    return None


def _plain_status(value) -> int | None:
    """The status code of a handler's return value: an int, a status Dataset, or a tuple of
    either and a dataset (N-ACTION)."""
    if isinstance(value, tuple):
        value = value[0]
    return getattr(value, "Status", value) if value is not None else None


def _dataset_size(event) -> int:
    """Bytes of a C-STORE request's dataset, without copying them (0 when there is none)."""
    try:
        with event.request.DataSet.getbuffer() as view:
            return view.nbytes
    except (AttributeError, BufferError, ValueError):
        return 0


class _IndexCollector:
    """Gauges read from the archive's index at each scrape."""

    def __init__(self, archive):
        self.archive = archive

    def collect(self):
        totals = self.archive.stats()
        for key, doc in (("instances", "Instances stored"), ("series", "Series stored"),
                         ("studies", "Studies stored"),
                         ("original_bytes", "Bytes of the datasets as received"),
                         ("stored_bytes", "Bytes the archive holds for them now"),
                         ("pending_instances", "Instances staged, waiting for compaction"),
                         ("deferred_stacks", "Stacks coded without adaptation while compaction "
                                             "was behind, to be coded again when idle"),
                         ("recycle_bin_bytes", "Bytes of deleted instances kept restorable in "
                                               "the recycle bin")):
            yield GaugeMetricFamily(f"voxarc_{key}", doc, value=totals[key])
        usage = shutil.disk_usage(self.archive.data_dir)
        yield GaugeMetricFamily("voxarc_disk_free_bytes",
                                "Free bytes of the data folder's file system", value=usage.free)
        yield GaugeMetricFamily("voxarc_disk_total_bytes",
                                "Size of the data folder's file system", value=usage.total)
        queue = reports.jobs(self.archive.index)
        jobs = GaugeMetricFamily("voxarc_compaction_queue", "Series in the compaction queue",
                                 labels=["state"])
        for state in ("pending", "running", "failed"):
            jobs.add_metric([state], len(queue[state]))
        yield jobs
        failed = GaugeMetricFamily("voxarc_forward_failed_series",
                                   "Series whose forwarding failed, waiting for another attempt",
                                   labels=["destination"])
        for destination, count in sorted(forwarding.failed_count(self.archive.index).items()):
            failed.add_metric([destination], count)
        yield failed
        last = patrol.last_round(self.archive)
        if last is not None:       # before the first round there is nothing to say
            yield GaugeMetricFamily("voxarc_scrub_last_finished_timestamp_seconds",
                                    "When the integrity patrol last read every stored file back",
                                    value=last["finished"])
            yield GaugeMetricFamily("voxarc_scrub_damaged_instances",
                                    "Instances whose stored file the last patrol found damaged",
                                    value=last["damaged_instances"])
            yield GaugeMetricFamily("voxarc_scrub_damaged_bin_files",
                                    "Recycle bin files (deletions to undo, originals kept for "
                                    "legal holds) the last patrol found damaged",
                                    value=len(last.get("damaged_bin_files", {})))
        yield from _retention_gauges(retention.last_run(self.archive))


def _retention_gauges(last: dict | None):
    """The last retention run's gauges (none before the first)."""
    if last is None:
        return
    totals = retention.run_totals(last)
    yield GaugeMetricFamily("voxarc_retention_last_run_timestamp_seconds",
                            "When the retention rules were last applied", value=last["started"])
    yield GaugeMetricFamily("voxarc_retention_deleted_instances",
                            "Instances the last retention run deleted (into the recycle bin)",
                            value=totals["deleted_instances"])
    yield GaugeMetricFamily("voxarc_retention_failed_records",
                            "Records the last retention run selected and could not delete "
                            "(1 when the run itself failed)", value=totals["failed"])


class _DecoderCollector:
    """Gauges of the codec's worker processes and of the decoded-slab cache, read at each
    scrape: jobs waiting for a worker say that retrievals (or compaction) want more cores."""

    def __init__(self, archive=None):
        self.archive = archive

    def collect(self):
        waiting, running = parallel.load()
        jobs = GaugeMetricFamily("voxarc_codec_jobs", "Codec jobs of the worker processes",
                                 labels=["state"])
        jobs.add_metric(["waiting"], waiting)
        jobs.add_metric(["running"], running)
        yield jobs
        made = CounterMetricFamily(
            "voxarc_conversions", "Instances sent converted to a syntax the receiver takes "
            "(storage.transcode)", labels=["from_syntax", "to_syntax", "result"])
        for (stored, target, result), n in sorted(transcode.counts().items()):
            made.add_metric([stored, target, result], n)
        yield made
        if self.archive is not None:
            cache = self.archive.reconstructor.cache
            yield GaugeMetricFamily("voxarc_slab_cache_bytes",
                                    "Bytes of decoded slabs held for retrievals",
                                    value=cache.used)
            yield GaugeMetricFamily("voxarc_slab_cache_limit_bytes",
                                    "Budget of the decoded-slab cache (cache_bytes)",
                                    value=cache.max_bytes)


class _AuditCollector:
    """The audit messages sent to the audit record repository, and those dropped (it could not
    be reached while the queue filled): alert on the second."""

    def __init__(self, archive):
        self.archive = archive

    def collect(self):
        trail = audit_syslog.attached(self.archive)
        if trail is None:
            return
        messages = CounterMetricFamily("voxarc_audit_messages", "Audit messages for the "
                                       "audit record repository (audit_syslog)",
                                       labels=["result"])
        messages.add_metric(["sent"], trail.sender.sent)
        messages.add_metric(["dropped"], trail.sender.dropped)
        yield messages
        yield GaugeMetricFamily("voxarc_audit_queue", "Audit messages waiting to be sent",
                                value=trail.sender.queued)


class NodeMetrics:
    """The metrics of one node.

    Parameters
    ----------
    archive : Archive, optional
        When given, its totals and compaction queue are exported as gauges.
    """

    def __init__(self, archive=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("voxarc_instances_received", "Instances stored by C-STORE",
                                registry=r)
        self.received_bytes = Counter("voxarc_received_bytes", "Dataset bytes stored by C-STORE",
                                      registry=r)
        self.requests = Counter("voxarc_dimse_requests", "DIMSE requests handled",
                                ["operation"], registry=r)
        self.failures = Counter("voxarc_dimse_failures", "DIMSE requests answered with a failure",
                                ["operation", "status"], registry=r)
        self.associations = Counter("voxarc_associations", "Association events", ["event"],
                                    registry=r)
        self.compactions = Counter("voxarc_compactions", "Series compactions", ["result"],
                                   registry=r)
        self.compaction_seconds = Histogram(
            "voxarc_compaction_seconds", "Duration of one series compaction", registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, float("inf")))
        self.compacted_bytes = Counter("voxarc_compacted_bytes",
                                       "Staged bytes compacted successfully", registry=r)
        self.throughput = Gauge("voxarc_compaction_throughput_bytes_per_second",
                                "Staged bytes per second of the last successful compaction",
                                registry=r)
        self.forwarded_instances = Counter(
            "voxarc_forwarded_instances", "Instances forwarded by C-STORE, by destination and "
            "result", ["destination", "result"], registry=r)
        self.hl7_messages = Counter("voxarc_hl7_messages", "HL7 messages answered (ADT, "
                                    "orders, appointments), by acknowledgement code (AA, AE, "
                                    "AR)", ["ack"], registry=r)
        if archive is not None:
            r.register(_IndexCollector(archive))
        r.register(_DecoderCollector(archive))
        if archive is not None:
            r.register(_AuditCollector(archive))

    # --- hook points -----------------------------------------------------------------------
    def store_done(self, status: int, nbytes: int) -> None:
        """Count one C-STORE answered with ``status`` for a dataset of ``nbytes``."""
        self.dimse_done("C-STORE", status)
        if status == statuses.SUCCESS:
            self.received.inc()
            self.received_bytes.inc(nbytes)

    def dimse_done(self, operation: str, status: int | None) -> None:
        """Count one request of ``operation``, and a failure when ``status`` is one."""
        self.requests.labels(operation).inc()
        self.dimse_status(operation, status)

    def dimse_status(self, operation: str, status: int | None) -> None:
        """Count a failure of ``operation`` when ``status`` is a failure status."""
        if status is not None and status not in _NOT_FAILURES:
            self.failures.labels(operation, f"0x{status:04X}").inc()

    def association(self, name: str) -> None:
        """Count one association event ("accepted", "rejected", "released", "aborted")."""
        self.associations.labels(name).inc()

    def forwarded(self, destination: str, sent: int, failed: int) -> None:
        """Count the instances one forwarding attempt stored at ``destination``, and those
        it failed to."""
        self.forwarded_instances.labels(destination, "stored").inc(sent)
        if failed:
            self.forwarded_instances.labels(destination, "failed").inc(failed)

    def hl7_answered(self, code: str) -> None:
        """Count one HL7 message answered with the acknowledgement ``code``."""
        self.hl7_messages.labels(code).inc()

    def compaction_done(self, ok: bool, seconds: float, nbytes: int) -> None:
        """Record one series compaction of ``nbytes`` staged bytes taking ``seconds``."""
        self.compactions.labels("ok" if ok else "failed").inc()
        self.compaction_seconds.observe(seconds)
        if ok:
            self.compacted_bytes.inc(nbytes)
            self.throughput.set(nbytes / seconds if seconds > 0 else 0.0)

    # --- wiring --------------------------------------------------------------------------------
    def instrument(self, bindings: list) -> list:
        """Return pynetdicom handler bindings whose DIMSE handlers are counted, plus handlers of
        the association events."""
        out = []
        for event, handler, *args in bindings:
            name = _OPERATIONS.get(event)
            out.append((event, self._wrap(name, handler), *args) if name else
                       (event, handler, *args))
        for event, name in _ASSOCIATION_EVENTS.items():
            out.append((event, lambda _event, name=name: self.association(name)))
        return out

    def _wrap(self, operation: str, handler):
        if inspect.isgeneratorfunction(handler):
            @functools.wraps(handler)
            def counted_generator(event, *args):
                self.dimse_done(operation, None)
                for item in handler(event, *args):
                    self.dimse_status(operation, _status_of(item))
                    yield item
            return counted_generator

        @functools.wraps(handler)
        def counted(event, *args):
            status = handler(event, *args)
            if operation == "C-STORE":
                self.store_done(status, _dataset_size(event))
            else:
                self.dimse_done(operation, _plain_status(status))
            return status
        return counted

    def watch_compactor(self, compactor) -> None:
        """Time every ``compactor.compact_series`` call (wraps that method of the instance)."""
        compact = compactor.compact_series

        @functools.wraps(compact)
        def timed(series_id: int, **options) -> bool:
            nbytes = reports.staged_bytes(compactor.index, series_id)
            start = time.perf_counter()
            ok = False
            try:
                ok = compact(series_id, **options)
                return ok
            finally:
                if nbytes:                        # a series with nothing staged did no work
                    self.compaction_done(ok, time.perf_counter() - start, nbytes)
        compactor.compact_series = timed

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
