"""Orthanc (the Debian `orthanc` package) as a peer PACS, driven through its REST API: it pushes a
study to the node (C-STORE), queries the node (C-FIND, as its "query/retrieve" page does) and
pulls the study back into itself (C-MOVE with Orthanc as destination), staged and compacted;
what Orthanc then holds is, byte for byte, what the node received from it."""

from __future__ import annotations

import io
import json
import urllib.request

import pytest

from node_helpers import (TESTDATA, file_bytes, free_port, make_series, node,  # noqa: F401
                          real_series_files, with_scanner_private_elements)
from service import node_bench
from storage.dataset_parts import parse_dataset
from storage.part10 import split_file

pytestmark = pytest.mark.skipif(not node_bench.orthanc_binary(), reason="orthanc not installed")


class Orthanc:
    """A running Orthanc and its REST API."""

    def __init__(self, work, node_port: int):
        self.http = free_port()
        self.server = node_bench.start_orthanc(
            work, compression=False, http_port=self.http,
            modalities={"voxarc": {"AET": "VOXARC", "Host": "127.0.0.1", "Port": node_port}})

    def call(self, method: str, path: str, body=None):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data,
                                         method=method)
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
        return json.loads(raw) if response.headers.get_content_type() == "application/json" else raw

    def instances(self) -> dict[str, tuple[str, bytes]]:
        """Every instance Orthanc holds, as (transfer syntax, dataset bytes) by SOP UID."""
        out = {}
        for orthanc_id in self.call("GET", "/instances"):
            ts, data = split_file(self.call("GET", f"/instances/{orthanc_id}/file"))
            sop = self.call("GET", f"/instances/{orthanc_id}")["MainDicomTags"]["SOPInstanceUID"]
            out[sop] = (ts, data)
        return out


@pytest.fixture
def orthanc(node, tmp_path):
    peer = Orthanc(tmp_path / "orthanc", node.port)
    node.settings.destinations["orthanc"] = f"ORTHANC@127.0.0.1:{peer.server.port}"
    yield peer
    peer.server.stop()


def _query(orthanc, level: str, query: dict) -> tuple[list[dict], str]:
    """Orthanc's C-FIND to the node: its answers as {keyword: value}, and the query's id."""
    found = orthanc.call("POST", "/modalities/voxarc/query", {"Level": level, "Query": query})
    answers = orthanc.call("GET", f"/queries/{found['ID']}/answers")
    return [orthanc.call("GET", f"/queries/{found['ID']}/answers/{a}/content?simplify")
            for a in answers], found["ID"]


def _pull_back(orthanc, study_uid: str, sent: dict) -> None:
    """Orthanc forgets every study, finds this one on the node and retrieves it (C-MOVE to
    itself): it then holds ``sent``, byte for byte."""
    for orthanc_id in orthanc.call("GET", "/studies"):
        orthanc.call("DELETE", f"/studies/{orthanc_id}")
    assert orthanc.instances() == {}
    answers, query_id = _query(orthanc, "Study", {"StudyInstanceUID": study_uid})
    assert [a["StudyInstanceUID"] for a in answers] == [study_uid]
    orthanc.call("POST", f"/queries/{query_id}/retrieve",
                 {"TargetAet": "ORTHANC", "Synchronous": True})
    assert orthanc.instances() == sent


def _push_through_orthanc(orthanc, node, files: list[bytes]) -> dict:
    """Orthanc is given Part 10 files and sends their studies to the node (C-STORE); returns
    what the node received, by SOP UID. Orthanc's DCMTK re-encodes what it sends (a private
    text's trailing space trimmed, encapsulated pixel data re-framed), so the node's copy is
    compared with what the node received, not with the files."""
    for data in files:
        orthanc.call("POST", "/instances", data)
    orthanc.call("POST", "/modalities/voxarc/store",
                 {"Resources": orthanc.call("GET", "/studies"), "Synchronous": True})
    held = orthanc.instances()
    assert node.archive.stats()["instances"] == len(held) == len(files)
    return {sop: (node.archive.retrieve(sop).transfer_syntax, node.archive.retrieve(sop).data)
            for sop in held}


