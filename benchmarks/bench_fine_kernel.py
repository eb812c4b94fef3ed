"""Fine-grained similarity of the binarization student: the release's way vs packed codes.

Fixed random inputs: a 60-frame query against N targets of 30-120 frames (9 regions, 512 bits),
scored by the bundled model set's fine student (speed does not depend on the weights; the
bfloat16 score error does). Sections:

1. Speed, in pairs per second, over ``--rounds`` rounds (min / median reported), the methods
   alternating on slices of the targets so that they meet the same load:
   (a) the release's way: one pair at a time, ``einsum`` over float ±1 codes, region Chamfer,
       then the video comparator, Hardtanh and frame Chamfer (plain torch, same weights);
   (b) ``fine_similarity_packed`` from packed codes (the C Hamming kernel on CPU) in float32, in
       bfloat16 where the CPU has native bfloat16 arithmetic, and with ``--variants`` the
       variants that show where the time goes (NCHW comparator, GEMM back-end, batch sizes).
2. Threads under load: the packed path with 1 thread, ``--threads-max`` threads and the
   automatic choice, on the machine as it is and with ``--load-procs`` busy processes competing.
3. Precision: bfloat16 against float32 on the same pairs (max / mean score difference, top-k
   order); with ``--copybench DIR`` also on the real footage of a copy benchmark (every query
   against the database, codes extracted once and cached, and the mAP of both).
4. The exact Hamming-stage candidates on a few targets, and what float16 storage of the attention
   student's tensors does to its similarities.

Results are printed and written as JSON. Example:

    python benchmarks/bench_fine_kernel.py --targets 400 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dns_milvus.models import FineGrainedStudent, load_checkpoint
from dns_milvus.similarity import fine as fine_module
from dns_milvus.similarity import (
    fine_similarity_float,
    fine_similarity_packed,
    pack_codes,
    packed_frame_similarity,
    prepare_for_inference,
    resolve_backend,
)
from dns_milvus.similarity._native import load_native_kernel
from dns_milvus.similarity.comparator import (
    bfloat16_unsupported_reason,
    comparator_student,
    cpu_bfloat16_flags,
)
from dns_milvus.similarity.fine import CPU_BATCH_SIZE, CUDA_BATCH_SIZE
from dns_milvus.similarity.threads import usable_cores

QUERY_FRAMES = 60
MIN_FRAMES, MAX_FRAMES = 30, 120
REGIONS, BITS = 9, 512


def random_codes(generator: torch.Generator, frames: int) -> torch.Tensor:
    return torch.randint(0, 2, (frames, REGIONS, BITS), generator=generator).float() * 2 - 1


BUNDLED_STUDENT = Path(__file__).resolve().parent.parent / "dns_milvus" / "assets" / "fg_bin_student.pth"


def make_inputs(
    seed: int, n_targets: int, student_path: Path | None
) -> tuple[FineGrainedStudent, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    if student_path is None:
        student = FineGrainedStudent(binarization=True, bits=BITS).eval()
    else:
        student = load_checkpoint(student_path, expected="fg_bin_student").eval()
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
        kernel = load_native_kernel()
        if kernel is not None:
            methods["native_c_kernel"] = lambda: packed_frame_similarity(packed_q, packed_t, backend="native")
            q_words, t_words = packed_q.numpy().view("<u8"), packed_t.numpy().view("<u8")
            for variant in {kernel.variant(BITS // 64, name) for name in kernel.variants()}:
                methods[f"native_c_kernel_{variant}_1_thread"] = functools.partial(
                    kernel.min_hamming_sums, q_words, t_words, 1, variant
                )
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


# -- rounds, load and reports --------------------------------------------------------------------


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.platform()


def rounds_of(
    methods: dict[str, Callable[[slice], dict[str, Any]]], n: int, slices: int, rounds: int
) -> dict[str, Any]:
    """``rounds`` interleaved runs of every method; per method its min / median over rounds, and
    per round the speed-up of each method over the first (the baseline of the same round)."""
    runs = []
    for k in range(rounds):
        before = load_average()
        results = interleaved(methods, n, slices)
        runs.append({"results": results, "load_average": [before, load_average()]})
        print(f"  round {k + 1}/{rounds}: load average {before} -> {load_average()}", flush=True)
    names = list(methods)
    summary: dict[str, Any] = {}
    for name in names:
        per_round = [r["results"][name] for r in runs]
        rates = [r["pairs_per_s"] for r in per_round]
        speedups = [r["pairs_per_s"] / b["results"][names[0]]["pairs_per_s"] for r, b in zip(per_round, runs)]
        stage = {
            key: float(np.median([r[key] for r in per_round]))
            for key in ("hamming_chamfer_s", "comparator_s")
        }
        summary[name] = {
            "pairs_per_s": {"min": min(rates), "median": float(np.median(rates)), "rounds": rates},
            "speedup": {"min": min(speedups), "median": float(np.median(speedups)), "rounds": speedups},
            "cpu_seconds_median": float(np.median([r["cpu_seconds"] for r in per_round])),
            "seconds_median": float(np.median([r["seconds"] for r in per_round])),
            **{f"{key}_median": value for key, value in stage.items()},
            "scores": per_round[-1]["scores"],
        }
    return {"methods": summary, "load_average": [r["load_average"] for r in runs]}


def unfused(method: Callable[[slice], dict[str, Any]]) -> Callable[[slice], dict[str, Any]]:
    """``method`` with the comparator's first layer in torch's layers instead of the fused C loop."""

    def run(part: slice) -> dict[str, Any]:
        real = fine_module.comparator_student
        fine_module.comparator_student = functools.partial(real, native=False)
        try:
            return method(part)
        finally:
            fine_module.comparator_student = real

    return run


def show(title: str, summary: dict[str, Any]) -> None:
    print(f"\n{title}")
    print(
        f"{'method':<40} {'pairs/s min':>11} {'median':>7} {'speed-up min':>12} {'median':>7} {'CPU s':>6}"
        f" {'hamming s':>9} {'comparator s':>12}"
    )
    for name, r in summary["methods"].items():
        print(
            f"{name:<40} {r['pairs_per_s']['min']:11.1f} {r['pairs_per_s']['median']:7.1f} "
            f"{r['speedup']['min']:11.2f}x {r['speedup']['median']:6.2f}x {r['cpu_seconds_median']:6.2f} "
            f"{r['hamming_chamfer_s_median']:9.2f} {r['comparator_s_median']:12.2f}"
        )


class CompetingProcesses:
    """``count`` processes that keep a core busy each (a pure-Python loop), stopped on exit."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> CompetingProcesses:
        self.processes = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)
        ]
        time.sleep(1.0)  # let the scheduler and the load monitor see them
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()


