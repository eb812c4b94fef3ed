"""Fine-grained similarity of the binarization student: the release's way vs packed codes.

One run on fixed random inputs: a 60-frame query against N targets of 30-120 frames (9 regions,
512 bits). It measures, in pairs per second:

(a) the release's way: one pair at a time, ``einsum`` over float ±1 codes, region Chamfer,
    then the video comparator, Hardtanh and frame Chamfer (plain torch, same weights);
(b) ``fine_similarity_packed`` from packed codes (the C Hamming kernel on CPU), with variants
    that show where the time goes (GEMM back-end, comparator batch sizes, channels-last weights).

It also compares exact Hamming-stage candidates on a few targets, and measures what float16
storage of the attention student's tensors does to its similarities. Results are printed and
written as JSON. Example:

    python benchmarks/bench_fine_kernel.py --targets 1000 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dns_milvus.models import FineGrainedStudent
from dns_milvus.similarity import (
    fine_similarity_float,
    fine_similarity_packed,
    pack_codes,
    packed_frame_similarity,
    resolve_backend,
)
from dns_milvus.similarity._native import load_native_kernel
from dns_milvus.similarity.fine import CPU_BATCH_SIZE, CUDA_BATCH_SIZE

QUERY_FRAMES = 60
MIN_FRAMES, MAX_FRAMES = 30, 120
REGIONS, BITS = 9, 512


def random_codes(generator: torch.Generator, frames: int) -> torch.Tensor:
    return torch.randint(0, 2, (frames, REGIONS, BITS), generator=generator).float() * 2 - 1


def make_inputs(seed: int, n_targets: int) -> tuple[FineGrainedStudent, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    student = FineGrainedStudent(binarization=True, bits=BITS).eval()
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(MIN_FRAMES, MAX_FRAMES + 1, (n_targets,), generator=generator).tolist()
    return student, random_codes(generator, QUERY_FRAMES), [random_codes(generator, n) for n in lengths]


# -- (a) the release's way, one pair at a time ----------------------------------------------------


def release_frame_matrix(query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[Tq, R, L] x [Tt, R, L] -> [1, Tq, Tt]: einsum over all region pairs, max over target
    regions, mean over query regions, divided by L, as the release computes it."""
    sim = torch.einsum("aiok,bjpk->aiopjb", query[None], target[None])  # [1, Tq, R, R, Tt, 1]
    sim = sim.max(dim=3, keepdim=True).values.mean(dim=2, keepdim=True).squeeze(3).squeeze(2)
    return (sim / target.shape[-1]).permute(0, 3, 1, 2).reshape(1, query.shape[0], target.shape[0])


def release_comparator(student: FineGrainedStudent, sim: torch.Tensor) -> torch.Tensor:
    """[1, Tq, Tt] -> [1]: zero-pad + conv per layer, ReLU, 2x2 max-pools, 1x1 conv, Hardtanh,
    max over target frames, mean over query frames."""
    head = student.visil_head
    x = sim.unsqueeze(1)
    x = F.max_pool2d(F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1)), head.conv1.weight, head.conv1.bias)), 2)
    x = F.max_pool2d(F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1)), head.conv2.weight, head.conv2.bias)), 2)
    x = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1)), head.conv3.weight, head.conv3.bias))
    x = F.hardtanh(F.conv2d(x, head.fconv.weight, head.fconv.bias)).squeeze(1)
    return x.max(dim=2).values.mean(dim=1)


def run_release(
    student: FineGrainedStudent, query: torch.Tensor, targets: list[torch.Tensor]
) -> dict[str, Any]:
    f2f_s = comparator_s = 0.0
    out = torch.empty(len(targets))
    with torch.no_grad():
        cpu0 = time.process_time()
        for i, t in enumerate(targets):
            t0 = time.perf_counter()
            sim = release_frame_matrix(query, t)
            t1 = time.perf_counter()
            out[i] = release_comparator(student, sim)[0]
            t2 = time.perf_counter()
            f2f_s += t1 - t0
            comparator_s += t2 - t1
    return {"seconds": f2f_s + comparator_s, "cpu_seconds": time.process_time() - cpu0,
            "hamming_chamfer_s": f2f_s, "comparator_s": comparator_s, "scores": out}  # fmt: skip


