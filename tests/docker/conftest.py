"""Fixtures of the Docker stack tests: docker/docker-compose.local.yml, driven by pytest-docker.

The stack (Milvus standalone from the PyPI ``milvus`` server, SeaweedFS as S3, the re-ranker
sidecar) is built from this working tree by ``docker/local/build.py`` and runs with host
networking on loopback, on free ports and with fresh S3 keys chosen for the session.

Without a Docker engine, a compose command or the base image, every test that needs the stack
is skipped with the reason (``bash docker/dev-engine.sh up`` provides all three; CI runs it).
Once they are there, a failing build or a stack that does not come up fails the tests.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from pytest_docker.plugin import DockerComposeExecutor, Services, get_docker_services

from dns_milvus.testing.milvus_server import free_ports
from dns_milvus.testing.synthetic import write_model_set

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker" / "docker-compose.local.yml"
BUILD_SCRIPT = REPO_ROOT / "docker" / "local" / "build.py"
BASE_IMAGE = os.environ.get("DNS_BASE_IMAGE", "dns-milvus/base:bookworm")
IMAGE_TAG = os.environ.get("DNS_LOCAL_TAG", "local")
MODEL_SET = "stack-test"
BUCKET = "dns-fine"
SERVICES = ("milvus", "s3", "sidecar")
#: How long the stack may take to come up (Milvus's first start initialises its etcd).
STACK_START_TIMEOUT_S = 240.0


def _run(command: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {done.returncode}"


def compose_command() -> str | None:
    """``docker compose`` (v2) when the CLI has it, else ``docker-compose`` (v1), else None."""
    try:
        if _run(["docker", "compose", "version"]).returncode == 0:
            return "docker compose"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "docker-compose" if shutil.which("docker-compose") else None


def engine_problem() -> str | None:
    """Why the stack cannot run here, or None when it can."""
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        info = _run(["docker", "info", "--format", "{{.ServerVersion}}"])
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker info` failed: {exc}"
    if info.returncode != 0:
        return f"`docker info` failed: {_last_line(info)}"
    if compose_command() is None:
        return "no compose command (docker compose or docker-compose)"
    if _run(["docker", "image", "inspect", BASE_IMAGE]).returncode != 0:
        return f"no base image {BASE_IMAGE}"
    return None


def stack_ports(count: int) -> list[int]:
    """``count`` free ports below the kernel's ephemeral range: the containers pick their
    internal ports (and the kernel its outgoing ones) from that range when they start, after
    these were chosen, so they cannot take one of them in between."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low < 12_000:
        return free_ports(count)
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(10_000, low)
        if port not in ports and all(_bindable(host, port) for host in ("127.0.0.1", "0.0.0.0")):
            ports.append(port)
    return ports


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Stack:
    """The running stack: where each service listens, and how to act on its containers."""

    compose: DockerComposeExecutor
    milvus_port: int
    milvus_health_port: int
    s3_port: int
    grpc_port: int
    http_port: int
    access_key: str
    secret_key: str
    bucket: str = BUCKET
    containers: dict[str, str] = field(default_factory=dict)

    @property
    def milvus_uri(self) -> str:
        return f"http://127.0.0.1:{self.milvus_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def sidecar_http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def store_uri(self) -> str:
        return f"s3://{self.bucket}/objects?endpoint_url={self.s3_endpoint}&create_bucket=true"

    def container(self, service: str) -> str:
        """The id of the service's container (the same across stop and start)."""
        if service not in self.containers:
            out = self.compose.execute(f"ps -q {service}", ignore_stderr=True).decode().split()
            assert out, f"no container for service {service}"
            self.containers[service] = out[-1]
        return self.containers[service]

    def inspect(self, service: str) -> dict[str, Any]:
        done = _run(["docker", "inspect", self.container(service)])
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)[0]

    def health(self, service: str) -> str:
        """Docker's health status of the service's container, for its current run: "healthy"
        only once a health check that started after the container (re)started passed (Docker
        keeps the previous run's status across a stop and a start)."""
        state = self.inspect(service)["State"]
        health = state.get("Health") or {}
        status = health.get("Status", state["Status"])
        if status == "healthy":
            started = _docker_time(state["StartedAt"])
            probes = [p for p in health.get("Log") or [] if _docker_time(p["Start"]) >= started]
            if not probes or probes[-1]["ExitCode"] != 0:
                return "starting"
        return status

    def logs(self, service: str) -> str:
        done = _run(["docker", "logs", self.container(service)])
        return done.stdout + done.stderr

    def wait_healthy(self, *services: str, timeout: float = STACK_START_TIMEOUT_S) -> None:
        """Until Docker reports each service's container healthy (its image's HEALTHCHECK)."""
        deadline = time.monotonic() + timeout
        pending = list(services or SERVICES)
        while pending:
            pending = [s for s in pending if self.health(s) != "healthy"]
            if not pending:
                return
            for service in pending:
                if self.inspect(service)["State"]["Status"] == "exited":
                    pytest.fail(f"the {service} container exited:\n{self.logs(service)[-3000:]}")
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {s} ---\n{self.logs(s)[-2000:]}" for s in pending)
                pytest.fail(f"not healthy within {timeout:g} s: {', '.join(pending)}\n{tails}")
            time.sleep(1.0)


