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
    """A stored fine-grained tensor whose header, checksum or video binding does not verify."""


class RepairRefusedError(DnSError):
    """``repair --fix`` would delete more of the object store than is safe without ``force``."""


class IncompleteDeleteError(DnSError):
    """Rows were deleted but some of their objects could not be; ``repair`` removes them later."""


class NotFoundError(DnSError, KeyError):
    """An unknown video id or a missing stored object."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "not found"


class BackendUnavailableError(DnSError, ConnectionError):
    """A server (Milvus, object store, re-ranker) that cannot be reached."""


class VideoDecodeError(DnSError):
    """A video file that is missing, corrupt, empty or has no decodable frames."""


class ModelSetMismatchError(DnSError):
    """A re-rank request for another model set than the one the re-ranker serves."""


# -- the re-ranker service (server side: ``dns_milvus.sidecar``) -----------------------------------


class WorkLimitError(InvalidInputError):
    """A request that asks for more work than one request may (INVALID_ARGUMENT / 400): retrying
    it as is will not help; the message names the limit."""


class OverloadedError(DnSError):
    """The re-ranker is at capacity; the client should retry later (RESOURCE_EXHAUSTED / 429)."""


class ShuttingDownError(DnSError):
    """The re-ranker is draining and takes no new work (UNAVAILABLE / 503)."""


class DeadlineExceededError(DnSError, TimeoutError):
    """A request's deadline passed before or while its work ran (DEADLINE_EXCEEDED / 504)."""


class RequestCancelledError(DnSError):
    """The client cancelled the request; its pending work was dropped (CANCELLED / 499)."""


# -- the re-ranker client (``dns_milvus.rpc.RemoteReranker``) ----------------------------------------


class RerankerAuthError(DnSError):
    """Credentials refused by the re-ranker (UNAUTHENTICATED / PERMISSION_DENIED / 401)."""


class RerankerOverloadedError(BackendUnavailableError):
    """The sidecar is at capacity (RESOURCE_EXHAUSTED); search degrades to the coarse ranking."""


class RerankerTimeoutError(DnSError, TimeoutError):
    """The sidecar did not answer within the deadline (DEADLINE_EXCEEDED)."""


class RemoteRerankerError(DnSError):
    """Any other failure the sidecar reported (INTERNAL, UNKNOWN, ...)."""
