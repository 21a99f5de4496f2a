"""Fine-tuning runs in worker processes of their own, at a lower CPU priority.

The encoder's per-volume adaptation (models.adapt) runs its fine-tuning runs side by side. As
threads of one process they contend for the interpreter lock: an Adam step on 4096 samples
(bfloat16 products, one torch thread each) took 1.25 ms alone, 1.86 ms each in two threads and
1.19-1.25 ms each in two processes. So each run goes to a process of this pool. The samples
travel as memory-mapped files (pickling would copy a few hundred MB twice): the adaptation
draws them straight into files in memory (``/dev/shm``, :class:`SampleFiles`, kept mapped for
the next adaptation a while), and arrays that are not there are written as ``.npy`` files to
``/dev/shm`` or, without room there, the temporary folder: 250 MB of samples took 0.74 s to
write to a disk's temporary folder and 0.13 s to ``/dev/shm``, time every adapted encode
waited for. The result comes back by pickle (a quantised predictor, small).
The folder's name carries the process id, so that one left by a process killed mid-run is
removed by a later adaptation of any process, once an hour old (:func:`remove_stale`).

The processes run at ``nice`` +:data:`NICE`: a node that compacts while it serves decodes
and receives first, and fine-tuning no longer holds the interpreter lock of the node's
process. Where processes cannot start (a script without a ``__main__`` guard under the spawn
method, no semaphores) or ``VOXARC_TUNE_WORKERS=0``, the runs go to threads: the same
computations, the same results.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from models import parallel, scratch

log = logging.getLogger(__name__)
NICE = 10
_POOL: ProcessPoolExecutor | None = None
_SIZE = 0
_BROKEN = False
_LOCK = threading.Lock()     # encoders in several threads share one pool
# where the samples are written for the worker processes, in this order (None: TMPDIR);
# a container's small /dev/shm (Docker's 64 MB) fails the write and the next one is tried
SAMPLE_DIRS = ("/dev/shm", None)


def usable() -> bool:
    """Whether runs go to worker processes."""
    return not _BROKEN and os.environ.get("VOXARC_TUNE_WORKERS", "1") != "0"


def map_runs(fn, arrays: dict[str, np.ndarray], jobs: list, space=None) -> list:
    """``[fn(arrays, job) for job in jobs]``, all at once, each job in a worker process of its
    own (or a thread). ``fn`` must be a module-level function; in a worker process it gets
    ``arrays`` as read-only memory maps: those in ``space``'s files (:func:`sample_space`)
    as they are, the others written to a temporary folder first."""
    if usable():
        try:
            return _in_processes(fn, arrays, jobs, space)
        except _SamplesNotWritten as exc:   # a full temporary folder: threads, this time
            log.warning("could not hand the samples to the fine-tuning processes (%s); "
                        "tuning in threads", exc.__cause__)
        except (BrokenProcessPool, RuntimeError, OSError) as exc:
            _give_up(exc)
    with parallel.one_thread(), ThreadPoolExecutor(len(jobs)) as threads:
        return list(threads.map(lambda job: fn(arrays, job), jobs))


def _in_processes(fn, arrays: dict[str, np.ndarray], jobs: list, space) -> list:
    describe = getattr(space, "describe", lambda a: None)
    where = {n: ("raw", *d) for n, a in arrays.items() if (d := describe(a)) is not None}
    rest = {n: a for n, a in arrays.items() if n not in where}
    with _samples_folder(rest) as folder:
        where.update((n, ("npy", os.path.join(folder, f"{n}.npy"))) for n in rest)
        pool = _pool(len(jobs))
        futures = [pool.submit(_run, fn, where, job) for job in jobs]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:       # one failed: the others need not finish
                f.cancel()


@contextmanager
def _samples_folder(arrays: dict[str, np.ndarray]):
    """A fresh folder holding ``arrays`` as ``.npy`` files, in the first of
    :data:`SAMPLE_DIRS` with room for them; removed afterwards (None: no arrays)."""
    if not arrays:
        yield None
        return
    error = None
    for where in SAMPLE_DIRS:
        try:
            folder = _new_folder(where)
        except OSError as exc:     # no such folder here
            error = exc
            continue
        try:
            try:
                for name, a in arrays.items():
                    np.save(os.path.join(folder, f"{name}.npy"), a)
            except OSError as exc:
                error = exc
                continue
            yield folder
            return
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    raise _SamplesNotWritten() from error


def remove_stale(where: str | None) -> list[str]:
    """Remove the sample folders in ``where`` (None: TMPDIR) of processes that no longer run,
    older than :data:`STALE_AFTER_S`: a node killed while it fine-tuned leaves its samples
    behind, and in ``/dev/shm`` they hold their memory until the machine restarts. Returns the
    folders removed."""
    base = where or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        pid = name[len(_PREFIX):].split("-", 1)[0]
        path = os.path.join(base, name)
        if name.startswith(_PREFIX) and pid.isdigit() and not _running(int(pid)) \
                and _age(path) > STALE_AFTER_S:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
            log.info("removed fine-tuning samples left by process %s: %s", pid, name)
    return removed


_PREFIX = "voxarc-tune-"    # then the process id, a dash and mkdtemp's random part
# a folder lives for one volume's fine-tuning (seconds); an older one whose process id is not
# running here is stale, not one of a process in another PID namespace sharing /dev/shm
STALE_AFTER_S = 3600.0


def _age(path: str) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return 0.0


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:            # another user's process: running
        return True
    return True


class _SamplesNotWritten(Exception):
    """The samples could not be written for the worker processes (the pool itself is fine)."""


def _run(fn, where: dict[str, tuple], job):
    arrays = {n: np.load(w[1], mmap_mode="r") if w[0] == "npy"
              else np.memmap(w[1], np.dtype(w[2]), "r", shape=w[3]) for n, w in where.items()}
    return fn(arrays, job)


class SampleFiles:
    """Named arrays in files of a folder of this process in shared memory (the first of
    :data:`SAMPLE_DIRS` that takes it), which the worker processes map as they are: samples
    drawn into them need no copy to be handed over, and the next adaptation refills the same
    pages (models.scratch keeps the files a while). An array that finds no room is an
    ordinary one (:func:`map_runs` then writes it out)."""

    def __init__(self):
        self.folder: str | None = None
        self._maps: dict[str, mmap.mmap] = {}    # kept mapped: refilled without page faults
        self._given: dict[str, np.ndarray] = {}     # the latest array of each file

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised ``shape`` array of ``dtype`` in the file ``name``."""
        dtype = np.dtype(dtype)
        size = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        try:
            memory = self._mapped(name, size)
        except OSError as exc:
            log.info("no room for the fine-tuning samples in shared memory (%s)", exc)
            return np.empty(shape, dtype)
        array = self._given[name] = np.ndarray(shape, dtype, buffer=memory)
        return array

    def _mapped(self, name: str, size: int) -> mmap.mmap:
        if self.folder is None:
            self.folder = _sample_folder()
        memory = self._maps.get(name)
        if memory is None or len(memory) < size:
            self._maps.pop(name, None)
            room = os.statvfs(self.folder)
            if room.f_bavail * room.f_frsize < size + KEEP_FREE:
                raise OSError(28, f"less than {KEEP_FREE >> 20} MB would be left free")
            with open(os.path.join(self.folder, name), "wb+") as f:
                # the room now, or ENOSPC here: not a SIGBUS when a full tmpfs meets a write
                os.posix_fallocate(f.fileno(), 0, size)
                memory = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | _POPULATE)
            self._maps[name] = memory
        return memory

    def describe(self, array: np.ndarray) -> tuple[str, str, tuple[int, ...]] | None:
        """(path, dtype, shape) of an array :meth:`array` gave (None: another array)."""
        for name, given in self._given.items():
            if array is given:
                return os.path.join(self.folder, name), array.dtype.str, array.shape
        return None

    @property
    def nbytes(self) -> int:
        return sum(len(m) for m in self._maps.values())

    def close(self) -> None:
        """Remove the files; their memory goes with the last array that uses it."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder, self._maps, self._given = None, {}, {}


# what SampleFiles leave free where they are: its files stay a while, and others (the
# decoders' shared memory for a retrieval's first instance) must still find room there
KEEP_FREE = 128 << 20
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)    # Linux: map the pages now, not one fault each


def _sample_folder() -> str:
    """A new folder of this process in the first of :data:`SAMPLE_DIRS` that takes one."""
    error: OSError | None = None
    for where in SAMPLE_DIRS:
        try:
            return _new_folder(where)
        except OSError as exc:     # no such folder here
            error = exc
    raise error or OSError("no folder for the fine-tuning samples")


def _new_folder(where: str | None) -> str:
    """A new sample folder in ``where`` (None: TMPDIR), named for this process so that
    :func:`remove_stale` knows whose it is; stale ones there are removed first."""
    remove_stale(where)
    return tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=where)


SAMPLE_FILES = scratch.Pool(make=SampleFiles)
atexit.register(lambda: SAMPLE_FILES.trim(now=float("inf")))


@contextmanager
def sample_space():
    """Where an adaptation draws the samples it hands to :func:`map_runs`: files the worker
    processes map (:class:`SampleFiles`), or, where runs go to threads, reused memory
    (models.scratch); either kept a while for the next adaptation."""
    with (SAMPLE_FILES if usable() else scratch.POOL).lease() as space:
        yield space


def _init_worker() -> None:
    parallel.init_worker()
    try:
        os.nice(NICE)
    except (AttributeError, OSError):   # no nice here: full priority is still correct
        pass
    importlib.import_module("models.train")   # torch: every run needs it, a started worker is ready


def _pool(size: int) -> ProcessPoolExecutor:
    global _POOL, _SIZE
    with _LOCK:
        if _POOL is None or _SIZE < size:
            shutdown()
            _POOL = parallel.spawn_pool(size, _init_worker)
            _SIZE = size
        return _POOL


def worker_state(arrays: dict, job) -> dict:
    """What a run sees where it runs: process id, whether torch was imported before the run,
    torch threads, niceness, its arrays' types (a diagnostic for :func:`map_runs`)."""
    ready = "torch" in sys.modules
    import torch
    return {"pid": os.getpid(), "torch_ready": ready, "threads": torch.get_num_threads(),
            "nice": os.nice(0),
            "arrays": {k: type(v).__name__ for k, v in arrays.items()}, "job": job}


