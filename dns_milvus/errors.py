"""The project's exception hierarchy.

Every error a user can cause is a ``DnSError`` subclass with a message that says what was
expected, so callers can catch one type and tools can print it without a traceback.
"""

from __future__ import annotations


class DnSError(Exception):
    """Base class of all errors raised by dns-milvus."""


class InvalidInputError(DnSError, ValueError):
    """A tensor, id, file or request that does not have the expected form."""


class CheckpointError(DnSError):
    """A checkpoint file that cannot be read, or holds a network of another kind."""


class CorruptObjectError(DnSError):
    """A stored fine-grained tensor whose header or checksum does not verify."""


class NotFoundError(DnSError, KeyError):
    """An unknown video id or a missing stored object."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "not found"


class BackendUnavailableError(DnSError, ConnectionError):
    """A server (Milvus, object store, re-ranker) that cannot be reached."""


class VideoDecodeError(DnSError):
    """A video file that is missing, corrupt, empty or has no decodable frames."""