@pytest.fixture(scope="session")
def stack_model_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic model set the sidecar container mounts (readable by its non-root user)."""
    directory = write_model_set(tmp_path_factory.mktemp("stack") / "models", name=MODEL_SET, seed=11)
    for path in (directory, *directory.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory


@pytest.fixture(scope="session")
def stack_environment(stack_model_set: Path) -> Iterator[dict[str, str]]:
    """Free loopback ports and fresh S3 keys for the session, in the environment compose reads."""
    problem = engine_problem()
    if problem:
        pytest.skip(f"no usable Docker engine: {problem} (bash docker/dev-engine.sh up starts one)")
    milvus, milvus_health, s3, grpc_port, http = stack_ports(5)
    settings = {
        "DNS_LOCAL_TAG": IMAGE_TAG,
        "DNS_MODEL_SET_DIR": str(stack_model_set),
        "DNS_STACK_MILVUS_PORT": str(milvus),
        "DNS_STACK_MILVUS_HEALTH_PORT": str(milvus_health),
        "DNS_STACK_S3_PORT": str(s3),
        "DNS_STACK_GRPC_PORT": str(grpc_port),
        "DNS_STACK_HTTP_PORT": str(http),
        "DNS_STACK_S3_ACCESS_KEY": "dns" + secrets.token_hex(8),
        "DNS_STACK_S3_SECRET_KEY": secrets.token_urlsafe(24),
        "DNS_STACK_BUCKET": BUCKET,
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield settings
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def stack_images(stack_environment: dict[str, str]) -> None:
    """The stack's images, built from this working tree (layers cached between runs)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--tag", IMAGE_TAG],
        capture_output=True, text=True, timeout=1500, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"building the images failed:\n{(done.stdout + done.stderr)[-6000:]}")
    print(f"\nimages built in {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return compose_command() or "docker compose"


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(COMPOSE_FILE)


PROJECT_PREFIX = "dns-milvus-test-"


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return f"{PROJECT_PREFIX}{os.getpid()}"


def remove_abandoned_stacks(compose: str) -> None:
    """Remove the containers and volumes of test stacks whose session died without its clean-up
    (a killed run): their project names end in the pid of a process that is gone."""
    listed = _run(["docker", "ps", "-a", "--format", '{{.Label "com.docker.compose.project"}}'])
    for project in sorted(set(listed.stdout.split())):
        pid = project.removeprefix(PROJECT_PREFIX)
        if project.startswith(PROJECT_PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(
                [*compose.split(), "-f", str(COMPOSE_FILE), "-p", project, "down", "-v", "-t", "1"],
                capture_output=True, timeout=120, check=False,
            )  # fmt: skip


@pytest.fixture(scope="session")
def docker_setup(stack_images: None, docker_compose_command: str) -> list[str]:
    """Start from nothing: remove what killed earlier sessions left, then start the stack."""
    remove_abandoned_stacks(docker_compose_command)
    return ["down -v --remove-orphans", "up -d"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v --remove-orphans -t 10"]


@pytest.fixture(scope="module")
def docker_services(
    docker_compose_command: str,
    docker_compose_file: str,
    docker_compose_project_name: str,
    docker_setup: list[str],
    docker_cleanup: list[str],
) -> Iterator[Services]:
    """pytest-docker's fixture, for the module that uses it rather than the whole session: the
    stack stops after its tests instead of idling through the rest of the suite."""
    with get_docker_services(
        docker_compose_command, docker_compose_file, docker_compose_project_name, docker_setup, docker_cleanup
    ) as services:
        yield services


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest,
    stack_environment: dict[str, str],
    docker_compose_command: str,
    docker_compose_file: str,
    docker_compose_project_name: str,
) -> Stack:
    """The running stack, every container healthy and every service answering."""
    compose = DockerComposeExecutor(docker_compose_command, docker_compose_file, docker_compose_project_name)
    started = time.monotonic()
    try:
        request.getfixturevalue("docker_services")
    except BaseException:
        # pytest-docker runs no clean-up when `up` itself fails: leave nothing running.
        compose.execute("down -v --remove-orphans -t 5", success_codes=range(256))
        raise
    env = stack_environment
    running = Stack(
        compose=compose,
        milvus_port=int(env["DNS_STACK_MILVUS_PORT"]),
        milvus_health_port=int(env["DNS_STACK_MILVUS_HEALTH_PORT"]),
        s3_port=int(env["DNS_STACK_S3_PORT"]),
        grpc_port=int(env["DNS_STACK_GRPC_PORT"]),
        http_port=int(env["DNS_STACK_HTTP_PORT"]),
        access_key=env["DNS_STACK_S3_ACCESS_KEY"],
        secret_key=env["DNS_STACK_S3_SECRET_KEY"],
    )
    running.wait_healthy()
    wait_for_milvus(running.milvus_uri)
    print(f"\nstack healthy in {time.monotonic() - started:.0f} s")
    return running


def _docker_time(text: str) -> datetime:
    """A time as Docker prints it (RFC 3339 with up to nanoseconds)."""
    match = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text.strip())
    assert match, f"not a Docker time: {text!r}"
    head, fraction, zone = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(f"{head}.{(fraction or '')[:6].ljust(6, '0')}{zone}")


def wait_for_milvus(uri: str, timeout: float = 120.0) -> None:
    """Until a client can list the collections (a healthy proxy can still refuse for a moment)."""
    from pymilvus import MilvusClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            client = MilvusClient(uri, timeout=5)
            try:
                client.list_collections()
                return
            finally:
                client.close()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
