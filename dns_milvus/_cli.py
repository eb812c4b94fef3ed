"""What every ``dns-milvus`` command line shares: errors the user can fix are one line on
stderr with exit code 2, never a traceback; Ctrl-C exits with 130."""

from __future__ import annotations

import sys
from collections.abc import Callable

from dns_milvus.errors import DnSError


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's ``body`` and return its exit code."""
    try:
        return int(body() or 0)
    except DnSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
