"""Crash safety: the real node (``voxarc serve`` in a subprocess) is killed with SIGKILL at random
moments while a pynetdicom SCU pushes series and while compaction runs (every fifth kill as soon
as a compaction starts), then restarted.

Afterwards every instance that was answered 0x0000 is retrieved byte-exact, every indexed
instance passes its SHA-256 check (nothing half-written is visible), and the data folder holds no
orphan blob, staged or temporary file. ``VOXARC_CRASH_KILLS`` sets the number of kills (default
20; raise it for a benchmark run), ``VOXARC_CRASH_SEED`` the random seed.
"""

import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.presentation import build_context
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from sqlalchemy import select as sql_select

from node_helpers import dataset_bytes, free_port, make_series
from storage.archive import Archive
from storage.blobstore import BlobStore
from storage.index import Blob, Index, Instance
from storage.part10 import build_file

REPO = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("VOXARC_CRASH_KILLS", "20"))
SEED = int(os.environ.get("VOXARC_CRASH_SEED", "6"))


def _start(data: Path, config: Path, log) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--config", str(config), "--data-dir",
         str(data), "--port", str(port), "--stable-age", "0.5", "--http-port", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=log, start_new_session=True, text=True,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready and proc.stdout.readline().startswith("listening on port"):
            return proc, port
        assert proc.poll() is None, "node exited during startup"
    raise AssertionError("node did not start listening")


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)      # the whole group: codec worker processes too
    proc.wait(timeout=60)


class Pusher(threading.Thread):
    """Push generated series until the association breaks; record what was acknowledged."""

    def __init__(self, port: int, folder: Path, rng: random.Random, acked: dict, counter):
        super().__init__(daemon=True)
        self.port, self.folder, self.rng, self.acked, self.counter = (
            port, folder, rng, acked, counter)
        self.phase = "connecting"

    def run(self) -> None:
        try:
            while self._push_series():
                self.phase = "idle (compaction window)"
                time.sleep(self.rng.uniform(0.0, 1.5))
        except Exception:        # the node died under us: expected
            pass
        self.phase = "stopped"

    def _push_series(self) -> bool:
        ae = AE(ae_title="CRASHSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", self.port, ae_title="VOXARC",
                             contexts=[build_context(CTImageStorage, [ExplicitVRLittleEndian])])
        if not assoc.is_established:
            return False
        self.phase = "storing"
        seed = next(self.counter)
        for ds in make_series(self.rng.randint(4, 10), 64, 64, seed=seed):
            ts, data = dataset_bytes(ds)
            path = self.folder / f"{ds.SOPInstanceUID}.dcm"
            path.write_bytes(build_file(CTImageStorage, ds.SOPInstanceUID, ts, data))
            status = assoc.send_c_store(path)
            path.unlink()
            if not assoc.is_established:
                return False
            if status and status.Status == 0x0000:
                self.acked[ds.SOPInstanceUID] = data
        assoc.release()
        return True


COMPACTING = "compacting series"   # the node's log line when a compaction job starts
AIM_EVERY = 5                      # every fifth kill waits for a compaction to start


