"""pynetdicom SCU helpers of the service tests: store, find, get and a store SCP for C-MOVE."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, build_role, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove, Verification)

from service import reactor_pause
from storage.part10 import build_file


def associate(port: int, contexts, **kwargs):
    """An association of a pynetdicom SCU with the node at ``port``, with the node's guard
    against pynetdicom's reactor race (service.reactor_pause): under two busy cores a test's
    C-STORE response was dropped as "unexpected" and the SCU waited out its timeout."""
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title="VOXARC", **kwargs)
    assert assoc.is_established and reactor_pause.guard(assoc)
    return assoc


def store_bytes(port: int, items: list[tuple[str, str, str, bytes]], tmp: Path) -> list[int]:
    """C-STORE (sop_class, sop_uid, ts, dataset bytes) items unchanged; return the statuses."""
    _config.STORE_SEND_CHUNKED_DATASET = True      # send the file's dataset bytes unchanged
    contexts = sorted({(c, ts) for c, _, ts, _ in items})
    assoc = associate(port, [build_context(c, [ts]) for c, ts in contexts])
    out = []
    for n, (sop_class, uid, ts, data) in enumerate(items):
        path = tmp / f"send{n}.dcm"
        path.write_bytes(build_file(sop_class, uid, ts, data))
        out.append(assoc.send_c_store(path).Status)
    assoc.release()
    return out


def echo(port: int) -> int:
    assoc = associate(port, [build_context(Verification)])
    status = assoc.send_c_echo().Status
    assoc.release()
    return status


def find(port: int, query: dict, patient_root: bool = False) -> tuple[int, list[Dataset]]:
    """C-FIND; return the final status and the matches."""
    model = (PatientRootQueryRetrieveInformationModelFind if patient_root
             else StudyRootQueryRetrieveInformationModelFind)
    ds = Dataset()
    for keyword, value in query.items():
        setattr(ds, keyword, value)
    assoc = associate(port, [build_context(model)])
    matches, final = [], None
    for status, ident in assoc.send_c_find(ds, model):
        if status and status.Status in (0xFF00, 0xFF01):
            matches.append(ident)
        elif status:
            final = status.Status
    assoc.release()
    return final, matches


def get(port: int, query: dict, storage: list[tuple[str, str]], cancel_after: int = 0):
    """C-GET accepting the given (SOP class, transfer syntax) pairs (a list of syntaxes: one
    context proposing them in that order), sending a C-CANCEL once ``cancel_after`` instances
    have come (before answering the last of them); return (final status dataset,
    {sop_uid: (ts, dataset bytes)})."""
    received = {}

    def on_store(event):
        received[event.request.AffectedSOPInstanceUID] = (
            str(event.context.transfer_syntax), event.encoded_dataset(include_meta=False))
        if len(received) == cancel_after:
            context = next(cx for cx in assoc.accepted_contexts
                           if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet)
            assoc.send_c_cancel(1, context.context_id)
        return 0x0000

    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
    contexts += [build_context(c, ts if isinstance(ts, list) else [ts]) for c, ts in storage]
    roles = [build_role(c, scp_role=True) for c in sorted({c for c, _ in storage})]
    assoc = associate(port, contexts, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    ds = Dataset()
    for keyword, value in query.items():
        setattr(ds, keyword, value)
    final = None
    for status, _ in assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet, msg_id=1):
        if status and status.Status not in (0xFF00,):
            final = status
    assoc.release()
    return final, received


def move(port: int, query: dict, destination: str):
    ds = Dataset()
    for keyword, value in query.items():
        setattr(ds, keyword, value)
    assoc = associate(port, [build_context(StudyRootQueryRetrieveInformationModelMove)])
    final = None
    for status, _ in assoc.send_c_move(ds, destination,
                                       StudyRootQueryRetrieveInformationModelMove):
        if status and status.Status != 0xFF00:
            final = status
    assoc.release()
    return final


class StoreSCP:
    """A pynetdicom storage SCP recording what it receives (a C-MOVE destination)."""

    def __init__(self, ae_title: str = "DEST", fail_every: int = 0):
        self.received: dict = {}
        self.fail_every, self.count = fail_every, 0
        ae = AE(ae_title=ae_title)
        from pynetdicom import AllStoragePresentationContexts
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]

    def _on_store(self, event):
        self.count += 1
        if self.fail_every and self.count % self.fail_every == 0:
            return 0xA700
        self.received[event.request.AffectedSOPInstanceUID] = (
            str(event.context.transfer_syntax), event.encoded_dataset(include_meta=False))
        return 0x0000

    def stop(self):
        self.server.shutdown()
