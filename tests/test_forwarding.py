"""Forwarding (storage.forwarding, service.forwarding): each stable series a rule matches goes to
its destination byte for byte, once; late instances follow; a failed attempt is retried after a
growing delay; rules and destinations are checked when the settings load."""

from __future__ import annotations

import time

import pytest

from admin_helpers import admin_site, http_token  # noqa: F401
from node_helpers import archive, dataset_bytes, make_series, store_as_received  # noqa: F401
from scu_helpers import StoreSCP
from service.config import load_settings
from service.forwarding import Forwarder
from service.metrics import NodeMetrics
from storage import forwarding

LATER = 120.0          # seconds after the instances came: every series is stable by then


def _late(series, number: int, seed: int):
    (late,) = make_series(1, 16, 16, seed=seed)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName",
                "Modality"):
        setattr(late, key, getattr(series[0], key))
    late.InstanceNumber = number
    return late


def test_rules_select_stable_series_and_late_instances_follow(archive):  # noqa: F811
    ct = make_series(3, 16, 16, modality="CT", seed=1)
    mr = make_series(2, 16, 16, modality="MR", patient_id="P2", seed=2)
    store_as_received(archive, ct + mr)
    rules = {"reading": {"Modality": "CT\\PT"}}
    index, now = archive.index, time.time()
    assert forwarding.due(index, rules, 60.0, now) == []           # not stable yet
    (item,) = forwarding.due(index, rules, 60.0, now + LATER)
    assert item.series_uid == ct[0].SeriesInstanceUID and item.attempts == 0
    assert set(item.sop_uids) == {ds.SOPInstanceUID for ds in ct}
    forwarding.record(index, item, None, now + LATER)
    assert forwarding.due(index, rules, 60.0, now + LATER) == []
    # a late CT instance: only it, once its series is stable again
    late = _late(ct, 4, seed=3)
    store_as_received(archive, [late])
    assert forwarding.due(index, rules, 60.0, time.time()) == []
    (again,) = forwarding.due(index, rules, 60.0, time.time() + LATER)
    assert again.sop_uids == (late.SOPInstanceUID,)
    # the MR was looked at once, found not matching, and is left alone until it grows
    shown = forwarding.status(index)
    assert [(r["series_uid"], r["state"], r["instances"]) for r in shown] == \
        [(ct[0].SeriesInstanceUID, "sent", 3)]
    # an empty rule takes every series, on its own watermark
    everything = forwarding.due(index, {"archive2": {}}, 60.0, time.time() + LATER)
    assert {d.series_uid for d in everything} == {ct[0].SeriesInstanceUID,
                                                  mr[0].SeriesInstanceUID}


def test_a_failed_attempt_is_retried_after_a_growing_delay(archive):  # noqa: F811
    ct = make_series(2, 16, 16, seed=4)
    store_as_received(archive, ct)
    rules, index = {"reading": {}}, archive.index
    t0 = time.time() + LATER
    (item,) = forwarding.due(index, rules, 60.0, t0)
    forwarding.record(index, item, "no association with READ@127.0.0.1:1", t0)
    (row,) = forwarding.status(index)
    assert (row["state"], row["attempts"]) == ("failed", 1)
    assert row["next_attempt"] == pytest.approx(t0 + forwarding.RETRY_FIRST)
    assert forwarding.due(index, rules, 60.0, t0 + forwarding.RETRY_FIRST - 1) == []
    (retry,) = forwarding.due(index, rules, 60.0, t0 + forwarding.RETRY_FIRST)
    assert retry.attempts == 1 and retry.sop_uids == item.sop_uids
    forwarding.record(index, retry, "again", t0 + 30)
    assert forwarding.status(index)[0]["next_attempt"] == pytest.approx(t0 + 30 + 60)
    forwarding.record(index, retry, None, t0 + 90)
    assert forwarding.status(index)[0]["state"] == "sent"
    assert forwarding.due(index, rules, 60.0, t0 + 10_000) == []


def test_deleting_a_series_drops_its_forwarding_row(archive):  # noqa: F811
    ct = make_series(2, 16, 16, seed=5)
    store_as_received(archive, ct)
    (item,) = forwarding.due(archive.index, {"reading": {}}, 60.0, time.time() + LATER)
    forwarding.record(archive.index, item, "down", time.time())
    archive.delete("series", ct[0].SeriesInstanceUID, reason="test")
    assert forwarding.status(archive.index) == []
    forwarding.record(archive.index, item, None)       # a send that ended after the deletion