def threads_under_load(
    student: FineGrainedStudent,
    query: torch.Tensor,
    targets: list[torch.Tensor],
    threads_max: int,
    load_procs: int,
    slices: int,
    rounds: int,
) -> dict[str, Any]:
    """Packed float32 scoring with 1, ``threads_max`` and automatic threads, side by side, on the
    machine as it is and with ``load_procs`` busy processes competing."""
    counts: list[int | None] = [*sorted({1, threads_max}), None]
    methods = {
        f"threads={'auto' if n is None else n}": (
            lambda part, n=n: run_packed(student, query, targets[part], threads=n)
        )
        for n in counts
    }
    chosen: list[int] = []  # what the automatic choice picked, call by call

    def recording(threads: int) -> Any:
        chosen.append(threads)
        return real_context(threads)

    real_context = fine_module.intra_op_threads
    automatic = methods["threads=auto"]

    def auto(part: slice) -> dict[str, Any]:
        fine_module.intra_op_threads = recording
        try:
            return automatic(part)
        finally:
            fine_module.intra_op_threads = real_context

    methods["threads=auto"] = auto
    for method in methods.values():
        method(slice(0, 4))
    out = {}
    for label, count in (("as is", 0), (f"+{load_procs} busy processes", load_procs)):
        if label != "as is" and load_procs == 0:
            continue
        chosen.clear()
        with CompetingProcesses(count):
            summary = rounds_of(methods, len(targets), slices, rounds)
        show(f"threads, machine {label} (speed-up relative to threads=1)", summary)
        picks = {n: chosen.count(n) for n in sorted(set(chosen))}
        print(f"  threads=auto chose (threads: calls) {picks}")
        out[label] = {**strip(summary), "auto_choices": picks}
    return out


