"""Fixtures of the Docker stack tests (docker/docker-compose.yml, driven by pytest-docker).

Without a Docker engine (or the compose plugin) every test here is skipped: pytest-docker's
``docker_services`` would otherwise error out while running ``docker compose up``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dns_milvus.testing.synthetic import write_model_set

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_SET = "stack-test"


def _docker_problem() -> str | None:
    """Why the stack cannot run here, or None when it can."""
    for command in (["docker", "info"], ["docker", "compose", "version"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(command)}` failed: {exc}"
        if done.returncode != 0:
            reason = (done.stderr or done.stdout).strip().splitlines()
            return f"`{' '.join(command)}` failed: {reason[-1] if reason else f'exit code {done.returncode}'}"
    return None


@pytest.fixture(scope="session")
def stack_model_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic model set the sidecar container mounts (readable by its non-root user)."""
    directory = write_model_set(tmp_path_factory.mktemp("stack") / "models", name=MODEL_SET, seed=11)
    for path in (directory.parent, directory, *directory.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory


@pytest.fixture(scope="session")
def docker_setup(request: pytest.FixtureRequest) -> list[str]:
    """Skip without an engine; otherwise point the compose file at the test model set and build."""
    problem = _docker_problem()
    if problem:
        pytest.skip(f"no usable Docker engine: {problem}")
    os.environ["DNS_MODEL_SET_DIR"] = str(request.getfixturevalue("stack_model_set"))
    return ["up --build -d --wait"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v"]


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(REPO_ROOT / "docker" / "docker-compose.yml")


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return "dns-milvus-test"
