"""`voxarc pull` (service.pull): studies copied from another archive (here another voxarc node,
its stacks compacted) by C-FIND and C-GET into this one, byte for byte and in the syntax the
source holds them in; filters, a dry run, resuming after a loss, and sources that cannot
serve."""

from __future__ import annotations

import json
import logging

import pytest

from node_helpers import bundled, dataset_bytes, make_series, node  # noqa: F401
from scu_helpers import store_bytes
from service.ae import open_archive
from service.cli import main
from service.config import load_settings
from storage.dataset_parts import parse_dataset


@pytest.fixture
def source(node, tmp_path):
    """A node holding two patients' studies (a CT stack and an MR stack, compacted) and a
    JPEG-LS instance kept as received; returns (node, {SOP UID: (syntax, bytes)}, studies)."""
    ct = make_series(5, 16, 16, patient_id="PAT1", seed=1)
    mr = make_series(3, 12, 12, patient_id="PAT2", modality="MR", seed=2)
    items, sent = [], {}
    for ds in ct + mr:
        ts, data = dataset_bytes(ds)
        items.append((ds.SOPClassUID, ds.SOPInstanceUID, ts, data))
    ts, data = bundled("MR_small_jpeg_ls_lossless.dcm")
    jls = parse_dataset(data, ts, ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"))
    items.append((jls.SOPClassUID, jls.SOPInstanceUID, ts, data))
    for sop_class, sop, ts, data in items:
        sent[sop] = (ts, data)
    assert set(store_bytes(node.port, items, tmp_path)) == {0}
    assert node.archive.compact(stable_age=0) == (3, 0)     # three series
    studies = {"ct": ct, "mr": mr, "jls": jls.StudyInstanceUID}
    return node, sent, studies


def _pull(tmp_path, node, *args) -> int:
    return main(["pull", "--data-dir", str(tmp_path / "target"), *args,
                 f"VOXARC@127.0.0.1:{node.port}"])


def _held(tmp_path) -> dict:
    archive = open_archive(load_settings(data_dir=str(tmp_path / "target")))
    try:
        uids = [r["SOPInstanceUID"] for r in archive.find("IMAGE", {})]
        out = {}
        for uid in uids:
            inst = archive.retrieve(uid)
            out[uid] = (inst.transfer_syntax, inst.data)
        return out
    finally:
        archive.close()


def test_pull_copies_every_study_byte_for_byte(source, tmp_path):
    node, sent, studies = source
    report = tmp_path / "pull.json"
    assert _pull(tmp_path, node, "--json", str(report)) == 0
    assert _held(tmp_path) == sent          # the JPEG-LS instance still in JPEG-LS
    entries = {e["study_uid"]: e for e in json.loads(report.read_text())["studies"]}
    assert entries[studies["ct"][0].StudyInstanceUID] | {"patient": ""} == {
        "study_uid": studies["ct"][0].StudyInstanceUID, "patient": "", "at_source": 5,
        "received": 5, "missing": 0, "status": "0x0000"}
    assert sum(e["received"] for e in entries.values()) == len(sent)


def test_pull_filters_and_resumes_where_it_stopped(source, tmp_path, caplog):
    node, sent, studies = source
    ct = studies["ct"]
    assert _pull(tmp_path, node, "--patient-id", "PAT1") == 0
    assert set(_held(tmp_path)) == {ds.SOPInstanceUID for ds in ct}
    target = open_archive(load_settings(data_dir=str(tmp_path / "target")))
    target.delete("instance", ct[2].SOPInstanceUID, reason="lost, to be pulled again")
    target.close()
    caplog.set_level(logging.INFO, logger="service.pull_cli")
    assert _pull(tmp_path, node, "--study", ct[0].StudyInstanceUID,
                 "--study", studies["jls"]) == 0
    received = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study ")]
    assert sorted(m.split(":")[1].split(",")[0].strip() for m in received) == \
        ["1 instances received"] * 2        # the lost one alone, and the JPEG-LS instance
    held = _held(tmp_path)
    assert set(held) == {ds.SOPInstanceUID for ds in ct} | {
        sop for sop, (ts, _) in sent.items() if ts.startswith("1.2.840.10008.1.2.4.80")}
    assert all(held[uid] == sent[uid] for uid in held)
    caplog.clear()
    assert _pull(tmp_path, node, "--modality", "MR", "--patient-id", "PAT2") == 0
    assert {ds.SOPInstanceUID for ds in studies["mr"]} <= set(_held(tmp_path))


def test_dry_run_lists_and_pulls_nothing(source, tmp_path, capsys):
    node, sent, studies = source
    assert _pull(tmp_path, node, "--dry-run") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and any("5 of 5 to pull" in line for line in lines)
    assert _held(tmp_path) == {}


def test_sources_that_cannot_serve(node, tmp_path):
    settings_dir = str(tmp_path / "target")
    assert main(["pull", "--data-dir", settings_dir, "nowhere"]) == 2     # not a source
    assert main(["pull", "--data-dir", settings_dir, "GONE@127.0.0.1:1"]) == 1
    # the node refuses associations called by another AE title than its own
    assert main(["pull", "--data-dir", settings_dir, f"ELSEWHERE@127.0.0.1:{node.port}"]) == 1


@pytest.mark.parametrize("classes", [1, 7, 8, 40, 127])
def test_contexts_fit_one_association(classes):
    """Every class gets its uncompressed context and as many compressed ones as 128 contexts
    leave: all sixteen up to seven classes."""
    from service.pull import _COMPRESSED, _get_contexts
    uids = [f"1.2.3.{n}" for n in range(classes)]
    contexts = _get_contexts(uids)
    assert len(contexts) <= 128
    per_class = {uid: [cx for cx in contexts if cx.abstract_syntax == uid] for uid in uids}
    assert all(cxs and len(cxs[0].transfer_syntax) == 3 for cxs in per_class.values())
    assert (len(per_class[uids[0]]) == 1 + len(_COMPRESSED)) == (classes <= 7)


def test_pull_by_c_move_into_the_running_node(source, tmp_path):
    """``--move``: the source sends by C-MOVE to the running node's AE title (sources without
    C-GET); the command sees the instances arrive in the node's archive."""
    from service.ae import Node
    src, sent, _ = source
    config = tmp_path / "target.toml"
    config.write_text(f'data_dir = "{tmp_path / "target"}"\nae_title = "TARGET"\n'
                      'host = "127.0.0.1"\nport = 0\nstable_age = 3600\n')
    target = Node(load_settings(config), compaction=False).start()
    try:
        src.settings.destinations["target"] = f"TARGET@127.0.0.1:{target.port}"
        assert main(["pull", "--config", str(config), "--move",
                     f"VOXARC@127.0.0.1:{src.port}"]) == 0
        assert {uid: (i.transfer_syntax, i.data) for uid, i in
                ((u, target.archive.retrieve(u)) for u in sent)} == sent
        del src.settings.destinations["target"]      # unknown to the source now: 0xA801
        target.archive.delete("instance", next(iter(sent)), reason="test")
        assert main(["pull", "--config", str(config), "--move",
                     f"VOXARC@127.0.0.1:{src.port}"]) == 1
    finally:
        target.stop()


def test_a_study_that_fails_does_not_stop_the_others(source, tmp_path, monkeypatch):
    from service import pull
    node, sent, studies = source
    original, failing = pull.Puller.pull, studies["ct"][0].StudyInstanceUID

    def pull_unless_ct(self, plan, move_to=None):
        if plan.study_uid == failing:
            raise pull.PullError("the source aborted the association")
        return original(self, plan, move_to)
    monkeypatch.setattr(pull.Puller, "pull", pull_unless_ct)
    report = tmp_path / "pull.json"
    assert _pull(tmp_path, node, "--json", str(report)) == 1      # one study incomplete
    (failed,) = [e for e in json.loads(report.read_text())["studies"] if "error" in e]
    assert failed["study_uid"] == failing and "aborted" in failed["error"]
    held = _held(tmp_path)
    assert not {ds.SOPInstanceUID for ds in studies["ct"]} & set(held)
    assert {ds.SOPInstanceUID for ds in studies["mr"]} <= set(held)
