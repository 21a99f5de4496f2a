"""The node through a pynetdicom SCU: every status path of ECHO, STORE, FIND, GET and MOVE."""

import re

import pytest
from pynetdicom.presentation import build_context
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node_helpers import bundled, dataset_bytes, make_series, node, store_series  # noqa: F401
from scu_helpers import StoreSCP, associate, echo, find, get, move, store_bytes
from service import socket_tuning
from storage.part10 import build_file

CT = "1.2.840.10008.5.1.4.1.1.2"


def _items(datasets):
    out = []
    for ds in datasets:
        ts, data = dataset_bytes(ds)
        out.append((ds.SOPClassUID, ds.SOPInstanceUID, ts, data))
    return out


def _bundled_items(names):
    from storage.dataset_parts import parse_dataset
    out = []
    for name in names:
        ts, data = bundled(name)
        ds = parse_dataset(data, ts)
        out.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts, data))
    return out


@pytest.fixture
def populated(node, tmp_path):
    """Two studies of two patients: a CT stack (explicit VR) and an MR-like stack (implicit)."""
    a = make_series(4, 8, 8, patient_id="PAT1", patient_name="Doe^Jane", study_date="20240102")
    b = make_series(3, 8, 8, patient_id="pat2", patient_name="Roe^Rick", modality="MR",
                    study_date="20231231", transfer_syntax=ImplicitVRLittleEndian, seed=2)
    b[0].StudyDescription = "Müller knee"
    items = _items(a + b) + _bundled_items(["MR_small_RLE.dcm", "CT_small.dcm"])
    assert store_bytes(node.port, items, tmp_path) == [0] * len(items)
    return node, a, b, {uid: (ts, data) for _, uid, ts, data in items}


def _formats(sent):
    pairs = set()
    for _, uid, ts, _ in sent:
        pairs.add((CT, ts))
    return pairs


def test_the_node_says_how_its_codec_computes(tmp_path, caplog, monkeypatch):
    """A node logs at start whether its codec runs the compiled kernels (and which network
    layers), and warns when it runs the slower numpy path."""
    from models import kernels
    from service.ae import Node
    from service.config import load_settings
    caplog.set_level("INFO", logger="service.ae")
    for switch in ("auto", "numpy"):
        monkeypatch.setenv("VOXARC_KERNELS", switch)
        settings = load_settings(data_dir=str(tmp_path / switch), host="127.0.0.1", port=0)
        Node(settings, compaction=False).start().stop()
    lines = [r for r in caplog.records if r.getMessage().startswith("codec: ")]
    assert len(lines) == 2
    monkeypatch.setenv("VOXARC_KERNELS", "auto")
    assert lines[0].getMessage().startswith(f"codec: {kernels.describe()}")
    assert lines[1].levelname == "WARNING" and "numpy and torch" in lines[1].getMessage()


def test_echo(node):
    assert echo(node.port) == 0x0000


