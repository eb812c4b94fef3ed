"""Milvus standalone from the PyPI ``milvus`` package as a container's process.

    milvus_server.py prepare   # at build time: unpack the server's binaries into $MILVUS_HOME/bin
    milvus_server.py run       # render the config, run the server, stop it on SIGTERM
    milvus_server.py health    # exit 0 when /healthz answers OK (the image's HEALTHCHECK)

Settings (environment):

- ``MILVUS_PORT``: the proxy (clients' gRPC and REST) port, default 19530;
- ``MILVUS_HEALTH_PORT``: ``/healthz`` and metrics, default 9091;
- ``MILVUS_DATA``: etcd, message queue and segments (mount a volume), default /var/lib/milvus;
- ``MILVUS_HOME``: binaries, rendered config, logs, default /opt/milvus.

Made for host networking: every internal listener (etcd, coordinators, nodes) gets a free
port at the first start, kept in ``$MILVUS_DATA/ports.json`` so a restart finds the same
cluster again; etcd listens on loopback, and the components advertise loopback addresses to
each other. ``docker stop`` gives the server a few seconds to exit (see ``supervise``).
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from contextlib import ExitStack
from pathlib import Path

HOME = Path(os.environ.get("MILVUS_HOME", "/opt/milvus"))
DATA = Path(os.environ.get("MILVUS_DATA", "/var/lib/milvus"))
PROXY_PORT = int(os.environ.get("MILVUS_PORT", "19530"))
HEALTH_PORT = int(os.environ.get("MILVUS_HEALTH_PORT", "9091"))
# The components of a standalone server; each advertises its address to the others.
_COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")


def prepare() -> None:
    """Unpack the binaries the wheel ships compressed (the package would do it at each start)."""
    import milvus

    packed = Path(milvus.__file__).parent / "data" / "bin"
    target = HOME / "bin"
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(packed.glob("*.lzma")):
        out = target / path.name[: -len(".lzma")]
        with lzma.open(path) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        out.chmod(0o755)
    shutil.rmtree(packed)  # 56 MB the image does not need twice


def _bindable(port: int) -> bool:
    """Whether a server could listen on ``port`` now (connections of an earlier run that are
    still in TIME_WAIT do not count: the servers listen with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def _free_ports(count: int, taken: set[int]) -> list[int]:
    with ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("", 0))
            port = sock.getsockname()[1]
            if port not in taken:
                ports.append(port)
        return ports


def internal_ports(names: list[str]) -> dict[str, int]:
    """A port for each internal listener: the ones of the previous start while still free."""
    saved_file = DATA / "ports.json"
    saved: dict[str, int] = {}
    if saved_file.is_file():
        saved = {k: int(v) for k, v in json.loads(saved_file.read_text()).items() if k in names}
    taken = {PROXY_PORT, HEALTH_PORT}
    chosen: dict[str, int] = {}
    for name in names:
        port = saved.get(name)
        if port is not None and port not in taken and _bindable(port):
            chosen[name] = port
            taken.add(port)
    missing = [n for n in names if n not in chosen]
    chosen.update(zip(missing, _free_ports(len(missing), taken)))
    if chosen != saved:
        tmp = saved_file.with_name(".ports.json.tmp")
        tmp.write_text(json.dumps(chosen, indent=1, sort_keys=True))
        os.replace(tmp, saved_file)
    return chosen


