"""The node: the pynetdicom application entity, its handlers, and the compaction worker.

Built in one place, the same way by ``voxarc serve`` and by the tests.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelFind,
    StorageCommitmentPushModel, StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove, Verification,
)

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.presentation import PresentationContext

from service import (audit_syslog, command_encoding, commitment, exact_send, handlers,
                     move_refusal, negotiation, quiet_log, statuses, tls)
from service.access import AccessPolicy, guard
from service.config import Settings
from service.forwarding import Forwarder
from service.retention import RetentionWorker
from service.hl7_listener import Hl7Listener
from service.metrics import NodeMetrics
from service.patrol import Patrol
from service.socket_tuning import tune_association
from storage import part10
from storage.archive import Archive

log = logging.getLogger(__name__)
#: what a running node takes from its settings file again on SIGHUP (:meth:`Node.reload`): who
#: may use it (the admin page, DICOMweb, the HL7 port, the DICOM peers), where it sends, which
#: rejection notes it applies, how long deletions stay restorable and what it deletes by rule
RELOADABLE = ("http_token", "http_users", "hl7_senders", "peers", "destinations", "forward",
              "hl7_prefetch", "rejection_notes_from", "deleted_keep_days", "retention",
              "retention_hour", "retention_grace_days")
# The acceptor's order decides which proposed syntax a context gets; explicit VR little endian
# first, as most modalities send it (an instance goes out only in the syntax it came in).
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian] + [
    ts for ts in ALL_TRANSFER_SYNTAXES if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)]
QUERY_RETRIEVE = (
    PatientRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove,
)


def open_archive(settings: Settings) -> Archive:
    """Open the archive a node's settings describe (telling its audit record repository, when
    one is set, what its access trail is told)."""
    archive = Archive(settings.data_dir, settings.database_url, settings.duplicate_policy,
                      settings.max_storage_bytes, settings.codec_model,
                      settings.max_stack_slices, settings.cache_bytes, settings.codec_slab,
                      settings.codec_adapt, settings.access_trail_days,
                      settings.deleted_keep_days)
    try:
        audit_syslog.attach(archive, settings)
    except Exception:
        archive.close()
        raise
    return archive


def build_ae(settings: Settings) -> AE:
    """Return the application entity: every storage SOP class in every transfer syntax (also in
    the SCP role, for C-GET), Verification, the Patient/Study Root query/retrieve models and
    Storage Commitment Push Model."""
    exact_send.install()    # retrieved instances go out as received, never re-encoded
    command_encoding.install()    # C-STORE command sets packed without a pydicom Dataset
    move_refusal.install()        # a refused C-MOVE opens no association to its destination
    quiet_log.install()           # no anonymous log line per instance sent or match found
    # pynetdicom's "standard" handlers log every PDU and DIMSE message (building the text even
    # when the level drops it); keep them for debug logging only, we log each operation anyway.
    debug = logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)
    _config.LOG_HANDLER_LEVEL = "standard" if debug else "none"
    ae = AE(ae_title=settings.ae_title)
    ae.implementation_class_uid = part10.IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = part10.IMPLEMENTATION_VERSION_NAME
    ae.maximum_pdu_size = settings.max_pdu_size     # large PDUs: far fewer round trips
    # C-MOVE's associations to destinations: one that drops packets (switched off, firewalled)
    # would hold the request for the operating system's two minutes of SYN retries
    ae.connection_timeout = commitment.CONNECTION_TIMEOUT     # as for commitment reports
    ae.maximum_associations = settings.max_associations
    ae.require_called_aet = settings.require_called_ae_title
    ae.require_calling_aet = AccessPolicy.from_settings(settings.peers).calling_titles()
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES,
                                 scu_role=True, scp_role=True)
    ae.add_supported_context(Verification)
    ae.add_supported_context(StorageCommitmentPushModel)
    for sop_class in QUERY_RETRIEVE:
        ae.add_supported_context(sop_class)
    return ae


def event_handlers(archive: Archive, settings: Settings,
                   reporter: commitment.Reporter | None = None,
                   policy: AccessPolicy | None = None) -> list:
    """The (event, handler, args) bindings of a node, with the permission checks of ``policy``
    (default: the ``peers`` setting's; storage commitment only with a ``reporter`` to answer
    it)."""
    policy = AccessPolicy.from_settings(settings.peers) if policy is None else policy
    return guard([
        (evt.EVT_CONN_OPEN, tune_association),
        (evt.EVT_ACCEPTED, handlers.handle_association),
        (evt.EVT_RELEASED, handlers.handle_association),
        (evt.EVT_ABORTED, handlers.handle_association),
        (evt.EVT_SOP_EXTENDED, handlers.handle_extended),
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store,
         [archive, settings.max_dataset_bytes, settings]),
        (evt.EVT_C_FIND, handlers.handle_find, [archive, settings.max_find_results]),
        (evt.EVT_C_GET, handlers.handle_get, [archive]),
        (evt.EVT_C_MOVE, handlers.handle_move, [archive, settings]),
        (evt.EVT_REJECTED, handlers.handle_rejected,
         [archive, policy, settings.require_called_ae_title]),
    ] + ([(evt.EVT_N_ACTION, commitment.handle_action, [reporter, settings])] if reporter else []),
        policy, handlers.refusals(archive))


class _SharedSyntaxContext(PresentationContext):
    """A supported presentation context whose copies share its (immutable) transfer syntax UIDs.

    pynetdicom deep-copies every supported context for each new association; with every storage
    SOP class in every transfer syntax (177 contexts, 7,678 UIDs) that took 180 ms here, on every
    association, before the A-ASSOCIATE-AC. A copy needs its own list, not its own UID strings.
    """

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        new._transfer_syntax = list(self._transfer_syntax)
        return new


def shared_contexts(contexts: list) -> list:
    """The same presentation contexts, as :class:`_SharedSyntaxContext` (cheap to deep-copy)."""
    out = []
    for cx in contexts:
        new = _SharedSyntaxContext()
        new.__dict__.update(copy.deepcopy(cx).__dict__)
        out.append(new)
    return out


class CompactionWorker(threading.Thread):
    """Background thread compacting stable series every ``compaction_interval`` seconds.

    While ``fast_backlog`` or more series wait behind the one it codes, it codes without the
    codec's adaptation (storage.compaction); when nothing at all is staged, it codes one such
    stack again with adaptation per pass (storage.recode), so the archive ends up as small as
    if it had never fallen behind."""

    def __init__(self, archive: Archive, stable_age: float, interval: float,
                 fast_backlog: int = 0):
        super().__init__(name="voxarc-compaction", daemon=True)
        self.archive, self.stable_age, self.interval = archive, stable_age, interval
        self.fast_backlog = fast_backlog
        # whether deferred stacks may be left: only this worker defers, so after a look that
        # found none, the next one waits for a compaction (each look scans the blob rows)
        self._deferred_left = True
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.run_pass()
            except Exception:  # a failed pass is logged; the next one tries again
                log.exception("compaction pass failed")
            self._stop_event.wait(self.interval)

    def run_pass(self) -> None:
        """One look: compact the stable series; when nothing is staged, one deferred stack.
        Expired recycle bin entries are removed (at most once an hour)."""
        self.archive.recycle.purge_if_due()
        if self.archive.compact(self.stable_age, self.fast_backlog) != (0, 0):
            self._deferred_left = True
        elif self._deferred_left and not self.archive.pending_series(0.0):
            # a damaged stack is unmarked and not returned: then look whether others are left
            self._deferred_left = bool(self.archive.adapt_deferred(1)
                                       or self.archive.recoder().deferred_blobs(1))

    def stop(self) -> None:
        """Ask the worker to finish its current series and exit; wait for it."""
        self._stop_event.set()
        self.join()


class Node:
    """A running storage node: DICOM listener plus compaction worker and integrity patrol.

    Parameters
    ----------
    settings : Settings
        Port 0 picks a free port (see :attr:`port`).
    compaction : bool
        Run the background workers: compaction, the integrity patrol, forwarding, retention.
    """

    def __init__(self, settings: Settings, compaction: bool = True):
        self.settings = settings
        self.archive = open_archive(settings)
        self.metrics = NodeMetrics(self.archive)           # served at /metrics (service.web)
        self.metrics.watch_compactor(self.archive.compactor)
        self.ae = build_ae(settings)
        move_refusal.count_with(self.ae, lambda: self.metrics.dimse_done(
            "C-MOVE", statuses.IDENTIFIER_MISMATCH))
        self.reporter = commitment.Reporter(self.archive, settings)
        self.server = None
        self.worker = CompactionWorker(self.archive, settings.stable_age,
                                       settings.compaction_interval,
                                       settings.codec_fast_backlog) if compaction else None
        self.patrol = Patrol(self.archive, settings.scrub_every_days * 86400.0,
                             settings.scrub_read_mb_per_s * 1e6) \
            if compaction and settings.scrub_every_days > 0 else None
        # with destinations but no rules, it makes again the sends by hand that failed
        self.forwarder = Forwarder(self.archive, settings, self.metrics) \
            if compaction and (settings.forward or settings.destinations) else None
        # it reads the settings at each look: rules added by a reload need no restart
        self.retention = RetentionWorker(self.archive, settings) if compaction else None
        self.hl7: Hl7Listener | None = None
        self.background = compaction
        #: the calling AE titles and what each may do; a reload changes it in place
        self.policy = AccessPolicy.from_settings(settings.peers)

    @property
    def port(self) -> int:
        """The TCP port the listener is bound to."""
        return self.server.server_address[1]

    def start(self) -> "Node":
        """Start listening (in background threads) and start the compaction worker."""
        ssl_context = tls.server_context(self.settings.tls_certificate,
                                         self.settings.tls_private_key,
                                         self.settings.tls_ca_certificates)
        self.server = self.ae.start_server((self.settings.host, self.settings.port), block=False,
                                           ssl_context=ssl_context,
                                           contexts=negotiation.attach(
                                               shared_contexts(self.ae.supported_contexts),
                                               negotiation.RetrievalOrder(
                                                   self.archive.stored_syntaxes)),
                                           evt_handlers=self.metrics.instrument(
                                               event_handlers(self.archive, self.settings,
                                                              self.reporter, self.policy)))
        if self.settings.hl7_port:
            try:
                self.hl7 = Hl7Listener(self.archive, self.settings,
                                       self.metrics.hl7_answered).start()
            except (OSError, ValueError):        # its port, its TLS certificate
                self.server.shutdown()
                self.archive.close()
                raise
        if self.worker:
            self.worker.start()
        if self.patrol:
            self.patrol.start()
        if self.forwarder:
            self.forwarder.start()
            self._log_forwarding()
        if self.retention:
            self.retention.start()
            self._log_retention()
        threading.Thread(target=self._warm, name="voxarc-warm", daemon=True).start()
        if self.settings.access_trail_days > 0:
            # the access trail's old rows, now (its writer removes them once a day after this)
            threading.Thread(target=self.archive.accesses.prune, name="voxarc-trail-prune",
                             daemon=True).start()
        log.info("voxarc node %s listening on %s:%d (data %s)", self.settings.ae_title,
                 self.settings.host, self.port, self.settings.data_dir)
        audit = audit_syslog.attached(self.archive)
        if audit is not None:
            audit.application(started=True)
            log.info("audit messages to %s", self.settings.audit_syslog)
        _log_codec()
        return self

    def reload(self, fresh: Settings) -> tuple[list[str], list[str]]:
        """Take the :data:`RELOADABLE` settings of ``fresh`` (the settings file read again) into
        the running node, each where it is used; return (those that changed, the other settings
        that changed and need a restart, which are left as they are)."""
        changed = [f.name for f in dataclasses.fields(Settings)
                   if getattr(fresh, f.name) != getattr(self.settings, f.name)]
        applied = [name for name in changed if name in RELOADABLE]
        for name in applied:
            setattr(self.settings, name, getattr(fresh, name))
        if "peers" in applied:
            self.policy.peers = AccessPolicy.from_settings(fresh.peers).peers
            self.ae.require_calling_aet = self.policy.calling_titles()
        if "deleted_keep_days" in applied:
            self.archive.recycle.keep_days = fresh.deleted_keep_days
        if "forward" in applied or "destinations" in applied:
            self._forwarding_changed()
        if {"retention", "retention_hour"} & set(applied):
            self._log_retention()
        return applied, [name for name in changed if name not in RELOADABLE]

    def _forwarding_changed(self) -> None:
        if self.forwarder is not None:
            self.forwarder.use_rules(self.settings.forward)
        elif self.background and (self.settings.forward or self.settings.destinations):
            self.forwarder = Forwarder(self.archive, self.settings, self.metrics)
            self.forwarder.start()
        self._log_forwarding()

    def _log_forwarding(self) -> None:
        if self.settings.forward:
            log.info("forwarding: %s", "; ".join(f"{name} <- {rule or 'every series'}"
                                                  for name, rule in self.settings.forward.items()))

    def _log_retention(self) -> None:
        if self.settings.retention:
            when = f"daily at {self.settings.retention_hour:02d}h" \
                if self.settings.retention_hour >= 0 else "not by itself (retention_hour -1)"
            log.info("retention rules, applied %s: %s", when, "; ".join(
                f"{name} <- {text}" for name, text in self.settings.retention.items()))

    def _warm(self) -> None:
        try:
            if self.archive.warm_decoders():
                log.info("decoder processes: started")
            else:
                log.info("decoder processes: not started (no compressed volume stored yet)")
        except Exception:  # only a head start: retrievals start the processes themselves
            log.exception("could not start the decoder processes ahead of retrievals")

    def stop(self) -> None:
        """Stop accepting, finish running associations and compaction, close the index."""
        if self.server is not None:
            self.server.shutdown()
        if self.hl7 is not None:
            self.hl7.stop()
        if self.worker is not None and self.worker.is_alive():
            self.worker.stop()
        if self.patrol is not None:
            self.patrol.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.retention is not None and self.retention.is_alive():
            self.retention.stop()
        self.reporter.stop()
        audit = audit_syslog.attached(self.archive)
        if audit is not None:
            audit.application(started=False)
        self.archive.close()
        log.info("voxarc node %s stopped", self.settings.ae_title)


def _log_codec() -> None:
    """Say how this node's codec computes (a node without the compiled kernels compacts and
    retrieves several times slower: a warning)."""
    from models import kernels
    from models.predictor import compute_device
    device = compute_device()
    level = logging.INFO if kernels.available() else logging.WARNING
    where = "" if device == "cpu" else f"; the network on {device} (torch)"
    log.log(level, "codec: %s%s", kernels.describe(), where)
