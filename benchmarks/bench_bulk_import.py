"""Rows per second into a Milvus server: bulk import (Parquet files + the Import API) against
upserts, in one run.

The embedded Milvus standalone server (PyPI ``milvus``, local storage) receives ``--rows`` rows
of a DnS collection (1024-d coarse vectors, the scalar fields, a small JSON metadata) per run,
into a fresh collection each time, by:

- **upsert**: ``VideoCollection.upsert`` (batches of up to 1,000 rows / 16 MiB), then one Strong
  count that waits until the server has applied them;
- **import**: ``dns_milvus.milvus.bulk.import_rows``: the existence check of the ids, the
  Parquet files (pymilvus ``LocalBulkWriter``), the import tasks until the server reports them
  completed (rows persisted, indexed and loaded), and the read-back of every id.

The methods alternate (upsert, import, upsert, import, ...) so both meet the same load; min and
median of ``--repeats`` runs are reported with the load average, and the import's time is split
into its steps. Objects are not part of this measurement (the same for both ways).

    python benchmarks/bench_bulk_import.py [--rows 20000] [--repeats 3] [--quick]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    SUMMARY_HEADERS,
    base_parser,
    collection_name,
    milvus_server,
    print_table,
    ratio,
    runs_summary,
    scratch_dir,
    summary_row,
    write_report,
)

NAME = "bulk_import"
DIM = 1024


def make_rows(n: int, seed: int) -> list[Any]:
    from dns_milvus.milvus import VideoRow

    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((n, DIM), dtype=np.float32)
    coarse /= np.linalg.norm(coarse, axis=1, keepdims=True)
    return [
        VideoRow(
            video_id=f"video{i:07d}",
            coarse=coarse[i],
            self_sim=float(rng.random()),
            fine_key=f"fine/bench/{i:07d}",
            n_frames=int(rng.integers(30, 121)),
            payload_kind="bits512",
            metadata={"source": f"clip{i}.mp4", "group": int(i % 97)},
        )
        for i in range(n)
    ]


def fresh_collection(client: Any) -> Any:
    from dns_milvus.milvus import VideoCollection

    return VideoCollection.create(client, collection_name("bbulk"), model_set="bench", dim=DIM)


def count_strong(collection: Any) -> int:
    rows = collection.client.query(collection.name, filter="", output_fields=["count(*)"],
                                   consistency_level="Strong")  # fmt: skip
    return int(rows[0]["count(*)"])


def run_upsert(client: Any, rows: list[Any]) -> dict[str, Any]:
    collection = fresh_collection(client)
    try:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        collection.upsert(rows)
        t1 = time.perf_counter()
        assert count_strong(collection) == len(rows)
        t2 = time.perf_counter()
        return {"seconds": t2 - t0, "steps": {"upsert": t1 - t0, "visible": t2 - t1}, "load_1m": load}
    finally:
        collection.drop()


def run_import(client: Any, rows: list[Any], staging: Path) -> dict[str, Any]:
    from dns_milvus.milvus.bulk import import_rows

    collection = fresh_collection(client)
    try:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        report = import_rows(collection, rows, staging)
        seconds = time.perf_counter() - t0
        assert len(report.imported) == len(rows) and count_strong(collection) == len(rows)
        return {"seconds": seconds, "steps": report.seconds, "files": len(report.files), "load_1m": load}
    finally:
        collection.drop()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], NAME)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.repeats = 2000, 1
    from dns_milvus.milvus import connect

    rows = make_rows(args.rows, args.seed)
    results: dict[str, list[dict[str, Any]]] = {"upsert": [], "import": []}
    with scratch_dir(args.workdir, "bench-bulk-") as work, milvus_server(work / "milvus") as uri:
        client = connect(uri)
        for rep in range(args.repeats):
            print(f"repeat {rep + 1}/{args.repeats}", flush=True)
            results["upsert"].append(run_upsert(client, rows))
            results["import"].append(run_import(client, rows, work / "staging"))
        client.close()

    summary = {}
    for name, runs in results.items():
        summary[name] = runs_summary(runs, args.rows)
        summary[name]["steps_median"] = {
            k: round(statistics.median(r["steps"][k] for r in runs), 2) for k in runs[0]["steps"]
        }
    print(f"\n{args.rows} rows of a {DIM}-d DnS collection into the embedded Milvus server")
    print_table(SUMMARY_HEADERS, [summary_row(name, summary[name]) for name in summary])  # per s: rows
    for name in summary:
        print(f"{name} steps (median s): {summary[name]['steps_median']}")
    speedup = ratio(summary["upsert"]["seconds_median"], summary["import"]["seconds_median"])
    print(f"import vs upsert: {speedup}x (median seconds)")
    write_report(args.out, NAME, args, {"rows": args.rows, "results": summary, "import_vs_upsert": speedup})


if __name__ == "__main__":
    main()
