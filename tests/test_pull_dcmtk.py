"""`voxarc pull` from DCMTK's own archive, `dcmqrscp`: a real Query/Retrieve SCP whose IMAGE-level
answers carry no SOP Class UID, by C-GET and by C-MOVE to the running node; every instance
arrives as the archive holds it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from node_helpers import free_port, make_series, needs_dcmtk, node, write_series  # noqa: F401
from service.ae import open_archive
from service.cli import main
from service.config import load_settings
from service.dcmtk import dcmtk
from storage.dataset_parts import parse_dataset
from storage.part10 import split_file

pytestmark = needs_dcmtk
ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture
def dcmqrscp(node, tmp_path):
    """dcmqrscp (AE QRSCP) holding two generated series, sent by storescu; it knows the
    running node as move destination VOXARC. Yields its port and {SOP UID: (syntax, bytes)}
    of what it was sent."""
    port, db = free_port(), tmp_path / "qrdb"
    db.mkdir()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        f"HostTable BEGIN\nvoxarc = (VOXARC, 127.0.0.1, {node.port})\nHostTable END\n"
        "VendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\nQRSCP {db} RW (200, 1024mb) ANY\nAETable END\n")
    proc = subprocess.Popen([dcmtk("dcmqrscp"), "-c", str(config)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        files = write_series(make_series(4, 16, 16, seed=8) + make_series(
            3, 12, 12, modality="MR", patient_id="PAT2", seed=9), tmp_path / "files")
        subprocess.run([dcmtk("storescu"), "-aec", "QRSCP", "127.0.0.1", str(port),
                        *map(str, files)], env=ENV, check=True, capture_output=True)
        sent = {}
        for path in files:
            ts, data = split_file(Path(path).read_bytes())
            sent[str(parse_dataset(data, ts).SOPInstanceUID)] = (ts, data)
        yield port, sent
    finally:
        proc.terminate()
        proc.wait(10)


def _held(archive, uids) -> dict:
    return {uid: (archive.retrieve(uid).transfer_syntax, archive.retrieve(uid).data)
            for uid in uids}


def test_pull_from_dcmqrscp_by_c_get(dcmqrscp, tmp_path):
    port, sent = dcmqrscp
    target = str(tmp_path / "target")
    assert main(["pull", "--data-dir", target, f"QRSCP@127.0.0.1:{port}"]) == 0
    archive = open_archive(load_settings(data_dir=target))
    try:
        assert _held(archive, sent) == sent
    finally:
        archive.close()
    assert main(["pull", "--data-dir", target, "--patient-id", "PAT2",
                 f"QRSCP@127.0.0.1:{port}"]) == 0            # nothing left to pull


def test_pull_from_dcmqrscp_by_c_move(dcmqrscp, node):
    port, sent = dcmqrscp
    assert main(["pull", "--data-dir", node.settings.data_dir, "--move",
                 f"QRSCP@127.0.0.1:{port}"]) == 0
    assert _held(node.archive, sent) == sent