def _settings(tmp_path, port: int, rule: str = "Modality=CT"):
    return load_settings(data_dir=str(tmp_path / "node"), destination=[
        f"reading=READ@127.0.0.1:{port}"], forward=[f"reading={rule}"], stable_age=60.0)


def test_the_forwarder_sends_each_instance_as_received_once(archive, tmp_path):  # noqa: F811
    dest = StoreSCP("READ")
    try:
        settings = _settings(tmp_path, dest.port)
        metrics = NodeMetrics()
        forwarder = Forwarder(archive, settings, metrics)
        ct = make_series(3, 16, 16, seed=6)
        sent = store_as_received(archive, ct + make_series(2, 16, 16, modality="MR", seed=7))
        assert archive.compact(stable_age=0) == (2, 0)    # rebuilt from the codec's blobs
        assert forwarder.run_once(time.time() + LATER) == 1
        assert dest.received == {ds.SOPInstanceUID: sent[ds.SOPInstanceUID] for ds in ct}
        assert forwarder.run_once(time.time() + 2 * LATER) == 0     # nothing twice
        late = _late(ct, 4, seed=8)
        sent.update(store_as_received(archive, [late]))
        assert forwarder.run_once(time.time() + LATER) == 1
        assert dest.received[late.SOPInstanceUID] == sent[late.SOPInstanceUID]
        assert len(dest.received) == 4 and dest.count == 4
        text = metrics.exposition().decode()
        assert 'voxarc_forwarded_instances_total{destination="reading",result="stored"} 4.0' \
            in text
    finally:
        dest.stop()


def test_an_unreachable_destination_is_retried_then_served(archive, tmp_path):  # noqa: F811
    from node_helpers import free_port
    port = free_port()
    forwarder = Forwarder(archive, _settings(tmp_path, port, ""))
    ct = make_series(2, 16, 16, seed=9)
    store_as_received(archive, ct)
    t0 = time.time() + LATER
    assert forwarder.run_once(t0) == 0
    (row,) = forwarding.status(archive.index)
    assert row["state"] == "failed" and f"127.0.0.1:{port}" in row["reason"]
    dest = StoreSCP("READ")
    try:
        forwarder.settings.destinations["reading"] = f"READ@127.0.0.1:{dest.port}"
        assert forwarder.run_once(t0 + 1) == 0                       # waits for its retry
        assert forwarder.run_once(t0 + forwarding.RETRY_FIRST) == 1
        assert set(dest.received) == {ds.SOPInstanceUID for ds in ct}
        assert forwarding.status(archive.index)[0]["state"] == "sent"
    finally:
        dest.stop()


def test_a_destination_that_refuses_instances_gets_the_batch_again(archive,  # noqa: F811
                                                                  tmp_path):
    dest = StoreSCP("READ", fail_every=2)            # 0xA700 for every second instance
    try:
        forwarder = Forwarder(archive, _settings(tmp_path, dest.port, ""))
        ct = make_series(3, 16, 16, seed=10)
        store_as_received(archive, ct)
        t0 = time.time() + LATER
        assert forwarder.run_once(t0) == 0
        (row,) = forwarding.status(archive.index)
        assert row["state"] == "failed" and "0xA700" in row["reason"]
        dest.fail_every = 0
        assert forwarder.run_once(t0 + forwarding.RETRY_FIRST) == 1
        assert set(dest.received) == {ds.SOPInstanceUID for ds in ct}
    finally:
        dest.stop()


@pytest.mark.parametrize("flags, error", [
    (["nowhere="], "not one of the destinations"),
    (["reading=Colour=red"], "is not one of"),
    (["reading=Modality"], "is not Keyword=pattern"),
    (["=Modality=CT"], "is not NAME=RULE")])
def test_bad_rules_are_refused_when_the_settings_load(tmp_path, flags, error):
    with pytest.raises(ValueError, match=error):
        load_settings(data_dir=str(tmp_path), destination=["reading=READ@127.0.0.1:104"],
                      forward=flags)