# -- (b) packed codes ----------------------------------------------------------------------------


def run_packed(
    student: FineGrainedStudent, query: torch.Tensor, targets: list[torch.Tensor], **options: Any
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    cpu0, t0 = time.process_time(), time.perf_counter()
    scores = fine_similarity_packed(student, query, targets, timings=timings, **options)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
            "hamming_chamfer_s": timings["frame_matrices"], "comparator_s": timings["comparator"],
            "scores": scores.cpu()}  # fmt: skip


def interleaved(methods: dict[str, Callable[[slice], dict[str, Any]]], n: int, slices: int) -> dict[str, Any]:
    """Run every method over the same targets, slice by slice, in a rotating order.

    On a machine shared with other work, the load changes over minutes; timing the methods side
    by side on each slice exposes them to the same load, so their ratios stay meaningful. Each
    method's totals cover all n targets; ``slice_speedups`` are per-slice ratios to the first
    method (their median is the robust speed-up)."""
    names = list(methods)
    totals = {name: {"seconds": 0.0, "cpu_seconds": 0.0, "hamming_chamfer_s": 0.0, "comparator_s": 0.0}
              for name in names}  # fmt: skip
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    slice_seconds: dict[str, list[float]] = {name: [] for name in names}
    bounds = np.linspace(0, n, slices + 1).astype(int)
    for k in range(slices):
        part = slice(int(bounds[k]), int(bounds[k + 1]))
        for name in names[k % len(names) :] + names[: k % len(names)]:
            r = methods[name](part)
            for key in totals[name]:
                totals[name][key] += r[key]
            scores[name].append(r["scores"])
            slice_seconds[name].append(r["seconds"])
    base = names[0]
    for name in names:
        totals[name]["pairs_per_s"] = n / totals[name]["seconds"]
        totals[name]["scores"] = torch.cat(scores[name])
        totals[name]["slice_speedups"] = [b / s for b, s in zip(slice_seconds[base], slice_seconds[name])]
    return totals


def hamming_candidates(
    query: torch.Tensor, targets: list[torch.Tensor], device: torch.device
) -> dict[str, float]:
    """Seconds of the Hamming/region-Chamfer stage for these targets, per exact method."""
    packed_q = pack_codes(query)
    frames = torch.cat(targets)
    packed_t = pack_codes(frames)
    tq, n = query.shape[0], frames.shape[0]
    q2, t2 = query.reshape(-1, BITS), frames.reshape(-1, BITS)

    def gemm(dtype: torch.dtype) -> None:
        scores = (q2.to(device, dtype) @ t2.to(device, dtype).T).view(tq, REGIONS, n, REGIONS)
        scores.amax(-1).float().sum(1)

    def int8() -> None:
        scores = torch._int_mm(q2.to(torch.int8), t2.to(torch.int8).T)
        scores.view(tq, REGIONS, n, REGIONS).amax(-1).sum(1)

    def numpy_popcount() -> None:
        qw = packed_q.numpy().view(np.uint64).reshape(tq * REGIONS, 1, -1)
        tw = packed_t.numpy().view(np.uint64).reshape(1, n * REGIONS, -1)
        step = 225 * REGIONS  # target regions a chunk: bounds the XOR temporary to ~80 MB
        ham = np.concatenate(
            [
                np.bitwise_count(qw ^ tw[:, k : k + step]).sum(-1, dtype=np.int32)
                for k in range(0, tw.shape[1], step)
            ],
            axis=1,
        )
        ham.reshape(tq, REGIONS, n, REGIONS).min(-1).sum(1)

    methods: dict[str, Any] = {"gemm_float32": lambda: gemm(torch.float32)}
    if device.type == "cpu":
        methods["gemm_bfloat16"] = lambda: gemm(torch.bfloat16)
        methods["int8_int_mm"] = int8
        methods["numpy_xor_bitwise_count"] = numpy_popcount
        if load_native_kernel() is not None:
            methods["native_c_kernel"] = lambda: packed_frame_similarity(packed_q, packed_t, backend="native")
    else:
        methods["gemm_float16"] = lambda: gemm(torch.float16)
    seconds = {}
    with torch.inference_mode():
        for name, fn in methods.items():
            runs = []
            for _ in range(2):  # the faster of two calls: the first also pays one-time costs
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - t0)
            seconds[name] = min(runs)
    return seconds