def strip(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        **summary,
        "methods": {
            k: {kk: vv for kk, vv in v.items() if kk != "scores"} for k, v in summary["methods"].items()
        },
    }


def comparator_alone(
    student: FineGrainedStudent, query_frames: int, target_lengths: list[int], calls: int = 7
) -> dict[str, dict[str, float]]:
    """CPU milliseconds of one comparator call on a batch of frame matrices (the first 32 target
    lengths, sorted, padded to the longest), best of ``calls`` interleaved calls, per variant:
    the student itself and the copies the scorers run (float32 / bfloat16, fused first layer or
    torch's); with each one's largest score difference to the student."""
    lengths = torch.tensor(sorted(target_lengths[:32]))
    generator = torch.Generator().manual_seed(0)
    f2f = torch.rand(len(lengths), query_frames, int(lengths.max()), generator=generator) * 2 - 1
    query_lengths = torch.full((len(lengths),), query_frames)
    variants: dict[str, Any] = {"student (float32, torch's first layer)": student}
    variants["float32, fused first layer (default)"] = comparator_student(student, torch.float32)
    if bfloat16_unsupported_reason(torch.device("cpu")) is None:
        variants["bfloat16, torch's first layer"] = comparator_student(student, torch.bfloat16, native=False)
        variants["bfloat16, fused first layer"] = comparator_student(student, torch.bfloat16)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        reference = student.similarity_from_frame_matrix(f2f, query_lengths, lengths)
        for _ in range(calls + 1):  # the first round warms up
            for name, model in variants.items():
                started = time.process_time()
                model.similarity_from_frame_matrix(f2f, query_lengths, lengths)
                seconds[name].append(time.process_time() - started)
        return {
            name: {
                "cpu_ms_min": 1e3 * min(seconds[name][1:]),
                "cpu_ms_median": 1e3 * float(np.median(seconds[name][1:])),
                "max_abs_diff": float(
                    (model.similarity_from_frame_matrix(f2f, query_lengths, lengths) - reference).abs().max()
                ),
            }
            for name, model in variants.items()
        }


# -- precision -------------------------------------------------------------------------------------


def score_agreement(reference: torch.Tensor, other: torch.Tensor, top: int) -> dict[str, Any]:
    """Score differences and whether the ``top`` best targets come in the same order."""
    diff = (other - reference).abs()
    ref_order = torch.argsort(reference, descending=True, stable=True)[:top]
    other_order = torch.argsort(other, descending=True, stable=True)[:top]
    differing = (ref_order != other_order).nonzero().flatten()
    first = int(differing[0]) if len(differing) else None
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top_identical": first is None,
        "top_positions_differing": len(differing),
        "top_same_set": set(ref_order.tolist()) == set(other_order.tolist()),
        "first_differing_rank": None if first is None else first + 1,
        # how close the first pair that changed places was in float32 (a near-tie or not)
        "first_swap_gap": None
        if first is None
        else float((reference[ref_order[first]] - reference[other_order[first]]).abs()),
    }