def test_rules_from_the_configuration_file(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[destinations]\nreading = "READ@10.0.0.9:104"\n'
                      '[forward]\nreading = "Modality=CT\\\\MR; StudyDescription=*HEAD*"\n')
    settings = load_settings(config)
    assert forwarding.parse_rule(settings.forward["reading"]) == {
        "Modality": "CT\\MR", "StudyDescription": "*HEAD*"}
    config.write_text('[forward]\nreading = ""\n')
    with pytest.raises(ValueError, match="not one of the destinations"):
        load_settings(config)


def test_the_admin_api_lists_forwarding_failed_first(admin_site, tmp_path):
    from admin_helpers import get_json
    node, admin = admin_site
    first, second = make_series(2, 16, 16, seed=11), make_series(2, 16, 16, seed=12)
    store_as_received(node.archive, first + second)
    items = forwarding.due(node.archive.index, {"viewer": {}}, 60.0, time.time() + LATER)
    assert len(items) == 2
    forwarding.record(node.archive.index, items[0], None)
    forwarding.record(node.archive.index, items[1], "no association with VIEW@127.0.0.1:1")
    rows = get_json(f"{admin.url}/api/forwards")
    assert [(r["series_uid"], r["state"]) for r in rows] == \
        [(items[1].series_uid, "failed"), (items[0].series_uid, "sent")]
    assert rows[0]["reason"].startswith("no association") and rows[1]["instances"] == 2
    from admin_helpers import http_get, metric
    text = http_get(f"{admin.url}/metrics")[1].decode()
    assert metric(text, "voxarc_forward_failed_series", destination="viewer") == 1


def test_a_rule_forwards_only_what_comes_after_it_took_effect(archive, tmp_path):  # noqa: F811
    """Enabling a rule does not send the archive's past; restarting with the same rule keeps
    its start, a changed rule starts anew."""
    dest = StoreSCP("READ")
    try:
        old = make_series(2, 16, 16, seed=13)
        store_as_received(archive, old)
        time.sleep(0.01)
        forwarder = Forwarder(archive, _settings(tmp_path, dest.port, ""))
        since = forwarder.since["reading"]
        new = make_series(2, 16, 16, seed=14)
        store_as_received(archive, new)
        assert forwarder.run_once(time.time() + LATER) == 1
        assert set(dest.received) == {ds.SOPInstanceUID for ds in new}
        again = Forwarder(archive, _settings(tmp_path, dest.port, ""))    # a restart
        assert again.since["reading"] == since
        changed = Forwarder(archive, _settings(tmp_path, dest.port, "Modality=CT"))
        assert changed.since["reading"] > since
        assert changed.run_once(time.time() + 2 * LATER) == 0
        assert len(dest.received) == 2
        # a reload (SIGHUP) of a running forwarder: the same, a new rule from now on only
        forwarder.use_rules({"reading": ""})
        assert forwarder.since["reading"] > since and forwarder.rules == {"reading": {}}
        assert forwarder.run_once(time.time() + 3 * LATER) == 0
        later = make_series(1, 16, 16, seed=15)
        store_as_received(archive, later)
        assert forwarder.run_once(time.time() + 4 * LATER) == 1
        assert later[0].SOPInstanceUID in dest.received
    finally:
        dest.stop()


