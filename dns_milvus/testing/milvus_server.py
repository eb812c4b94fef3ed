"""A throwaway Milvus standalone server for tests, benchmarks and local trials.

Runs the embedded standalone build of the PyPI ``milvus`` package (one process with its own
etcd and local storage; a dev extra) on loopback, on free ports, with its data in a directory
the caller gives. Not for production: for that, run Milvus as its docs say (docker/ has a
compose file).
"""

from __future__ import annotations

import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from dns_milvus.errors import BackendUnavailableError

#: How long the server may take to answer after it starts (first start unpacks and initialises).
START_TIMEOUT_S = 180.0


@contextmanager
def embedded_server(base: str | Path, *, start_timeout: float = START_TIMEOUT_S) -> Iterator[str]:
    """Start the embedded Milvus server with its data, config and logs under ``base`` and yield
    its URI (``http://127.0.0.1:<port>``); it is stopped on exit (``base`` is left to the
    caller). Raises ``BackendUnavailableError`` with the server's log tail if it does not start.
    """
    try:
        from milvus import MilvusServer, MilvusServerConfig
    except ImportError as exc:
        raise BackendUnavailableError(
            "the embedded Milvus server needs the 'milvus' package (a dev dependency): pip install -e .[dev]"
        ) from exc
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    port_keys = [k for k in MilvusServerConfig().configurable_items if k.endswith("_port")]
    *ports, metrics_port, etcd_peer_port = free_ports(len(port_keys) + 2)
    # Every listening port is given explicitly: the package's own choice scans upward from the
    # well-known defaults (19530, 2379, ...), which races with any other server on the machine,
    # and its embedded etcd always takes 2380 unless given a config file of its own.
    chosen = dict(zip(port_keys, ports, strict=True))
    template = _template_with_etcd_config(base, client_port=chosen["etcd_port"], peer_port=etcd_peer_port)
    config = MilvusServerConfig(data_dir=str(base), template=str(template), **chosen)
    # The package sets its glog config path only when it uses its own template.
    config.glog_conf_file = str(template.with_name("glog.conf"))
    server = MilvusServer(config, wait_for_started=False)
    server.webservice_port = metrics_port
    uri = f"http://127.0.0.1:{chosen['proxy_port']}"
    try:
        server.start()
        _wait_until_ready(server, uri, time.monotonic() + start_timeout, start_timeout)
    except Exception as exc:
        server.stop()
        tail = _log_tail(base)
        raise BackendUnavailableError(f"the embedded Milvus server did not start: {exc}\n{tail}") from exc
    try:
        yield uri
    finally:
        server.stop()


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open together so none repeats)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _template_with_etcd_config(base: Path, *, client_port: int, peer_port: int) -> Path:
    """The package's config template plus ``etcd.config.path``, pointing at an embedded-etcd
    config that listens on the given loopback ports."""
    import milvus

    etcd_config = base / "embedded-etcd.yaml"
    peer, client = f"http://127.0.0.1:{peer_port}", f"http://127.0.0.1:{client_port}"
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
    template = base / "milvus.yaml.template"
    template.write_text("\n".join(lines) + "\n")
    shutil.copy(original.with_name("glog.conf"), base / "glog.conf")
    return template


def _wait_until_ready(server: Any, uri: str, deadline: float, timeout: float) -> None:
    """Poll the health endpoint, then open a client; fail early if the process exits."""
    from pymilvus import MilvusClient

    health = f"http://127.0.0.1:{server.webservice_port}/healthz"
    while True:
        process = server.server_proc
        if process is None or process.poll() is not None:
            code = None if process is None else process.returncode
            raise RuntimeError(f"the server process exited (code {code})")
        try:
            with urllib.request.urlopen(health, timeout=2) as response:
                if b"OK" in response.read():
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"not healthy within {timeout:g} s")
        time.sleep(0.2)
    while True:  # healthy proxies can still refuse requests for a moment
        try:
            client = MilvusClient(uri, timeout=5)
            client.list_collections()
            client.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _log_tail(base: Path, lines: int = 30) -> str:
    tails = []
    for name in ("milvus-stderr.log", "milvus-stdout.log"):
        path = base / "logs" / name
        if path.is_file():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {name} ---\n" + "\n".join(text))
    return "\n".join(tails)
