"""Access: calling AE titles limited to ``peers`` (others rejected at association), per-peer
store / query / retrieve permissions, the called AE title checked, association and PDU limits,
and TLS (mutual, self-signed certificates made with openssl) tested with DCMTK ``storescu +tls``."""

import shutil
import subprocess

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove, Verification)

from node_helpers import DCMTK, make_series, write_series
from service.access import AccessPolicy, parse_permissions
from service.dcmtk import dcmtk
from service.ae import Node
from service.config import load_settings
from storage.part10 import split_file

CT = "1.2.840.10008.5.1.4.1.1.2"
PEERS = {"MODALITY": "store", "VIEWER": "query,retrieve"}


def _node(tmp_path, **settings):
    values = dict(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0, stable_age=3600.0)
    values.update(settings)
    return Node(load_settings(**values), compaction=False).start()


def _assoc(port, calling="MODALITY", called="VOXARC", contexts=None, **kwargs):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae.associate("127.0.0.1", port, ae_title=called,
                        contexts=contexts or [build_context(Verification)], **kwargs)


def _store(port, calling, ds):
    assoc = _assoc(port, calling, contexts=[build_context(CT)])
    status = assoc.send_c_store(ds).Status
    assoc.release()
    return status


def _series_query(series_uid) -> Dataset:
    ident = Dataset()
    ident.QueryRetrieveLevel, ident.SeriesInstanceUID = "SERIES", series_uid
    return ident


def _query(port, calling, series_uid):
    assoc = _assoc(port, calling,
                   contexts=[build_context(StudyRootQueryRetrieveInformationModelFind)])
    ident = _series_query(series_uid)
    statuses = [s.Status for s, _ in assoc.send_c_find(
        ident, StudyRootQueryRetrieveInformationModelFind) if s]
    assoc.release()
    return statuses


def _get(port, calling, series_uid):
    got = []
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet), build_context(CT)]
    assoc = _assoc(port, calling, contexts=contexts, ext_neg=[build_role(CT, scp_role=True)],
                   evt_handlers=[(evt.EVT_C_STORE, lambda e: got.append(1) or 0x0000)])
    ident = _series_query(series_uid)
    final = [s.Status for s, _ in assoc.send_c_get(
        ident, StudyRootQueryRetrieveInformationModelGet) if s][-1]
    assoc.release()
    return final, len(got)


def _move(port, calling, series_uid):
    assoc = _assoc(port, calling,
                   contexts=[build_context(StudyRootQueryRetrieveInformationModelMove)])
    ident = _series_query(series_uid)
    final = [s.Status for s, _ in assoc.send_c_move(
        ident, "NOWHERE", StudyRootQueryRetrieveInformationModelMove) if s][-1]
    assoc.release()
    return final


def test_policy_parsing():
    assert parse_permissions("store, query") == {"store", "query"}
    with pytest.raises(ValueError):
        parse_permissions("store,delete")
    with pytest.raises(ValueError):
        AccessPolicy.from_settings({"A" * 17: "store"})
    open_policy = AccessPolicy.from_settings({})
    assert open_policy.allows("ANYONE", "retrieve") and open_policy.calling_titles() == []
    with pytest.raises(ValueError):
        load_settings(peers="MODALITY=store")


def test_unknown_callers_and_wrong_called_title_rejected(tmp_path):
    node = _node(tmp_path, peers=PEERS)
    try:
        stranger = _assoc(node.port, calling="STRANGER")
        assert stranger.is_rejected and not stranger.is_established
        wrong = _assoc(node.port, calling="VIEWER", called="SOMEONE")
        assert wrong.is_rejected
        ok = _assoc(node.port, calling="VIEWER")
        assert ok.is_established and ok.send_c_echo().Status == 0
        ok.release()
    finally:
        node.stop()


def test_per_peer_permissions(tmp_path):
    node = _node(tmp_path, peers=PEERS)
    series = make_series(2, 8, 8)
    uid = series[0].SeriesInstanceUID
    try:
        assert _store(node.port, "MODALITY", series[0]) == 0x0000
        assert _store(node.port, "VIEWER", series[1]) == 0x0124       # query/retrieve only
        assert node.archive.stats()["instances"] == 1
        assert _query(node.port, "MODALITY", uid) == [0x0124]
        assert _query(node.port, "VIEWER", uid) == [0xFF00, 0x0000]
        assert _get(node.port, "MODALITY", uid) == (0x0124, 0)
        assert _get(node.port, "VIEWER", uid) == (0x0000, 1)
        assert _move(node.port, "MODALITY", uid) == 0xC514
        assert _move(node.port, "VIEWER", uid) == 0xA801            # allowed, unknown destination
    finally:
        node.stop()


