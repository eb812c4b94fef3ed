"""Same-invocation comparisons of code trees for the ingestion benchmarks.

A variant is a tree (this checkout, or a git worktree of a baseline commit) plus the settings of
one ``_ingest_worker.py`` run. ``interleave`` runs every variant once a round, in an order that
rotates from round to round, so that on a shared machine each variant meets the same load;
``min_median`` summarises a variant's rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from statistics import median
from typing import Any

WORKER = Path(__file__).resolve().parent / "_ingest_worker.py"
HERE = Path(__file__).resolve().parents[1]

#: Where the baseline worktree is expected unless told otherwise (``git worktree add``).
DEFAULT_BASELINE = Path("/tmp/ingest-base")


def run_worker(tree: Path, spec: Mapping[str, Any], *, timeout: float = 3600) -> dict[str, Any]:
    """One ``_ingest_worker.py`` run with ``tree``'s ``dns_milvus``; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, str(WORKER), json.dumps({**spec, "tree": str(tree)})],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ingest run in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleave(
    variants: Mapping[str, tuple[Path, Mapping[str, Any]]], rounds: int, *, verbose: bool = True
) -> dict[str, list[dict[str, Any]]]:
    """Run each variant ``rounds`` times, interleaved, the order rotating each round."""
    names = list(variants)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            tree, spec = variants[name]
            result = run_worker(tree, {**spec, "label": name})
            results[name].append(result)
            if verbose:
                print(
                    f"  round {r + 1}/{rounds} {name:<28} {result['videos_per_s']:8.2f} videos/s "
                    f"({result['videos']} in {result['seconds']:.1f} s, CPU {result['cpu_ms_per_video']:.0f} "
                    f"ms/video; GEMM {result['gemm_gflops_before']} "
                    f"GF/s, load {result['load_average_before']})",
                    flush=True,
                )
    return results


def min_median(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(median(values), 3), "max": round(max(values), 3)}


def rate_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's rounds: videos/s (min/median/max), the median run's stage split."""
    rates = [r["videos_per_s"] for r in runs]
    middle = sorted(runs, key=lambda r: r["videos_per_s"])[len(runs) // 2]
    return {
        "videos_per_s": min_median(rates),
        "cpu_ms_per_video": min_median([r["cpu_ms_per_video"] for r in runs]),
        "median_run": middle,
        "load_average": min_median([r["load_average_before"] for r in runs]),
        "gemm_gflops": min_median([r["gemm_gflops_before"] for r in runs]),
    }


def check_tree(tree: Path) -> Path:
    """``tree`` resolved, or a clear exit when it holds no ``dns_milvus`` package."""
    tree = tree.resolve()
    if not (tree / "dns_milvus" / "__init__.py").is_file():
        raise SystemExit(
            f"{tree} is not a checkout of this project: make the baseline with "
            f"`git worktree add --detach {tree} <commit>` (or pass --baseline none)"
        )
    return tree
