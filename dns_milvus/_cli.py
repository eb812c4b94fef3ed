"""What every ``dns-milvus`` command line shares: errors the user can fix are one line on
stderr with exit code 2, never a traceback; Ctrl-C exits with 130."""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from dns_milvus.errors import DnSError

#: Libraries that log a failure (with its traceback) on stderr before raising it to us.
_NOISY_LOGGERS = ("pymilvus", "milvus_lite")


def quiet_milvus_logs() -> None:
    """Silence pymilvus's and Milvus Lite's loggers: they log each failed call with a traceback on
    stderr, before the one-line error the command prints for the same failure.

    Importing pymilvus configures its loggers (and would undo an earlier change), so it is
    imported first; commands that call this talk to Milvus anyway.
    """
    with contextlib.suppress(ImportError):
        import pymilvus  # noqa: F401
    children = tuple(f"{name}." for name in _NOISY_LOGGERS)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        # pymilvus gives some of its child loggers a level of their own
        if name.startswith(children) and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL + 1)


#: Milvus Lite databases at least this large take longer to open than torch takes to import
#: (Lite reads a database whole: ~1.2 s for 800 MB, a 100k-video index, on 2 cores).
LITE_SLOW_OPEN_BYTES = 128 * 2**20


def opens_slowly(uri: str) -> bool:
    """Whether ``uri`` is a Milvus Lite database large enough that importing torch while it opens
    costs no wall time (a server, or a small or missing database, opens in a fraction of that)."""
    path = Path(uri).expanduser()
    if "://" in uri or not path.is_dir():
        return False
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file Lite is rewriting: counted or not
                total += os.stat(os.path.join(root, name)).st_size
            if total >= LITE_SLOW_OPEN_BYTES:
                return True
    return False


@contextlib.contextmanager
def milvus_opening(uri: str, token: str | None) -> Iterator[None]:
    """Connect to Milvus at ``uri`` in a thread while the body runs (importing torch takes a second
    or more); leaving waits for it, and raises its error if it failed.

    Milvus Lite reads a whole collection when it opens it (seconds at 100k videos) and keeps it
    open in this process, so the index's own ``connect`` afterwards finds it ready.
    """
    from dns_milvus.milvus import connect

    failure: list[Exception] = []

    def open_database() -> None:
        try:
            connect(uri, token=token).close()  # the database stays open in this process
        except Exception as exc:  # raised in the caller's thread, as the index would raise it
            failure.append(exc)

    thread = threading.Thread(target=open_database, name="milvus-open", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failure:
        raise failure[0]


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's ``body`` and return its exit code."""
    _freeze_objects_at_exit()
    try:
        return int(body() or 0)
    except DnSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@functools.cache
def _freeze_objects_at_exit() -> None:
    """At exit, after the other exit handlers (Milvus Lite closes its database in one), move
    every object to the collector's permanent generation: the interpreter's last collections
    would otherwise traverse all that torch, pandas and pymilvus made, ~0.6 s of CPU for a
    process that ends right after (measured in benchmarks/bench_startup.py)."""
    atexit.register(gc.freeze)  # handlers run last-registered first: registered early, it runs late