# -- float16 storage of the attention student ----------------------------------------------------


def float16_storage_effect(seed: int, n_targets: int) -> dict[str, dict[str, Any]]:
    """Max / mean |s(float16 tensors) - s(float32 tensors)| of the attention student, for the
    frame-to-frame matrices (independent of the comparator's weights) and the video scores."""
    torch.manual_seed(seed)
    student = FineGrainedStudent(attention=True).eval()
    g = torch.Generator().manual_seed(seed)

    def normalised(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    def smooth_video(frames: int) -> torch.Tensor:
        # frames drift slowly, as neighbouring frames of a shot do
        steps = torch.randn(frames, REGIONS, 512, generator=g) * 0.3
        return normalised(torch.randn(1, REGIONS, 512, generator=g) + steps.cumsum(0) / frames**0.5)

    query_random = normalised(torch.randn(QUERY_FRAMES, REGIONS, 512, generator=g))
    random_targets = [
        normalised(torch.randn(n, REGIONS, 512, generator=g))
        for n in torch.randint(MIN_FRAMES, MAX_FRAMES + 1, (n_targets,), generator=g).tolist()
    ]
    query_real = smooth_video(QUERY_FRAMES)
    realistic_targets = []
    for k in range(n_targets):
        if k % 2:  # near-duplicates: a crop of the query, every other frame dropped at times, noise
            start = int(torch.randint(0, 20, (1,), generator=g))
            frames = query_real[start : start + int(torch.randint(30, 41, (1,), generator=g))]
            frames = frames[:: 1 + k % 3 // 2]
            noise = float(torch.empty(1).uniform_(0.05, 0.5, generator=g))
            realistic_targets.append(
                normalised(frames + noise * torch.randn(frames.shape, generator=g) / 512**0.5)
            )
        else:  # unrelated videos with their own temporal structure
            realistic_targets.append(
                smooth_video(int(torch.randint(MIN_FRAMES, MAX_FRAMES + 1, (1,), generator=g)))
            )

    results = {}
    with torch.inference_mode():
        for name, query, targets in (
            ("random", query_random, random_targets),
            ("realistic", query_real, realistic_targets),
        ):
            q32 = student.index_video(query)
            t32 = [student.index_video(t) for t in targets]
            s32 = fine_similarity_float(student, q32, t32)
            s16 = fine_similarity_float(student, q32.half(), [t.half() for t in t32])
            diff = (s16 - s32).abs()
            f2f = student.frame_to_frame_similarity
            f2f_diffs = torch.cat([(f2f(q32.half(), t.half()) - f2f(q32, t)).abs().flatten() for t in t32])
            results[name] = {
                "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()),
                "score_range": [float(s32.min()), float(s32.max())],
                "f2f_max_abs_diff": float(f2f_diffs.max()),
                "f2f_mean_abs_diff": float(f2f_diffs.mean()),
                "pairs": len(targets),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=1000, help="number of target videos")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slices", type=int, default=10, help="slices the methods alternate on")
    parser.add_argument(
        "--batch-sizes", type=lambda text: [int(v) for v in text.split(",") if v], default=[],
        help="extra comparator batch sizes to time, e.g. 16,64",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fine_kernel.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    student, query, targets = make_inputs(args.seed, args.targets)
    student = student.to(device)
    packed_query, packed_targets = pack_codes(query), [pack_codes(t) for t in targets]
    report: dict[str, Any] = {
        "config": {"targets": args.targets, "threads": args.threads, "device": str(device), "seed": args.seed,
                   "slices": args.slices, "extra_batch_sizes": args.batch_sizes,
                   "query_frames": QUERY_FRAMES, "target_frames": [MIN_FRAMES, MAX_FRAMES],
                   "regions": REGIONS, "bits": BITS, "torch": torch.__version__,
                   "machine": platform.machine(), "processor": platform.processor() or platform.platform()},
    }  # fmt: skip
    kernel = load_native_kernel()
    backend = resolve_backend("auto", device, BITS // 8)
    report["config"]["hamming_backend"] = backend + (
        f" ({kernel.variant(BITS // 64)})" if backend == "native" and kernel else ""
    )

    def show(name: str, r: dict[str, Any]) -> None:
        share = r["comparator_s"] / (r["hamming_chamfer_s"] + r["comparator_s"])
        print(f"{name:<50} {r['pairs_per_s']:8.1f} pairs/s  {r['seconds']:6.2f} s  "
              f"hamming+chamfer {r['hamming_chamfer_s']:6.2f} s  comparator {r['comparator_s']:6.2f} s "
              f"({100 * share:.0f}% of stages)")  # fmt: skip

    def release(part: slice) -> dict[str, Any]:
        return run_release(student_cpu, query, targets[part])

    def packed(model: FineGrainedStudent, **options: Any) -> Callable[[slice], dict[str, Any]]:
        return lambda part: run_packed(model, packed_query, packed_targets[part], device=device, **options)

    student_cpu = copy.deepcopy(student).cpu()  # the release's layout (NCHW), taken before any change
    nchw = copy.deepcopy(student)
    default_batch = CPU_BATCH_SIZE if device.type == "cpu" else CUDA_BATCH_SIZE
    methods = {"(a) release, one pair at a time": release,
               f"(b) packed, default (batch {default_batch})": packed(student)}  # fmt: skip
    if device.type == "cpu":
        methods["(b) packed, NCHW comparator (channels_last=False)"] = packed(nchw, channels_last=False)
        methods["(b) packed, gemm back-end"] = packed(student, backend="gemm")
        for size in args.batch_sizes:
            methods[f"(b) packed, batch {size}"] = packed(student, batch_size=size)
    for method in methods.values():  # warm-up: kernel build, oneDNN primitives, allocator
        method(slice(0, 8))
    results = interleaved(methods, len(targets), args.slices)
    for name, r in results.items():
        show(name, r)

    names = list(results)
    base, default = results[names[0]], results[names[1]]
    ratio = default["pairs_per_s"] / base["pairs_per_s"]
    median_ratio = float(np.median(default["slice_speedups"]))
    cpu_ratio = base["cpu_seconds"] / default["cpu_seconds"]
    parity = {name: float((r["scores"] - base["scores"]).abs().max()) for name, r in results.items()}
    print(
        f"speed-up (b) default / (a): {ratio:.2f}x overall, median over slices {median_ratio:.2f}x, "
        f"in CPU time {cpu_ratio:.2f}x"
    )
    print(f"max |(b) - (a)| over all variants: {max(parity.values()):.2e}")  # fmt: skip
    best = max(names[1:], key=lambda k: results[k]["pairs_per_s"])
    print(f"fastest variant: {best} = {results[best]['pairs_per_s'] / base['pairs_per_s']:.2f}x (a)")

    sample = targets[:30]
    candidates = hamming_candidates(query, sample, device)
    sample_pairs = len(sample)
    print(
        "hamming+chamfer stage alone, pairs/s over",
        sample_pairs,
        "targets:",
        ", ".join(f"{k} {sample_pairs / v:.0f}" for k, v in candidates.items()),
    )

    storage = float16_storage_effect(args.seed, min(200, args.targets))
    for name, r in storage.items():
        print(
            f"attention student, float16 vs float32 storage ({name}): "
            f"scores max |diff| {r['max_abs_diff']:.2e}, "
            f"mean {r['mean_abs_diff']:.2e}; frame-to-frame max {r['f2f_max_abs_diff']:.2e}, "
            f"mean {r['f2f_mean_abs_diff']:.2e}"
        )

    def strip(r: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in r.items() if k != "scores"}

    report.update({
        "methods": {name: strip(r) for name, r in results.items()},
        "speedup_default": ratio,
        "speedup_default_median_over_slices": median_ratio,
        "speedup_default_cpu_time": cpu_ratio,
        "speedup_fastest": {"variant": best, "ratio": results[best]["pairs_per_s"] / base["pairs_per_s"]},
        "max_abs_diff_vs_release": parity,
        "hamming_stage_pairs_per_s": {k: sample_pairs / v for k, v in candidates.items()},
        "float16_storage_attention_student": storage,
    })  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
