"""One measured ingest run in a fresh interpreter, for the ingestion benchmarks.

``bench_ingest.py`` and ``bench_video_ingest.py`` compare the current tree with a baseline (a git
worktree of an earlier commit) in the same invocation: each run is this script, started with
``PYTHONPATH`` naming the tree whose ``dns_milvus`` it measures, so that both trees run in the
same conditions (a fresh process, the same inputs, the same threads) and their runs interleave.
Only what both trees have is used: ``DnSIndex``, ``ModelSet``, ``ingest``, ``hdf5_source``,
``file_source`` (the baseline's way to ingest video files) and ``video_source`` where present.

    PYTHONPATH=TREE python benchmarks/_ingest_worker.py '{"tree": ..., "models": ..., ...}'

prints one JSON line: the rate, the report's stage split, the GEMM rate just before, and (with
``records``) writes every indexed video's coarse vector, self-similarity and fine codes to an
``.npz`` file for the caller to compare trees and settings.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import gemm_gflops


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import dns_milvus
    from dns_milvus import ingest as ingest_module
    from dns_milvus.engine import DnSIndex, ModelSet

    tree = Path(spec["tree"]).resolve()
    if not Path(dns_milvus.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"dns_milvus comes from {dns_milvus.__file__}, not from {tree}: check PYTHONPATH")
    torch.set_num_threads(spec["threads"])
    device = spec.get("device", "cpu")
    models = ModelSet.load(spec["models"], device=device)
    extractor = models.extractor if spec["kind"] == "videos" else None
    for key, value in spec.get("extractor", {}).items():  # e.g. chunk_size, precision (new tree only)
        if not hasattr(extractor, key):
            raise SystemExit(f"this tree's FeatureExtractor has no {key!r}")
        setattr(extractor, key, value)

    with tempfile.TemporaryDirectory(prefix="dns-ingest-run-", dir=spec.get("workdir")) as tmp:
        work = Path(tmp)
        index = DnSIndex(
            str(work / "run.db"),
            models=models,
            store=f"file://{work / 'objects'}?fsync={str(spec.get('fsync', True)).lower()}",
            collection="bench_ingest",
        )
        items, warm = _source(spec, models, ingest_module)
        warm()  # first calls build kernels and caches: not part of any tree's rate
        options = dict(spec.get("options", {}))
        gemm = gemm_gflops()
        load_before = os.getloadavg()[0]
        cpu_before = _cpu_seconds()
        started = time.perf_counter()
        report = ingest_module.ingest(index, items, batch_size=spec["batch_size"], progress=False, **options)
        wall = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_before
        result = {
            "tree": str(tree),
            "label": spec.get("label", ""),
            "videos": len(report.added),
            "failed": len(report.failed),
            "failures": dict(list(report.failed.items())[:5]),
            "seconds": round(report.seconds, 3),
            "wall_seconds": round(wall, 3),
            "videos_per_s": round(report.videos_per_second, 3),
            # CPU time of all the process's threads: on a machine shared with other work, a
            # process with more runnable threads gets a larger share of it, which wall time
            # rewards; CPU seconds a video measure the work itself.
            "cpu_seconds": round(cpu, 3),
            "cpu_ms_per_video": round(1000 * cpu / max(1, len(report.added)), 2),
            "stage_seconds": {k: round(v, 3) for k, v in report.stage_seconds.items()},
            "load_busy_seconds": round(getattr(report, "load_busy_seconds", 0.0), 3),
            "gemm_gflops_before": round(gemm, 1),
            "load_average_before": round(load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2),
            "device": device,
        }
        if spec.get("records"):
            _write_records(index, report.added, Path(spec["records"]))
        index.close()
    return result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _source(spec: dict[str, Any], models: Any, ingest_module: Any) -> tuple[Any, Any]:
    """The run's items and a warm-up that exercises the same code on a little input."""
    if spec["kind"] == "hdf5":
        ids = spec.get("ids")
        items = ingest_module.hdf5_source(spec["h5"], ids)

        def warm_networks() -> None:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((40, models.regions or 9, models.feature_dim)).astype(np.float32)
            models.index_features([x / np.linalg.norm(x, axis=-1, keepdims=True)] * 2)

        return items, warm_networks
    files = [Path(p) for p in spec["files"]]
    max_frames = spec.get("max_frames")
    if hasattr(ingest_module, "video_source") and not spec.get("per_video"):
        items = ingest_module.video_source(files, models, max_frames=max_frames)
    else:  # the baseline's (and the CLI's) way: each load extracts its video's features
        items = ingest_module.file_source(
            files, lambda path: models.extract_video(path, max_frames=max_frames), id_from="stem"
        )

    def warm_extractor() -> None:
        models.index_features([models.extract_video(files[0], max_frames=4)])

    return items, warm_extractor


def _write_records(index: Any, video_ids: list[str], path: Path) -> None:
    ids = sorted(video_ids)
    records = [index.load_record(vid) for vid in ids]
    np.savez(
        path,
        ids=np.array(ids),
        coarse=np.stack([r.coarse for r in records]),
        self_sim=np.array([r.self_sim for r in records], dtype=np.float64),
        frames=np.array([r.n_frames for r in records]),
        fine=np.concatenate([np.asarray(r.fine).reshape(-1) for r in records]),
    )


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
