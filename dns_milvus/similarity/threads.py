"""How many CPU threads one fine-scoring call uses (``threads=`` of the fine scorers).

Torch's intra-op threads meet at a barrier after every operator. On a machine where other
processes keep the cores busy, one of them is often descheduled and the others wait for it:
measured on 2 cores under load, two threads scored fewer pairs a second than one (see
docs/kernel.md). So by default each call picks its thread count from the CPU time that *other*
processes used recently:

    threads = clamp(round(usable cores - cores busy with other processes), 1, torch.get_num_threads())

"Busy with other processes" is the machine's busy CPU time (``/proc/stat``, hypervisor steal
included) minus this process's own (all its threads), over the last half second or more between
calls. Until a first window has been seen, and where ``/proc/stat`` is missing, the 1-minute
load average stands in (it counts this process too, so it errs towards fewer threads).

The count is set for the calling thread only while the call runs (torch's OpenMP thread count
is per thread once a thread has used torch) and restored afterwards; the packed Hamming kernel
splits its work over the same number of threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dns_milvus.errors import InvalidInputError

#: Shortest window over which the others' CPU use is measured; calls closer together reuse it.
MIN_WINDOW_S = 0.5
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class _Sample:
    wall: float
    busy_s: float  # the whole machine's busy CPU seconds since boot
    own_s: float  # this process's CPU seconds


def _read_busy_seconds() -> float | None:
    """Busy CPU seconds of all cores since boot: user, nice, system, irq, softirq and steal."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


class CompetingLoad:
    """Cores kept busy by other processes, measured between calls (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reference: _Sample | None = None
        self._last: float | None = None

    def _sample(self) -> _Sample | None:
        busy = _read_busy_seconds()
        if busy is None:
            return None
        return _Sample(time.monotonic(), busy, time.process_time())

    def busy_cores(self) -> float:
        """Cores' worth of CPU time other processes used over the latest window."""
        now = self._sample()
        with self._lock:
            if now is None:
                return _load_average()
            if self._reference is None:
                self._reference = now
            elif now.wall - self._reference.wall >= MIN_WINDOW_S:
                elapsed = now.wall - self._reference.wall
                others = (now.busy_s - self._reference.busy_s) - (now.own_s - self._reference.own_s)
                self._last = max(0.0, others / elapsed)
                self._reference = now
            return self._last if self._last is not None else _load_average()


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


_competing_load = CompetingLoad()


def auto_threads(limit: int | None = None) -> int:
    """Threads for the next call: the usable cores not busy with other processes, rounded, within
    1..``limit`` (default: ``torch.get_num_threads()``)."""
    limit = torch.get_num_threads() if limit is None else limit
    free = usable_cores() - _competing_load.busy_cores()
    return max(1, min(limit, round(free)))


def resolve_threads(threads: int | None) -> int:
    """``threads`` as given (a positive integer), or :func:`auto_threads` for None."""
    if threads is None:
        return auto_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidInputError(f"expected threads as a positive integer or None (auto), got {threads!r}")
    return threads


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads in this thread, then restore them."""
    previous = torch.get_num_threads()
    if previous == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
