"""Decoding slab groups on several cores: a small persistent pool of worker processes.

Slabs decode independently, so a volume's slab groups can go to different processes; the
result is the same whatever the split (the tests decode with and without workers).
``VOXARC_DECODE_WORKERS`` sets the number of processes (default: up to 2, one per core;
0 or 1 decodes in the calling process).
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

log = logging.getLogger(__name__)
_POOL: ProcessPoolExecutor | None = None
_BROKEN = False


def worker_count() -> int:
    if _BROKEN:
        return 1
    env = os.environ.get("VOXARC_DECODE_WORKERS")
    if env is not None:
        return max(int(env), 1)
    return max(1, min(2, os.cpu_count() or 1))


def init_worker() -> None:
    """A worker process's start (decoders and fine-tuning alike): one torch thread (set now,
    or, where torch is not imported yet, when it is), and gone when its parent is."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    else:
        os.environ["OMP_NUM_THREADS"] = "1"   # torch reads it when imported
    exit_with_parent()


def exit_with_parent(poll_s: float = 1.0) -> None:
    """In a worker process: exit as soon as the process that started it is gone. A parent
    killed outright (SIGKILL, a crash) leaves its pool's workers blocked on a queue nobody
    writes to; on Linux they are re-parented, which this notices within ``poll_s``."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)
    threading.Thread(target=watch, name="voxarc-parent-watch", daemon=True).start()


_THREADS_LOCK = threading.Lock()
_single = {"depth": 0, "saved": 1}


@contextmanager
def one_thread():
    """Run the block with one torch thread, as the worker processes always do. The codec's
    network runs on one wavefront step at a time, a few hundred to a few thousand voxels, where
    a second intra-op thread only adds wake-ups: a single slice decoded in the calling process
    took 1.4-1.6 s with two threads and the default OMP_WAIT_POLICY, 0.3-0.4 s with one (the
    result is the same either way). Nested and concurrent blocks share one saved setting.
    Where torch is not imported and the compiled kernels run (they need none), there is
    nothing to set."""
    from models import kernels
    torch = sys.modules.get("torch")
    if torch is None and not kernels.available():
        import torch                       # the numpy and torch path it is then
    if torch is None:
        yield
        return
    with _THREADS_LOCK:
        if _single["depth"] == 0:
            _single["saved"] = torch.get_num_threads()
            if _single["saved"] != 1:
                torch.set_num_threads(1)
        _single["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _single["depth"] -= 1
            if _single["depth"] == 0 and _single["saved"] != 1:
                torch.set_num_threads(_single["saved"])


def running() -> bool:
    """Whether the worker pool has been started (and several workers are wanted)."""
    return _POOL is not None and worker_count() > 1


def pool() -> ProcessPoolExecutor:
    """The shared worker pool (started on first use, with the spawn method: no inherited
    thread state)."""
    global _POOL
    if _POOL is None:
        _POOL = spawn_pool(worker_count(), init_worker)
        atexit.register(shutdown)
    return _POOL


def spawn_pool(size: int, initializer) -> ProcessPoolExecutor:
    """A process pool of ``size`` workers started with the spawn method (no inherited thread
    state), each running ``initializer`` first."""
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(size, mp_context=ctx, initializer=initializer)


def await_workers(get_pool, job, workers: int, timeout: float) -> set[int]:
    """Submit ``job`` (which returns its process id) ``workers`` times to ``get_pool()``, in
    rounds until every worker has answered or ``timeout`` has passed; the ids seen. A worker
    still starting lets the ready ones take its job, hence the rounds."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < workers and time.monotonic() < deadline:
        futures = [get_pool().submit(job) for _ in range(workers)]
        seen.update(future.result() for future in futures)
        if len(seen) < workers:
            time.sleep(0.02)
    return seen


def imap(fn, jobs, window: int = 4, first_rank: int = 0):
    """``fn(job)`` for each job, yielded in order as soon as each is done, with at most
    ``window`` jobs submitted ahead of the consumer. ``jobs`` may be an iterator: a job is taken
    from it only when it is submitted, so neither the jobs nor the results pile up (bounded
    memory for long streams). The first ``window`` jobs are submitted at once, before the
    first result is asked for. The k-th job is submitted with rank ``first_rank + k`` (see
    :func:`submit`). Runs in this process when the pool cannot (for example a script without
    a ``__main__`` guard under the spawn method); closing the generator cancels what has not
    started."""
    jobs = enumerate(jobs, first_rank)
    pending = deque((job, submit(fn, job, rank))
                    for rank, job in itertools.islice(jobs, window))
    return _drain(fn, jobs, pending)


