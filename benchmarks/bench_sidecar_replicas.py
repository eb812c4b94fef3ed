"""One re-ranker sidecar against two replicas behind one client target, and one replica killed mid-run.

The script builds a synthetic model set at the release's sizes (512-d region features, 512-bit
codes) and a corpus of videos of 30-120 frames, starts sidecar processes on loopback
(``python -m dns_milvus.sidecar``) and drives them with ``--clients`` threads, each with its own
``RemoteReranker`` (one channel: round robin over the replicas that report SERVING, UNAVAILABLE
calls retried on the next one), inline queries of the corpus's lengths, ``--candidates``
candidates at policy ``--policy``. Configurations, interleaved in every round (``--rounds``):

- ``single``: one replica of ``--threads-single`` cores (2: the whole box): torch threads and
  the fine scorer's threads;
- ``replicas``: two replicas with ``--threads-per-replica`` torch threads each (1 + 1), on the
  same cores: the split of one box, not two boxes;
- ``single_1t``: one replica with ``--threads-per-replica`` threads, the control that tells what
  one of the two replicas would do alone (``--no-control`` leaves it out);
- ``kill`` (``--kill-clients`` clients): the two replicas, one SIGKILLed once ``--kill-after``
  of the requests are answered; every search must still succeed (the killed replica is
  started again before the next round).

The summary gives min / median over the rounds of throughput and p99 for each configuration
and their ratio, the failed searches of the kill runs, and the load average around every run.

    python benchmarks/bench_sidecar_replicas.py                       # 3 rounds, 16 and 32 clients
    python benchmarks/bench_sidecar_replicas.py --quick               # one short round
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sidecar_load as sidecar_load
from _common import base_parser, print_table, ratio, scratch_dir, setup_torch, write_report

from dns_milvus.engine import ModelSet, SelectionPolicy
from dns_milvus.engine.modelset import VideoRecord
from dns_milvus.engine.rerank import Candidate
from dns_milvus.store import LocalStore
from dns_milvus.testing.sidecar import SidecarProcess, launch_sidecar
from dns_milvus.testing.synthetic import candidates_for, write_corpus, write_model_set

NAME = "sidecar_replicas"
WorkItem = tuple[VideoRecord, list[Candidate]]


def run_load(
    targets: list[str], items: list[WorkItem], clients: int, policy: SelectionPolicy, top_k: int
) -> dict[str, Any]:
    """``clients`` threads, one channel each (to every target), take the next item until none are
    left: the load benchmark's driver, with the load average around the run."""
    load_before = os.getloadavg()[0]
    result = sidecar_load.run_load(",".join(targets), items, clients, policy, top_k)
    return {
        "clients": clients,
        **result,
        "failed": sum(result["errors"].values()),
        "wall_s": round(result["wall_s"], 3),
        "throughput_rps": round(result["throughput_rps"], 2),
        "latency_ms": {k: None if v is None else round(v, 1) for k, v in result["latency_ms"].items()},
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }


def served(process: SidecarProcess) -> float:
    """Rerank calls a replica answered, from its /metrics."""
    with urllib.request.urlopen(f"{process.http_url}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            labels = ('method="Rerank"', 'status="ok"', 'protocol="grpc"')
            if line.startswith("dns_reranker_requests_total{") and all(x in line for x in labels):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


class Killer:
    """SIGKILLs ``doomed`` once the replicas have answered ``threshold`` more calls, watching their
    /metrics from a thread of its own (as a failure would strike: from outside the clients)."""

    def __init__(self, replicas: list[SidecarProcess], doomed: SidecarProcess, threshold: int) -> None:
        self.killed = False
        self._stop = threading.Event()
        start = sum(served(r) for r in replicas)

        def watch() -> None:
            while not self._stop.wait(0.02):
                if sum(served(r) for r in replicas) - start >= threshold:
                    doomed.kill()
                    self.killed = True
                    return

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = base_parser(__doc__.split("\n")[0], NAME)
    parser.add_argument("--clients", default="16,32", help="client counts, comma-separated")
    parser.add_argument("--requests", type=int, default=240, help="requests of each measured run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--corpus", type=int, default=300, help="videos in the store")
    parser.add_argument("--candidates", type=int, default=200, help="candidates of each request")
    parser.add_argument("--policy", default="10%", help="selection policy")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--frames", default="30,120", help="frame-count range of the videos")
    parser.add_argument("--threads-single", type=int, default=2, help="torch threads of the single replica")
    parser.add_argument("--threads-per-replica", type=int, default=1, help="torch threads of each of two")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the sidecars' batching wait")
    parser.add_argument("--no-control", action="store_true", help="leave out the single_1t runs")
    parser.add_argument("--kill-clients", type=int, default=32)
    parser.add_argument("--kill-after", type=float, default=0.3, help="fraction answered before the kill")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.rounds, args.corpus = "16", 64, 1, 60
    setup_torch(1)
    client_counts = [int(c) for c in args.clients.split(",")]
    frames = tuple(int(f) for f in args.frames.split(","))
    policy = SelectionPolicy.parse(args.policy)
    settings = {"MAX_WAIT_MS": str(args.max_wait_ms), "MAX_INFLIGHT": "256", "CACHE_BYTES": str(256 << 20)}

    with scratch_dir(args.workdir, "dns-replicas-bench-") as work:
        model_dir = write_model_set(work / "models", name="bench", dims=512, bits=512, seed=args.seed,
                                    netvlad_clusters=64, coarse_dim=1024)  # fmt: skip
        models = ModelSet.load(model_dir, device="cpu")
        store = LocalStore(work / "objects")
        corpus = write_corpus(models, store, "bench", args.corpus, seed=args.seed + 1, frames=frames)
        records = list(corpus.values())
        rng = np.random.default_rng(args.seed + 2)

        def item() -> WorkItem:
            query = records[int(rng.integers(len(records)))]
            candidates = candidates_for(query, corpus, "bench")
            picked = rng.choice(len(candidates), size=min(args.candidates, len(candidates)), replace=False)
            return query, [candidates[i] for i in picked]

        def launch(name: str, cores: int) -> SidecarProcess:
            # a replica of `cores` cores: one fine scorer of as many threads (by default its
            # threads are the machine's idle cores)
            cores_settings = {"FINE_SCORERS": "1", "FINE_THREADS": str(cores)}
            return launch_sidecar(model_dir, work / "objects", work / name, torch_threads=cores,
                                  settings={**settings, **cores_settings})  # fmt: skip

        single = launch("single", args.threads_single)
        pair = [launch(f"replica{i}", args.threads_per_replica) for i in range(2)]
        control = None if args.no_control else launch("single_1t", args.threads_per_replica)
        processes = [single, *pair] + ([control] if control else [])
        try:
            for process in processes:
                process.wait_ready()
            # Each replica reads and caches every tensor once before anything is measured.
            everything = [(q, candidates_for(q, corpus, "bench")) for q in records[:2]]
            warm_all = SelectionPolicy.parse("all")
            for process in processes:
                run_load([process.grpc_target], everything, 4, warm_all, args.top_k)
                run_load([process.grpc_target], [item() for _ in range(32)], 8, policy, args.top_k)

            runs: list[dict[str, Any]] = []
            for round_index in range(args.rounds):
                for clients in client_counts:
                    items = [item() for _ in range(args.requests)]
                    order = [("single", [single.grpc_target]), ("replicas", [p.grpc_target for p in pair])]
                    if control is not None:
                        order.append(("single_1t", [control.grpc_target]))
                    order = order[round_index % len(order) :] + order[: round_index % len(order)]
                    for config, targets in order:
                        before = [served(p) for p in pair]
                        result = run_load(targets, items, clients, policy, args.top_k)
                        if config == "replicas":  # how the client spread the calls
                            result["served_by_replica"] = [served(p) - b for p, b in zip(pair, before)]
                        runs.append({"config": config, "round": round_index, **result})
                        spread = result.get("served_by_replica", "")
                        print(f"round {round_index} {config:8s} {clients:2d} clients: "
                              f"{result['throughput_rps']:6.1f} req/s, p99 {result['latency_ms']['p99']} ms, "
                              f"failed {result['failed']}, load {result['load_average_1m']} "
                              f"{spread}")  # fmt: skip

                # the kill run: one of the two replicas dies once kill_after of the work is answered
                items = [item() for _ in range(args.requests)]
                killer = Killer(pair, pair[1], int(args.kill_after * len(items)))
                result = run_load([p.grpc_target for p in pair], items, args.kill_clients, policy, args.top_k)
                killer.join()
                runs.append({"config": "kill", "round": round_index, "killed": killer.killed, **result})
                print(f"round {round_index} kill     {args.kill_clients:2d} clients: "
                      f"{result['ok']}/{result['requests']} ok, failed {result['failed']}, "
                      f"{result['throughput_rps']:6.1f} req/s, p99 {result['latency_ms']['p99']} ms, "
                      f"max {result['latency_ms']['max']} ms")  # fmt: skip
                # a fresh replica in its place for the next round
                pair[1] = launch("replica1", args.threads_per_replica).wait_ready()
                processes[2] = pair[1]
                run_load([pair[1].grpc_target], everything, 4, warm_all, args.top_k)
        finally:
            for process in processes:
                process.stop()

    summary = summarize(runs, client_counts)
    print()
    print_table(
        ["clients", "config", "req/s min", "req/s median", "p99 ms min", "p99 ms median", "failed"],
        [
            (row["clients"], row["config"], row["throughput_rps"]["min"], row["throughput_rps"]["median"],
             row["p99_ms"]["min"], row["p99_ms"]["median"], row["failed"])
            for row in summary["configs"]
        ],
    )  # fmt: skip
    for clients, r in summary["ratios"].items():
        print(f"{clients} clients: replicas / single throughput (median) {r['throughput_median']}, "
              f"p99 {r['p99_median']}; replicas / single_1t throughput "
              f"{r.get('throughput_vs_single_1t_median')}")  # fmt: skip
    kill = summary["kill"]
    print(f"kill runs: {kill['failed']} failed searches of {kill['requests']} ({kill['runs']} runs)")
    write_report(args.out, NAME, args, {"runs": runs, "summary": summary})
    return 0 if kill["failed"] == 0 else 1


def summarize(runs: list[dict[str, Any]], client_counts: list[int]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float]:
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    configs = []
    for clients in client_counts:
        for config in ("single", "replicas", "single_1t"):
            chosen = [r for r in runs if r["config"] == config and r["clients"] == clients]
            if chosen:
                configs.append({
                    "clients": clients, "config": config, "rounds": len(chosen),
                    "throughput_rps": stats([r["throughput_rps"] for r in chosen]),
                    "p99_ms": stats([r["latency_ms"]["p99"] for r in chosen]),
                    "failed": sum(r["failed"] for r in chosen),
                    "load_average_1m": [r["load_average_1m"] for r in chosen],
                })  # fmt: skip
    by_key = {(c["clients"], c["config"]): c for c in configs}
    ratios = {}
    for clients in client_counts:
        if (clients, "single") in by_key and (clients, "replicas") in by_key:
            one, two = by_key[(clients, "single")], by_key[(clients, "replicas")]
            ratios[clients] = {
                "throughput_median": ratio(two["throughput_rps"]["median"], one["throughput_rps"]["median"]),
                "p99_median": ratio(two["p99_ms"]["median"], one["p99_ms"]["median"]),
            }
            alone = by_key.get((clients, "single_1t"))
            if alone is not None:  # two replicas against one of them alone
                ratios[clients]["throughput_vs_single_1t_median"] = ratio(
                    two["throughput_rps"]["median"], alone["throughput_rps"]["median"]
                )
    kills = [r for r in runs if r["config"] == "kill"]
    return {
        "configs": configs,
        "ratios": ratios,
        "kill": {
            "runs": len(kills),
            "requests": sum(r["requests"] for r in kills),
            "failed": sum(r["failed"] for r in kills),
            "all_killed_mid_run": all(r["killed"] for r in kills),
            "throughput_rps": stats([r["throughput_rps"] for r in kills]) if kills else None,
            "p99_ms": stats([r["latency_ms"]["p99"] for r in kills]) if kills else None,
            "max_ms": max((r["latency_ms"]["max"] for r in kills), default=None),
        },
    }


if __name__ == "__main__":
    raise SystemExit(main())
