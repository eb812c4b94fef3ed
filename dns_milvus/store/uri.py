"""Open an object store from a URI: a directory path, ``file:///path`` or ``s3://bucket/prefix``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from dns_milvus.errors import InvalidInputError
from dns_milvus.store.base import ObjectStore
from dns_milvus.store.local import LocalStore

_FORMS = "a directory path, file:///path or s3://bucket[/prefix][?endpoint_url=...&region=...]"


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# Options a URI query may carry, with their parsers. Credentials are not among them on purpose:
# URIs end up in shell history, logs and process listings.
_Parser = tuple[Callable[[str], Any], str]
_TEXT: _Parser = (str, "string")
_INT: _Parser = (int, "integer")
_FLOAT: _Parser = (float, "number")
_BOOL: _Parser = (_parse_bool, "boolean (true/false)")
_LOCAL_QUERY: dict[str, _Parser] = {"fsync": _BOOL}
_S3_QUERY: dict[str, _Parser] = {
    "endpoint_url": _TEXT,
    "region": _TEXT,
    "max_pool_connections": _INT,
    "connect_timeout": _FLOAT,
    "read_timeout": _FLOAT,
    "max_attempts": _INT,
    "retry_mode": _TEXT,
    "addressing_style": _TEXT,
    "create_bucket": _BOOL,
}
_SECRET_WORDS = ("secret", "password", "access_key", "token", "credential")


def open_store(uri: str, **options: Any) -> ObjectStore:
    """Open the store ``uri`` names; keyword ``options`` go to the store's constructor and win
    over the same option in the URI's query.

    - ``/data/fine`` or ``file:///data/fine?fsync=false`` -> ``LocalStore``
    - ``s3://bucket/prefix?endpoint_url=http://127.0.0.1:8333&region=us-east-1`` -> ``S3Store``
      (credentials from ``access_key``/``secret_key`` options or the environment, never the URI)
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidInputError(f"object store URI must be a non-empty string: {_FORMS}")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    # "C:\\data" parses with scheme "c": a one-letter scheme is a Windows drive, i.e. a path.
    if scheme == "" or len(scheme) == 1:
        return _construct(LocalStore, uri, **options)
    shown = f"{scheme}://{parts.hostname or ''}{parts.path}"  # never the query or user info
    if "@" in parts.netloc:
        raise InvalidInputError(
            f"object store URI {scheme}://... must not contain user information ('user:password@'); "
            "pass credentials as options or through the environment"
        )
    query = _parse_query(parts.query, _LOCAL_QUERY if scheme == "file" else _S3_QUERY, shown)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidInputError(f"file URI {shown!r} names host {parts.netloc!r}; expected file:///path")
        if not parts.path:
            raise InvalidInputError(f"file URI {shown!r} has no path; expected file:///path")
        return _construct(LocalStore, Path(unquote(parts.path)), **{**query, **options})
    if scheme == "s3":
        if not parts.hostname:
            raise InvalidInputError(f"S3 URI {shown!r} has no bucket; expected s3://bucket[/prefix]")
        try:
            from dns_milvus.store.s3 import S3Store
        except ImportError as exc:
            raise InvalidInputError(f"S3 URI {shown!r} needs boto3: install dns-milvus[s3] ({exc})") from None
        return _construct(S3Store, parts.netloc, prefix=unquote(parts.path), **{**query, **options})
    raise InvalidInputError(f"unknown object store URI scheme {scheme!r} in {shown!r}: expected {_FORMS}")


def _construct(store_type: type[ObjectStore], *args: Any, **options: Any) -> ObjectStore:
    """Build the store, turning unknown or missing options into a clear error."""
    try:
        inspect.signature(store_type).bind(*args, **options)
    except TypeError as exc:
        raise InvalidInputError(f"bad options for {store_type.__name__}: {exc}") from None
    return store_type(*args, **options)


def _parse_query(query: str, allowed: dict[str, _Parser], shown: str) -> dict[str, Any]:
    if not query:
        return {}
    try:
        fields = parse_qs(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InvalidInputError(f"the query of object store URI {shown!r} is malformed") from None
    parsed: dict[str, Any] = {}
    for name, values in fields.items():
        if any(word in name.lower() for word in _SECRET_WORDS):
            raise InvalidInputError(
                f"object store URI {shown!r} carries {name!r}: credentials do not belong in URIs; pass "
                "access_key/secret_key as options or set DNS_S3_ACCESS_KEY/DNS_S3_SECRET_KEY"
            )
        if name not in allowed:
            raise InvalidInputError(
                f"object store URI {shown!r} has unknown option {name!r}; expected one of {sorted(allowed)}"
            )
        if len(values) != 1:
            raise InvalidInputError(f"object store URI {shown!r} gives option {name!r} more than once")
        parse, expected = allowed[name]
        try:
            parsed[name] = parse(values[0])
        except ValueError:
            raise InvalidInputError(
                f"object store URI {shown!r} option {name!r}={values[0]!r} is not a valid {expected}"
            ) from None
    return parsed
