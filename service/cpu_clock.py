"""CPU seconds used by this process and all its descendants, worker pools included.

``time.process_time()`` counts only the calling process, so a codec that decodes on a persistent
pool of worker processes would look almost free. This clock adds the CPU time of descendant
processes that are still alive (read from ``/proc`` on Linux) and of those already reaped.
Differences of two readings are what callers use.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

_PROC = Path("/proc")


def cpu_seconds() -> float:
    """Total user + system CPU seconds of this process and its descendants so far.

    Returns
    -------
    float
        Monotonic within one process as long as no descendant is reaped by someone else.
    """
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + reaped.ru_utime + reaped.ru_stime + _live_descendants_cpu()


def _live_descendants_cpu() -> float:
    if not _PROC.is_dir():
        return 0.0
    stats = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


def _process_table() -> dict[int, tuple[int, float]]:
    """``pid -> (parent pid, user + system CPU seconds)`` for every readable process."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return table
