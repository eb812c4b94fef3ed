"""SeaweedFS's S3 server (``weed mini``) as a container's process.

    seaweedfs_server.py run      # write the identities, then exec weed mini (it becomes PID 1)
    seaweedfs_server.py health   # exit 0 when the S3 gateway answers /healthz (the HEALTHCHECK)

Settings (environment):

- ``S3_PORT``: the S3 port, default 8333;
- ``S3_ACCESS_KEY``, ``S3_SECRET_KEY``: the one identity (all actions); required, as SeaweedFS
  checks every request's signature;
- ``S3_DATA``: volumes, filer metadata and logs (mount a volume), default /data.

Made for host networking: everything listens on loopback only, telemetry is off, no WebDAV,
admin UI or Iceberg gateway; the other listeners (master, volume, filer, their gRPC ports) get
free ports at the first start, kept in ``$S3_DATA/ports.json`` for restarts.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.request
from contextlib import ExitStack
from pathlib import Path

DATA = Path(os.environ.get("S3_DATA", "/data"))
S3_PORT = int(os.environ.get("S3_PORT", "8333"))
WEED = os.environ.get("WEED_BINARY", "/usr/local/bin/weed")

# Every other listener of `weed mini` (the gRPC defaults, "HTTP port + 10000", can clash).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
_FIXED_FLAGS = (
    "-ip=127.0.0.1",
    "-ip.bind=127.0.0.1",
    "-master.telemetry=false",
    "-admin.ui=false",
    "-webdav=false",
    "-s3.port.iceberg=0",
    "-s3.port.lance=0",
    "-master.volumeSizeLimitMB=64",
    "-s3.autoCreateBucket=false",
)


def _bindable(port: int) -> bool:
    """Whether a server could listen on ``port`` now (connections of an earlier run that are
    still in TIME_WAIT do not count: the servers listen with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int, taken: set[int]) -> list[int]:
    with ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in taken:
                ports.append(port)
        return ports


def listener_ports() -> dict[str, int]:
    """A port for each listener but S3's: the previous start's while still free."""
    saved_file = DATA / "ports.json"
    saved: dict[str, int] = {}
    if saved_file.is_file():
        saved = {k: int(v) for k, v in json.loads(saved_file.read_text()).items() if k in _PORT_FLAGS}
    taken = {S3_PORT}
    chosen: dict[str, int] = {}
    for flag in _PORT_FLAGS:
        port = saved.get(flag)
        if port is not None and port not in taken and _bindable(port):
            chosen[flag] = port
            taken.add(port)
    missing = [f for f in _PORT_FLAGS if f not in chosen]
    chosen.update(zip(missing, _free_ports(len(missing), taken)))
    if chosen != saved:
        tmp = saved_file.with_name(".ports.json.tmp")
        tmp.write_text(json.dumps(chosen, indent=1, sort_keys=True))
        os.replace(tmp, saved_file)
    return chosen


def run() -> int:
    access_key, secret_key = os.environ.get("S3_ACCESS_KEY"), os.environ.get("S3_SECRET_KEY")
    if not access_key or not secret_key:
        print("S3_ACCESS_KEY and S3_SECRET_KEY are required", file=sys.stderr)
        return 2
    for sub in ("data", "logs"):
        (DATA / sub).mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "dns-milvus",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List"],
            }
        ]
    }
    s3_config = DATA / "s3.json"
    fd = os.open(s3_config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(identities, out)
    ports = listener_ports()
    command = [WEED, f"-logdir={DATA / 'logs'}", "mini", f"-dir={DATA / 'data'}", *_FIXED_FLAGS]
    command += [f"-s3.config={s3_config}", f"-s3.port={S3_PORT}"]
    command += [f"-{flag}={port}" for flag, port in ports.items()]
    command += [f"-filer.localSocket={DATA / 'filer.sock'}", f"-s3.localSocket={DATA / 's3.sock'}"]
    print(f"seaweedfs: S3 on 127.0.0.1:{S3_PORT}, data {DATA}", flush=True)
    os.chdir(DATA)
    os.execv(WEED, command)
    return 1  # not reached


def health() -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{S3_PORT}/healthz", timeout=2) as reply:
            return 0 if reply.status == 200 else 1
    except OSError:
        return 1


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "run"
    if command == "run":
        return run()
    if command == "health":
        return health()
    print(f"usage: {sys.argv[0]} run|health", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
