"""The re-ranker sidecar as a real process (``python -m dns_milvus.sidecar``), for tests and benchmarks.

    replicas = [launch_sidecar(model_dir, store_dir, work / f"r{i}") for i in range(2)]
    for replica in replicas:
        replica.wait_ready()          # both import torch and load the model set at the same time
    ...
    replicas[0].kill()                # SIGKILL: the process dies mid-request, as on a crash

Each process gets free ports (``0``) unless told otherwise, writes them to its port file once
serving, and logs to ``<workdir>/sidecar.log`` (a pipe nobody reads would block it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SidecarProcess:
    """One sidecar process; its ports are known once ``wait_ready`` returns."""

    proc: subprocess.Popen
    workdir: Path
    host: str
    grpc_port: int = 0
    http_port: int = 0
    _log: object = field(default=None, repr=False)

    @property
    def port_file(self) -> Path:
        return self.workdir / "ports.json"

    @property
    def log_file(self) -> Path:
        return self.workdir / "sidecar.log"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def wait_ready(self, timeout_s: float = 180.0) -> SidecarProcess:
        """Wait until the process serves (its port file exists); raise with its log if it died."""
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = self.log_file.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"the sidecar in {self.workdir} did not start; its log ends:\n{tail}")
            time.sleep(0.05)
        ports = json.loads(self.port_file.read_text())
        self.grpc_port, self.http_port = int(ports["grpc_port"]), int(ports["http_port"])
        return self

    def kill(self) -> None:
        """SIGKILL: no drain, connections reset mid-request."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._close_log()

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (the sidecar drains), then SIGKILL past ``timeout_s``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait(timeout=30)
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def __enter__(self) -> SidecarProcess:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch_sidecar(
    model_dir: str | os.PathLike,
    store: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    grpc_port: int = 0,
    http_port: int = 0,
    torch_threads: int = 1,
    settings: dict[str, str] | None = None,
) -> SidecarProcess:
    """Start a sidecar process (without waiting for it: call ``wait_ready``).

    ``settings`` are more ``DNS_RERANKER_*`` variables, by their name without the prefix
    (``{"MAX_WAIT_MS": "2"}``)."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    port_file = work / "ports.json"
    port_file.unlink(missing_ok=True)
    env = {
        **os.environ,
        "DNS_RERANKER_MODEL_SET": str(model_dir),
        "DNS_RERANKER_STORE": str(store),
        "DNS_RERANKER_HOST": host,
        "DNS_RERANKER_GRPC_PORT": str(grpc_port),
        "DNS_RERANKER_HTTP_PORT": str(http_port),
        "DNS_RERANKER_PORT_FILE": str(port_file),
        "DNS_RERANKER_TORCH_THREADS": str(torch_threads),
        "DNS_RERANKER_DEVICE": "cpu",
        "DNS_RERANKER_LOG_LEVEL": "WARNING",
        **{f"DNS_RERANKER_{name}": value for name, value in (settings or {}).items()},
    }
    log = (work / "sidecar.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "dns_milvus.sidecar"], env=env, stdout=log, stderr=log)
    return SidecarProcess(proc, work, host, _log=log)
