"""Connecting to Milvus (a Milvus Lite file or a server) and translating its failures.

Error messages name the URI with any credentials removed; tokens and passwords never
appear in them.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import grpc
from pymilvus import MilvusClient
from pymilvus.exceptions import (
    ConnectError,
    ConnectionNotExistException,
    MilvusException,
    MilvusUnavailableException,
)

from dns_milvus.errors import BackendUnavailableError, DnSError, InvalidInputError
from dns_milvus.milvus._checks import require_seconds

BackendKind = Literal["lite", "server"]
DEFAULT_CONNECT_TIMEOUT_S = 10.0
_LITE_CONNECT_FAILED = 2  # pymilvus Status.CONNECT_FAILED
_LITE_STOP_TIMEOUT_S = 5.0  # Milvus Lite stops its server with a 2 s grace period

_SERVER_URI = re.compile(r"^(https?|tcp)://", re.IGNORECASE)
_UNAVAILABLE_GRPC_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_UNAVAILABLE_HINTS = ("fail connecting", "server unavailable", "deadline exceeded", "connection refused")


class MilvusOperationError(DnSError):
    """Milvus was reachable but failed or refused an operation."""


class MilvusLiteDamagedError(BackendUnavailableError):
    """A Milvus Lite database whose files cannot be read, e.g. truncated by a killed process."""


@dataclass(frozen=True)
class _ClientInfo:
    display_uri: str
    kind: BackendKind


# What connect() learnt about each client it made (MilvusClient has no public field for it).
_CLIENT_INFO: weakref.WeakKeyDictionary[MilvusClient, _ClientInfo] = weakref.WeakKeyDictionary()


def connect(
    uri: str | os.PathLike[str],
    *,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    db_name: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> MilvusClient:
    """Open a Milvus client.

    ``uri`` is either a local ``*.db`` path (a Milvus Lite database; missing parent
    directories are created) or ``http(s)://host:port`` / ``tcp://host:port`` (a server;
    authenticate with ``token`` or ``user``/``password``). A server that cannot be reached
    within ``timeout`` seconds raises ``BackendUnavailableError``.

    A Milvus Lite database is read and its collections loaded here, so one whose files are
    damaged raises ``MilvusLiteDamagedError`` (saying how to recover) before any request. That
    includes a collection whose manifest is damaged, which Milvus Lite itself would open
    without the rows the lost manifest listed (empty, when it held them all).
    """
    timeout = require_seconds(timeout, "connect timeout")
    text = os.fspath(uri)
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError("Milvus URI must be a non-empty path or http(s)://host:port")
    if _SERVER_URI.match(text):
        return _connect_server(
            text, token=token, user=user, password=password, db_name=db_name, timeout=timeout
        )
    if "://" in text:
        raise InvalidInputError(
            f"unsupported Milvus URI scheme in {redact_uri(text)!r}; expected http(s)://host:port, "
            "tcp://host:port or a local path ending in .db"
        )
    return _connect_lite(Path(text).expanduser())


def _connect_lite(path: Path) -> MilvusClient:
    if path.suffix != ".db":
        raise InvalidInputError(f"a Milvus Lite database path must end in .db, got {str(path)!r}")
    if path.exists() and not path.is_dir():
        raise BackendUnavailableError(
            f"{str(path)!r} is a file, not a Milvus Lite database: this Milvus Lite keeps each database "
            "in a directory; give a new path (or that of such a directory)"
        )
    _check_lite_manifests(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        client, collections = _open_lite_client(path)
    except (OSError, MilvusException) as exc:
        raise BackendUnavailableError(
            f"cannot open the Milvus Lite database {str(path)!r}: {exc} (only one process at a time "
            "may open a Milvus Lite database: is another one using it?)"
        ) from exc
    _open_lite_collections(client, path, collections)
    _CLIENT_INFO[client] = _ClientInfo(str(path), "lite")
    return client


def _open_lite_client(path: Path) -> tuple[MilvusClient, list[str] | None]:
    """A client of the in-process Milvus Lite server of ``path``.

    pymilvus keeps that server registered for the path until it is released; a registered server
    that refuses connections (seen in a long test run, right after a database was reopened) is
    released and started afresh once, instead of failing every later connect to the path.
    Returns the client and its collections (``None`` when listing them failed otherwise: the
    database's own error, which :func:`_open_lite_collections` reports).
    """
    try:
        client = MilvusClient(str(path))
    except MilvusException as exc:
        if exc.code != _LITE_CONNECT_FAILED:
            raise
    else:
        try:  # pymilvus may hand out a cached channel to the server's port: one request tells
            return client, client.list_collections()
        except MilvusException as exc:
            if exc.code != _LITE_CONNECT_FAILED:
                return client, None
            client.close()
    release_lite(path)
    return MilvusClient(str(path)), None


def _open_lite_collections(client: MilvusClient, path: Path, collections: list[str] | None = None) -> None:
    """Read and load every collection of a Milvus Lite database (``collections``: already listed).

    Milvus Lite reads a collection's schema and data files when it is first used and its index
    files when it is loaded; a process killed while Lite was writing them can leave them
    truncated (Lite is not crash-safe). Doing both here makes such a database fail now, with
    ``MilvusLiteDamagedError`` saying how to recover, instead of on some later request.
    """
    collection = None
    try:
        for collection in client.list_collections() if collections is None else collections:
            client.load_collection(collection)
    except MilvusException as exc:
        client.close()
        release_lite(path)  # else a later connect() to this path would reuse the broken one
        raise _lite_damaged(path, collection, _reason(exc)) from exc


def _check_lite_manifests(path: Path) -> None:
    """Refuse a Milvus Lite database with a collection manifest it cannot read.

    Milvus Lite keeps each collection's list of data files in
    ``<db>/collections/<name>/manifest.json``. When that file is damaged, Lite falls back to
    the previous manifest with only a log line, and the collection opens without the rows
    written since: empty, if they were all written at once. Checked before Lite opens the
    database, as Lite's next save would overwrite the damaged file. A database of another
    layout is left to Lite's own checks.
    """
    collections = path / "collections"
    if not collections.is_dir():
        return
    for directory in sorted(p for p in collections.iterdir() if p.is_dir()):
        manifest = directory / "manifest.json"
        if not manifest.exists() and not (directory / "manifest.json.prev").exists():
            continue  # never saved: Lite starts it afresh
        try:
            readable = isinstance(json.loads(manifest.read_bytes()), dict)
        except (OSError, ValueError):  # missing, unreadable, truncated or not JSON
            readable = False
        if not readable:
            raise _lite_damaged(
                path,
                directory.name,
                f"its manifest {manifest.name} (the list of its data files) is missing or damaged, and "
                "Milvus Lite would open the collection without the rows it listed",
            )


def _lite_damaged(path: Path, collection: str | None, reason: str) -> MilvusLiteDamagedError:
    where = f" (collection {collection!r})" if collection else ""
    return MilvusLiteDamagedError(
        f"cannot read the Milvus Lite database {str(path)!r}{where}: {reason}. Its files are "
        "damaged or incomplete: Milvus Lite is not crash-safe, and a process killed while it was "
        f"writing can leave them truncated. To recover, move {str(path)!r} aside and re-run the "
        "ingestion into a new database: ingestion is resumable, and the fine-tensor objects in the "
        "object store are not affected; `dns-milvus repair` then lists objects no row refers to "
        "(`--fix` deletes them)."
    )


def release_lite(path: str | os.PathLike[str]) -> None:
    """Stop the in-process Milvus Lite server of ``path`` (pymilvus keeps one per path until exit)."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # a pymilvus without Milvus Lite never started one
        return
    entry = getattr(server_manager_instance, "_servers", {}).get(os.path.abspath(path))
    server_manager_instance.release_server(str(path))
    if entry:  # release_server only starts the gRPC server's stop: wait until its port is closed
        entry[0].wait_for_termination(timeout=_LITE_STOP_TIMEOUT_S)


def _connect_server(
    uri: str,
    *,
    token: str | None,
    user: str | None,
    password: str | None,
    db_name: str | None,
    timeout: float,
) -> MilvusClient:
    shown = redact_uri(uri)
    secrets = [s for s in (token, password, _userinfo(uri)) if s]
    try:
        client = MilvusClient(
            uri=uri,
            token=token or "",
            user=user or "",
            password=password or "",
            db_name=db_name or "",
            timeout=timeout,
        )
    except (MilvusException, grpc.RpcError) as exc:
        reason = _scrub(_reason(exc), secrets)
        raise BackendUnavailableError(
            f"cannot reach Milvus at {shown} within {timeout:g} s: {reason}"
        ) from None  # the chained pymilvus error may echo connection parameters
    _CLIENT_INFO[client] = _ClientInfo(shown, _detect_kind(client))
    return client


def backend_kind(client: MilvusClient) -> BackendKind:
    """``"lite"`` for Milvus Lite, ``"server"`` for a Milvus server."""
    info = _CLIENT_INFO.get(client)
    return info.kind if info is not None else _detect_kind(client)


def display_uri(client: MilvusClient) -> str:
    """Where ``client`` points, fit for error messages (no credentials)."""
    info = _CLIENT_INFO.get(client)
    if info is not None:
        return info.display_uri
    config = getattr(client, "_config", None)
    return redact_uri(str(getattr(config, "uri", "Milvus")))


def _detect_kind(client: MilvusClient) -> BackendKind:
    with translate_errors("ask the server version", "Milvus"):
        version = str(client.get_server_version())
    return "lite" if version.startswith("milvus_lite") else "server"


def redact_uri(uri: str) -> str:
    """``uri`` without user name, password or query string."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable URI>"
    if not parts.scheme:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _userinfo(uri: str) -> str:
    parts = urlsplit(uri)
    return ":".join(p for p in (parts.username, parts.password) if p)


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _reason(exc: BaseException) -> str:
    if isinstance(exc, MilvusException):
        return str(exc.message)
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return str(exc)


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the backend could not be reached (rather than refused a request)."""
    if isinstance(exc, ConnectError | MilvusUnavailableException | ConnectionNotExistException):
        return True
    if isinstance(exc, grpc.RpcError):
        return exc.code() in _UNAVAILABLE_GRPC_CODES  # type: ignore[attr-defined]
    if isinstance(exc, MilvusException):
        message = str(exc.message).lower()
        return exc.code == 2 or any(hint in message for hint in _UNAVAILABLE_HINTS)
    return False


@contextmanager
def translate_errors(action: str, where: str, *, user_filter: str | None = None) -> Iterator[None]:
    """Re-raise pymilvus / gRPC failures of ``action`` as the project's errors.

    Unreachable backends give ``BackendUnavailableError``; a refusal while a caller-written
    filter is involved gives ``InvalidInputError`` naming the filter (the filter is the only
    free-form part of a request); anything else gives ``MilvusOperationError``.
    """
    try:
        yield
    except (MilvusException, grpc.RpcError) as exc:
        reason = _reason(exc)
        if is_unavailable(exc):
            raise BackendUnavailableError(f"Milvus at {where} is unavailable ({action}): {reason}") from exc
        if user_filter is not None:
            raise InvalidInputError(
                f"Milvus refused the filter {user_filter!r} ({action}): {reason}"
            ) from exc
        raise MilvusOperationError(f"Milvus at {where} failed to {action}: {reason}") from exc
