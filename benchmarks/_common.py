"""Shared helpers of the engine benchmarks (bench_ingest, bench_storage, bench_query_latency).

Timing and percentiles, the JSON report, seeded synthetic region features, a model set of
freshly initialised networks at the DnS release's default sizes, and a start/stop helper for
the embedded Milvus standalone server (PyPI package ``milvus``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REGIONS = 9
FEATURE_DIM = 512
BITS = 512
#: Frame counts of the synthetic videos (1 frame a second): 30 s to 2 min.
DEFAULT_FRAMES = (30, 120)


# -- command line and environment --------------------------------------------------------------


def base_parser(description: str, name: str) -> argparse.ArgumentParser:
    """Options every engine benchmark takes: seed, threads, quick mode, output path, scratch dir."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seed", type=int, default=0, help="seed of the networks and the features")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2 = the target box)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (about a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="JSON report path")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch directory (default: a temporary one, removed at the end)",
    )
    return parser


def setup_torch(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


@contextlib.contextmanager
def scratch_dir(given: Path | None, prefix: str) -> Iterator[Path]:
    """``given`` (created, kept) or a temporary directory removed on exit."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on. The load average matters: the box may be shared."""
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_report(path: Path, name: str, args: argparse.Namespace, body: dict[str, Any]) -> None:
    """Write the JSON report: the command's options, the machine, then the measurements."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "benchmark": name,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "options": options,
        "commit": git_commit(),
        "machine": machine_info(),
        **body,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    print(f"\nwrote {path}")


def _json_default(value: object) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- timing ------------------------------------------------------------------------------------


@dataclass
class Stopwatch:
    """Accumulates named wall-clock laps: ``with watch("stage"): ...``."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def gemm_gflops(repeats: int = 10) -> float:
    """This machine's float32 GEMM rate at the threads set, on the networks' typical shape."""
    a, b = torch.randn(8192, 512), torch.randn(512, 512)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * 8192 * 512 * 512 * repeats / (time.perf_counter() - start) / 1e9


def summarize(values: Sequence[float], digits: int = 2) -> dict[str, float]:
    """p50 / p95 / mean / min / max of ``values`` (linear interpolation between order statistics)."""
    if not values:
        return {"n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "n": int(arr.size),
        "p50": round(float(np.percentile(arr, 50)), digits),
        "p95": round(float(np.percentile(arr, 95)), digits),
        "mean": round(float(arr.mean()), digits),
        "min": round(float(arr.min()), digits),
        "max": round(float(arr.max()), digits),
    }


def runs_summary(runs: Sequence[dict[str, Any]], items: int) -> dict[str, Any]:
    """Repeated runs (each with ``seconds`` and the ``load_1m`` it started at) of ``items`` items:
    best and median seconds and items per second, the load averages, and the runs themselves."""
    seconds = [r["seconds"] for r in runs]
    return {
        "per_s_best": round(items / min(seconds), 3),
        "per_s_median": round(items / statistics.median(seconds), 3),
        "seconds_min": round(min(seconds), 2),
        "seconds_median": round(statistics.median(seconds), 2),
        "load_1m": [round(r["load_1m"], 2) for r in runs],
        "runs": list(runs),
    }


def summary_row(name: str, summary: dict[str, Any]) -> list[object]:
    """``runs_summary`` as a row of ``print_table`` under ``SUMMARY_HEADERS``."""
    return [name, summary["seconds_min"], summary["seconds_median"], summary["per_s_best"],
            summary["per_s_median"], " ".join(f"{x:.1f}" for x in summary["load_1m"])]  # fmt: skip


SUMMARY_HEADERS = ("setting", "s min", "s median", "per s best", "per s median", "load 1m")


def ratio(numerator: float, denominator: float, digits: int = 2) -> float | None:
    return round(numerator / denominator, digits) if denominator else None


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned table (first column left, the rest right)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(
        str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(headers, widths))
    )
    print(line)
    print("-" * len(line))
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


# -- synthetic inputs ------------------------------------------------------------------------------


def frame_counts(rng: np.random.Generator, n: int, frames: tuple[int, int] = DEFAULT_FRAMES) -> np.ndarray:
    """``n`` frame counts drawn uniformly from ``frames`` (inclusive)."""
    low, high = frames
    return rng.integers(low, high + 1, size=n)


def random_features(rng: np.random.Generator, n_frames: int) -> np.ndarray:
    """L2-normalised random region features float32 [T, 9, 512] (PCA-whitened features are unit-norm).

    The networks' cost depends on shapes only, so random content measures speed and size faithfully.
    """
    x = rng.standard_normal((n_frames, REGIONS, FEATURE_DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def parse_frames(text: str) -> tuple[int, int]:
    """``"30-120"`` -> (30, 120); ``"60"`` -> (60, 60)."""
    low, _, high = text.partition("-")
    try:
        pair = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frames as N or LOW-HIGH, got {text!r}") from None
    if pair[0] < 1 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return pair


# -- model sets ----------------------------------------------------------------------------------


def make_model_set(directory: Path, *, seed: int = 0, fine: str = "bin") -> Path:
    """A model-set directory of seeded, freshly initialised networks at the release's default sizes.

    Coarse student: 64 NetVLAD clusters -> 1024-d; fine student: binarization (512 bits) or
    attention (``fine="att"``, float16 storage); selector: default. Untrained weights cost the
    same time and bytes as trained ones, which is all these benchmarks measure.
    """
    from dns_milvus.testing.synthetic import write_model_set

    return write_model_set(
        directory, name=f"bench-{fine}", seed=seed, dims=FEATURE_DIM, bits=BITS, fine=fine,
        netvlad_clusters=64, coarse_dim=1024,
    )  # fmt: skip


def load_model_set(directory: Path, *, seed: int = 0, fine: str = "bin") -> Any:
    """Build the set under ``directory`` and load it on the CPU (the benchmarks' target)."""
    from dns_milvus.engine import ModelSet

    return ModelSet.load(make_model_set(directory, seed=seed, fine=fine), device="cpu")


def settle_disk() -> float:
    """Write back dirty pages now (``sync``), so that the kernel's write-back of what was just
    written (objects, HDF5 files, Milvus segments) does not steal CPU from the next measurement.
    Returns the seconds it took."""
    started = time.perf_counter()
    os.sync()
    return time.perf_counter() - started


def directory_bytes(root: Path) -> int:
    """Total size of the regular files under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def collection_name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


# -- the embedded Milvus standalone server ---------------------------------------------------------


def milvus_server(base: Path) -> AbstractContextManager[str]:
    """The embedded Milvus standalone server (PyPI ``milvus``) with its data under ``base``;
    yields its URI and stops it on exit."""
    from dns_milvus.testing.milvus_server import embedded_server

    return embedded_server(base)
