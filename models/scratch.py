"""Working buffers a process keeps from one fine-tuning run to the next, for a while.

Each fine-tuning run (models.adapt) copies its samples, shuffled, into about 230 MB of
float32 arrays. Memory a process has never touched can cost far more than memory it reuses:
on the 2-core VM of 2026-12-03, numpy's large arrays (transparent huge pages, from memory the
VM had handed back to its host) took 0.5-0.8 s per 200 MB to fill the first time and
0.03-0.06 s when reused (without huge pages 0.17 s, but decoding then ran slower: not taken).
Filling the run's arrays took 0.49-0.77 s in a worker process, time every adapted encode
waited for. A run leases a set of buffers, fills them, and gives them back; the next run (the
next series a node compacts, seconds later) fills the same pages. Sets idle for
:data:`KEEP_S` are dropped, so an idle worker shrinks back to its code.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np

KEEP_S = 60.0      # a set of buffers unused this long is released


class Buffers:
    """Named arrays of one lease: :meth:`array` gives a buffer of the asked shape and dtype,
    reusing the memory of the same name from an earlier run when it is large enough."""

    def __init__(self):
        self._memory: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised ``shape`` array of ``dtype`` (contiguous), in reused memory."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        memory = self._memory.get(name)
        if memory is None or memory.nbytes < size:
            memory = self._memory[name] = np.empty(size, np.uint8)
        return memory[:size].view(dtype).reshape(shape)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self._memory.values())


class Pool:
    """Sets of buffers (made by ``make``: :class:`Buffers` by default), one per run at a time
    (runs in threads each lease their own), released after ``keep_s`` unused (their
    ``close()`` called, where they have one)."""

    def __init__(self, keep_s: float = KEEP_S, make=Buffers):
        self.keep_s, self.make = keep_s, make
        self._idle: list[tuple[float, Buffers]] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    @contextmanager
    def lease(self):
        """A set of buffers for one run, given back (and kept for a while) afterwards."""
        with self._lock:
            buffers = self._idle.pop()[1] if self._idle else self.make()
        try:
            yield buffers
        finally:
            with self._lock:
                self._idle.append((time.monotonic(), buffers))
                self._schedule()

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for _, b in self._idle)

    def trim(self, now: float | None = None) -> None:
        """Release the sets unused for ``keep_s`` (all of them with ``keep_s`` 0)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            old = [b for t, b in self._idle if now - t >= self.keep_s]
            self._idle = [(t, b) for t, b in self._idle if now - t < self.keep_s]
            self._timer = None
            self._schedule()
        for buffers in old:
            getattr(buffers, "close", lambda: None)()

    def _schedule(self) -> None:   # holds the lock
        if self._timer is None and self._idle:
            self._timer = threading.Timer(self.keep_s, self.trim)
            self._timer.daemon = True
            self._timer.start()


POOL = Pool()