def test_store_then_get_exact_before_and_after_compaction(populated):
    node, a, b, sent = populated
    storage = [(CT, ExplicitVRLittleEndian), (CT, ImplicitVRLittleEndian),
               ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.5")]
    for stage in ("staged", "compacted"):
        for study in {a[0].StudyInstanceUID, b[0].StudyInstanceUID}:
            final, got = get(node.port, {"QueryRetrieveLevel": "STUDY",
                                         "StudyInstanceUID": study}, storage)
            assert final.Status == 0x0000, stage
            for uid, value in got.items():
                assert value == sent[uid], (stage, uid)
        final, got = get(node.port, {"QueryRetrieveLevel": "SERIES",
                                     "SeriesInstanceUID": a[0].SeriesInstanceUID}, storage)
        assert len(got) == 4 and final.NumberOfCompletedSuboperations == 4
        node.archive.compact(0)
        assert node.archive.stats()["pending_instances"] == 0


def test_get_counts_failed_sub_operations(populated, tmp_path, caplog):
    node, a, _, sent = populated
    caplog.set_level("INFO", logger="pynetdicom")
    caplog.set_level("INFO", logger="service.handlers")
    # JPEG 2000 that may be lossy is never decompressed: a client taking its class only
    # uncompressed cannot have it
    j2k = _bundled_items(["JPEG2000.dcm"])
    assert store_bytes(node.port, j2k, tmp_path) == [0]
    j2k_class, j2k_uid = j2k[0][:2]
    final, got = get(node.port, {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": j2k_uid},
                     [(j2k_class, ExplicitVRLittleEndian)])
    assert final.Status == 0xA702          # all sub-operations failed
    assert final.NumberOfFailedSuboperations == 1 and final.NumberOfCompletedSuboperations == 0
    assert got == {}
    both = f"{a[0].SOPInstanceUID}\\{j2k_uid}"
    final, got = get(node.port, {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": both},
                     [(CT, ExplicitVRLittleEndian), (j2k_class, ExplicitVRLittleEndian)])
    assert final.Status == 0xB000          # some failed
    assert final.NumberOfFailedSuboperations == 1 and final.NumberOfCompletedSuboperations == 1
    assert got == {a[0].SOPInstanceUID: sent[a[0].SOPInstanceUID]}
    # the log keeps each operation's final status, not a line per routine sub-operation
    lines = [r.getMessage() for r in caplog.records if r.name == "pynetdicom.service_class"]
    assert [m for m in lines if m.startswith("Get SCP Response")] == \
        ["Get SCP Response 2: 0xA702 (Failure)", "Get SCP Response 3: 0xB000 (Warning)"]
    assert not [m for m in lines if "Pending" in m or "(Success)" in m]
    assert not [m for m in lines if "required element" in m]     # the node says why instead
    assert [r.getMessage() for r in caplog.records if r.name == "service.handlers"
            and "not sent" in r.getMessage()] == [f"C-GET of {j2k_uid} not sent: no accepted "
                                                   f"context for {j2k_class} in {j2k[0][2]} or in "
                                                   "a syntax it converts to losslessly"] * 2
    summaries = [r.getMessage() for r in caplog.records
                 if r.name == "service.handlers" and " instances sent in " in r.getMessage()]
    assert [re.sub(r"@\S+:", "@...:", m.split(" in ")[0]) for m in summaries] == \
        ["C-GET from TESTSCU@...: 0 of 1 instances sent",
         "C-GET from TESTSCU@...: 1 of 2 instances sent"]


def test_a_get_locates_its_instances_in_one_query(populated):
    """The sender does not query the index once per instance it sends."""
    from sqlalchemy import event
    node, a, _, sent = populated
    statements = []
    engine = node.archive.index.engine
    listen = lambda conn, cursor, sql, *rest: statements.append(sql)  # noqa: E731
    event.listen(engine, "before_cursor_execute", listen)
    try:
        final, got = get(node.port, {"QueryRetrieveLevel": "SERIES",
                                     "SeriesInstanceUID": a[0].SeriesInstanceUID},
                         [(CT, ExplicitVRLittleEndian)])
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    assert final.Status == 0 and got == {ds.SOPInstanceUID: sent[ds.SOPInstanceUID]
                                         for ds in a}
    assert not [q for q in statements if "instances.sop_uid = " in q]
    assert len([q for q in statements if "instances.sop_uid IN " in q]) <= 3


def _same_instance(received: tuple[str, bytes], sent: tuple[str, bytes]) -> None:
    """The same elements and pixel values in whatever syntaxes the two are in."""
    import io

    import numpy as np
    from pydicom import dcmread
    got, original = (dcmread(io.BytesIO(build_file("1.2", "1.2", ts, data)))
                     for ts, data in (received, sent))
    assert [e.tag for e in got] == [e.tag for e in original if e.tag.element]
    for elem in original:
        if elem.tag.element and elem.VR not in ("OB", "OW", "UN", "SQ"):
            assert got[elem.tag].value == elem.value, elem.tag
    np.testing.assert_array_equal(got.pixel_array, original.pixel_array)


def test_get_converts_what_the_client_does_not_take_as_stored(populated):
    """A client that takes a class only in Explicit (or only in Implicit) VR Little Endian gets
    implicit VR instances and a lossless compressed one converted, before and after
    compaction; as received whenever it takes that."""
    node, _, b, sent = populated
    mr = "1.2.840.10008.5.1.4.1.1.4"
    rle_uid = next(uid for uid, (ts, _) in sent.items() if ts == "1.2.840.10008.1.2.5")
    for stage in ("staged", "compacted"):
        final, got = get(node.port, {"QueryRetrieveLevel": "PATIENT", "PatientID": "pat2"},
                         [(CT, ExplicitVRLittleEndian)])
        assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 3, stage
        assert set(got) == {ds.SOPInstanceUID for ds in b}
        for uid, (ts, data) in got.items():
            assert ts == ExplicitVRLittleEndian
            _same_instance((ts, data), sent[uid])
        final, got = get(node.port, {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": rle_uid},
                         [(mr, ImplicitVRLittleEndian)])
        assert final.Status == 0x0000 and got[rle_uid][0] == ImplicitVRLittleEndian
        _same_instance(got[rle_uid], sent[rle_uid])
        final, got = get(node.port, {"QueryRetrieveLevel": "PATIENT", "PatientID": "pat2"},
                         [(CT, ExplicitVRLittleEndian), (CT, ImplicitVRLittleEndian)])
        assert got == {ds.SOPInstanceUID: sent[ds.SOPInstanceUID] for ds in b}   # as stored
        node.archive.compact(0)


def test_move_converts_for_a_destination_that_refuses_the_stored_syntax(populated):
    from pynetdicom import AE, evt
    node, _, _, sent = populated
    mr = "1.2.840.10008.5.1.4.1.1.4"
    rle_uid = next(uid for uid, (ts, _) in sent.items() if ts == "1.2.840.10008.1.2.5")
    received = {}

    def on_store(event):
        received[event.request.AffectedSOPInstanceUID] = (
            str(event.context.transfer_syntax), event.encoded_dataset(include_meta=False))
        return 0
    ae = AE(ae_title="PLAIN")
    ae.add_supported_context(mr, [ExplicitVRLittleEndian])       # no RLE, no implicit VR
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        node.settings.destinations["plain"] = f"PLAIN@127.0.0.1:{server.server_address[1]}"
        final = move(node.port, {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": rle_uid},
                     "PLAIN")
    finally:
        server.shutdown()
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 1
    assert received[rle_uid][0] == ExplicitVRLittleEndian
    _same_instance(received[rle_uid], sent[rle_uid])


def test_retrieval_contexts_take_the_syntax_the_archive_holds(populated):
    """A C-GET client proposing several syntaxes in one context (as DCMTK's getscu does) is
    given the one the archive holds that class in, not explicit VR first: the RLE MR goes out
    as received. A peer storing to the node still gets explicit VR first."""
    node, _, _, sent = populated
    mr, rle = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.5"
    rle_uid = next(uid for uid, (ts, _) in sent.items() if ts == rle)
    final, got = get(node.port, {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": rle_uid},
                     [(mr, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, rle])])
    assert final.Status == 0x0000 and got == {rle_uid: sent[rle_uid]}
    assoc = associate(node.port, [build_context(mr, [rle, ExplicitVRLittleEndian])])
    assert [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts] == [
        ExplicitVRLittleEndian]
    assoc.release()


def test_get_without_unique_key_is_refused(populated):
    node = populated[0]
    final, _ = get(node.port, {"QueryRetrieveLevel": "STUDY", "StudyDate": "20240102"},
                   [(CT, ExplicitVRLittleEndian)])
    assert final.Status == 0xA900


def test_move_to_destination_and_partial_failure(populated, tmp_path):
    node, a, _, sent = populated
    ok, flaky = StoreSCP("DEST"), StoreSCP("FLAKY", fail_every=2)
    node.settings.destinations.update(dest=f"DEST@127.0.0.1:{ok.port}",
                                      flaky=f"FLAKY@127.0.0.1:{flaky.port}")
    try:
        query = {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": a[0].SeriesInstanceUID}
        final = move(node.port, query, "DEST")
        assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 4
        assert ok.received == {uid: sent[uid] for uid in ok.received} and len(ok.received) == 4
        final = move(node.port, query, "FLAKY")
        assert final.Status == 0xB000
        assert final.NumberOfFailedSuboperations == 2
        assert final.NumberOfCompletedSuboperations == 2
        assert move(node.port, query, "NOWHERE").Status == 0xA801
    finally:
        ok.stop()
        flaky.stop()


def test_get_cancelled_midway_stops_and_counts(node, tmp_path):
    """A C-CANCEL during a C-GET (a viewer closing a study while it loads) stops the
    sub-operations: 0xFE00 with the completed and remaining counts, staged and compacted."""
    series = make_series(12, 8, 8, seed=17)
    assert store_bytes(node.port, _items(series), tmp_path) == [0] * 12
    query = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": series[0].StudyInstanceUID}
    for stage in ("staged", "compacted"):
        if stage == "compacted":
            node.archive.compact(0)
            assert node.archive.stats()["pending_instances"] == 0
        final, received = get(node.port, query, [(CT, ExplicitVRLittleEndian)], cancel_after=3)
        assert final.Status == 0xFE00 and len(received) == 3, stage
        assert (final.NumberOfCompletedSuboperations, final.NumberOfRemainingSuboperations,
                final.NumberOfFailedSuboperations) == (3, 9, 0), stage


def test_move_to_a_destination_that_drops_connection_attempts_is_answered_in_time(populated):
    """A destination switched off or behind a firewall never answers the node's SYN (here: a
    listener whose accept queue is full). The request is answered 0xA801 once the node's
    connection timeout passes, not after the operating system's two minutes of retries (and
    the calling association, idle meanwhile, is not lost)."""
    import socket
    import time
    node, a = populated[0], populated[1]
    assert node.ae.connection_timeout == 10
    node.ae.connection_timeout = 1.5                     # the test's patience, not the node's
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    queued = socket.create_connection(hole.getsockname())   # fills the accept queue
    node.settings.destinations["hole"] = f"HOLE@127.0.0.1:{hole.getsockname()[1]}"
    try:
        started = time.monotonic()
        final = move(node.port, {"QueryRetrieveLevel": "STUDY",
                                 "StudyInstanceUID": a[0].StudyInstanceUID}, "HOLE")
        assert final.Status == 0xA801 and time.monotonic() - started < 30
    finally:
        queued.close()
        hole.close()


def test_move_associations_are_tuned_like_the_listeners(populated, monkeypatch):
    """The node's own association to a C-MOVE destination reads large and acknowledges at once
    (service.socket_tuning): a DCMTK storescp with Nagle's algorithm on (its default) otherwise
    stalls every sub-operation (C-MOVE of 100 slices: 5.8 s against 3.3 s, node benchmark)."""
    import socket

    from service import handlers, socket_tuning
    node, a, _, sent = populated
    tuned = []

    def recording(event):
        socket_tuning.tune_association(event)
        raw = event.assoc.dul.socket.socket
        tuned.append((event.assoc.is_requestor,
                      raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                      event.assoc.dul.socket.recv.__func__ is socket_tuning._recv_exactly))
    monkeypatch.setattr(handlers, "tune_association", recording)
    dest = StoreSCP("DEST")
    node.settings.destinations.update(dest=f"DEST@127.0.0.1:{dest.port}")
    try:
        query = {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": a[0].SeriesInstanceUID}
        assert move(node.port, query, "DEST").Status == 0x0000
    finally:
        dest.stop()
    assert tuned and all(t == (True, 1, True) for t in tuned)


def test_quick_ack_is_set_on_a_tcp_socket():
    import socket

    from service.socket_tuning import _QUICKACK, _quick_ack
    if _QUICKACK is None:
        pytest.skip("TCP_QUICKACK is Linux only")
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    try:
        peer.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 0)
        _quick_ack(peer)
        assert peer.getsockopt(socket.IPPROTO_TCP, _QUICKACK) == 1
        left, right = socket.socketpair()          # not TCP: left alone, no error
        _quick_ack(left)
        left.close()
        right.close()
    finally:
        for s in (peer, client, server):
            s.close()


def test_bad_datasets_get_failure_statuses(node, tmp_path):
    ds = make_series(1, 8, 8)[0]
    ts, data = dataset_bytes(ds)
    no_uid = make_series(1)[0]
    del no_uid.StudyInstanceUID
    items = [(CT, ds.SOPInstanceUID, ts, data[:-6]),
             (CT, no_uid.SOPInstanceUID, ts, dataset_bytes(no_uid)[1]),
             (CT, "1.2.3.4", ts, b"\x08\x00\x16\x00UI\x40\x00" + b"x" * 10)]
    assert store_bytes(node.port, items, tmp_path) == [0xC210, 0xC210, 0xC210]
    assert node.archive.stats()["instances"] == 0


def test_storage_full_is_a700(node, tmp_path):
    node.archive.max_storage_bytes = 10
    assert store_bytes(node.port, _items(make_series(1)), tmp_path) == [0xA700]


def test_unsupported_sop_class_is_rejected(node):
    ae_assoc = associate(node.port, [build_context("1.2.3.4.5.6.7"), build_context(CT)])
    accepted = {cx.abstract_syntax for cx in ae_assoc.accepted_contexts}
    ae_assoc.release()
    assert accepted == {CT}


def test_duplicates_are_kept_first(node, tmp_path):
    items = _items(make_series(1))
    changed = (*items[0][:3], items[0][3] + b"")
    assert store_bytes(node.port, items + [changed], tmp_path) == [0, 0]
    assert node.archive.stats()["instances"] == 1


def _uids(matches, keyword):
    return sorted(str(m.get(keyword)) for m in matches)


def test_find_matching_rules(populated):
    node, a, b, _ = populated
    q = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "PatientName": "",
         "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
         "NumberOfStudyRelatedInstances": "", "StudyDate": ""}
    status, all_studies = find(node.port, q)
    assert status == 0x0000 and len(all_studies) == 4
    study_a = next(m for m in all_studies if m.StudyInstanceUID == a[0].StudyInstanceUID)
    assert int(study_a.NumberOfStudyRelatedInstances) == 4
    assert int(study_a.NumberOfStudyRelatedSeries) == 1 and study_a.ModalitiesInStudy == "CT"
    cases = [
        ({"PatientName": "doe^jane"}, [a]),                 # PN: case-insensitive
        ({"PatientName": "R*"}, [b]),
        ({"PatientID": "PAT*"}, [a]),                       # case-sensitive wildcard
        ({"PatientID": "pat?"}, [b]),
        ({"StudyDate": "20240101-"}, [a]),
        ({"StudyDate": "-20231231"}, [b]),
        ({"StudyDate": "20231201-20240110"}, [a, b]),
        ({"StudyInstanceUID": f"{a[0].StudyInstanceUID}\\{b[0].StudyInstanceUID}"}, [a, b]),
        ({"ModalitiesInStudy": "MR"}, [b]),
        ({"StudyTime": "1000-1100"}, [a, b]),
        ({"AccessionNumber": "acc1"}, []),
    ]
    ours = {a[0].StudyInstanceUID, b[0].StudyInstanceUID}   # ignore the bundled files' studies
    for extra, expected in cases:
        _, matches = find(node.port, {**q, **extra})
        want = sorted(s[0].StudyInstanceUID for s in expected)
        assert [u for u in _uids(matches, "StudyInstanceUID") if u in ours] == want, extra


def test_find_levels_and_roots(populated):
    node, a, b, _ = populated
    _, patients = find(node.port, {"QueryRetrieveLevel": "PATIENT", "PatientID": "",
                                   "NumberOfPatientRelatedInstances": ""}, patient_root=True)
    counts = {p.PatientID: int(p.NumberOfPatientRelatedInstances) for p in patients}
    assert counts["PAT1"] == 4 and counts["pat2"] == 3
    _, series = find(node.port, {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": "",
                                 "StudyInstanceUID": b[0].StudyInstanceUID, "Modality": "",
                                 "NumberOfSeriesRelatedInstances": ""})
    assert len(series) == 1 and series[0].Modality == "MR"
    assert int(series[0].NumberOfSeriesRelatedInstances) == 3
    _, images = find(node.port, {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": "",
                                 "SeriesInstanceUID": a[0].SeriesInstanceUID,
                                 "InstanceNumber": "", "SOPClassUID": ""})
    assert _uids(images, "SOPInstanceUID") == sorted(d.SOPInstanceUID for d in a)
    assert sorted(int(i.InstanceNumber) for i in images) == [1, 2, 3, 4]
    status, _ = find(node.port, {"QueryRetrieveLevel": "WARD", "PatientID": ""})
    assert status == 0xA900


def test_find_answers_where_and_how_the_instances_are_available(populated):
    """Retrieve AE Title (the node's own) and Instance Availability (ONLINE), as return keys
    at every level and as matching keys."""
    node, a, _, _ = populated
    for level, key in (("STUDY", "StudyInstanceUID"), ("SERIES", "SeriesInstanceUID"),
                       ("IMAGE", "SOPInstanceUID")):
        q = {"QueryRetrieveLevel": level, key: "", "RetrieveAETitle": "",
             "InstanceAvailability": "", "StudyInstanceUID": a[0].StudyInstanceUID}
        _, matches = find(node.port, q)
        assert matches and {(m.RetrieveAETitle, m.InstanceAvailability) for m in matches} == \
            {(node.settings.ae_title, "ONLINE")}, level
    q = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": a[0].StudyInstanceUID}
    assert len(find(node.port, {**q, "RetrieveAETitle": "VOX*"})[1]) == 1
    assert len(find(node.port, {**q, "InstanceAvailability": "ONLINE"})[1]) == 1
    assert find(node.port, {**q, "RetrieveAETitle": "ELSEWHERE"}) == (0x0000, [])
    assert find(node.port, {**q, "InstanceAvailability": "NEARLINE"}) == (0x0000, [])


def test_find_with_fuzzy_name_matching_negotiated(populated):
    """An SCU that proposes fuzzy semantic matching of person names (SOP Class Extended
    Negotiation, PS3.4 C.5.1.1.1, third byte) gets it, and relational queries (first byte)
    too; timezone adjustment (fourth) is declined; an SCU that does not propose it gets
    literal matching."""
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as model
    node, a, _, _ = populated
    proposal = SOPClassExtendedNegotiation()
    proposal.sop_class_uid = model
    proposal.service_class_application_information = b"\x01\x00\x01\x01"
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID, query.PatientName = "STUDY", "", "jane d"

    def names(assoc) -> list[str]:
        found = [str(m.PatientName) for s, m in assoc.send_c_find(query, model)
                 if s and s.Status == 0xFF00]
        assoc.release()
        return found
    fuzzy = associate(node.port, [build_context(model)], ext_neg=[proposal])
    assert fuzzy.acceptor.sop_class_extended[model] == b"\x01\x00\x01\x00"
    assert names(fuzzy) == ["Doe^Jane"]
    assert names(associate(node.port, [build_context(model)])) == []
    assert find(node.port, {"QueryRetrieveLevel": "STUDY", "PatientName": "jane d"}) == \
        (0x0000, [])


def test_find_with_combined_date_time_matching_negotiated(populated):
    """Combined date-time matching (second byte): December 31, 09:00 to January 2, 10:00 finds
    the study of December 31 at 10:15 and not that of January 2 at 10:15; matched apart
    (without the option), 09:00-10:00 of each day finds neither."""
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as model
    node, a, b, _ = populated
    proposal = SOPClassExtendedNegotiation()
    proposal.sop_class_uid = model
    proposal.service_class_application_information = b"\x00\x01"
    keys = {"QueryRetrieveLevel": "STUDY", "PatientID": "", "StudyInstanceUID": "",
            "StudyDate": "20231231-20240102", "StudyTime": "0900-1000"}
    query = Dataset()
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    assoc = associate(node.port, [build_context(model)], ext_neg=[proposal])
    assert assoc.acceptor.sop_class_extended[model] == b"\x00\x01"
    found = [m.StudyInstanceUID for s, m in assoc.send_c_find(query, model)
             if s and s.Status == 0xFF00]
    assoc.release()
    assert found == [b[0].StudyInstanceUID]
    assert find(node.port, keys, patient_root=True) == (0x0000, [])


def test_get_with_relational_retrieval_negotiated(populated):
    """Relational retrieval (PS3.4 C.5.3.1.1, first byte) is accepted for C-GET and C-MOVE;
    an IMAGE-level C-GET naming only SOP Instance UIDs, no study or series, sends them."""
    from pynetdicom import evt
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
    from pynetdicom.presentation import build_role
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as get_model
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as move_model
    node, a, _, _ = populated
    proposals = []
    for model in (get_model, move_model):
        proposal = SOPClassExtendedNegotiation()
        proposal.sop_class_uid = model
        proposal.service_class_application_information = b"\x01\x01"
        proposals.append(proposal)
    received = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000
    assoc = associate(node.port, [build_context(get_model), build_context(move_model),
                                  build_context(CT, [ExplicitVRLittleEndian])],
                      ext_neg=[*proposals, build_role(CT, scp_role=True)],
                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.acceptor.sop_class_extended == {get_model: b"\x01\x00",
                                                 move_model: b"\x01\x00"}
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.SOPInstanceUID = "\\".join(ds.SOPInstanceUID for ds in a[:2])
    statuses = [s.Status for s, _ in assoc.send_c_get(query, get_model) if s]
    assoc.release()
    assert statuses[-1] == 0x0000 and sorted(received) == sorted(ds.SOPInstanceUID
                                                                 for ds in a[:2])


def test_move_without_unique_key_is_refused_before_associating(populated):
    """0xA900, and the destination never sees an association (pynetdicom would open one
    before the handler could refuse); a valid request still reaches it."""
    from pynetdicom import evt
    node, a = populated[0], populated[1]
    dest, opened = StoreSCP("DEST"), []
    dest.server.bind(evt.EVT_CONN_OPEN, lambda event: opened.append(1))
    node.settings.destinations["dest"] = f"DEST@127.0.0.1:{dest.port}"
    try:
        for keys in ({"QueryRetrieveLevel": "STUDY", "StudyDate": "2024"},
                     {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"},
                     {"StudyInstanceUID": a[0].StudyInstanceUID}):
            final = move(node.port, keys, "DEST")
            assert final.Status == 0xA900 and dest.received == {} and opened == [], keys
        final = move(node.port, {"QueryRetrieveLevel": "STUDY",
                                 "StudyInstanceUID": a[0].StudyInstanceUID}, "DEST")
        assert final.Status == 0x0000 and len(dest.received) == len(a) and opened
    finally:
        dest.stop()


def test_associations_get_cheap_context_copies_and_a_short_reactor_sleep(node):
    """pynetdicom deep-copies the supported contexts for every association: the node's copies
    share their transfer syntax UIDs (own lists), each association's DUL sleeps briefly and its
    socket sends without Nagle's delay."""
    import copy
    import socket

    from service.socket_tuning import DUL_LOOP_DELAY
    contexts = node.server.contexts
    copies = copy.deepcopy(contexts)
    assert [c.as_tuple for c in copies] == [c.as_tuple for c in node.ae.supported_contexts]
    assert [(c.scu_role, c.scp_role) for c in copies] == \
        [(c.scu_role, c.scp_role) for c in node.ae.supported_contexts]
    first, again = contexts[0], copies[0]
    assert again.transfer_syntax[0] is first.transfer_syntax[0]
    again.add_transfer_syntax("1.2.3.4.5")
    assert "1.2.3.4.5" not in first.transfer_syntax
    assoc = associate(node.port, [build_context(CT, [ExplicitVRLittleEndian])])
    try:
        served = node.server.active_associations
        assert served and all(a.dul._run_loop_delay == DUL_LOOP_DELAY for a in served)
        assert all(a.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                   for a in served)
    finally:
        assoc.release()


def test_retrieval_order_reads_the_archive_at_most_every_cache_period(monkeypatch):
    from pynetdicom.presentation import build_context as context

    from service import negotiation
    reads = []
    order = negotiation.RetrievalOrder(lambda: reads.append(1) or {
        CT: [ImplicitVRLittleEndian]})
    ours = [context(CT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    assert order.reorder(ours, {CT: (True, False)}) == ours       # a peer storing to us
    assert reads == []
    got = order.reorder(ours, {CT: (False, True)})
    assert list(got[0].transfer_syntax) == [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    assert list(ours[0].transfer_syntax) == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    order.reorder(ours, {CT: (False, True)})
    assert reads == [1]
    monkeypatch.setattr(negotiation, "CACHE_SECONDS", -1.0)
    order.reorder(ours, {CT: (False, True)})
    assert reads == [1, 1]


class _Trickle:
    """A socket that delivers ``data`` in pieces of at most ``piece`` bytes, then closes."""

    def __init__(self, data: bytes, piece: int):
        self.data, self.piece = data, piece

    def recv_into(self, view, n):
        n = min(n, self.piece, len(self.data))
        view[:n], self.data = self.data[:n], self.data[n:]
        return n

    def setsockopt(self, *args):
        pass


def test_a_pdu_length_alone_never_allocates_its_size():
    import tracemalloc
    from types import SimpleNamespace
    reader = SimpleNamespace(socket=_Trickle(b"ab", 2))
    tracemalloc.start()
    try:
        got = socket_tuning._recv_exactly(reader, (1 << 32) - 1)    # a header's claim only
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == b"ab" and peak < 4 << 20
    data = bytes(range(256)) * 40_000                              # 10 MB in 64 kB pieces
    assert socket_tuning._recv_exactly(SimpleNamespace(socket=_Trickle(data, 1 << 16)),
                                       len(data)) == data


@pytest.mark.parametrize("query", [
    {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "*"},            # the whole archive
    {"QueryRetrieveLevel": "STUDY", "PatientID": "PAT1", "StudyInstanceUID": ""},
    {"QueryRetrieveLevel": "IMAGE", "SeriesInstanceUID": "1.2.3", "SOPInstanceUID": ""},
    {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3", "SOPInstanceUID": "1.2.4"},
])
def test_a_retrieve_takes_the_unique_key_of_its_level_and_no_wildcards(populated, query):
    node = populated[0]
    final, got = get(node.port, query, [(CT, ExplicitVRLittleEndian)])
    assert final.Status == 0xA900 and got == {}


def test_find_keys_of_repeating_groups_are_not_matched_on(populated):
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
    node = populated[0]
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.PatientID, ds.StudyInstanceUID = "STUDY", "pat2", ""
    ds.add_new(0x60000010, "US", None)                   # Overlay Rows of group 6000
    assoc = associate(node.port, [build_context(FIND)])
    try:
        answers = [(status.Status, found) for status, found in assoc.send_c_find(ds, FIND)]
    finally:
        assoc.release()
    assert answers[-1][0] == 0x0000 and [s for s, _ in answers[:-1]] == [0xFF00]


def test_a_name_the_querys_character_set_cannot_hold_comes_back_in_utf8(node, tmp_path):
    (ds,) = make_series(1, 8, 8, patient_id="GR1", patient_name="Ωμέγα^Άλφα")
    ds.SpecificCharacterSet = "ISO_IR 192"
    assert store_bytes(node.port, _items([ds]), tmp_path) == [0]
    status, matches = find(node.port, {"QueryRetrieveLevel": "PATIENT", "PatientID": "GR1",
                                       "PatientName": "", "SpecificCharacterSet": "ISO_IR 100"},
                           patient_root=True)
    assert status == 0x0000 and str(matches[0].PatientName) == "Ωμέγα^Άλφα"
    (latin,) = make_series(1, 8, 8, patient_id="DE1", patient_name="Müller^Jörg", seed=3)
    latin.SpecificCharacterSet = "ISO_IR 100"
    assert store_bytes(node.port, _items([latin]), tmp_path) == [0]
    status, matches = find(node.port, {"QueryRetrieveLevel": "PATIENT", "PatientID": "DE1",
                                       "PatientName": "", "SpecificCharacterSet": "ISO_IR 100"},
                           patient_root=True)
    assert matches[0].SpecificCharacterSet == "ISO_IR 100"              # held: as asked
    assert str(matches[0].PatientName) == "Müller^Jörg"


def test_a_dataset_that_is_not_the_instance_its_request_names_is_refused(node, tmp_path):
    from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
    (ds,) = make_series(1, 8, 8, seed=5)
    ts, data = dataset_bytes(ds)
    other = generate_uid()
    assert store_bytes(node.port, [(CTImageStorage, other, ts, data)], tmp_path) == [0xA900]
    assert node.archive.held([other, ds.SOPInstanceUID]) == {}          # nothing stored
    # the right instance under another SOP class: stored, with the warning that says so
    assert store_bytes(node.port, [(MRImageStorage, ds.SOPInstanceUID, ts, data)],
                       tmp_path) == [0xB007]
    assert node.archive.held([ds.SOPInstanceUID]) == {ds.SOPInstanceUID: CTImageStorage}


def _counting_retrieve(node) -> dict:
    calls, real = {"n": 0}, node.archive.retrieve

    def retrieve(uid):
        calls["n"] += 1
        return real(uid)
    node.archive.retrieve = retrieve
    return calls


def test_a_get_rebuilds_nothing_the_client_cannot_take(node):
    from pydicom.uid import MRImageStorage
    series = make_series(20, 8, 8, seed=7)                 # stored in explicit VR
    store_series(node.archive, series)
    calls = _counting_retrieve(node)
    final, got = get(node.port, {"QueryRetrieveLevel": "SERIES",
                                 "SeriesInstanceUID": series[0].SeriesInstanceUID},
                     [(MRImageStorage, ImplicitVRLittleEndian)])     # no context for CT
    assert final.Status == 0xA702 and final.NumberOfFailedSuboperations == 20
    assert got == {} and calls["n"] == 0


def test_a_move_stops_rebuilding_once_its_destination_is_gone(node):
    import threading
    import time

    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE
    series = make_series(40, 8, 8, seed=8)
    store_series(node.archive, series)
    calls, got = _counting_retrieve(node), []

    def on_store(event):
        got.append(1)
        if len(got) == 3:                                  # the destination gives up
            threading.Thread(target=event.assoc.abort).start()
            time.sleep(0.2)
        return 0
    ae = AE(ae_title="DEST")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        node.settings.destinations["dest"] = f"DEST@127.0.0.1:{server.server_address[1]}"
        assoc = associate(node.port, [build_context(MOVE)])
        ds = Dataset()
        ds.QueryRetrieveLevel, ds.SeriesInstanceUID = "SERIES", series[0].SeriesInstanceUID
        final = [s for s, _ in assoc.send_c_move(ds, "DEST", MOVE) if s][-1]
        assoc.release()
    finally:
        server.shutdown()
    assert final.Status in (0xB000, 0xA702) and final.NumberOfFailedSuboperations >= 36
    assert calls["n"] <= 6                                 # not the other 37 as well


def test_a_find_matching_more_than_max_find_results_is_refused_whole(tmp_path):
    from service.ae import Node
    from service.config import load_settings
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             stable_age=3600.0, max_find_results=3)
    limited = Node(settings, compaction=False).start()
    try:
        series = make_series(4, 8, 8, seed=9)
        assert store_bytes(limited.port, _items(series), tmp_path) == [0] * 4
        keys = {"StudyInstanceUID": series[0].StudyInstanceUID,
                "SeriesInstanceUID": series[0].SeriesInstanceUID, "SOPInstanceUID": ""}
        status, matches = find(limited.port, {"QueryRetrieveLevel": "IMAGE", **keys})
        assert (status, matches) == (0xA700, [])          # 4 > 3: none sent, not a cut list
        status, matches = find(limited.port, {"QueryRetrieveLevel": "SERIES", **keys})
        assert status == 0x0000 and len(matches) == 1
    finally:
        limited.stop()
