"""The running node's integrity patrol: every ``scrub_every_days`` it reads every stored file back,
at most ``scrub_read_mb_per_s``, and checks it against the SHA-256 recorded when it was written
(:func:`storage.scrub.check_stored_files`), so that a disk that changed bytes is found before a
retrieval needs them, while the sources may still be asked to send them again.

Damage is logged with the instances it takes; the last finished round is kept in ``scrub.json``
beside the index (a round cut short by a stop is started afresh) and shown by ``/api/stats``,
the admin page and ``/metrics``. ``voxarc verify`` checks more (it decodes every blob and
rebuilds every instance) and is the command to run on a stopped node after damage is reported.
"""

from __future__ import annotations

import logging
import threading
import time

from service import state_file
from storage.scrub import ScrubReport, check_stored_files

log = logging.getLogger(__name__)
STATE = "scrub.json"
START_DELAY = 600.0     # seconds after the node starts: not during a restart's catch-up ingest
RECHECK = 3600.0        # how often an idle patrol looks whether a round is due


class _Stopped(Exception):
    """The node is stopping: the round ends here."""


def last_round(archive) -> dict | None:
    """The outcome of the last finished round, or None before the first: ``started`` and
    ``finished`` (Unix times), ``files``, ``bytes``, ``damaged_files`` and
    ``damaged_instances`` (counts), ``damage`` (SOP Instance UID -> what is wrong with its
    file, the first 100)."""
    return state_file.read(archive, STATE)


def _save(archive, state: dict) -> None:
    state_file.write(archive, STATE, state)


class Patrol(threading.Thread):
    """Background thread running a round whenever the last one finished ``every_s`` ago.

    Parameters
    ----------
    archive : storage.archive.Archive
    every_s : float
        Seconds between the ends of two rounds.
    read_bytes_per_s : float
        Reading pace of a round (0: as fast as the disk goes).
    start_delay : float
        Seconds after :meth:`start` before the first look.
    """

    def __init__(self, archive, every_s: float, read_bytes_per_s: float,
                 start_delay: float = START_DELAY):
        super().__init__(name="voxarc-patrol", daemon=True)
        self.archive, self.every_s, self.rate = archive, every_s, read_bytes_per_s
        self.start_delay = start_delay
        self._stop_event = threading.Event()
        self._began, self._read = 0.0, 0

    def due_in(self) -> float:
        """Seconds until a round is due (0: due now)."""
        last = last_round(self.archive)
        return 0.0 if last is None else max(0.0, last["finished"] + self.every_s - time.time())

    def run(self) -> None:
        if self._stop_event.wait(self.start_delay):
            return
        while not self._stop_event.is_set():
            wait = self.due_in()
            if wait == 0:
                try:
                    self.run_round()
                except _Stopped:
                    return
                except Exception:   # logged; looked at again later
                    log.exception("integrity patrol: the round failed")
                    wait = RECHECK
            if wait and self._stop_event.wait(min(wait, RECHECK)):
                return

    def run_round(self) -> ScrubReport:
        """Read every stored file back now; save and return the outcome."""
        log.info("integrity patrol: reading every stored file back%s",
                 f" (at most {self.rate / 1e6:g} MB/s)" if self.rate else "")
        self._began, self._read = time.monotonic(), 0
        started = time.time()
        report = check_stored_files(self.archive, self._pace)
        damage = report.bad_instances
        _save(self.archive, {
            "started": started, "finished": time.time(),
            "files": report.blobs_checked + report.instances_checked,
            "bytes": report.bytes_checked,
            "damaged_files": len(report.bad_blobs) + len(report.bad_staged)
            + len(report.bad_bin_files),
            "bin_files": report.bin_files_checked, "damaged_bin_files": report.bad_bin_files,
            "damaged_instances": len(damage), "damage": dict(list(damage.items())[:100])})
        level = logging.ERROR if damage else logging.INFO
        log.log(level, "integrity patrol: %d files, %.2f GB read in %.0f s; %s",
                report.blobs_checked + report.instances_checked, report.bytes_checked / 1e9,
                time.time() - started, f"{len(report.bad_instances)} instances DAMAGED (run "
                "voxarc verify on the stopped node, resend them from their sources)"
                if damage else "no damage")
        return report

    def _pace(self, nbytes: int) -> None:
        """Sleep so that the round reads at most ``rate`` bytes a second; end it on stop."""
        self._read += nbytes
        ahead = self._read / self.rate - (time.monotonic() - self._began) if self.rate else 0.0
        if self._stop_event.wait(max(ahead, 0.0)) or self._stop_event.is_set():
            raise _Stopped

    def stop(self) -> None:
        """End the patrol (a round in progress stops after its current file); wait for it."""
        self._stop_event.set()
        if self.is_alive():
            self.join()
