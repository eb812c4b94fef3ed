"""Ingestion throughput: an HDF5 feature file into Milvus Lite + a local object store.

The HDF5 file holds synthetic region features in the DnS release layout (one float32 dataset
[T, 9, 512] per video id, T drawn from 30-120). Release-size networks (64-cluster coarse head ->
1024-d, 512-bit binarization student, selector) index every video; ``dns_milvus.ingest`` writes
the objects (verified) and upserts the rows. Reported:

- the headline: this tree against a baseline tree (``--baseline``, a git worktree of an earlier
  commit; ``none`` to skip), each run in a fresh interpreter (``_ingest_worker.py``), the runs
  interleaved in rotating order for ``--rounds`` rounds: min / median videos/s, the per-stage
  split of ``IngestReport.stage_seconds`` of the median run, and each run's share of the compute
  ceiling (its rate times the work per video over the GEMM rate measured just before it);
- a sweep on the first ``--sweep-videos`` videos, side by side in one run: batch sizes 16/64/128,
  fsync off, length-sorted ids (less padding), one torch thread;
- where the time goes: each network timed on one batch side by side, padded (``index_video`` on
  the zero-padded batch) and packed (``index_packed``, what indexing runs), with their largest
  output difference; the floating-point work per video (torch's FLOP counter) against this
  machine's measured GEMM rate (the compute ceiling); and a cProfile of an ingest run.

    python benchmarks/bench_ingest.py [--videos 2000] [--batch-size 64] [--rounds 3] [--quick]
    python benchmarks/bench_ingest.py --device cuda --baseline none   # on a GPU (gpu_check.sh)
"""

from __future__ import annotations

import cProfile
import io
import pstats
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    DEFAULT_FRAMES,
    Stopwatch,
    base_parser,
    collection_name,
    frame_counts,
    gemm_gflops,
    make_model_set,
    parse_frames,
    print_table,
    random_features,
    ratio,
    scratch_dir,
    settle_disk,
    setup_torch,
    summarize,
    write_report,
)
from _compare import DEFAULT_BASELINE, HERE, check_tree, interleave, min_median, rate_summary

from dns_milvus.milvus import release_lite

NAME = "ingest"
TARGET_VIDEOS_PER_S = 200.0
STAGES = ("hdf5_read", "load", "networks", "store", "milvus", "other")


# -- inputs --------------------------------------------------------------------------------------


def write_h5(path: Path, n_videos: int, frames: tuple[int, int], rng: np.random.Generator) -> list[int]:
    """Synthetic features file in the DnS layout; returns the frame counts in id order."""
    import h5py

    lengths = [int(n) for n in frame_counts(rng, n_videos, frames)]
    with h5py.File(path, "w") as f:
        for i, n in enumerate(lengths):
            f.create_dataset(video_id(i), data=random_features(rng, n))
    return lengths


def video_id(i: int) -> str:
    return f"video{i:05d}"


def timed_source(items: Iterable[Any], watch: Stopwatch) -> Iterator[Any]:
    """Pass items through, timing the source's own work (hdf5_source lists the file here; each
    item's load reads its dataset in the pipeline's read-ahead threads)."""
    iterator = iter(items)
    while True:
        with watch("hdf5_read"):
            item = next(iterator, None)
        if item is None:
            return
        yield item


# -- one ingest run ------------------------------------------------------------------------------