def test_instances_the_destination_takes_no_context_for_are_passed_over(archive,  # noqa: F811
                                                                        tmp_path):
    """A destination that accepts no context for a class: its instances are passed over (the
    row says how many), the others go, and the series is not tried again for them."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage
    received = []
    ae = AE(ae_title="READ")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(
        evt.EVT_C_STORE, lambda e: received.append(e.request.AffectedSOPInstanceUID) or 0)])
    try:
        forwarder = Forwarder(archive, _settings(tmp_path, server.server_address[1], ""))
        series = make_series(3, 16, 16, seed=15)
        series[1].SOPClassUID = series[1].file_meta.MediaStorageSOPClassUID = \
            "1.2.840.10008.5.1.4.1.1.7"                   # secondary capture: no context
        store_as_received(archive, series)
        assert forwarder.run_once(time.time() + LATER) == 1
        assert sorted(received) == sorted(series[k].SOPInstanceUID for k in (0, 2))
        (row,) = forwarding.status(archive.index)
        assert (row["state"], row["instances"]) == ("sent", 2)
        assert row["reason"].startswith("1 of 3 instances could not go out")
        assert forwarder.run_once(time.time() + 2 * LATER) == 0
    finally:
        server.shutdown()


def test_the_admin_api_sends_a_study_on_request(admin_site, tmp_path):
    """POST /api/studies/{uid}/send with {"destination": NAME}: 202, the study's instances
    arrive as received, the outcome is recorded; a body that is not JSON (which a cross-site
    form could send), an unknown destination or study are refused."""
    import json
    from admin_helpers import post_json
    node, admin = admin_site
    dest = StoreSCP("READ")
    try:
        node.settings.destinations["reading"] = f"READ@127.0.0.1:{dest.port}"
        series = make_series(3, 16, 16, seed=16)
        sent = store_as_received(node.archive, series)
        study = series[0].StudyInstanceUID

        def post(uid, body, ctype="application/json"):
            return post_json(f"{admin.url}/api/studies/{uid}/send", body, ctype)
        body = json.dumps({"destination": "reading"}).encode()
        assert post(study, b"destination=reading", "application/x-www-form-urlencoded")[0] == 415
        assert post(study, json.dumps({"destination": "nowhere"}).encode())[0] == 400
        assert post("1.2.3", body)[0] == 404
        status, answer = post(study, body)
        assert status == 202 and (answer["series"], answer["instances"]) == (1, 3)
        deadline = time.monotonic() + 30
        while len(dest.received) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dest.received == sent
        deadline = time.monotonic() + 10     # received there; recorded here a moment later
        while [r["state"] for r in forwarding.status(node.archive.index)] != ["sent"] and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        (row,) = forwarding.status(node.archive.index)
        assert (row["destination"], row["state"], row["instances"]) == ("reading", "sent", 3)
        # a send by hand that fails is shown failed, with the time of its retry
        assert post(study, json.dumps({"destination": "viewer"}).encode())[0] == 202
        deadline = time.monotonic() + 30
        while forwarding.status(node.archive.index)[0]["state"] != "failed" and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        failed = forwarding.status(node.archive.index)[0]
        assert (failed["destination"], failed["state"], failed["by_hand"]) == \
            ("viewer", "failed", True)
        assert failed["next_attempt"] > time.time() + forwarding.RETRY_FIRST / 2
    finally:
        dest.stop()


def test_a_send_by_hand_that_fails_goes_again_whole(archive, tmp_path):  # noqa: F811
    """A series sent by hand that fails is retried after the forwarding delays, all of it,
    also by a node without rules; a rule's own pass leaves it to that retry."""
    from node_helpers import free_port
    settings = _settings(tmp_path, free_port(), "Modality=CT")
    ct = make_series(3, 16, 16, seed=21)
    sent = store_as_received(archive, ct)
    items = forwarding.study_items(archive.index, ct[0].StudyInstanceUID, "reading")
    by_hand = Forwarder(archive, settings, rules={})
    forwarding.queue_by_hand(archive.index, items)
    assert [r["state"] for r in forwarding.status(archive.index)] == ["queued"]
    assert not by_hand.deliver(items[0], by_hand=True)              # the destination is down
    (row,) = forwarding.status(archive.index)
    assert (row["state"], row["by_hand"], row["attempts"]) == ("failed", True, 1)
    t0 = time.time() + LATER
    ruled = Forwarder(archive, settings)
    assert forwarding.due(archive.index, ruled.rules, 60.0, t0, ruled.since) == []
    dest = StoreSCP("READ")
    try:
        settings.destinations["reading"] = f"READ@127.0.0.1:{dest.port}"
        no_rules = Forwarder(archive, settings, rules={})
        assert no_rules.run_once(time.time() + 1) == 0                # waits for its retry
        assert no_rules.run_once(time.time() + forwarding.RETRY_FIRST + 1) == 1
        assert dest.received == sent and dest.count == 3
        (row,) = forwarding.status(archive.index)
        assert (row["state"], row["by_hand"], row["instances"]) == ("sent", True, 3)
        assert no_rules.run_once(time.time() + 2 * LATER) == 0
        assert ruled.run_once(t0 + LATER) == 0                       # it has them all
        assert dest.count == 3
    finally:
        dest.stop()


