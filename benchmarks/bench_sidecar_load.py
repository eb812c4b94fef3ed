"""Load runs against the re-ranker sidecar: 1, 8 and 32 concurrent gRPC clients.

The script builds a synthetic model set (seeded random networks at the release's sizes: 512-d
region features, 512-bit codes) and a corpus of videos of 30-120 frames (1 frame a second:
30 s to 2 min; ``--short`` for 3-12 frames), starts the sidecar as a subprocess on loopback
(``python -m dns_milvus.sidecar``, a fresh server for every run), and drives it with
``--clients`` threads, each with its own channel and inline queries of the corpus's lengths.
Each run reports throughput, latency percentiles (p50/p95/p99), errors by status, the server's
resident memory (peak over the run, ``VmHWM``, and after warm-up / at the end) and what the
dynamic batcher did (from the server's /metrics).

With ``--baseline-tree DIR`` (a git worktree of another commit, e.g. the parent) every run is
repeated against a sidecar started from that tree (``PYTHONPATH=DIR``), interleaved with the
measured tree's runs (``--tree``, default this checkout) in alternating order, ``--rounds``
times; the summary gives min / median over the rounds for each side and their ratio, with the
load average around each run (the machine may be shared). ``--fine-precision bfloat16`` adds the
measured tree with its comparator in that precision (``DNS_RERANKER_FINE_PRECISION``) as one more
side of every round, with its own ratio to the baseline.

    git worktree add /tmp/sidecar-base HEAD~1
    python benchmarks/bench_sidecar_load.py --baseline-tree /tmp/sidecar-base
    python benchmarks/bench_sidecar_load.py --baseline-tree /tmp/sidecar-base --fine-precision bfloat16
    python benchmarks/bench_sidecar_load.py --clients 32 --rounds 1 --short
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dns_milvus.engine import ModelSet, SelectionPolicy
from dns_milvus.rpc import RemoteReranker
from dns_milvus.store import LocalStore
from dns_milvus.testing.synthetic import candidates_for, write_corpus, write_model_set

REPO_ROOT = Path(__file__).resolve().parents[1]
REALISTIC_FRAMES = (30, 120)
SHORT_FRAMES = (3, 12)


def proc_status_mb(pid: int, field: str) -> float:
    """A memory field of /proc/PID/status (VmRSS: now, VmHWM: peak so far) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def scrape(http_port: int) -> dict[str, float]:
    """The server's unlabelled metric samples (name -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+) ([0-9.e+-]+)", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def server_env(
    tree: Path, model_dir: Path, store_dir: Path, port_file: Path, args: argparse.Namespace
) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),  # the tree's dns_milvus wins over the installed one
        "DNS_RERANKER_MODEL_SET": str(model_dir),
        "DNS_RERANKER_STORE": str(store_dir),
        "DNS_RERANKER_GRPC_PORT": "0",
        "DNS_RERANKER_HTTP_PORT": "0",
        "DNS_RERANKER_PORT_FILE": str(port_file),
        "DNS_RERANKER_MAX_INFLIGHT": str(max(64, max(args.clients))),
        "DNS_RERANKER_CACHE_BYTES": str(args.cache_mb << 20),
        "DNS_RERANKER_TORCH_THREADS": str(args.threads),
        "DNS_RERANKER_LOG_LEVEL": "WARNING",
    }
    if args.max_wait_ms is not None:
        env["DNS_RERANKER_MAX_WAIT_MS"] = str(args.max_wait_ms)
    return env


def check_tree(tree: Path, env: dict) -> None:
    """The sidecar started with ``env`` must import dns_milvus from ``tree``."""
    out = subprocess.run(
        [sys.executable, "-c", "import dns_milvus; print(dns_milvus.__file__)"],
        env=env, cwd=tree, capture_output=True, text=True, check=True,
    )  # fmt: skip
    where = Path(out.stdout.strip()).resolve()
    if tree.resolve() not in where.parents:
        raise SystemExit(f"a sidecar started from {tree} would import dns_milvus from {where}")


def start_server(tree: Path, env: dict, port_file: Path) -> tuple[subprocess.Popen, dict]:
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "dns_milvus.sidecar"], cwd=tree, env=env)
    deadline = time.monotonic() + 300
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the sidecar from {tree} did not start")
        time.sleep(0.05)
    return proc, json.loads(port_file.read_text())


def run_load(target: str, work_items: list[tuple], clients: int, policy: SelectionPolicy, top_k: int) -> dict:
    """Each client thread takes the next request until none are left; returns latencies and errors."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    next_item = iter(range(len(work_items)))

    def client() -> None:
        with RemoteReranker(target, timeout_s=120.0) as remote:
            while True:
                with lock:
                    index = next(next_item, None)
                if index is None:
                    return
                query, candidates = work_items[index]
                t0 = time.perf_counter()
                try:
                    remote.rerank(query, candidates, policy, top_k)
                except Exception as exc:
                    with lock:
                        errors[getattr(exc, "status_code", type(exc).__name__)] += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000.0

    def pct(q: float) -> float | None:
        return float(np.percentile(ms, q)) if ms.size else None

    return {
        "requests": len(work_items),
        "ok": len(latencies),
        "errors": dict(errors),
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall else 0.0,
        "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "max": pct(100)},
    }


