"""The deployment files agree with the code and are valid compose files (no engine needed).

A variable the sidecar does not read, or a compose file its own tool rejects, would otherwise
ship unnoticed: the stack tests run the local compose file only.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from dns_milvus.sidecar.config import ENV_PREFIX, ServerConfig
from tests.docker.conftest import REPO_ROOT, compose_command

DOCKER = REPO_ROOT / "docker"
PRODUCTION = DOCKER / "docker-compose.yml"
GPU = DOCKER / "docker-compose.gpu.yml"
LOCAL = DOCKER / "docker-compose.local.yml"
ENV_EXAMPLE = REPO_ROOT / "rerankers" / "reranker.env.example"
SETTINGS = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ServerConfig)}


def _variables(path: Path) -> set[str]:
    return set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+", path.read_text()))


@pytest.mark.parametrize(
    "path",
    [PRODUCTION, GPU, LOCAL, DOCKER / "Dockerfile", ENV_EXAMPLE, REPO_ROOT / "docs" / "deploy.md"],
    ids=lambda p: p.name,
)
def test_every_sidecar_variable_named_in_a_deployment_file_is_read_by_the_sidecar(path: Path) -> None:
    assert _variables(path) - SETTINGS == set()


def test_the_environment_example_names_every_setting() -> None:
    assert _variables(ENV_EXAMPLE) == SETTINGS


def test_the_production_sidecar_publishes_the_ports_the_image_listens_on() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    grpc_port = re.search(rf"{ENV_PREFIX}GRPC_PORT=(\d+)", dockerfile)
    http_port = re.search(rf"{ENV_PREFIX}HTTP_PORT=(\d+)", dockerfile)
    assert grpc_port and http_port
    compose = PRODUCTION.read_text()
    for port in (grpc_port[1], http_port[1]):
        assert f'"{port}:{port}"' in compose
    # The stop timeout leaves the drain its grace period.
    grace = float(re.search(rf"{ENV_PREFIX}GRACE_S: \"?([\d.]+)", compose)[1])  # type: ignore[index]
    stop = float(re.search(r"stop_grace_period: (\d+)s", compose)[1])  # type: ignore[index]
    assert stop > grace


def test_the_local_stack_uses_host_networking_only() -> None:
    text = LOCAL.read_text()
    services = re.findall(r"^  (\w+):\n    image:", text, flags=re.MULTILINE)
    assert services == ["milvus", "s3", "sidecar"]
    assert text.count("network_mode: host") == len(services)
    assert not re.search(r"^\s+(ports|networks):", text, flags=re.MULTILINE)


def test_the_dockerignore_lets_in_everything_the_dockerfile_copies() -> None:
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    dockerfile = (DOCKER / "Dockerfile").read_text()
    sources = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, flags=re.MULTILINE)
    for source in (s for line in sources for s in line.split()):
        name = source.rstrip("/")
        assert any(rule in (f"!{name}", f"!{name}/**") for rule in ignore), source


@pytest.mark.parametrize(
    "files", [[LOCAL], [PRODUCTION], [PRODUCTION, GPU]], ids=["local", "production", "production+gpu"]
)
def test_compose_accepts_the_file(files: list[Path], tmp_path: Path) -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no compose command (docker compose or docker-compose)")
    paths = [str(f) for f in files]
    if command == "docker-compose" and PRODUCTION in files:
        # Compose v1 predates the top-level `name` of the Compose specification; the rest of the
        # file it checks as v2 would. The copy stays in docker/ so relative paths resolve alike.
        stripped = DOCKER / f".{tmp_path.name}.docker-compose.yml"
        stripped.write_text(re.sub(r"(?m)^name: .*\n", "", PRODUCTION.read_text()))
        paths[0] = str(stripped)
    else:
        stripped = None
    try:
        args = [a for p in paths for a in ("-f", p)]
        done = subprocess.run(
            [*command.split(), *args, "config", "-q"], capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        if stripped is not None:
            stripped.unlink()
    assert done.returncode == 0, done.stderr
