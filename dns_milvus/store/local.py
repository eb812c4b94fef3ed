"""An object store in a local directory: one file per key, written atomically."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from dns_milvus.errors import BackendUnavailableError, InvalidInputError, NotFoundError
from dns_milvus.store.base import (
    ObjectInfo,
    ObjectStore,
    StoreAccessError,
    is_valid_key,
    validate_data,
    validate_key,
    validate_prefix,
)

# Temporary files start with '.', which no key segment may, so they are never listed as keys.
_TMP_SUFFIX = ".tmp"


class LocalStore(ObjectStore):
    """Objects as files under ``root`` (``root/<key>``), directories created on demand.

    ``put`` writes a temporary file beside the target, fsyncs it and renames it over the
    target (``os.replace`` is atomic on POSIX and Windows), then fsyncs the directory so the
    rename survives a power loss. ``fsync=False`` skips both syncs: faster, for scratch data.
    """

    #: Reading cached local files takes tens of microseconds, less than handing work to a thread,
    #: so get_many reads serially unless asked (benchmarks/bench_store.py: 8 threads run at ~0.4x).
    #: Raise it for network file systems, where each read waits on the network.
    default_max_workers = 1

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self._fsync = bool(fsync)
        if self.root.exists() and not self.root.is_dir():
            raise InvalidInputError(f"local store root {str(self.root)!r} exists and is not a directory")
        with self._os_errors(f"create the store root {str(self.root)!r}"):
            self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore(root={str(self.root)!r})"

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        payload = validate_data(data)
        with self._os_errors(f"write key {key!r}"):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise self._conflict(key) from None
            # Not tempfile.mkstemp: it creates files 0600, while objects should get the umask's mode
            # like any other file (a sidecar may read the store as another user).
            tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}{_TMP_SUFFIX}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(payload)
                    handle.flush()
                    if self._fsync:
                        os.fsync(handle.fileno())
                try:
                    os.replace(tmp, path)
                except IsADirectoryError:
                    raise self._conflict(key) from None
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if self._fsync:
                _fsync_directory(path.parent)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with self._os_errors(f"read key {key!r}"):
            try:
                return path.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise NotFoundError(f"no object under key {key!r} in {self!r}") from None

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        with self._os_errors(f"look up key {key!r}"):
            try:
                found = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
        if not stat.S_ISREG(found.st_mode):
            return None
        return ObjectInfo(key, found.st_size, found.st_mtime)

    def delete(self, key: str) -> None:
        path = self._path(key)
        # Directories stay: removing an emptied one could race a concurrent put into it.
        missing = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
        with self._os_errors(f"delete key {key!r}"), contextlib.suppress(*missing):
            path.unlink()

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        return self._walk_keys(prefix)

    def iter_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        return self._walk_objects(prefix)

    def _walk_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in self._walk_keys(prefix):
            info = self.stat(key)
            if info is not None:  # None: deleted since it was listed
                yield info

    def _walk_keys(self, prefix: str) -> Iterator[str]:
        # Start at the deepest directory the prefix names completely, prune the rest.
        directory, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*directory.split("/")) if directory else self.root
        for dirpath, dirnames, filenames in os.walk(start):
            relative = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if relative == "." else f"{relative}/"
            dirnames[:] = sorted(
                name
                for name in dirnames
                if not name.startswith(".")
                and (f"{base}{name}/".startswith(prefix) or prefix.startswith(f"{base}{name}/"))
            )
            for name in sorted(filenames):
                key = base + name
                if key.startswith(prefix) and is_valid_key(key):
                    yield key

    def _path(self, key: str) -> Path:
        # validate_key rules out '..', '.', empty segments, absolute paths and backslashes,
        # so the joined path always stays under root.
        return self.root.joinpath(*validate_key(key).split("/"))

    def _conflict(self, key: str) -> InvalidInputError:
        return InvalidInputError(
            f"key {key!r} conflicts with an existing key in {self!r}: on a local store a key cannot "
            "be both an object and a prefix of other keys"
        )

    @contextlib.contextmanager
    def _os_errors(self, action: str) -> Iterator[None]:
        """Turn file-system failures (full disk, permissions, I/O errors) into project errors."""
        try:
            yield
        except PermissionError as exc:
            raise StoreAccessError(f"{self!r} cannot {action}: permission denied ({exc.strerror})") from exc
        except OSError as exc:
            raise BackendUnavailableError(f"{self!r} cannot {action}: {exc.strerror or exc}") from exc


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