def test_a_send_by_hand_a_node_did_not_finish_goes_after_its_restart(archive,  # noqa: F811
                                                                     tmp_path):
    dest = StoreSCP("READ")
    try:
        settings = _settings(tmp_path, dest.port, "")
        series = make_series(2, 16, 16, seed=22)
        sent = store_as_received(archive, series)
        items = forwarding.study_items(archive.index, series[0].StudyInstanceUID, "reading")
        running = Forwarder(archive, settings, rules={})
        forwarding.queue_by_hand(archive.index, items)     # queued, then the node is killed
        assert running.run_once(time.time() + LATER) == 0    # its own sender has it in hand
        time.sleep(0.01)
        restarted = Forwarder(archive, settings, rules={})
        assert restarted.run_once() == 1
        assert dest.received == sent
        assert [r["state"] for r in forwarding.status(archive.index)] == ["sent"]
    finally:
        dest.stop()


def test_a_rule_on_the_source_ae_title_takes_only_what_that_modality_sent(archive):  # noqa: F811
    er, ward = make_series(2, 16, 16, seed=17), make_series(2, 16, 16, seed=18)
    for ds in er:
        archive.store(*reversed(dataset_bytes(ds)), source_ae="CT_ER1")
    for ds in ward:
        archive.store(*reversed(dataset_bytes(ds)), source_ae="CT_WARD")
    mixed = _late(er, 3, seed=19)                     # the ER series, sent from elsewhere
    archive.store(*reversed(dataset_bytes(mixed)), source_ae="PACS_OLD")
    rules = {"er": forwarding.parse_rule("SourceAETitle=CT_ER*; Modality=CT")}
    (item,) = forwarding.due(archive.index, rules, 60.0, time.time() + LATER)
    assert set(item.sop_uids) == {ds.SOPInstanceUID for ds in er}
    forwarding.record(archive.index, item, None)
    assert forwarding.due(archive.index, rules, 60.0, time.time() + LATER) == []
    with pytest.raises(ValueError, match="SourceAETitle"):
        forwarding.parse_rule("CallingAETitle=CT1")


def test_the_calling_ae_title_is_kept_with_each_instance(tmp_path):
    """C-STORE records who sent an instance (the test SCU calls itself TESTSCU); an import
    records no one."""
    from sqlalchemy import select

    from scu_helpers import store_bytes
    from service.ae import Node
    from storage.index import Instance
    running = Node(load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0),
                   compaction=False).start()
    try:
        (ds,) = make_series(1, 16, 16, seed=20)
        assert store_bytes(running.port, [(ds.SOPClassUID, ds.SOPInstanceUID,
                                           *dataset_bytes(ds))], tmp_path) == [0]
        (other,) = make_series(1, 16, 16, seed=21)
        running.archive.store(*reversed(dataset_bytes(other)))
        with running.archive.index.read() as s:
            kept = dict(s.execute(select(Instance.sop_uid, Instance.source_ae)).all())
        assert kept == {ds.SOPInstanceUID: "TESTSCU", other.SOPInstanceUID: ""}
    finally:
        running.stop()


def test_priors_go_along_with_a_new_study_once(archive, tmp_path):  # noqa: F811
    """``Priors=2``: a patient's new study arrives with the two latest of the patient's
    earlier studies (received long before the rule), once; another patient's are left."""
    dest = StoreSCP("READ")
    try:
        old = {date: make_series(2, 16, 16, patient_id="P7", study_date=date, seed=n)
               for n, date in enumerate(("20220301", "20240105", "20230710"), start=30)}
        other = make_series(2, 16, 16, patient_id="P8", study_date="20240601", seed=33)
        for series in (*old.values(), other):
            store_as_received(archive, series)
        time.sleep(0.01)
        forwarder = Forwarder(archive, _settings(tmp_path, dest.port, "Modality=CT; Priors=2"))
        new = make_series(3, 16, 16, patient_id="P7", study_date="20251130", seed=34)
        store_as_received(archive, new)
        assert forwarder.run_once(time.time() + LATER) == 1
        expected = {ds.SOPInstanceUID for ds in new + old["20240105"] + old["20230710"]}
        assert set(dest.received) == expected
        late = _late(new, 4, seed=35)                 # more of the new study: no prior again
        store_as_received(archive, [late])
        assert forwarder.run_once(time.time() + LATER) == 1
        assert set(dest.received) == expected | {late.SOPInstanceUID} and dest.count == 8
    finally:
        dest.stop()
    with pytest.raises(ValueError, match="Priors"):
        forwarding.parse_rule("Priors=many")


