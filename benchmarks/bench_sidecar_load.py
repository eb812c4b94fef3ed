"""Load run against the re-ranker sidecar: N concurrent gRPC clients, a fixed number of requests.

The script builds a synthetic model set (seeded random networks) and corpus, starts the sidecar
as a subprocess on loopback (``python -m dns_milvus.sidecar``), and drives it with ``--clients``
threads, each with its own channel, until ``--requests`` requests have been answered. It
reports throughput, latency percentiles, errors by status, the server's resident memory at
start / after warm-up / at the end (RSS must stay flat after warm-up: the queue is bounded and
the cache has a byte budget), and what the dynamic batcher did (from the server's /metrics).

    python benchmarks/bench_sidecar_load.py [--clients 32] [--requests 640] [--candidates 200]
        [--policy 10%] [--out benchmarks/results/sidecar_load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
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


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (psutil when installed, else /proc)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for pid {pid}") from None


def scrape(http_port: int) -> dict[str, float]:
    """The server's unlabelled metric samples (name -> value)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([a-z_]+) ([0-9.e+-]+)", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def start_server(
    model_dir: Path, store_dir: Path, work: Path, args: argparse.Namespace
) -> tuple[subprocess.Popen, dict]:
    port_file = work / "ports.json"
    env = {
        **os.environ,
        "DNS_RERANKER_MODEL_SET": str(model_dir),
        "DNS_RERANKER_STORE": str(store_dir),
        "DNS_RERANKER_GRPC_PORT": "0",
        "DNS_RERANKER_HTTP_PORT": "0",
        "DNS_RERANKER_PORT_FILE": str(port_file),
        "DNS_RERANKER_MAX_WAIT_MS": str(args.max_wait_ms),
        "DNS_RERANKER_MAX_INFLIGHT": str(max(64, args.clients)),
        "DNS_RERANKER_CACHE_BYTES": str(args.cache_mb << 20),
        "DNS_RERANKER_TORCH_THREADS": str(args.threads),
        "DNS_RERANKER_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([sys.executable, "-m", "dns_milvus.sidecar"], cwd=REPO_ROOT, env=env)
    deadline = time.monotonic() + 180
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the sidecar did not start")
        time.sleep(0.05)
    return proc, json.loads(port_file.read_text())


def run_load(target: str, work_items: list[tuple], clients: int, policy: SelectionPolicy, top_k: int) -> dict:
    """Each client thread takes the next request until none are left; returns latencies and errors."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    next_item = iter(range(len(work_items)))

    def client() -> None:
        with RemoteReranker(target, timeout_s=60.0) as remote:
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
    return {
        "requests": len(work_items),
        "ok": len(latencies),
        "errors": dict(errors),
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall else 0.0,
        "latency_ms": {
            "p50": float(np.percentile(ms, 50)) if ms.size else None,
            "p90": float(np.percentile(ms, 90)) if ms.size else None,
            "p99": float(np.percentile(ms, 99)) if ms.size else None,
            "max": float(ms.max()) if ms.size else None,
        },
    }


def _rss_at(samples: list[tuple[float, float]], t: float, default: float) -> float:
    """The first RSS sample taken at or after ``t`` seconds into the run."""
    return next((mb for ts, mb in samples if ts >= t), default)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=640, help="measured requests (after warm-up)")
    parser.add_argument("--warmup", type=int, default=64, help="requests before the measured run")
    parser.add_argument("--corpus", type=int, default=400, help="videos in the store")
    parser.add_argument("--candidates", type=int, default=200, help="stage-1 candidates per request")
    parser.add_argument("--policy", default="10%", help="selection policy (e.g. 10%%, count:20, all)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--dims", type=int, default=512, help="region-feature dimension")
    parser.add_argument("--bits", type=int, default=512, help="fine-grained code length")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--cache-mb", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "sidecar_load.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = SelectionPolicy.parse(args.policy)

    with tempfile.TemporaryDirectory(prefix="dns-sidecar-bench-") as tmp:
        work = Path(tmp)
        model_dir = write_model_set(work / "models", name="bench", dims=args.dims, bits=args.bits, seed=0)
        models = ModelSet.load(model_dir, device="cpu")
        store = LocalStore(work / "objects")
        t0 = time.perf_counter()
        corpus = write_corpus(models, store, "bench", args.corpus, seed=1)
        print(f"corpus: {args.corpus} videos indexed in {time.perf_counter() - t0:.1f} s")
        rng = np.random.default_rng(2)
        records = list(corpus.values())

        def item() -> tuple:
            query = records[int(rng.integers(len(records)))]
            candidates = candidates_for(query, corpus, "bench")
            picked = rng.choice(len(candidates), size=min(args.candidates, len(candidates)), replace=False)
            return query, [candidates[i] for i in picked]

        warmup = [item() for _ in range(args.warmup)]
        measured = [item() for _ in range(args.requests)]

        proc, ports = start_server(model_dir, work / "objects", work, args)
        target = f"127.0.0.1:{ports['grpc_port']}"
        try:
            rss_start = rss_mb(proc.pid)
            with RemoteReranker(target) as remote:
                info = remote.info()
            warm = run_load(target, warmup, args.clients, policy, args.top_k)
            rss_warm = rss_mb(proc.pid)
            before = scrape(ports["http_port"])
            samples: list[tuple[float, float]] = []
            stop_sampling = threading.Event()

            def sample_rss() -> None:
                t_start = time.perf_counter()
                while not stop_sampling.wait(0.5):
                    samples.append((time.perf_counter() - t_start, rss_mb(proc.pid)))

            sampler = threading.Thread(target=sample_rss, daemon=True)
            sampler.start()
            result = run_load(target, measured, args.clients, policy, args.top_k)
            stop_sampling.set()
            sampler.join()
            after = scrape(ports["http_port"])
            rss_end = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = delta("dns_reranker_batch_pairs_count")
    report: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "server_device": info["device"],
        },
        "warmup": {k: warm[k] for k in ("ok", "errors", "throughput_rps")},
        **result,
        "server_rss_mb": {
            "start": rss_start,
            "after_warmup": rss_warm,
            "end": rss_end,
            "max_during_run": max((mb for _, mb in samples), default=rss_end),
            # RSS over the measured run, every 0.5 s: flat means no per-request growth
            "samples": [[round(t, 1), round(mb, 1)] for t, mb in samples],
        },
        "rss_growth_after_warmup_mb": rss_end - rss_warm,
        "rss_growth_second_half_mb": rss_end - _rss_at(samples, result["wall_s"] / 2, rss_warm),
        "batching": {
            "batches": batches,
            "mean_pairs_per_batch": delta("dns_reranker_batch_pairs_sum") / batches if batches else 0.0,
            "mean_requests_per_batch": delta("dns_reranker_batch_jobs_sum") / batches if batches else 0.0,
            "scorer_busy_fraction": delta("dns_reranker_scorer_busy_seconds_total") / result["wall_s"],
            "cache_hit_ratio": after.get("dns_reranker_cache_hit_ratio"),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    lat = report["latency_ms"]
    print(
        f"{args.clients} clients, {result['ok']}/{result['requests']} ok, errors {result['errors'] or 0}: "
        f"{result['throughput_rps']:.1f} req/s, p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms"
    )
    print(
        f"server RSS MiB: start {rss_start:.0f}, after warm-up {rss_warm:.0f}, end {rss_end:.0f} "
        f"(growth after warm-up {rss_end - rss_warm:+.1f}, "
        f"over the second half of the run {report['rss_growth_second_half_mb']:+.1f})"
    )
    b = report["batching"]
    print(
        f"batching: {b['batches']:.0f} batches, {b['mean_requests_per_batch']:.2f} requests and "
        f"{b['mean_pairs_per_batch']:.1f} pairs a batch; "
        f"scorer busy {b['scorer_busy_fraction']:.0%} of the wall time"
    )
    print(f"wrote {args.out}")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