def _wait_for(path: Path, text: str, count: int, timeout: float) -> bool:
    """Poll ``path`` until ``text`` occurs ``count`` times (False on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.read_text().count(text) >= count:
            return True
        time.sleep(0.002)
    return False


def _assert_no_orphans(data: Path) -> dict:
    """Check the data folder against the index without opening an Archive (no recovery)."""
    index, blobs = Index(f"sqlite:///{data / 'index.sqlite'}"), BlobStore(data / "blobs")
    with index.read() as s:
        staged = set(s.scalars(sql_select(Instance.staged_key).where(
            Instance.staged_key.is_not(None))))
        blob_keys = set(s.scalars(sql_select(Blob.key)))
    index.close()
    on_disk = set(blobs.keys())
    assert not list(blobs.root.rglob("*.tmp")), "half-written file left behind"
    assert on_disk == staged | blob_keys, f"orphans {on_disk - staged - blob_keys}, " \
                                          f"missing {(staged | blob_keys) - on_disk}"
    return {"staged": len(staged), "blobs": len(blob_keys)}


def test_sigkill_during_store_and_compaction(tmp_path):
    _config.STORE_SEND_CHUNKED_DATASET = True        # send the file's dataset bytes unchanged
    data, rng, acked = tmp_path / "data", random.Random(SEED), {}
    config = tmp_path / "node.toml"
    config.write_text('host = "127.0.0.1"\ncompaction_interval = 0.2\n')
    counter, phases = iter(range(10 ** 6)), {}
    started = time.monotonic()
    with open(tmp_path / "node.log", "w") as log:
        for k in range(KILLS):
            proc, port = _start(data, config, log)
            seen = (tmp_path / "node.log").read_text().count(COMPACTING)
            pusher = Pusher(port, tmp_path, rng, acked, counter)
            pusher.start()
            if k % AIM_EVERY == AIM_EVERY - 1:
                # aimed: kill as soon as a compaction starts (a fast machine compacts these
                # small series in a few tens of ms, which random kills rarely hit)
                _wait_for(tmp_path / "node.log", COMPACTING, seen + 1, timeout=30)
            else:
                time.sleep(rng.uniform(0.1, 2.5))
            phases[pusher.phase] = phases.get(pusher.phase, 0) + 1
            _kill(proc)
            pusher.join(timeout=90)
        proc, _ = _start(data, config, log)            # recovery runs in the node itself
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0
    text = (tmp_path / "node.log").read_text()
    counts = _assert_no_orphans(data)
    arch = Archive(data)
    assert arch.recovery.clean and not arch.recovery.orphans_removed
    for uid, sent in acked.items():
        assert arch.retrieve(uid).data == sent, uid
    with arch.index.read() as s:
        stored = list(s.scalars(sql_select(Instance.sop_uid)))
    for uid in stored:                                  # SHA-256 checked on every one
        arch.retrieve(uid)
    arch.close()
    orphans = sum(map(int, re.findall(r"recovery: removed (\d+) orphan", text)))
    in_compaction = len(re.findall(r"reset [1-9]\d* interrupted compaction", text))
    print(f"\n{KILLS} kills in {time.monotonic() - started:.0f} s, kill phases {phases}, "
          f"{in_compaction} during a compaction; {len(acked)} acknowledged, {len(stored)} "
          f"indexed, {counts}; {orphans} orphan files removed by the restarted nodes")
    assert len(acked) > 0 and set(acked) <= set(stored)
    assert counts["blobs"] > 0, "compaction never ran between kills"
    assert "compacted series" in text
    assert in_compaction >= 1 or KILLS < AIM_EVERY, "no kill hit a running compaction"


def test_sigkill_while_forwarding_sends_the_series_again_after_restart(tmp_path):
    """A node killed while it forwards a series to a destination sends that series again,
    whole, once restarted: the destination ends up with every instance as received."""
    from scu_helpers import StoreSCP, store_bytes
    dest = StoreSCP("READ")
    data, config = tmp_path / "data", tmp_path / "node.toml"
    config.write_text(f'compaction_interval = 0.2\nscrub_every_days = 0\n[destinations]\n'
                      f'reading = "READ@127.0.0.1:{dest.port}"\n[forward]\nreading = ""\n')

    def slow_store(event):                    # a slow destination: the kill lands mid-series
        time.sleep(0.05)
        return StoreSCP._on_store(dest, event)
    dest.server.unbind(evt.EVT_C_STORE, dest._on_store)
    dest.server.bind(evt.EVT_C_STORE, slow_store)
    series = make_series(30, 32, 32, seed=51)
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    try:
        with open(tmp_path / "node.log", "w") as log:
            proc, port = _start(data, config, log)
            try:
                assert store_bytes(port, items, tmp_path) == [0] * len(items)
                deadline = time.monotonic() + 60
                while len(dest.received) < 5 and time.monotonic() < deadline:
                    time.sleep(0.01)
                at_kill = len(dest.received)
            finally:
                _kill(proc)
            assert 0 < at_kill < len(items)
            proc, port = _start(data, config, log)
            try:
                deadline = time.monotonic() + 90
                while len(dest.received) < len(items) and time.monotonic() < deadline:
                    time.sleep(0.05)
            finally:
                _kill(proc)
        assert dest.received == {uid: (ts, raw) for _, uid, ts, raw in items}
    finally:
        dest.stop()