def test_a_corrected_study_goes_again_where_it_went(archive, tmp_path):  # noqa: F811
    """``correct(..., resend=True)`` queues each series to every destination that had it, as
    a send by hand due now: the next forwarding pass sends it whole, with the corrected bytes;
    a series that went nowhere is not queued."""
    dest = StoreSCP("READ")
    try:
        forwarder = Forwarder(archive, _settings(tmp_path, dest.port))
        ct = make_series(3, 16, 16, patient_id="OLD", seed=21)
        mr = make_series(2, 16, 16, patient_id="OLD", modality="MR", seed=22,
                         study_uid=ct[0].StudyInstanceUID)
        store_as_received(archive, ct + mr)
        assert forwarder.run_once(time.time() + LATER) == 1            # the CT only
        sent = dict(dest.received)
        dest.received.clear()
        done = archive.correct("study", ct[0].StudyInstanceUID, {"PatientID": "NEW"},
                               resend=True)
        assert done["resent"] == [(ct[0].SeriesInstanceUID, "reading")]
        (row,) = forwarding.status(archive.index)
        assert (row["state"], row["reason"]) == ("queued", "corrected: to be sent again")
        assert forwarder.run_once() == 1
        assert set(dest.received) == set(sent)
        for uid, (ts, data) in dest.received.items():
            assert data == archive.retrieve(uid).data != sent[uid][1]
        assert [r["state"] for r in forwarding.status(archive.index)] == ["sent"]
        assert forwarder.run_once() == 0                                 # once
    finally:
        dest.stop()


def test_an_applied_rejection_note_goes_where_the_rejected_instances_went(archive,  # noqa
                                                                          tmp_path):
    """The destinations that had a series some of whose instances a rejection note deleted
    are sent the note (its series queued as a send by hand), so that they reject them too;
    a note that deletes nothing goes nowhere."""
    from storage import rejection
    from test_rejection_notes import note
    dest = StoreSCP("READ")
    try:
        forwarder = Forwarder(archive, _settings(tmp_path, dest.port))
        ct = make_series(3, 16, 16, seed=41)
        store_as_received(archive, ct)
        assert forwarder.run_once(time.time() + LATER) == 1
        dest.received.clear()
        refs = [(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in ct[:1]]
        kos = note(refs)
        ts, data = dataset_bytes(kos)
        archive.store(data, ts)
        done = archive.apply_rejection(rejection.read_note(data, ts), "CT1@10.0.0.1")
        assert done["instances"] == 1 and done["sent_to"] == ["reading"]
        assert forwarder.run_once() == 1
        assert list(dest.received) == [kos.SOPInstanceUID]
        assert dest.received[kos.SOPInstanceUID] == (ts, data)
        again = note(refs)                              # the instance is gone: nothing to do
        ts, data = dataset_bytes(again)
        archive.store(data, ts)
        assert archive.apply_rejection(rejection.read_note(data, ts), "CT1")["sent_to"] == []
    finally:
        dest.stop()


def test_a_destination_added_by_a_reload_is_offered_and_sent_to_by_the_page(admin_site):
    """The admin page reads the running node's settings: a destination a reload (SIGHUP)
    adds is in /api/config and takes a send by hand at once."""
    import dataclasses
    import json
    from admin_helpers import get_json, post_json
    node, admin = admin_site
    dest = StoreSCP("LATE")
    try:
        series = make_series(2, 8, 8, seed=17)
        sent = store_as_received(node.archive, series)
        url = f"{admin.url}/api/studies/{series[0].StudyInstanceUID}/send"
        body = json.dumps({"destination": "late"}).encode()
        assert post_json(url, body)[0] == 400
        node.reload(dataclasses.replace(node.settings, destinations={
            **node.settings.destinations, "late": f"LATE@127.0.0.1:{dest.port}"}))
        assert "late" in get_json(f"{admin.url}/api/config")["destinations"]
        assert post_json(url, body)[0] == 202
        deadline = time.monotonic() + 30
        while len(dest.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dest.received == sent
    finally:
        dest.stop()
