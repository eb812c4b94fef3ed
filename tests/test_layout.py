"""The distribution's shape: which top-level packages it installs, and what the sidecar imports.

``rerankers`` is another project's name on PyPI: installing both would overwrite one with the
other, so this distribution must not ship an importable package of that name. The sidecar is
a client of the gRPC contract like any other, through ``dns_milvus.rpc``'s public names.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

from setuptools import find_namespace_packages

import dns_milvus

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = Path(dns_milvus.__file__).resolve().parent


def test_the_configured_packages_are_dns_milvus_only() -> None:
    find = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    # packages.find discovers namespace packages too: a bare directory counts.
    packages = find_namespace_packages(
        where=str(REPO_ROOT), include=find["include"], exclude=find.get("exclude", ())
    )
    assert packages and {p.split(".")[0] for p in packages} == {"dns_milvus"}


def test_the_installed_distribution_has_no_top_level_rerankers(tmp_path: Path) -> None:
    top_level = importlib.metadata.distribution("dns-milvus").read_text("top_level.txt") or ""
    assert top_level.split() == ["dns_milvus"]
    # Outside the repository (where the directory would be a namespace package on sys.path).
    probe = "import importlib.util; print(importlib.util.find_spec('rerankers'))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "None"
    assert not (REPO_ROOT / "rerankers" / "__init__.py").exists()


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_sidecar_imports_the_grpc_contract_through_public_modules() -> None:
    sources = sorted((PACKAGE_ROOT / "sidecar").glob("*.py"))
    assert sources, "the sidecar lives in dns_milvus/sidecar"
    for path in sources:
        private = {name for name in _imported_modules(path) if "_generated" in name.split(".")}
        assert not private, f"{path.name} imports {sorted(private)}"
    import dns_milvus.sidecar.grpc_service as service

    assert service.pb.DESCRIPTOR.package == "dns.rerank.v1"


def test_the_example_environment_file_lists_every_setting_and_loads() -> None:
    from dataclasses import fields

    from dns_milvus.sidecar.config import ENV_PREFIX, ServerConfig, load_config

    lines = (REPO_ROOT / "rerankers" / "reranker.env.example").read_text().splitlines()
    environ = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert set(environ) == {ENV_PREFIX + f.name.upper() for f in fields(ServerConfig)}
    assert load_config([], environ={k: v for k, v in environ.items() if v}).model_set == "/models"