def one_run(
    label: str, tree: Path, env: dict, port_file: Path, clients: int, warmup: list, measured: list,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """A fresh sidecar from ``tree``: warm-up, then the measured requests with ``clients`` clients."""
    policy = SelectionPolicy.parse(args.policy)
    load_before = os.getloadavg()
    proc, ports = start_server(tree, env, port_file)
    target = f"127.0.0.1:{ports['grpc_port']}"
    samples: list[float] = []
    try:
        with RemoteReranker(target) as remote:
            device = remote.info()["device"]
        warm = run_load(target, warmup, clients, policy, args.top_k)
        rss_warm = proc_status_mb(proc.pid, "VmRSS")
        before = scrape(ports["http_port"])
        stop_sampling = threading.Event()

        def sample_rss() -> None:
            while not stop_sampling.wait(0.25):
                samples.append(proc_status_mb(proc.pid, "VmRSS"))

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        result = run_load(target, measured, clients, policy, args.top_k)
        stop_sampling.set()
        sampler.join()
        after = scrape(ports["http_port"])
        rss_end = proc_status_mb(proc.pid, "VmRSS")
        rss_peak = proc_status_mb(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = delta("dns_reranker_batch_pairs_count")
    run = {
        "variant": label,
        "clients": clients,
        "device": device,
        "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "warmup": {k: warm[k] for k in ("ok", "errors", "throughput_rps")},
        **result,
        "server_rss_mb": {
            "peak": rss_peak,  # VmHWM: the highest resident set since the server started
            "after_warmup": rss_warm,
            "end": rss_end,
            "max_sampled_during_run": max(samples, default=rss_end),
        },
        "batching": {
            "batches": batches,
            "mean_pairs_per_batch": delta("dns_reranker_batch_pairs_sum") / batches if batches else 0.0,
            "mean_requests_per_batch": delta("dns_reranker_batch_jobs_sum") / batches if batches else 0.0,
            "scorer_busy_fraction": delta("dns_reranker_scorer_busy_seconds_total") / result["wall_s"],
        },
    }
    lat = result["latency_ms"]
    print(
        f"  {label:>4} {clients:>2} clients: {result['ok']}/{result['requests']} ok "
        f"{result['errors'] or ''} {result['throughput_rps']:6.1f} req/s, p50 {lat['p50']:7.1f} "
        f"p95 {lat['p95']:7.1f} p99 {lat['p99']:7.1f} ms, RSS peak {rss_peak:6.0f} MiB, "
        f"{run['batching']['mean_requests_per_batch']:.1f} requests a batch, load {run['load_average_1m']}",
        flush=True,
    )
    return run


def summarize(runs: list[dict], variants: list[str], client_counts: list[int]) -> dict[str, Any]:
    """min / median over rounds for each variant and client count, and each variant / base ratio."""
    out: dict[str, Any] = {}
    for clients in client_counts:
        row: dict[str, Any] = {}
        for variant in variants:
            mine = [r for r in runs if r["variant"] == variant and r["clients"] == clients]
            if not mine:
                continue
            metrics = {
                "throughput_rps": [r["throughput_rps"] for r in mine],
                "p50_ms": [r["latency_ms"]["p50"] for r in mine],
                "p95_ms": [r["latency_ms"]["p95"] for r in mine],
                "p99_ms": [r["latency_ms"]["p99"] for r in mine],
                "rss_peak_mb": [r["server_rss_mb"]["peak"] for r in mine],
            }
            row[variant] = {
                name: {"min": min(v), "median": statistics.median(v), "all": v}
                for name, v in metrics.items()
                if None not in v
            }
            row[variant]["errors"] = sum(sum(r["errors"].values()) for r in mine)
        for variant in variants:
            if variant == "base" or "base" not in row or variant not in row:
                continue
            paired = [
                n["throughput_rps"] / b["throughput_rps"]
                for b, n in zip(
                    [r for r in runs if r["variant"] == "base" and r["clients"] == clients],
                    [r for r in runs if r["variant"] == variant and r["clients"] == clients],
                    strict=False,
                )
                if b["throughput_rps"]
            ]
            row[f"throughput_ratio_{variant}_over_base"] = {
                "of_medians": row[variant]["throughput_rps"]["median"]
                / row["base"]["throughput_rps"]["median"],
                "per_round": paired,
                "min": min(paired),
                "median": statistics.median(paired),
            }
        out[str(clients)] = row
    return out


def print_summary(summary: dict[str, Any], variants: list[str]) -> None:
    print("\nmin / median over rounds (throughput req/s; latency ms; server peak RSS MiB)")
    for clients, row in summary.items():
        for variant in variants:
            if variant not in row:
                continue
            s = row[variant]
            cells = "  ".join(
                f"{name} {s[name]['min']:.1f}/{s[name]['median']:.1f}"
                for name in ("throughput_rps", "p50_ms", "p95_ms", "p99_ms", "rss_peak_mb")
                if name in s
            )
            print(f"{clients:>3} clients {variant:>12}: {cells}  errors {s['errors']}")
        for variant in variants:
            ratio = row.get(f"throughput_ratio_{variant}_over_base")
            if ratio:
                print(
                    f"{clients:>3} clients {variant}/base throughput: {ratio['of_medians']:.2f}x of medians, "
                    f"per round min {ratio['min']:.2f}x median {ratio['median']:.2f}x"
                )


def parse_frames(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    frames = (int(low), int(high or low))
    if not 1 <= frames[0] <= frames[1]:
        raise argparse.ArgumentTypeError(f"expected frames as LOW-HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=int, default=10, help="measured requests a client")
    parser.add_argument("--min-requests", type=int, default=48, help="measured requests a run, at least")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up requests a client (at least 16 a run)")
    parser.add_argument(
        "--frames", type=parse_frames, default=REALISTIC_FRAMES, help="video lengths LOW-HIGH"
    )
    parser.add_argument(
        "--short", action="store_true", help=f"videos of {SHORT_FRAMES[0]}-{SHORT_FRAMES[1]} frames"
    )
    parser.add_argument("--corpus", type=int, default=400, help="videos in the store")
    parser.add_argument("--candidates", type=int, default=200, help="stage-1 candidates per request")
    parser.add_argument("--policy", default="10%", help="selection policy (e.g. 10%%, count:20, all)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--dims", type=int, default=512, help="region-feature dimension")
    parser.add_argument("--bits", type=int, default=512, help="fine-grained code length")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="the server's (default: its own)")
    parser.add_argument("--cache-mb", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument(
        "--fine-precision",
        type=lambda text: [p for p in text.split(",") if p],
        default=[],
        help="also run the measured tree with these comparator precisions (e.g. bfloat16)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of every run")
    parser.add_argument("--tree", type=Path, default=REPO_ROOT, help="the checkout whose sidecar is measured")
    parser.add_argument("--baseline-tree", type=Path, default=None, help="a checkout to compare against")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the model set and corpus here")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "sidecar_load.json"
    )
    args = parser.parse_args()
    # a terminated run still stops its sidecar (the ``finally`` of each run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.clients = [int(c) for c in str(args.clients).split(",")]
    if args.short:
        args.frames = SHORT_FRAMES
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="dns-sidecar-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = write_model_set(work / "models", name="bench", dims=args.dims, bits=args.bits, seed=0)
        models = ModelSet.load(model_dir, device="cpu")
        store_dir = work / f"objects-{args.frames[0]}-{args.frames[1]}-{args.corpus}"
        store = LocalStore(store_dir)
        t0 = time.perf_counter()
        corpus = write_corpus(models, store, "bench", args.corpus, seed=1, frames=args.frames)
        print(f"corpus: {args.corpus} videos of {args.frames[0]}-{args.frames[1]} frames indexed in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        rng = np.random.default_rng(2)
        records = list(corpus.values())

        def item() -> tuple:
            query = records[int(rng.integers(len(records)))]
            candidates = candidates_for(query, corpus, "bench")
            picked = rng.choice(len(candidates), size=min(args.candidates, len(candidates)), replace=False)
            return query, [candidates[i] for i in picked]

        loads = {
            clients: (
                [item() for _ in range(max(16, args.warmup * clients))],
                [item() for _ in range(max(args.min_requests, args.requests_per_client * clients))],
            )
            for clients in args.clients
        }
        trees = {"new": args.tree.resolve()}
        if args.baseline_tree is not None:
            trees = {"base": args.baseline_tree.resolve(), "new": args.tree.resolve()}
        port_file = work / "ports.json"
        envs = {}
        for label, tree in list(trees.items()):
            envs[label] = server_env(tree, model_dir, store_dir, port_file, args)
            check_tree(tree, envs[label])
        for precision in args.fine_precision:  # the measured tree again, its comparator in another precision
            label = f"new-{precision}"
            trees[label] = trees["new"]
            envs[label] = {**envs["new"], "DNS_RERANKER_FINE_PRECISION": precision}
        variants = list(trees)
        runs = []
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", flush=True)
            for clients in args.clients:
                order = variants if (round_index + args.clients.index(clients)) % 2 == 0 else variants[::-1]
                for label in order:  # alternating order: both sides meet the same load drift
                    warmup, measured = loads[clients]
                    run = one_run(
                        label, trees[label], envs[label], port_file, clients, warmup, measured, args
                    )
                    run["round"] = round_index
                    runs.append(run)

    summary = summarize(runs, variants, args.clients)
    print_summary(summary, variants)
    report: dict[str, Any] = {
        "benchmark": "sidecar_load",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "trees": {k: str(v) for k, v in trees.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0 if not any(r["errors"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