def test_association_and_pdu_limits(tmp_path):
    node = _node(tmp_path, max_associations=1, max_pdu_size=65536)
    try:
        first = _assoc(node.port)
        assert first.is_established and first.acceptor.maximum_length == 65536
        second = _assoc(node.port, calling="OTHER")
        assert not second.is_established
        first.release()
    finally:
        node.stop()
    defaults = load_settings()
    assert defaults.max_associations == 16 and defaults.max_pdu_size == 4 << 20
    assert defaults.require_called_ae_title and defaults.peers == {}


def _certificate(folder, name):
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "2", "-subj", f"/CN={name}"], check=True,
                   capture_output=True)
    return key, cert


@pytest.mark.skipif(not DCMTK or not shutil.which("openssl"), reason="needs DCMTK and openssl")
def test_tls_with_dcmtk_storescu(tmp_path):
    server_key, server_cert = _certificate(tmp_path, "localhost")
    client_key, client_cert = _certificate(tmp_path, "modality")
    paths = write_series(make_series(3, 16, 16), tmp_path / "in")
    node = _node(tmp_path, tls_certificate=str(server_cert), tls_private_key=str(server_key),
                 tls_ca_certificates=str(client_cert), peers={"STORESCU": "store"})
    try:
        base = [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "VOXARC", "-to", "60"]
        tls = ["+tls", str(client_key), str(client_cert), "+cf", str(server_cert)]
        plain = subprocess.run([*base, "127.0.0.1", str(node.port), str(paths[0])],
                               capture_output=True, text=True, timeout=120)
        assert plain.returncode != 0 and node.archive.stats()["instances"] == 0
        stranger_key, stranger_cert = _certificate(tmp_path, "stranger")
        refused = subprocess.run([*base, "+tls", str(stranger_key), str(stranger_cert), "+cf",
                                  str(server_cert), "127.0.0.1", str(node.port), str(paths[0])],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and node.archive.stats()["instances"] == 0
        proc = subprocess.run([*base, *tls, "127.0.0.1", str(node.port), *map(str, paths)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        sent = {split_file(p.read_bytes())[1] for p in paths}
        got = {node.archive.retrieve(r["SOPInstanceUID"]).data
               for r in node.archive.find("IMAGE", {})}
        assert got == sent
    finally:
        node.stop()


def test_a_reload_changes_peers_destinations_and_notes_in_the_running_node(tmp_path):
    """Node.reload (what SIGHUP calls): the new peers and permissions hold from the next
    association, a new destination takes C-MOVEs at once, the recycle bin's days and the
    rejection senders change; a setting that needs a restart is reported and left alone."""
    from scu_helpers import StoreSCP
    node = _node(tmp_path, peers=PEERS)
    dest = StoreSCP("NOWHERE")
    series = make_series(2, 8, 8)
    uid = series[0].SeriesInstanceUID
    try:
        assert _store(node.port, "MODALITY", series[0]) == 0x0000
        assert _assoc(node.port, calling="NEWCOMER").is_rejected
        assert _move(node.port, "VIEWER", uid) == 0xA801
        fresh = load_settings(data_dir=node.settings.data_dir, host="127.0.0.1", port=0,
                              stable_age=3600.0, peers={**PEERS, "NEWCOMER": "query"},
                              destination=[f"nowhere=NOWHERE@127.0.0.1:{dest.port}"],
                              deleted_keep_days=1.5, rejection_notes_from="MODALITY",
                              codec_slab=4)
        applied, pending = node.reload(fresh)
        assert sorted(applied) == ["deleted_keep_days", "destinations", "peers",
                                   "rejection_notes_from"]
        assert pending == ["codec_slab"] and node.settings.codec_slab == 8
        assert _query(node.port, "NEWCOMER", uid) == [0xFF00, 0x0000]
        assert _store(node.port, "NEWCOMER", series[1]) == 0x0124       # query only
        assert _move(node.port, "VIEWER", uid) == 0x0000 and len(dest.received) == 1
        assert node.archive.recycle.keep_days == 1.5
        assert node.settings.rejection_notes_from == "MODALITY"
        assert node.reload(fresh) == ([], ["codec_slab"])               # nothing new
        narrowed = load_settings(data_dir=node.settings.data_dir, peers={"VIEWER": "query"})
        node.reload(narrowed)
        assert _assoc(node.port, calling="MODALITY").is_rejected        # taken away
        assert _move(node.port, "VIEWER", uid) == 0xC514                # query only now
    finally:
        dest.server.shutdown()
        node.stop()
