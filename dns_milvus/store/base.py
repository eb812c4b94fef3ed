"""The object-store contract, key rules and the write-then-verify helper shared by all backends.

Keys are '/'-separated segments of ``[A-Za-z0-9_.-]`` that never start with '.', so a key
cannot name a parent directory, an absolute path or a hidden file on any backend, and the same
key is valid on a local directory and on S3. Video objects get their key from ``fine_key``:
the collection name plus the SHA-256 of the video id, never the id itself.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from types import TracebackType
from typing import TypeGuard

from dns_milvus.errors import BackendUnavailableError, CorruptObjectError, DnSError, InvalidInputError
from dns_milvus.ids import id_digest

#: Longest key accepted, in bytes (S3's limit is 1024; leave room for a store prefix).
MAX_KEY_BYTES = 768
#: Suffix of fine-tensor objects.
FINE_SUFFIX = ".dnsf"

_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"
_KEY_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_PREFIX_RE = re.compile(rf"(?:{_SEGMENT}/)*(?:{_SEGMENT})?")
_COLLECTION_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_KEY_FORM = "'/'-separated segments of letters, digits, '_', '-', '.', none starting with '.'"


class StoreAccessError(DnSError):
    """The object store refused a request: wrong credentials, no permission or no such bucket."""


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid object key, else raise ``InvalidInputError``."""
    if not isinstance(key, str):
        raise InvalidInputError(f"object key must be a string, got {type(key).__name__}")
    if not _KEY_RE.fullmatch(key):
        raise InvalidInputError(f"object key {_shown(key)} is not valid: expected {_KEY_FORM}")
    if len(key) > MAX_KEY_BYTES:  # the pattern is ASCII-only, so characters are bytes
        raise InvalidInputError(f"object key is {len(key)} bytes long; the limit is {MAX_KEY_BYTES}")
    return key


def is_valid_key(key: str) -> bool:
    """Whether ``key`` passes ``validate_key`` (for filtering listings without raising)."""
    return len(key) <= MAX_KEY_BYTES and _KEY_RE.fullmatch(key) is not None


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it can start a valid key (empty allowed), else raise ``InvalidInputError``."""
    if not isinstance(prefix, str):
        raise InvalidInputError(f"key prefix must be a string, got {type(prefix).__name__}")
    if not _PREFIX_RE.fullmatch(prefix) or len(prefix) > MAX_KEY_BYTES:
        raise InvalidInputError(
            f"key prefix {_shown(prefix)} is not valid: expected the start of {_KEY_FORM}"
        )
    return prefix


def validate_data(data: object) -> bytes:
    """Return ``data`` as bytes if it is bytes-like, else raise ``InvalidInputError``."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise InvalidInputError(f"object data must be bytes, bytearray or memoryview, got {type(data).__name__}")


def validate_collection(collection: object) -> str:
    """Return ``collection`` if it is a valid collection name (Milvus's rule), else raise."""
    if not isinstance(collection, str) or not _COLLECTION_RE.fullmatch(collection):
        raise InvalidInputError(
            f"collection name {_shown(collection)} is not valid: expected a letter or '_' followed by "
            "at most 254 letters, digits or '_'"
        )
    return collection


def fine_key_prefix(collection: str) -> str:
    """Prefix under which every fine-tensor object of ``collection`` lives."""
    return f"{validate_collection(collection)}/"


def fine_key(collection: str, video_id: str) -> str:
    """Object key of a video's fine tensor: ``{collection}/{digest[:2]}/{digest}.dnsf``.

    The two-character fan-out keeps directories small on a local store and spreads S3
    request load across key prefixes.
    """
    digest = id_digest(video_id)
    return f"{fine_key_prefix(collection)}{digest[:2]}/{digest}{FINE_SUFFIX}"


@dataclass(frozen=True)
class ObjectInfo:
    """A stored object as a listing describes it."""

    key: str
    size: int
    #: Unix time (seconds) of the object's last write, by the store's clock.
    modified: float


class ObjectStore(abc.ABC):
    """A flat key -> bytes store. Implementations are safe to share between threads."""

    #: Concurrency of ``get_many`` when the caller does not choose.
    default_max_workers: int = 8

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any object there. Atomic: a reader sees the
        old object or the whole new one, never a part."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; ``NotFoundError`` naming the key when there is none."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object under ``key``; removing a missing object is not an error."""

    @abc.abstractmethod
    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Every stored key that starts with ``prefix``, in no promised order."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and last-write time of the object under ``key``; None when there is none."""

    @abc.abstractmethod
    def iter_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """``iter_keys`` with each object's size and last-write time (one listing on S3)."""

    def close(self) -> None:  # noqa: B027 - stores without resources need no clean-up
        """Release connections and threads; the store is unusable afterwards."""

    def get_many(self, keys: Iterable[str], max_workers: int | None = None) -> dict[str, bytes | Exception]:
        """Fetch many objects with at most ``max_workers`` requests in flight.

        Returns one entry per distinct key: the bytes, or the ``DnSError`` that key raised
        (``NotFoundError`` for a missing object), so one bad key does not sink a batch. When
        the store itself fails (unreachable, credentials refused) the keys not yet fetched get
        that same error instead of each waiting out its own timeouts. Invalid keys raise
        ``InvalidInputError`` before anything is fetched.
        """
        unique = list(dict.fromkeys(validate_key(key) for key in keys))
        workers = self.default_max_workers if max_workers is None else max_workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InvalidInputError(f"max_workers must be an integer >= 1, got {max_workers!r}")
        results: dict[str, bytes | Exception] = {}
        failure: Exception | None = None
        if workers == 1 or len(unique) <= 1:
            for key in unique:
                result = results[key] = self._get_or_error(key)
                if _is_store_wide(result):
                    failure = result
                    break
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(unique))) as pool:
                futures = {pool.submit(self._get_or_error, key): key for key in unique}
                for future in as_completed(futures):
                    if future.cancelled():
                        continue
                    result = results[futures[future]] = future.result()
                    if failure is None and _is_store_wide(result):
                        failure = result
                        for other in futures:
                            other.cancel()  # requests already running finish and are kept
        if failure is not None:
            for key in unique:
                results.setdefault(key, failure)
        return results

    def _get_or_error(self, key: str) -> bytes | Exception:
        try:
            return self.get(key)
        except DnSError as exc:
            return exc

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def put_verified(store: ObjectStore, key: str, data: bytes) -> None:
    """Write ``data`` and read it back before returning.

    The ingest pipeline calls this before it upserts the Milvus row that points at ``key``, so
    a row never points at an object that did not land intact. A full read-back (not a size or
    ETag check) is used because ETags are not content hashes on every S3 implementation, and
    fine-tensor objects are small (tens of KB).
    """
    store.put(key, data)
    stored = store.get(key)
    if stored != data:
        raise CorruptObjectError(
            f"object {key!r} did not verify after writing: wrote {len(data)} bytes, read back "
            f"{len(stored)} bytes{' with different content' if len(stored) == len(data) else ''}"
        )


def _is_store_wide(result: bytes | Exception) -> TypeGuard[Exception]:
    """Errors that mean the store as a whole is failing, not just one key."""
    return isinstance(result, (BackendUnavailableError, StoreAccessError))


def _shown(text: object, limit: int = 80) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 5] + "...'"