def copybench_precision(bench_dir: Path, codes_cache: Path, top: int, threads: int) -> dict[str, Any]:
    """float32 vs bfloat16 fine scores of every query against the database of a built copy
    benchmark, with the bundled model set's codes (extracted once into ``codes_cache``)."""
    from dns_milvus.engine import ModelSet
    from dns_milvus.eval.copybench import load_copy_benchmark

    bench = load_copy_benchmark(bench_dir)
    models = ModelSet.load(BUNDLED_STUDENT.parent, device="cpu")
    ids = bench.video_ids
    if codes_cache.is_file():
        stored = np.load(codes_cache)
        codes = {vid: stored[vid] for vid in stored.files}
    else:
        codes = {}
    missing = [vid for vid in ids if vid not in codes]
    for k, vid in enumerate(missing):
        features = models.extract_video(bench.video_path(vid))
        codes[vid] = models.index_features([features])[0].fine
        if k % 50 == 0:
            print(f"  extracting {k + 1}/{len(missing)}", flush=True)
    if missing:
        codes_cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(codes_cache, **codes)
    database = list(bench.dataset.database)
    targets = [torch.from_numpy(codes[v]) for v in database]
    per_query, scores = [], {"float32": {}, "bfloat16": {}}
    seconds = {"float32": 0.0, "bfloat16": 0.0}
    for query in bench.dataset.queries:
        q = torch.from_numpy(codes[query])
        result = {}
        for precision in ("float32", "bfloat16"):
            started = time.process_time()
            result[precision] = fine_similarity_packed(
                models.fine, q, targets, precision=precision, threads=threads
            )
            seconds[precision] += time.process_time() - started
            scores[precision][query] = dict(zip(database, result[precision].tolist()))
        per_query.append(score_agreement(result["float32"], result["bfloat16"], top))
    maps = {
        p: {t: float(m) for t, m in bench.dataset.evaluate(s, tasks=["ND", "DSVR"]).items()}
        for p, s in scores.items()
    }
    return {
        "bench": str(bench_dir),
        "queries": len(bench.dataset.queries),
        "database": len(database),
        "pairs": len(bench.dataset.queries) * len(database),
        "frames": int(sum(codes[v].shape[0] for v in ids)),
        "max_abs_diff": max(r["max_abs_diff"] for r in per_query),
        "mean_abs_diff": float(np.mean([r["mean_abs_diff"] for r in per_query])),
        f"queries_top{top}_identical": sum(r["top_identical"] for r in per_query),
        f"queries_top{top}_same_set": sum(r["top_same_set"] for r in per_query),
        "top_positions_differing": [r["top_positions_differing"] for r in per_query],
        "first_differing_rank_min": min(
            (r["first_differing_rank"] for r in per_query if r["first_differing_rank"]), default=None
        ),
        "first_swap_gap_max": max(
            (r["first_swap_gap"] for r in per_query if r["first_swap_gap"] is not None), default=None
        ),
        "map": maps,
        "cpu_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=400, help="number of target videos")
    parser.add_argument("--threads", type=int, default=1, help="threads of the speed section (both paths)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (min / median reported)")
    parser.add_argument("--slices", type=int, default=5, help="slices the methods alternate on, a round")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--random-student", action="store_true", help="initial weights, not the bundled student"
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also time the NCHW comparator, the GEMM back-end and --batch-sizes",
    )
    parser.add_argument(
        "--batch-sizes",
        type=lambda text: [int(v) for v in text.split(",") if v],
        default=[],
        help="extra comparator batch sizes to time with --variants, e.g. 16,64",
    )
    parser.add_argument(
        "--threads-max",
        type=int,
        default=min(2, usable_cores()),
        help="the multi-thread count of the threads section",
    )
    parser.add_argument(
        "--load-procs",
        type=int,
        default=usable_cores(),
        help="busy processes competing in the threads section (0: machine as is only)",
    )
    parser.add_argument("--threads-targets", type=int, default=150, help="targets of the threads section")
    parser.add_argument("--skip-threads", action="store_true", help="leave out the threads section")
    parser.add_argument(
        "--copybench", type=Path, default=None, help="a built copy benchmark for the precision check"
    )
    parser.add_argument(
        "--codes-cache",
        type=Path,
        default=Path("benchmarks/results/copybench_codes.npz"),
        help="fine codes of the copy benchmark's videos (made once)",
    )
    parser.add_argument("--top", type=int, default=100, help="ranking depth compared across precisions")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fine_kernel.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    student, query, targets = make_inputs(
        args.seed, args.targets, None if args.random_student else BUNDLED_STUDENT
    )
    student = student.to(device)
    packed_query, packed_targets = pack_codes(query), [pack_codes(t) for t in targets]
    kernel = load_native_kernel()
    backend = resolve_backend("auto", device, BITS // 8)
    bf16_reason = bfloat16_unsupported_reason(device)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": {
            "targets": args.targets,
            "threads": args.threads,
            "rounds": args.rounds,
            "slices": args.slices,
            "device": str(device),
            "seed": args.seed,
            "student": "random" if args.random_student else "bundled",
            "query_frames": QUERY_FRAMES,
            "target_frames": [MIN_FRAMES, MAX_FRAMES],
            "regions": REGIONS,
            "bits": BITS,
            "torch": torch.__version__,
            "cpu": cpu_model(),
            "usable_cores": usable_cores(),
            "cpu_bfloat16_flags": list(cpu_bfloat16_flags()),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "hamming_backend": backend
            + (f" ({kernel.variant(BITS // 64)})" if backend == "native" and kernel else ""),
            "bfloat16": bf16_reason or "native",
        },
        "load_average_start": load_average(),
    }
    print(
        f"{cpu_model()}, {usable_cores()} cores, torch {torch.__version__}, "
        f"Hamming back-end {report['config']['hamming_backend']}, bfloat16: {bf16_reason or 'native'}, "
        f"load average {load_average()}"
    )

    def release(part: slice) -> dict[str, Any]:
        return run_release(student_cpu, query, targets[part])

    def packed(model: FineGrainedStudent, **options: Any) -> Callable[[slice], dict[str, Any]]:
        threads = options.pop("threads", args.threads if device.type == "cpu" else None)
        return lambda part: run_packed(
            model, packed_query, packed_targets[part], device=device, threads=threads, **options
        )

    student_cpu = copy.deepcopy(student).cpu()  # the release's layout (NCHW), taken before any change
    nchw = copy.deepcopy(student)
    default_batch = CPU_BATCH_SIZE if device.type == "cpu" else CUDA_BATCH_SIZE
    methods = {
        "(a) release, one pair at a time": release,
        f"(b) packed, float32 (batch {default_batch})": packed(student),
    }
    if bf16_reason is None:
        methods["(b) packed, bfloat16 comparator"] = packed(student, precision="bfloat16")
    if args.variants and device.type == "cpu":
        methods["(b) packed, float32, torch first layer"] = unfused(packed(student))
        methods["(b) packed, NCHW comparator (channels_last=False)"] = packed(nchw, channels_last=False)
        methods["(b) packed, gemm back-end"] = packed(student, backend="gemm")
        for size in args.batch_sizes:
            methods[f"(b) packed, batch {size}"] = packed(student, batch_size=size)
    for method in methods.values():  # warm-up: kernel build, oneDNN primitives, allocator
        method(slice(0, 8))
    print(f"\nspeed: {args.targets} targets, {args.threads} thread(s), {args.rounds} rounds", flush=True)
    speed = rounds_of(methods, len(targets), args.slices, args.rounds)
    show(f"speed ({args.threads} thread(s); speed-up over (a) of the same round)", speed)
    names = list(speed["methods"])
    base = speed["methods"][names[0]]
    parity = {name: float((r["scores"] - base["scores"]).abs().max()) for name, r in speed["methods"].items()}
    print(f"max |(b) float32 - (a)|: {parity[names[1]]:.2e}")
    split = {}
    for name in names[1:]:
        r = speed["methods"][name]
        stages = r["hamming_chamfer_s_median"] + r["comparator_s_median"]
        # the speed-up if the Hamming stage cost nothing: the release's time over the comparator's
        ceiling = base["seconds_median"] / r["comparator_s_median"]
        split[name] = {"comparator_share": r["comparator_s_median"] / stages, "free_hamming_ceiling": ceiling}
        print(
            f"{name}: comparator {100 * split[name]['comparator_share']:.0f}% of the stages; "
            f"with a free Hamming stage the ceiling would be {ceiling:.1f}x"
        )
    report["speed"] = strip(speed)
    report["speed"]["max_abs_diff_vs_release"] = parity
    report["speed"]["split"] = split

    if bf16_reason is None:
        reference = speed["methods"][names[1]]["scores"]
        bf16 = speed["methods"]["(b) packed, bfloat16 comparator"]["scores"]
        agreement = score_agreement(reference, bf16, args.top)
        print(
            f"bfloat16 vs float32 on these {len(targets)} random pairs: "
            f"max |diff| {agreement['max_abs_diff']:.2e}, mean {agreement['mean_abs_diff']:.2e}, "
            f"top-{args.top} order identical: {agreement['top_identical']}"
        )
        report["precision_random_pairs"] = agreement

    if not args.skip_threads and device.type == "cpu":
        n = min(args.threads_targets, len(targets))
        print(f"\nthreads: {n} targets, {args.rounds} rounds", flush=True)
        report["threads"] = threads_under_load(
            student,
            packed_query,
            packed_targets[:n],
            args.threads_max,
            args.load_procs,
            args.slices,
            args.rounds,
        )

    if args.copybench is not None and bf16_reason is None:
        print(f"\nprecision on the copy benchmark {args.copybench}", flush=True)
        real = copybench_precision(args.copybench, args.codes_cache, args.top, args.threads)
        print(
            f"  {real['pairs']} pairs ({real['queries']} queries x {real['database']} videos, "
            f"{real['frames']} frames): max |diff| {real['max_abs_diff']:.2e}, "
            f"mean {real['mean_abs_diff']:.2e}; queries with an identical "
            f"top-{args.top}: {real[f'queries_top{args.top}_identical']}/{real['queries']} (same set: "
            f"{real[f'queries_top{args.top}_same_set']}, first change at rank "
            f"{real['first_differing_rank_min']}, {real['first_swap_gap_max'] or 0:.1e} apart at most); "
            f"mAP float32 {real['map']['float32']}, bfloat16 {real['map']['bfloat16']}"
        )
        report["precision_copybench"] = real

    if device.type == "cpu":
        prepare_for_inference(student)
        alone = comparator_alone(student, QUERY_FRAMES, [t.shape[0] for t in targets])
        base_ms = alone["student (float32, torch's first layer)"]["cpu_ms_min"]
        print(f"\ncomparator alone, one batch of 32 ({args.threads} thread(s)), CPU ms best / median of 7:")
        for name, r in alone.items():
            print(f"  {name:<40} {r['cpu_ms_min']:6.1f} / {r['cpu_ms_median']:6.1f}  "
                  f"({base_ms / r['cpu_ms_min']:.2f}x)  max |diff| {r['max_abs_diff']:.1e}")  # fmt: skip
        report["comparator_alone"] = alone

    sample = targets[:30]
    candidates = hamming_candidates(query, sample, device)
    print(
        "\nhamming+chamfer stage alone, pairs/s over",
        len(sample),
        "targets:",
        ", ".join(f"{k} {len(sample) / v:.0f}" for k, v in candidates.items()),
    )
    storage = float16_storage_effect(args.seed, min(200, args.targets))
    for name, r in storage.items():
        print(
            f"attention student, float16 vs float32 storage ({name}): "
            f"scores max |diff| {r['max_abs_diff']:.2e}, "
            f"mean {r['mean_abs_diff']:.2e}; frame-to-frame max {r['f2f_max_abs_diff']:.2e}, "
            f"mean {r['f2f_mean_abs_diff']:.2e}"
        )
    report.update(
        {
            "hamming_stage_pairs_per_s": {k: len(sample) / v for k, v in candidates.items()},
            "float16_storage_attention_student": storage,
            "load_average_end": load_average(),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
