"""Large memory blocks straight from the OS, so that the sidecar's resident set stays bounded.

glibc's malloc serves blocks below its mmap threshold from its heaps, and raises that threshold
(up to 32 MiB on 64-bit Linux) each time a larger mapped block is freed. The comparator's
intermediates are blocks of a few to tens of MiB whose sizes change with every batch; once the
threshold has risen they come from the heaps, which fragment and are rarely given back. Fixing
the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also stops the adjustment) maps every block
of 1 MiB or more and unmaps it when freed: measured with 32 clients and 30-120-frame videos
(benchmarks/bench_sidecar_load.py), the server's peak RSS fell from 700-770 MiB to 600-650.

A ``MALLOC_MMAP_THRESHOLD_`` environment variable (glibc's own tunable) wins; elsewhere than glibc
nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def fix_mmap_threshold(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Map blocks of ``threshold_bytes`` or more from the OS from now on; whether it was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1
    log.debug("malloc mmap threshold", extra={"bytes": threshold_bytes, "set": done})
    return done