def test_orthanc_pushes_queries_and_pulls_back_a_study(node, orthanc):
    series = [with_scanner_private_elements(ds) for ds in make_series(4, 16, 16, seed=31)]
    jls = (TESTDATA / "MR_small_jpeg_ls_lossless.dcm").read_bytes()   # kept compressed
    sent = _push_through_orthanc(orthanc, node, [file_bytes(ds) for ds in series] + [jls])
    study_uid = series[0].StudyInstanceUID

    studies, _ = _query(orthanc, "Study", {"PatientID": "PAT1", "StudyDate": "20240101-20240131",
                                           "ModalitiesInStudy": "", "StudyDescription": "",
                                           "NumberOfStudyRelatedInstances": ""})
    assert [(s["StudyInstanceUID"], s["StudyDescription"], s["NumberOfStudyRelatedInstances"],
             s["ModalitiesInStudy"]) for s in studies] == [(study_uid, "Test study", "4", "CT")]
    instances, _ = _query(orthanc, "Instance", {"StudyInstanceUID": study_uid,
                                                "SeriesInstanceUID": series[0].SeriesInstanceUID,
                                                "InstanceNumber": ""})
    assert sorted(int(i["InstanceNumber"]) for i in instances) == [1, 2, 3, 4]

    ours = {sop: sent[sop] for sop in (ds.SOPInstanceUID for ds in series)}
    _pull_back(orthanc, study_uid, ours)
    node.archive.compact(0)
    assert node.archive.stats()["pending_instances"] == 0
    _pull_back(orthanc, study_uid, ours)


def test_orthanc_round_trip_of_real_scanners_instances(node, orthanc, shared_series):
    """Eight slices of the GE lung CT and the Siemens enhanced MR's four multi-frame time points
    of the test series, staged and compacted."""
    ct = real_series_files(shared_series("test", "ct_ge_revolution_lungbases_cptacpda"), 8)
    mr = real_series_files(shared_series("test", "mr_enh_siemens_xa10"))
    sent = _push_through_orthanc(orthanc, node, [p.read_bytes() for p in ct + mr])
    studies = {_study_of(data, ts): {} for ts, data in sent.values()}
    for sop, (ts, data) in sent.items():
        studies[_study_of(data, ts)][sop] = (ts, data)
    for compacted in (False, True):
        if compacted:
            node.archive.compact(0)
            assert node.archive.stats()["pending_instances"] == 0
        for study_uid, instances in studies.items():
            _pull_back(orthanc, study_uid, instances)


def _study_of(data: bytes, ts: str) -> str:
    return str(parse_dataset(data, ts).StudyInstanceUID)


def test_voxarc_pulls_the_studies_orthanc_holds(tmp_path):
    """A site moving from Orthanc: `voxarc pull` finds Orthanc's studies (C-FIND) and
    retrieves them (C-GET), each in the syntax Orthanc holds it in; run again, it finds
    nothing left to pull. Orthanc's DCMTK sends uncompressed instances as stored; the
    bundled JPEG-LS file's encapsulated pixels (written as OW) it sends re-framed as OB, the
    same pixels."""
    import numpy as np
    from pydicom import dcmread
    from service.ae import open_archive
    from service.cli import main
    from service.config import load_settings
    from storage.part10 import build_file
    peer = Orthanc(tmp_path / "orthanc", free_port())     # knows the AE title VOXARC
    try:
        plain = make_series(4, 16, 16, seed=5) + make_series(2, 8, 8, seed=6)
        for ds in plain:
            peer.call("POST", "/instances", file_bytes(ds))
        peer.call("POST", "/instances", (TESTDATA / "MR_small_jpeg_ls_lossless.dcm").read_bytes())
        held = peer.instances()
        source = f"ORTHANC@127.0.0.1:{peer.server.port}"
        target = str(tmp_path / "target")
        assert main(["pull", "--data-dir", target, "--ae-title", "VOXARC", source]) == 0
        archive = open_archive(load_settings(data_dir=target))
        got = {uid: archive.retrieve(uid) for uid in held}
        assert len(archive.find("IMAGE", {})) == len(held) == 7
        archive.close()
        for uid, (ts, data) in held.items():
            assert got[uid].transfer_syntax == ts
            mine, theirs = (dcmread(io.BytesIO(build_file("1.2.3", uid, ts, d)))
                            for d in (got[uid].data, data))
            np.testing.assert_array_equal(mine.pixel_array, theirs.pixel_array)
            assert (mine.PatientID, mine.SeriesInstanceUID) == \
                (theirs.PatientID, theirs.SeriesInstanceUID)
        assert all(got[ds.SOPInstanceUID].data == held[ds.SOPInstanceUID][1] for ds in plain)
        assert main(["pull", "--data-dir", target, "--ae-title", "VOXARC", source]) == 0
    finally:
        peer.server.stop()


def test_voxarc_pulls_from_orthanc_by_c_move(node, orthanc):
    """``voxarc pull --move``: Orthanc sends the study by C-MOVE to the running node, as a PACS
    without C-GET would; the command finds it arrived."""
    from service.cli import main
    series = make_series(3, 16, 16, seed=7)
    for ds in series:
        orthanc.call("POST", "/instances", file_bytes(ds))
    held = orthanc.instances()
    assert main(["pull", "--data-dir", node.settings.data_dir, "--move",
                 f"ORTHANC@127.0.0.1:{orthanc.server.port}"]) == 0
    assert {uid: (node.archive.retrieve(uid).transfer_syntax, node.archive.retrieve(uid).data)
            for uid in held} == held
