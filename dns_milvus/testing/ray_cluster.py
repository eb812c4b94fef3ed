"""A throwaway Ray cluster on loopback for tests and benchmarks: a head and worker nodes, each a
real ``ray start --block`` process (with its raylet and worker processes) in a process group of
its own, so that a node can be killed for real (``kill_worker``) and every node stopped cleanly.

Nodes listen on ``127.0.0.2`` (Ray resolves ``127.0.0.1`` to the machine's outward address,
while other loopback addresses are used as given), on free ports, with their files in a short
temporary directory (Ray's socket paths must stay under 108 bytes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dns_milvus.errors import BackendUnavailableError
from dns_milvus.testing.milvus_server import free_ports

#: The loopback address the nodes use.
NODE_IP = "127.0.0.2"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
#: Small object stores: the test videos are a few MB, and /dev/shm is shared with everything else.
OBJECT_STORE_BYTES = 256 * 2**20
# Marks the line of the node listing among whatever else Ray prints.
_NODES_MARK = "dns-milvus-nodes="
# Node deaths are noticed within ~2 s instead of the default ~30 s.
_HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}


@dataclass
class LocalRayCluster:
    """Nodes started by ``local_ray_cluster``; ``address`` is the head's ``host:port``."""

    address: str
    temp_dir: Path
    head: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    cpus_per_node: int = 1

    def add_worker(self, *, cpus: int | None = None, timeout: float = START_TIMEOUT_S) -> subprocess.Popen:
        """Start a worker node and wait until the cluster lists it alive (a node killed just
        before may still be listed, so this waits for a new node, not for a count)."""
        before = set(self._nodes())
        proc = _start_node(
            ["--address", self.address, "--num-cpus", _num(cpus or self.cpus_per_node)],
            self.temp_dir / f"worker-{len(self.workers)}.log",
        )
        self.workers.append(proc)
        deadline = time.monotonic() + timeout
        while not set(self._nodes()) - before:
            self._check_running(proc)
            if time.monotonic() > deadline:
                raise BackendUnavailableError(f"a new Ray worker node did not join within {timeout:g} s")
            time.sleep(0.3)
        return proc

    def kill_worker(self, proc: subprocess.Popen) -> None:
        """SIGKILL a worker node: its ``ray start`` process, raylet and every worker process on it."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)

    def alive_nodes(self) -> int:
        return len(self._nodes())

    def wait_for_nodes(
        self, count: int, *, timeout: float = START_TIMEOUT_S, watch: subprocess.Popen | None = None
    ) -> None:
        """Wait until exactly ``count`` nodes are alive."""
        deadline = time.monotonic() + timeout
        while self.alive_nodes() != count:
            self._check_running(watch)
            if time.monotonic() > deadline:
                raise BackendUnavailableError(f"the Ray cluster lacks {count} live nodes after {timeout:g} s")
            time.sleep(0.3)

    def _check_running(self, node: subprocess.Popen | None) -> None:
        for proc in (self.head, node):
            if proc is not None and proc.poll() is not None:
                raise BackendUnavailableError(f"a Ray node exited with code {proc.returncode}")

    def _nodes(self) -> list[str]:
        """Alive nodes, asked of the head by a short-lived process (the caller may be a driver)."""
        script = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR', "
            "log_to_driver=False); "
            f"print({_NODES_MARK!r} + json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=_ray_env()
        )
        found = [line for line in out.stdout.splitlines() if line.startswith(_NODES_MARK)]
        if out.returncode != 0 or not found:  # the head is not answering (yet)
            return []
        return json.loads(found[-1][len(_NODES_MARK) :])

    def stop(self) -> None:
        """Stop every node started here: SIGTERM to all (``ray start --block`` then stops its
        processes), and after ``STOP_TIMEOUT_S`` SIGKILL to what is left of each node's group."""
        nodes = [*self.workers, self.head]
        for proc in nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):  # what the node left running goes with its group
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def local_ray_cluster(
    workers: int = 1, *, cpus_per_node: int = 1, head_cpus: int | None = None
) -> Iterator[LocalRayCluster]:
    """A head node (``head_cpus``, default ``cpus_per_node``; 0 keeps work off it) and ``workers``
    worker nodes of ``cpus_per_node`` CPUs each; stopped on exit."""
    temp_dir = Path(tempfile.mkdtemp(prefix="dnsray-", dir="/tmp"))
    port, client_port = free_ports(2)
    head = _start_node(
        ["--head", "--port", str(port), "--num-cpus", _num(cpus_per_node if head_cpus is None else head_cpus),
         "--temp-dir", str(temp_dir),
         "--include-dashboard=false", "--ray-client-server-port", str(client_port),
         "--system-config", json.dumps(_HEAD_SYSTEM_CONFIG)],
        temp_dir / "head.log",
    )  # fmt: skip
    cluster = LocalRayCluster(f"{NODE_IP}:{port}", temp_dir, head, cpus_per_node=cpus_per_node)
    try:
        cluster.wait_for_nodes(1)
        for _ in range(workers):
            cluster.add_worker()
        yield cluster
    except BackendUnavailableError as exc:
        raise BackendUnavailableError(f"{exc}\n{_log_tail(temp_dir)}") from exc
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _start_node(args: list[str], log: Path) -> subprocess.Popen:
    ray = Path(sys.executable).with_name("ray")
    command = [str(ray), "start", "--block", "--node-ip-address", NODE_IP, "--disable-usage-stats",
               "--object-store-memory", str(OBJECT_STORE_BYTES), *args]  # fmt: skip
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_ray_env(),
                                start_new_session=True)  # fmt: skip


def _ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def _num(value: int) -> str:
    return str(int(value))


def _log_tail(temp_dir: Path, lines: int = 20) -> str:
    tails = []
    for log in sorted(temp_dir.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {log.name} ---\n" + "\n".join(text))
    return "\n".join(tails)
