"""Load: eight concurrent DCMTK storescu associations push series while the compaction worker
runs and a pynetdicom SCU keeps reading with C-GET; afterwards every instance is byte-exact and
the counts in `stats` are exact. Sizes: ``VOXARC_LOAD_SERIES`` (8), ``VOXARC_LOAD_SLICES`` (100),
``VOXARC_LOAD_SIZE`` (64, rows = columns); throughput and C-GET latency percentiles are printed.
"""

import os
import subprocess
import threading
import time

import numpy as np

from node_helpers import make_series, needs_dcmtk, write_series
from scu_helpers import get
from service.dcmtk import dcmtk
from service.ae import Node
from service.config import load_settings
from storage.part10 import split_file

SERIES = int(os.environ.get("VOXARC_LOAD_SERIES", "8"))
SLICES = int(os.environ.get("VOXARC_LOAD_SLICES", "100"))
SIZE = int(os.environ.get("VOXARC_LOAD_SIZE", "64"))
CT = "1.2.840.10008.5.1.4.1.1.2"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def _storescu(port, folder):
    return subprocess.Popen([dcmtk("storescu"), "-aec", "VOXARC", "-to", "120", "+sd", "127.0.0.1",
                             str(port), str(folder)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


class Reader(threading.Thread):
    """C-GET the first series again and again until stopped; keep each call's latency."""

    def __init__(self, port, series_uid, expected, ts):
        super().__init__(daemon=True)
        self.port, self.series_uid, self.expected, self.ts = port, series_uid, expected, ts
        self.latencies, self.mismatches, self.done = [], 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            t0 = time.perf_counter()
            _, got = get(self.port, {"QueryRetrieveLevel": "SERIES",
                                     "SeriesInstanceUID": self.series_uid}, [(CT, self.ts)])
            self.latencies.append(time.perf_counter() - t0)
            self.mismatches += sum(got[uid] != self.expected[uid] for uid in got)


def _series_files(tmp_path, n):
    """Write series ``n``; return (series UID, folder, {SOP UID: (ts, dataset bytes)})."""
    series = make_series(SLICES, SIZE, SIZE, seed=n, patient_id=f"LOAD{n}")
    folder = tmp_path / f"s{n}"
    paths = write_series(series, folder)
    return (series[0].SeriesInstanceUID, folder,
            {ds.SOPInstanceUID: split_file(p.read_bytes()) for ds, p in zip(series, paths)})


def _wait(procs, timeout):
    for proc in procs:
        assert proc.wait(timeout=timeout) == 0, proc.stderr.read()[-2000:]


@needs_dcmtk
def test_concurrent_stores_compaction_and_gets(tmp_path):
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             stable_age=1.0, compaction_interval=0.5)
    node = Node(settings).start()
    pushed = [_series_files(tmp_path, n) for n in range(SERIES + 1)]   # the first one is read
    originals = {uid: item for _, _, sent in pushed for uid, item in sent.items()}
    ts = next(iter(originals.values()))[0]
    try:
        _wait([_storescu(node.port, pushed[0][1])], 300)
        reader = Reader(node.port, pushed[0][0], originals, ts)
        reader.start()
        t0 = time.perf_counter()
        _wait([_storescu(node.port, folder) for _, folder, _ in pushed[1:]], 600)
        store_seconds = time.perf_counter() - t0
        deadline = time.monotonic() + 600
        while node.archive.stats()["pending_instances"] and time.monotonic() < deadline:
            time.sleep(0.5)
        reader.done.set()
        reader.join(timeout=300)
        stats = node.archive.stats()
        assert stats["pending_instances"] == 0
        assert (stats["instances"], stats["series"]) == ((SERIES + 1) * SLICES, SERIES + 1)
        assert reader.mismatches == 0 and reader.latencies
        for series_uid, _, sent in pushed:
            final, got = get(node.port, {"QueryRetrieveLevel": "SERIES",
                                         "SeriesInstanceUID": series_uid}, [(CT, ts)])
            assert final.Status == 0 and got == sent
    finally:
        node.stop()
    lat = np.array(reader.latencies)
    print(f"\n{SERIES} concurrent storescu x {SLICES} slices {SIZE}x{SIZE}: "
          f"{SERIES * SLICES / store_seconds:.0f} instances/s; {len(lat)} C-GETs of "
          f"{SLICES} instances during load: p50 {np.percentile(lat, 50):.2f} s, "
          f"p95 {np.percentile(lat, 95):.2f} s, max {lat.max():.2f} s")
