"""Regenerate the checked-in gRPC modules from ``proto/`` with grpcio-tools.

    python -m dns_milvus.rpc.generate            # rewrite dns_milvus/rpc/_generated/
    python -m dns_milvus.rpc.generate --check    # exit 1 if the checked-in modules are stale

protoc writes modules that import each other by their proto package path
(``from dns.rerank.v1 import rerank_pb2``), which is not an importable package here; the
generator rewrites those imports to package-relative ones, flattens the files into one
directory and marks them exempt from linting. The output depends only on the .proto files and
the grpcio-tools version, so the same tools version reproduces the checked-in files byte for byte.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: The .proto files that make up the contract, relative to the proto root.
PROTO_FILES = ("dns/rerank/v1/rerank.proto",)

PACKAGE_DIR = Path(__file__).resolve().parent
GENERATED_DIR = PACKAGE_DIR / "_generated"
PROTO_ROOT = PACKAGE_DIR.parents[1] / "proto"

_INIT_TEXT = '''"""Modules generated from proto/ by ``python -m dns_milvus.rpc.generate``. Do not edit."""
'''

# Generated text follows protoc's style, not the project's lint rules.
_GENERATED_MARK = "# ruff: noqa\n"

# `from dns.rerank.v1 import rerank_pb2 as alias` -> `from . import rerank_pb2 as alias`
_ABSOLUTE_IMPORT = re.compile(r"^from ((?:\w+\.)*\w+) import (\w+_pb2(?:_grpc)?)\b", re.MULTILINE)


def tools_version() -> str:
    """The installed grpcio-tools version (it decides the generated text)."""
    from grpc_tools import grpc_version

    return str(grpc_version.VERSION)


def generate_into(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generate the modules of ``PROTO_FILES`` into ``out_dir`` (created); return the files written."""
    from grpc_tools import protoc

    packages = {str(Path(p).parent).replace("/", ".") for p in PROTO_FILES}
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="dns-protoc-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTO_FILES,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(PROTO_FILES)} (proto root {proto_root})")
        for source in sorted(Path(tmp).rglob("*.py*")):
            text = _ABSOLUTE_IMPORT.sub(
                lambda m: f"from . import {m.group(2)}" if m.group(1) in packages else m.group(0),
                source.read_text(),
            )
            target = out_dir / source.name
            target.write_text(_GENERATED_MARK + text)
            written.append(target)
    init = out_dir / "__init__.py"
    init.write_text(_INIT_TEXT)
    return [init, *written]


def stale_files(generated_dir: Path = GENERATED_DIR, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Unified diffs of every file that differs between ``generated_dir`` and a fresh generation."""
    with tempfile.TemporaryDirectory(prefix="dns-rpc-check-") as tmp:
        fresh = {p.name: p.read_text() for p in generate_into(Path(tmp), proto_root)}
    current = {p.name: p.read_text() for p in generated_dir.glob("*.py*")} if generated_dir.is_dir() else {}
    diffs = []
    for name in sorted(fresh.keys() | current.keys()):
        old, new = current.get(name, ""), fresh.get(name, "")
        if old != new:
            diffs.append(
                "".join(
                    difflib.unified_diff(
                        old.splitlines(keepends=True),
                        new.splitlines(keepends=True),
                        f"checked-in/{name}",
                        f"generated/{name}",
                    )
                )
                or f"{name}: differs\n"
            )
    return diffs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dns_milvus.rpc.generate", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="only report whether the checked-in code is current"
    )
    parser.add_argument("--out", type=Path, default=GENERATED_DIR, help="output directory")
    parser.add_argument(
        "--proto-root", type=Path, default=PROTO_ROOT, help="directory holding dns/rerank/..."
    )
    args = parser.parse_args(argv)
    if args.check:
        diffs = stale_files(args.out, args.proto_root)
        if diffs:
            sys.stdout.write("".join(diffs))
            print(f"{len(diffs)} generated file(s) are stale; run python -m dns_milvus.rpc.generate")
            return 1
        print(f"generated code is current (grpcio-tools {tools_version()})")
        return 0
    for path in generate_into(args.out, args.proto_root):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