def _drain(fn, jobs, pending: deque):
    """Results of ``pending`` (job, future or None) in order, each replaced by the next job."""
    try:
        while pending:
            job, future = pending[0]
            if future is None:
                result = fn(job)
            else:
                try:
                    result = future.result()
                except (BrokenProcessPool, RuntimeError, OSError) as exc:
                    _give_up(exc)
                    break
            pending.popleft()
            for rank, more in itertools.islice(jobs, 1):
                pending.append((more, submit(fn, more, rank)))
            yield result
    finally:
        for _, future in pending:
            if future is not None:
                future.cancel()
    for job in itertools.chain([job for job, _ in pending], (job for _, job in jobs)):
        yield fn(job)       # the pool broke


BACKGROUND = 1 << 20   # first rank of background work (encoding): after any retrieval's jobs


class _Scheduler:
    """Hands jobs to the worker pool no faster than its workers take them, lowest rank first.

    The pool's own queue is first come, first served: a retrieval starting while another
    streams a series waited behind every job the other had queued (its first image after
    1.0-1.2 s instead of 0.3). Here a stream's k-th job has rank k, so a new stream's first
    jobs go before the later jobs of one that has run a while (least attained service), and
    jobs of equal rank go in the order they came.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list = []
        self._busy = 0
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def submit(self, fn, job, rank: int) -> Future:
        outer: Future = Future()
        with self._cond:
            heapq.heappush(self._heap, (rank, next(self._seq), fn, job, outer))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._dispatch, daemon=True,
                                                name="voxarc-worker-dispatch")
                self._thread.start()
            self._cond.notify_all()
        return outer

    def load(self) -> tuple[int, int]:
        """(jobs waiting for a worker, jobs on the workers)."""
        with self._cond:
            return len(self._heap), self._busy

    def fail_waiting(self, exc: BaseException) -> None:
        """Fail every job not yet handed to the pool (the pool is gone)."""
        with self._cond:
            waiting, self._heap = self._heap, []
        for *_, outer in waiting:
            if outer.set_running_or_notify_cancel():
                outer.set_exception(exc)

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._busy >= worker_count():
                    self._cond.wait()
                *_, fn, job, outer = heapq.heappop(self._heap)
                if not outer.set_running_or_notify_cancel():
                    continue                      # cancelled while it waited
                self._busy += 1
            try:
                inner = pool().submit(fn, job)
            except (BrokenProcessPool, RuntimeError, OSError) as exc:   # shut down meanwhile
                self._finished(None, outer, exc if isinstance(exc, BrokenProcessPool)
                               else BrokenProcessPool(f"no worker pool: {exc}"))
                continue
            inner.add_done_callback(lambda f, outer=outer: self._finished(f, outer))

    def _finished(self, inner, outer: Future, exc: BaseException | None = None) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()
        if inner is not None:
            exc = BrokenProcessPool("the worker pool was shut down") if inner.cancelled() \
                else inner.exception()
        if exc is not None:
            outer.set_exception(exc)
        else:
            outer.set_result(inner.result())


_SCHEDULER = _Scheduler()


def load() -> tuple[int, int]:
    """(jobs waiting for a worker process, jobs the worker processes are running)."""
    return _SCHEDULER.load()


def submit(fn, job, rank: int = 0):
    """A future of ``fn(job)`` on the worker pool; None when there is no pool to run it.
    Jobs wait in this process until a worker is free and then go lowest ``rank`` first (see
    :class:`_Scheduler`)."""
    if worker_count() <= 1:
        return None
    try:
        pool()
    except (BrokenProcessPool, RuntimeError, OSError) as exc:
        _give_up(exc)
        return None
    return _SCHEDULER.submit(fn, job, rank)


def _give_up(exc) -> None:
    global _BROKEN
    log.warning("worker processes unavailable (%s); coding in this process", exc)
    _BROKEN = True
    shutdown()


def _warm_worker() -> int:
    from models.registry import load_model
    load_model("default")
    return os.getpid()


def warm(timeout: float = 120.0) -> set[int]:
    """Start the worker processes now and load the default model in them, so that the first
    decode of a server does not wait (call from a background thread). Returns once every
    worker has done so (the process ids seen): a worker still starting would take a core from
    the first decode."""
    workers = worker_count()
    if workers <= 1:
        return set()
    try:
        return await_workers(pool, _warm_worker, workers, timeout)
    except (BrokenProcessPool, RuntimeError, OSError) as exc:
        log.warning("could not start the decode worker processes: %s", exc)
    return set()


def shutdown() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(wait=False, cancel_futures=True)
        _POOL = None
    _SCHEDULER.fail_waiting(BrokenProcessPool("the worker pool was shut down"))