def run_ingest(
    h5: Path,
    ids: list[str],
    frames: dict[str, int],
    work: Path,
    models: Any,
    label: str,
    *,
    batch_size: int,
    fsync: bool = True,
    profile: bool = False,
) -> dict[str, Any]:
    """Ingest ``ids`` (in this order) from ``h5`` into a fresh Lite database and store; returns
    rates, the stage split and how much of the networks' work is padding (``frames``: T by id)."""
    from dns_milvus.engine import DnSIndex
    from dns_milvus.ingest import hdf5_source, ingest

    settle_disk()
    db, objects = work / f"{label}.db", work / f"objects-{label}"
    index = DnSIndex(
        str(db),
        models=models,
        store=f"file://{objects}?fsync={str(fsync).lower()}",
        collection=collection_name("ingest"),
    )
    watch = Stopwatch()
    load_probe = gemm_gflops()  # how much of the CPU this run got, to read the sweep's ratios with
    profiler = cProfile.Profile() if profile else None
    try:
        if profiler:
            profiler.enable()
        report = ingest(
            index,
            timed_source(hdf5_source(h5, ids), watch),
            batch_size=batch_size,
            progress=False,
            total=len(ids),
        )
        if profiler:
            profiler.disable()
        if report.failed or index.count() != len(ids):
            raise RuntimeError(
                f"{label}: {len(report.failed)} videos failed, {index.count()} rows: "
                f"{list(report.failed.items())[:3]}"
            )
    finally:
        index.close()
        release_lite(db)
        shutil.rmtree(objects, ignore_errors=True)
        shutil.rmtree(db, ignore_errors=True)
    stages = {"hdf5_read": watch.seconds.get("hdf5_read", 0.0), **report.stage_seconds}
    stages["other"] = max(0.0, report.seconds - sum(stages.values()))
    result = {
        "label": label,
        "videos": len(report.added),
        "batch_size": batch_size,
        "fsync": fsync,
        "gemm_gflops_before": round(load_probe, 1),
        "padding_efficiency": round(padding_efficiency([frames[v] for v in ids], batch_size), 3),
        "seconds": round(report.seconds, 3),
        "videos_per_s": round(report.videos_per_second, 2),
        "stage_seconds": {k: round(stages[k], 3) for k in STAGES},
        "stage_ms_per_video": {k: round(1000 * stages[k] / len(ids), 2) for k in STAGES},
        "stage_share_pct": {k: round(100 * stages[k] / report.seconds, 1) for k in STAGES},
    }
    if profiler:
        result["profile"] = top_functions(profiler, 15)
    return result


def top_functions(profiler: cProfile.Profile, n: int) -> list[dict[str, Any]]:
    """The ``n`` functions with the most own time (torch kernels show as their C entry points)."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = func if filename == "~" else f"{_short_path(filename)}:{line}({func})"
        rows.append(
            {"function": where, "calls": calls, "own_s": round(tottime, 3), "cumulative_s": round(cumtime, 3)}
        )
    rows.sort(key=lambda r: -r["own_s"])
    return rows[:n]


def _short_path(filename: str) -> str:
    for marker in ("dns_milvus/", "site-packages/"):
        if marker in filename:
            return (
                filename.split(marker, 1)[1]
                if marker == "site-packages/"
                else marker + filename.split(marker, 1)[1]
            )
    return Path(filename).name


# -- where the networks' time goes ------------------------------------------------------------------


def padding_efficiency(lengths: list[int], batch_size: int) -> float:
    """Real frames / frames computed when consecutive videos are padded to their batch's longest."""
    padded = sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size])
        for i in range(0, len(lengths), batch_size)
    )
    return sum(lengths) / padded


def gemm_rate(device: torch.device) -> float:
    """The float32 GEMM rate of ``device`` on the networks' typical shape (the CPU's: ``_common``)."""
    if device.type != "cuda":
        return gemm_gflops()
    a, b = torch.randn(8192, 512, device=device), torch.randn(512, 512, device=device)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    repeats = 200
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * 8192 * 512 * 512 * repeats / (time.perf_counter() - start) / 1e9