def run() -> int:
    import milvus
    from milvus import MilvusServerConfig

    class Config(MilvusServerConfig):  # data in $MILVUS_DATA, the rest in $MILVUS_HOME
        def resolve_storage(self) -> None:
            super().resolve_storage()
            self.set("etcd_data_dir", str(DATA / "etcd"))
            self.set("local_storage_dir", str(DATA / "storage"))
            self.set("rocksmq_data_dir", str(DATA / "rocksmq"))
            self.set("system_log_path", "")  # the server's log goes to stdout: `docker logs`

        def try_bind_port(self, port: int) -> socket.socket | None:  # the package's check, SO_REUSEADDR
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
            except OSError:
                sock.close()
                return None
            return sock

    DATA.mkdir(parents=True, exist_ok=True)
    port_keys = [k for k in Config().configurable_items if k.endswith("_port") and k != "proxy_port"]
    ports = internal_ports([*port_keys, "etcd_peer_port"])
    peer = f"http://127.0.0.1:{ports.pop('etcd_peer_port')}"
    client = f"http://127.0.0.1:{ports['etcd_port']}"
    # The embedded etcd takes its listeners from a config file of its own (else it binds 2380).
    etcd_config = HOME / "configs" / "embedded-etcd.yaml"
    etcd_config.parent.mkdir(parents=True, exist_ok=True)
    etcd_config.write_text(
        "name: dns-milvus\n"
        f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
        f"initial-cluster: dns-milvus={peer}\n"
        f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
    )
    original = Path(milvus.__file__).parent / "data" / "config.yaml.template"
    lines = original.read_text().splitlines()
    etcd_section = lines.index("etcd:")
    lines[etcd_section + 1 : etcd_section + 1] = ["  config:", f"    path: {etcd_config}"]
    template = HOME / "configs" / "milvus.yaml.template"
    template.write_text("\n".join(lines) + "\n")
    config = Config(template=str(template), data_dir=str(HOME), proxy_port=PROXY_PORT, **ports)
    config.glog_conf_file = str(original.with_name("glog.conf"))
    config.set("log.level", "warn")
    # The lease of each component's session: a restart waits for the previous run's to lapse
    # before it serves the collections again (30 s by default).
    config.set("common.session.ttl", int(os.environ.get("MILVUS_SESSION_TTL_S", "10")))
    for component in _COMPONENTS:  # advertise loopback to each other, not the host's first address
        config.set(f"{component}.ip", "127.0.0.1")
    config.resolve()  # writes $MILVUS_HOME/configs/milvus.yaml
    run_dir = HOME / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a pid file of the previous start, if any
    run_dir.mkdir()
    env = dict(
        os.environ,
        DEPLOY_MODE="STANDALONE",
        METRICS_PORT=str(HEALTH_PORT),
        MILVUS_RUN_DIR=str(run_dir),
        LD_LIBRARY_PATH=":".join(filter(None, [str(HOME / "bin"), os.environ.get("LD_LIBRARY_PATH")])),
    )
    print(
        f"milvus standalone {milvus.__version__}: proxy port {PROXY_PORT}, health port {HEALTH_PORT}, "
        f"data {DATA}",
        flush=True,
    )
    binary = str(HOME / "bin" / "milvus")
    return supervise([binary, "run", "standalone"], env)


def supervise(command: list[str], env: dict[str, str]) -> int:
    """Run the server until it exits or a stop signal comes; returns the exit code.

    On SIGTERM/SIGINT the server gets SIGTERM and ``MILVUS_STOP_GRACE_S`` to exit, then SIGKILL:
    this build's standalone server stops its root coordinator first and then waits for it for
    ever. Nothing acknowledged is lost by the kill: inserts are acknowledged once they are in
    the message queue on disk, which the next start replays.
    """
    grace = float(os.environ.get("MILVUS_STOP_GRACE_S", "5"))
    server = subprocess.Popen(command, env=env, cwd=HOME)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while server.poll() is None and not stopping.is_set():
        stopping.wait(0.5)
    if server.poll() is not None:
        return server.returncode
    print(f"stopping milvus (pid {server.pid}, {grace:g} s to exit)", flush=True)
    server.terminate()
    try:
        server.wait(grace)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        print("milvus did not exit in time: killed", flush=True)
    return 0


def health() -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{HEALTH_PORT}/healthz", timeout=2) as reply:
            return 0 if b"OK" in reply.read() else 1
    except OSError:
        return 1


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "run"
    if command == "prepare":
        prepare()
    elif command == "run":
        return run()
    elif command == "health":
        return health()
    else:
        print(f"usage: {sys.argv[0]} prepare|run|health", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