def start(size: int = 2) -> None:
    """Have the worker processes start (each imports torch, over a second) without waiting for
    them: the encoder calls this before it draws its samples, so that a first adaptation's
    runs find them ready or nearly. A pool that cannot start shows it to :func:`map_runs`."""
    if not usable():
        return
    try:
        pool = _pool(size)
        for _ in range(size):     # a process pool starts its processes as jobs arrive
            pool.submit(os.getpid)
    except (BrokenProcessPool, RuntimeError, OSError) as exc:
        _give_up(exc)


def warm(size: int = 2, timeout: float = 120.0) -> set[int]:
    """Start the worker processes now (each imports torch), so that the first adaptation does
    not wait for them; returns their process ids once they are ready."""
    if not usable():
        return set()
    try:
        return parallel.await_workers(lambda: _pool(size), os.getpid, size, timeout)
    except (BrokenProcessPool, RuntimeError, OSError) as exc:
        _give_up(exc)
    return set()


def _give_up(exc) -> None:
    global _BROKEN
    log.warning("fine-tuning worker processes unavailable (%s); tuning in threads", exc)
    _BROKEN = True
    shutdown()


def shutdown() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(wait=False, cancel_futures=True)
        _POOL = None


atexit.register(shutdown)     # once (a pool rebuilt larger registered it again before)
