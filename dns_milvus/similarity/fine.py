"""Fine-grained similarity of one query against many stored targets (stage 2b of DnS search).

Both entry points share one batching scheme (:func:`_score_targets`):

1. targets are sorted by length, so neighbours need little padding;
2. consecutive runs ("groups") get their frame-to-frame matrices in one go, within a memory
   budget: from packed codes by the Hamming kernel (binarization student), or by the
   student's own region tensor dot (float tensors, e.g. the attention student's float16 store);
3. each group is fed to the student's video comparator in batches of ``batch_size`` pairs, each
   batch cut to its own longest target, through ``student.similarity_from_frame_matrix``
   (comparator -> Hardtanh -> Chamfer), which is batch-invariant: the result does not depend on
   the batching and equals ``student.calculate_video_similarity``. A batch also holds at most
   ``*_BATCH_CELLS`` frame-matrix cells (a long query gets fewer pairs a call), which bounds the
   comparator's memory, and the time between two checks of an optional ``deadline``.

Two options tune the CPU work without changing what is computed: ``precision`` runs the
comparator's convolutions in bfloat16 where the CPU has native bfloat16 arithmetic
(:mod:`~dns_milvus.similarity.precision`, scores within about 1e-3 of float32), and ``threads``
sets how many threads a call uses (default: as many as other processes leave idle,
:mod:`~dns_milvus.similarity.threads`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from dns_milvus.errors import DeadlineExceededError, InvalidInputError
from dns_milvus.models import FineSimilarityNetwork
from dns_milvus.similarity.comparator import comparator_student, resolve_precision
from dns_milvus.similarity.hamming import check_packed_video, packed_frame_similarity, scatter_frames
from dns_milvus.similarity.threads import intra_op_threads, resolve_threads

#: Pairs a comparator call on CPU: 16-64 measure alike, 32 is best with channels-last weights
#: (docs/kernel.md); much larger batches spill the caches.
CPU_BATCH_SIZE = 32
#: Pairs a comparator call on CUDA, where bigger launches pay off.
CUDA_BATCH_SIZE = 256
#: Largest intermediate of one group of targets, in floats (64 MiB in float32).
GROUP_ELEMENTS = 2**24
#: Frame-matrix cells (pairs x Tq x longest Tt) of one comparator call. Its first convolution's
#: output is 32 channels of that: 256 MiB on CPU, 1 GiB on CUDA in float32. Typical videos
#: (minutes at 1 fps) never reach it; a query of thousands of frames gets fewer pairs a call.
CPU_BATCH_CELLS = 2**21
CUDA_BATCH_CELLS = 2**23

#: Builds the frame-to-frame matrices [n, Tq, Tt_max] (float32, zero-padded) of a group of targets.
FrameMatrices = Callable[[list[int], int], Tensor]


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(int(s)) for s in x.shape) + "]"


def _resolve_device(student: FineSimilarityNetwork, device: str | torch.device | None) -> torch.device:
    student_device = next(student.parameters()).device
    if device is None:
        return student_device
    device = torch.device(device)
    if device.type != student_device.type or (device.index is not None and device != student_device):
        raise InvalidInputError(
            f"the student is on {student_device} but device={device} was asked; move it first"
        )
    return student_device


def _check_targets(targets: object) -> list:
    if isinstance(targets, Tensor) or not isinstance(targets, Sequence):
        raise InvalidInputError(
            f"expected targets as a sequence of per-video tensors [Tt, R, C], got {type(targets).__name__}"
        )
    if len(targets) == 0:
        raise InvalidInputError("expected at least one target video, got an empty sequence")
    return list(targets)


def _groups(sorted_lengths: list[int], floats_per_frame: int, budget: int) -> list[tuple[int, int]]:
    """Runs [start, stop) of the length-sorted targets whose padded size
    (count x longest length x floats a target frame) stays within ``budget``; at least one target."""
    runs, start = [], 0
    while start < len(sorted_lengths):
        stop = start + 1
        while (
            stop < len(sorted_lengths)
            and (stop + 1 - start) * sorted_lengths[stop] * floats_per_frame <= budget
        ):
            stop += 1
        runs.append((start, stop))
        start = stop
    return runs


def _score_targets(
    student: FineSimilarityNetwork,
    query_length: int,
    target_lengths: list[int],
    frame_matrices: FrameMatrices,
    *,
    floats_per_frame: int,
    device: torch.device,
    batch_size: int | None,
    timings: dict[str, float] | None,
    channels_last: bool,
    deadline: float | None,
    precision: str,
    threads: int | None,
) -> Tensor:
    """The shared driver: sort, group, build frame matrices, run the comparator in batches.

    ``deadline`` (a ``time.monotonic()`` value) is checked before each group and each comparator
    batch: past it, the remaining work is dropped and ``DeadlineExceededError`` raised.
    """
    dtype = resolve_precision(precision, device)
    thread_count = resolve_threads(threads)
    if channels_last and device.type == "cpu":
        prepare_for_inference(student)
    comparator = comparator_student(student, dtype)
    if batch_size is None:
        batch_size = CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE
    if batch_size < 1:
        raise InvalidInputError(f"expected batch_size >= 1, got {batch_size}")
    max_cells = CUDA_BATCH_CELLS if device.type == "cuda" else CPU_BATCH_CELLS
    order = sorted(range(len(target_lengths)), key=target_lengths.__getitem__)
    sorted_lengths = [target_lengths[i] for i in order]
    out = torch.empty(len(order), dtype=torch.float32, device=device)
    stage_seconds = {"frame_matrices": 0.0, "comparator": 0.0}
    clock = _StageClock(device if timings is not None else None)
    done = 0
    # CUDA work is queued from this thread: torch's CPU thread count does not matter there
    with intra_op_threads(thread_count) if device.type == "cpu" else contextlib.nullcontext():
        for start, stop in _groups(sorted_lengths, floats_per_frame, GROUP_ELEMENTS):
            _check_deadline(deadline, done, len(order), device)
            f2f = frame_matrices(order[start:stop], sorted_lengths[stop - 1])
            stage_seconds["frame_matrices"] += clock.lap()
            first = start
            while first < stop:
                _check_deadline(deadline, done, len(order), device)
                limit = min(first + batch_size, stop)
                last = _batch_end(sorted_lengths, first, limit, query_length, max_cells)
                longest = sorted_lengths[last - 1]
                ql = torch.full((last - first,), query_length, dtype=torch.long, device=device)
                tl = torch.tensor(sorted_lengths[first:last], dtype=torch.long, device=device)
                sims = comparator.similarity_from_frame_matrix(
                    f2f[first - start : last - start, :, :longest], ql, tl
                )
                out[torch.tensor(order[first:last], device=device)] = sims.to(torch.float32)
                done += last - first
                first = last
            stage_seconds["comparator"] += clock.lap()
    if timings is not None:
        for stage, seconds in stage_seconds.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    return out


def _batch_end(sorted_lengths: list[int], first: int, limit: int, query_length: int, max_cells: int) -> int:
    """End of the comparator batch that starts at ``first``: at most ``limit``, and at most
    ``max_cells`` frame-matrix cells (targets are sorted, so the last one is the longest); at
    least one pair, whatever its size."""
    last = limit
    while last > first + 1 and (last - first) * query_length * sorted_lengths[last - 1] > max_cells:
        last -= 1
    return last


def _check_deadline(deadline: float | None, done: int, total: int, device: torch.device) -> None:
    if deadline is None:
        return
    if device.type == "cuda":  # launches are asynchronous: wait for the work queued so far
        torch.cuda.synchronize(device)
    if time.monotonic() > deadline:
        raise DeadlineExceededError(
            f"deadline exceeded during fine-grained scoring ({done} of {total} targets scored); "
            "the rest was dropped"
        )


class _StageClock:
    """Wall-clock laps. Given a CUDA device it waits for queued kernels, so that each stage gets
    its own time; without one it never synchronises (laps are then only a rough split)."""

    def __init__(self, device: torch.device | None) -> None:
        self._sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else None
        self._last = time.perf_counter()

    def lap(self) -> float:
        if self._sync is not None:
            self._sync()
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


def prepare_for_inference(student: FineSimilarityNetwork) -> FineSimilarityNetwork:
    """Store the video comparator's convolution weights in channels-last memory format, in place.

    The values are unchanged; oneDNN then runs the comparator's 32- and 64-channel convolutions
    in its NHWC kernels, which measured 1.4-1.9x faster than the default layout on CPU (see
    docs/kernel.md). Idempotent; ``load_state_dict`` and ``.to(device)`` keep the layout.
    ``fine_similarity_packed`` / ``fine_similarity_float`` call it for students on CPU unless
    told not to (``channels_last=False``). Returns the student.
    """
    student.visil_head.to(memory_format=torch.channels_last)
    return student


def _combine_on(
    device: torch.device, tensors: list[Tensor], combine: Callable[[list[Tensor]], Tensor]
) -> Tensor:
    """``combine`` the tensors where they are when they share a device, then move the result once
    (one host-to-GPU copy a group instead of one a target)."""
    if any(t.device != tensors[0].device for t in tensors):
        tensors = [t.to(device) for t in tensors]
    return combine(tensors).to(device)


def fine_similarity_packed(
    student: FineSimilarityNetwork,
    query_packed: Tensor,
    targets_packed: Sequence[Tensor],
    *,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    backend: str = "auto",
    timings: dict[str, float] | None = None,
    channels_last: bool = True,
    deadline: float | None = None,
    precision: str = "float32",
    threads: int | None = None,
) -> Tensor:
    """Fine-grained similarity of a query with each target, from packed binary codes.

    ``query_packed`` uint8 [Tq, R, L/8] and each target uint8 [Tt_i, R, L/8] (same R and L; L =
    the binarization student's bits) -> float32 [B] in [-1, 1] on the student's device, equal to
    ``student.calculate_video_similarity`` on the unpacked ±1 codes. ``batch_size`` is the number
    of pairs a comparator call (default 32 on CPU, 256 on CUDA); ``backend`` picks the Hamming
    kernel (``auto``, ``native``, ``gemm``; see :mod:`dns_milvus.similarity.hamming`). A
    ``timings`` dict, when given, accumulates the seconds spent in the two stages
    (``frame_matrices``, ``comparator``); on CUDA measuring them synchronises the device. On CPU
    the student's comparator weights are first put in channels-last layout, in place (see
    :func:`prepare_for_inference`; values unchanged), unless ``channels_last=False``. Given a
    ``deadline`` (a ``time.monotonic()`` value), scoring stops with ``DeadlineExceededError`` at
    the first comparator batch that would start after it. ``precision`` (``float32``,
    ``bfloat16``, ``auto``) is the comparator's arithmetic (see
    :mod:`~dns_milvus.similarity.precision`); ``threads`` the CPU threads of the call (None: as
    many as other processes leave idle, see :mod:`~dns_milvus.similarity.threads`).
    """
    fg_type = getattr(student, "fg_type", None)
    if fg_type != "bin":
        raise InvalidInputError(f"packed codes need a binarization student (fg_type 'bin'), got {fg_type!r}")
    device = _resolve_device(student, device)
    query = check_packed_video(query_packed, "query").to(device)
    bits = int(student.index_dims)
    if 8 * query.shape[2] != bits:
        raise InvalidInputError(
            f"expected packed codes uint8 [T, R, {bits // 8}] for a {bits}-bit student, "
            f"got query {_shape(query)}"
        )
    targets = [
        check_packed_video(t, f"target {i}", query.shape[1], query.shape[2])
        for i, t in enumerate(_check_targets(targets_packed))
    ]

    def frame_matrices(indices: list[int], longest: int) -> Tensor:
        # real frames only, concatenated: no padding is computed
        frames = _combine_on(device, [targets[i] for i in indices], torch.cat)
        sim = packed_frame_similarity(query, frames, backend=backend)
        lengths = torch.tensor([targets[i].shape[0] for i in indices])
        return scatter_frames(sim, lengths, longest)

    with torch.inference_mode():
        return _score_targets(
            student, query.shape[0], [t.shape[0] for t in targets], frame_matrices,
            floats_per_frame=2 * query.shape[0], device=device, batch_size=batch_size, timings=timings,
            channels_last=channels_last, deadline=deadline, precision=precision, threads=threads,
        )  # fmt: skip


def _check_float_video(x: object, what: str, regions: int | None, dims: int) -> Tensor:
    expected = f"float region tensors [T, {regions if regions is not None else 'R'}, {dims}]"
    if not isinstance(x, Tensor):
        raise InvalidInputError(f"expected {what} as {expected} torch tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InvalidInputError(f"expected {what} as {expected} (float16 or float32), got dtype {x.dtype}")
    if x.ndim != 3 or 0 in x.shape or x.shape[2] != dims or (regions is not None and x.shape[1] != regions):
        raise InvalidInputError(f"expected {what} as {expected} with T >= 1, got {_shape(x)}")
    return x


def fine_similarity_float(
    student: FineSimilarityNetwork,
    query: Tensor,
    targets: Sequence[Tensor],
    *,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    timings: dict[str, float] | None = None,
    channels_last: bool = True,
    deadline: float | None = None,
    precision: str = "float32",
    threads: int | None = None,
) -> Tensor:
    """Fine-grained similarity of a query with each target, from float region tensors.

    ``query`` [Tq, R, D] and each target [Tt_i, R, D] (float16 as stored, or float32; D = the
    student's ``index_dims``) -> float32 [B] on the student's device, equal to
    ``student.calculate_video_similarity`` on the same tensors. Uses the same sorting, grouping
    and comparator batching (and ``timings``, ``channels_last``, ``deadline``, ``precision``,
    ``threads``) as :func:`fine_similarity_packed`.
    """
    device = _resolve_device(student, device)
    compute_dtype = next(student.parameters()).dtype  # float16 storage is widened once, here
    dims = int(student.index_dims)
    query = _check_float_video(query, "query", None, dims).to(device)
    regions = query.shape[1]
    target_list = [
        _check_float_video(t, f"target {i}", regions, dims) for i, t in enumerate(_check_targets(targets))
    ]

    def frame_matrices(indices: list[int], longest: int) -> Tensor:
        group = [target_list[i] for i in indices]
        # the group is sorted by length, so padding to its longest member gives [n, longest, R, D]
        padded = _combine_on(device, group, lambda ts: pad_sequence(ts, batch_first=True)).to(compute_dtype)
        lengths = torch.tensor([t.shape[0] for t in group], device=device)
        mask = torch.arange(longest, device=device)[None, :] < lengths[:, None]
        return student.frame_to_frame_similarity(query.unsqueeze(0), padded, None, mask)[0]

    with torch.inference_mode():
        return _score_targets(
            student, query.shape[0], [t.shape[0] for t in target_list], frame_matrices,
            floats_per_frame=query.shape[0] * regions * regions, device=device, batch_size=batch_size,
            timings=timings, channels_last=channels_last, deadline=deadline, precision=precision,
            threads=threads,
        )  # fmt: skip
