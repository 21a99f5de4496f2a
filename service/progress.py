"""Progress of long commands: a one-line bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Progress:
    """Report ``done / total`` of a task.

    Parameters
    ----------
    label : str
        What is being counted ("import", "compress").
    total : int
        Expected count (0 when unknown).
    stream : file, optional
        Where the bar goes when it is a TTY (default stderr).
    every : float
        Seconds between two log lines when not on a TTY.
    """

    def __init__(self, label: str, total: int, stream=None, every: float = 5.0):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every, self._last, self._start = every, 0.0, time.monotonic()

    def advance(self, n: int = 1, note: str = "") -> None:
        """Count ``n`` more items done and report when it is time to."""
        self.done += n
        now = time.monotonic()
        if self.tty:
            width = 30
            filled = int(width * self.done / self.total) if self.total else 0
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{self.done}/{self.total} {note[:40]:<40}")
            self.stream.flush()
        elif now - self._last >= self.every or self.done == self.total:
            self._last = now
            log.info("%s: %d/%d %s", self.label, self.done, self.total, note)

    def finish(self) -> float:
        """End the report; return the seconds elapsed."""
        if self.tty:
            self.stream.write("\n")
        return time.monotonic() - self._start