def _synced(device: torch.device, value: Any = None) -> Any:
    """``value`` once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value


@torch.inference_mode()
def network_split(
    models: Any, features: list[np.ndarray], device: torch.device, repeats: int = 2
) -> dict[str, Any]:
    """Each network on one batch, side by side: padded (``index_video`` on the zero-padded
    batch, the way indexing ran before packing) and packed (``index_packed``, what
    ``ModelSet.index_features`` runs), with the largest output difference; plus the whole
    ``index_features`` call. Each piece's best of ``repeats`` rounds (the box may be shared)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dns_milvus.similarity import pack_codes, pack_signs

    models.index_features(features[:2])  # warm-up
    tensors = [torch.from_numpy(f).to(device) for f in features]
    lengths = torch.tensor([t.shape[0] for t in tensors], device=device)
    packed = torch.cat(tensors)
    batch = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True)
    mask = torch.arange(batch.shape[1], device=device)[None, :] < lengths[:, None]
    nets = {"coarse student": models.coarse, "selector self-similarity": models.selector}
    rounds, outputs = [], {}
    for _ in range(repeats):
        watch = Stopwatch()
        for name, net in nets.items():
            with watch(f"{name}, padded"):
                outputs[f"{name}, padded"] = _synced(device, net.index_video(batch, mask))
            with watch(f"{name}, packed"):
                outputs[f"{name}, packed"] = _synced(device, net.index_packed(packed, lengths))
        with watch("fine student + code packing, padded"):
            codes = models.fine.index_video(batch, mask).cpu()
            padded_bytes = [pack_codes(codes[i, :n].numpy()) for i, n in enumerate(lengths.tolist())]
        with watch("fine student + code packing, packed"):
            packed_bytes = pack_signs(models.fine.index_packed_signs(packed, lengths).cpu().numpy())
        with watch("index_features (whole call)"):
            models.index_features(features)
        rounds.append(watch.seconds)
    seconds = {name: min(r[name] for r in rounds) for name in rounds[0]}
    differences = {
        name: float((outputs[f"{name}, padded"] - outputs[f"{name}, packed"]).abs().max()) for name in nets
    }
    differences["fine codes (differing bytes)"] = int((np.concatenate(padded_bytes) != packed_bytes).sum())
    n = len(features)
    flops = {}
    for label, run in (
        ("padded", lambda: [net.index_video(batch, mask) for net in (*nets.values(), models.fine)]),
        ("packed", lambda: models.index_features(features)),
    ):
        counter = FlopCounterMode(display=False)
        with counter:
            run()
        flops[label] = round(counter.get_total_flops() / n / 1e9, 3)
    padded_total = sum(v for k, v in seconds.items() if k.endswith(", padded"))
    packed_total = sum(v for k, v in seconds.items() if k.endswith(", packed"))
    return {
        "videos": n,
        "repeats": repeats,
        "device": str(device),
        "frames_real": int(lengths.sum()),
        "frames_padded": int(batch.shape[0] * batch.shape[1]),
        "ms_per_video": {k: round(1000 * v / n, 2) for k, v in seconds.items()},
        "max_abs_difference_padded_vs_packed": differences,
        "gflop_per_video": flops["packed"],
        "gflop_per_video_padded": flops["padded"],
        "packed_speedup": ratio(padded_total, packed_total),
    }


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument("--videos", type=int, default=2000, help="videos in the HDF5 file (headline run)")
    parser.add_argument(
        "--frames", type=parse_frames, default=DEFAULT_FRAMES, help="frame-count range LOW-HIGH"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the headline run")
    parser.add_argument(
        "--fsync",
        choices=("on", "off"),
        default="on",
        help="object-store fsync in the headline run (on = the store's default)",
    )
    parser.add_argument("--sweep", default="16,64,128", help="batch sizes of the sweep")
    parser.add_argument(
        "--sweep-videos", type=int, default=128, help="videos in each sweep run (0: no sweep)"
    )
    parser.add_argument("--split-videos", type=int, default=32, help="videos in the per-network timing")
    parser.add_argument("--profile-videos", type=int, default=64, help="videos in the cProfile run (0: none)")
    parser.add_argument(
        "--h5", type=Path, default=None, help="existing HDF5 feature file to ingest instead of generating one"
    )
    parser.add_argument("--device", default="cpu", help="torch device of the networks: cpu, cuda, cuda:N")
    parser.add_argument(
        "--baseline",
        default=str(DEFAULT_BASELINE),
        help="worktree of the baseline commit, or 'none' (default: %(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the headline")
    args = parser.parse_args(argv)
    if args.quick:
        args.videos, args.sweep_videos, args.profile_videos = min(args.videos, 24), 16, 8
        args.batch_size, args.sweep, args.split_videos, args.rounds = 8, "8,16", 8, 1
    setup_torch(args.threads)
    device = torch.device(args.device)
    baseline = None if args.baseline == "none" else check_tree(Path(args.baseline))
    sweep_sizes = [int(s) for s in args.sweep.split(",") if s.strip()]
    rng = np.random.default_rng(args.seed)

    with scratch_dir(args.workdir, "dns-bench-ingest-") as work:
        from dns_milvus.engine import ModelSet

        models = ModelSet.load(make_model_set(work / "models", seed=args.seed), device=args.device)
        h5 = args.h5 or work / "features.h5"
        started = time.perf_counter()
        if args.h5 is None:
            lengths = write_h5(h5, args.videos, args.frames, rng)
        else:
            import h5py

            with h5py.File(h5, "r") as f:
                lengths = [f[video_id(i)].shape[0] for i in range(args.videos)]
        h5_seconds = time.perf_counter() - started
        ids = [video_id(i) for i in range(len(lengths))]
        frames = dict(zip(ids, lengths))
        h5_bytes = h5.stat().st_size
        print(
            f"HDF5: {len(ids)} videos, T {min(lengths)}-{max(lengths)} (mean {np.mean(lengths):.1f}), "
            f"{h5_bytes / 2**20:.0f} MiB, written in {h5_seconds:.1f} s"
        )

        split_n = min(args.split_videos, len(ids))
        split = network_split(models, [random_features(rng, n) for n in lengths[:split_n]], device)
        gflops = gemm_rate(device)
        print(
            f"networks on one batch of {split_n}: {split['gflop_per_video']} GFLOP/video as executed; "
            f"this machine's GEMM rate {gflops:.1f} GFLOP/s ({device})"
        )

        spec = {
            "kind": "hdf5",
            "h5": str(h5),
            "ids": ids,
            "models": str(work / "models"),
            "threads": args.threads,
            "device": args.device,
            "batch_size": args.batch_size,
            "fsync": args.fsync == "on",
            "workdir": str(work),
        }
        variants = {"current": (HERE, spec)}
        if baseline is not None:
            variants = {"baseline": (baseline, spec), **variants}
        print(f"headline: {len(ids)} videos, {args.rounds} interleaved rounds")
        rounds = interleave(variants, args.rounds)
        for runs in rounds.values():
            for run in runs:  # this run's share of the ceiling, at the GEMM rate measured before it
                run["over_compute_ceiling"] = round(
                    run["videos_per_s"] * split["gflop_per_video"] / run["gemm_gflops_before"], 3
                )
        headline_summary = {name: rate_summary(runs) for name, runs in rounds.items()}
        for name, runs in rounds.items():
            headline_summary[name]["over_compute_ceiling"] = min_median(
                [r["over_compute_ceiling"] for r in runs]
            )
        headline = headline_summary["current"]["median_run"]

        sweep: list[dict[str, Any]] = []
        if args.sweep_videos:
            sub = ids[: args.sweep_videos]
            by_length = sorted(sub, key=frames.__getitem__)
            for size in sweep_sizes:
                sweep.append(run_ingest(h5, sub, frames, work, models, f"batch{size}", batch_size=size))
            base = args.batch_size if args.batch_size in sweep_sizes else sweep_sizes[-1]
            sweep.append(
                run_ingest(
                    h5, sub, frames, work, models, f"batch{base}-fsync-off", batch_size=base, fsync=False
                )
            )
            sweep.append(
                run_ingest(h5, by_length, frames, work, models, f"batch{base}-length-sorted", batch_size=base)
            )
            # One torch thread: on a busy 2-core box, two OpenMP threads wait on each other.
            setup_torch(1)
            sweep.append(run_ingest(h5, sub, frames, work, models, f"batch{base}-1-thread", batch_size=base))
            setup_torch(args.threads)
        profile: dict[str, Any] = {}
        if args.profile_videos:
            profile = run_ingest(
                h5,
                ids[: args.profile_videos],
                frames,
                work,
                models,
                "profiled",
                batch_size=args.batch_size,
                profile=True,
            )

    print(
        "\nheadline, interleaved rounds (over ceiling: rate x GFLOP/video / GEMM rate just before the run):"
    )
    print_table(
        [
            "variant",
            "videos/s min",
            "median",
            "max",
            "over ceiling min",
            "median",
            "CPU ms/video",
            "load avg",
        ],
        [
            [
                name,
                h["videos_per_s"]["min"],
                h["videos_per_s"]["median"],
                h["videos_per_s"]["max"],
                h["over_compute_ceiling"]["min"],
                h["over_compute_ceiling"]["median"],
                h["cpu_ms_per_video"]["median"],
                h["load_average"]["median"],
            ]
            for name, h in headline_summary.items()
        ],
    )
    print("stage split of the median runs, ms per video:")
    for name, h in headline_summary.items():
        run = h["median_run"]
        print(
            f"  {name:<9} "
            + ", ".join(
                f"{k} {1000 * v / max(1, run['videos']):.2f}" for k, v in run["stage_seconds"].items()
            )
        )
    if sweep:
        print(
            "\nper-stage split, ms per video (hdf5_read: the source iterator's own time; load: waiting for "
            "the read-ahead threads' reads;"
            " other: skip-existing lookups, Lite flushes they trigger, bookkeeping)"
        )
        runs = list(sweep)
        print_table(
            ["run", "videos", "videos/s", *STAGES, "pad eff", "GEMM GF/s"],
            [
                [
                    r["label"],
                    r["videos"],
                    r["videos_per_s"],
                    *r["stage_ms_per_video"].values(),
                    r["padding_efficiency"],
                    r["gemm_gflops_before"],
                ]
                for r in runs
            ],
        )
        print(
            "(pad eff: real frames / frames of the padded batches; only self-attention, NetVLAD's sums and "
            "the selector's comparator see padding now; GEMM GF/s: the float32 GEMM "
            "rate measured just before each run, lower = a busier machine)"
        )

    print(
        f"\nnetworks, one batch of {split['videos']} (real frames {split['frames_real']}, "
        f"padded {split['frames_padded']}), ms per video (padded = index_video on the zero-padded "
        "batch, packed = index_packed, what indexing runs):"
    )
    for part, ms in split["ms_per_video"].items():
        print(f"  {part:<42} {ms:>9.2f}")
    print(
        f"packed over padded: {split['packed_speedup']}x faster; GFLOP/video {split['gflop_per_video']} "
        f"packed vs {split['gflop_per_video_padded']} padded (the padded count misses the transformer: "
        "torch's fused encoder path has no FLOP formula); max |difference| "
        + ", ".join(f"{k} {v:.2g}" for k, v in split["max_abs_difference_padded_vs_packed"].items())
    )
    ceiling = gflops / split["gflop_per_video"]
    print(
        f"compute ceiling at the measured GEMM rate: {gflops:.1f} / {split['gflop_per_video']} = "
        f"{ceiling:.1f} videos/s (networks alone, every FLOP at the GEMM rate)"
    )
    if profile:
        print(f"\ncProfile of {profile['videos']} videos, top functions by own time:")
        print_table(
            ["function", "calls", "own s", "cum s"],
            [
                [p["function"][:70], p["calls"], p["own_s"], p["cumulative_s"]]
                for p in profile["profile"][:12]
            ],
        )

    ratios: dict[str, Any] = {
        "headline_over_target": ratio(headline["videos_per_s"], TARGET_VIDEOS_PER_S, 3),
        "compute_ceiling_over_target": ratio(ceiling, TARGET_VIDEOS_PER_S, 3),
        "headline_over_compute_ceiling_median": headline_summary["current"]["over_compute_ceiling"]["median"],
        "headline_over_compute_ceiling_min": headline_summary["current"]["over_compute_ceiling"]["min"],
        "networks_packed_over_padded_speed": split["packed_speedup"],
    }
    if "baseline" in headline_summary:
        for stat in ("min", "median"):
            ratios[f"current_over_baseline_{stat}"] = ratio(
                headline_summary["current"]["videos_per_s"][stat],
                headline_summary["baseline"]["videos_per_s"][stat],
            )
        ratios["current_over_baseline_per_round"] = [
            round(c["videos_per_s"] / b["videos_per_s"], 2)
            for c, b in zip(rounds["current"], rounds["baseline"], strict=True)
        ]
    if sweep:
        rate = {r["label"]: r["videos_per_s"] for r in sweep}
        base_label = f"batch{base}"
        for r in sweep:
            if r["label"] != base_label:
                ratios[f"{r['label']}_vs_{base_label}"] = ratio(r["videos_per_s"], rate[base_label])
    print("\nratios:")
    for key, value in ratios.items():
        print(f"  {key:<45} {value}")
    met = headline["videos_per_s"] >= TARGET_VIDEOS_PER_S
    print(
        f"\ntarget >= {TARGET_VIDEOS_PER_S:.0f} videos/s on {args.threads} threads: "
        f"{'met' if met else 'NOT met'} ({headline['videos_per_s']:.2f} videos/s)"
    )

    write_report(
        args.out,
        NAME,
        args,
        {
            "hdf5": {
                "videos": len(ids),
                "frames": summarize(lengths),
                "bytes": h5_bytes,
                "write_seconds": round(h5_seconds, 2),
            },
            "target_videos_per_s": TARGET_VIDEOS_PER_S,
            "target_met": met,
            "headline": headline_summary,
            "headline_runs": rounds,
            "baseline_tree": None if baseline is None else str(baseline),
            "sweep": sweep,
            "network_split": split,
            "gemm_gflops": round(gflops, 2),
            "compute_ceiling_videos_per_s": round(ceiling, 2),
            "profile": profile,
            "ratios": ratios,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
