"""Fine-grained similarity of several queries, each against its own targets, in shared calls.

:func:`fine_similarity_packed` scores one query against many targets; a server that answers
many requests at once would call it once per query, and each call pads its comparator batches
to the longest target of that query alone. Here the pairs of every query are pooled:

1. each query's frame-to-frame matrices are computed as in the one-query scorers (the packed
   Hamming kernel over the query's targets concatenated, or the float tensor dot), compactly:
   one [Tq, sum(Tt)] block a query, no padding;
2. the pooled pairs are ordered by query length, cut into bands of a few comparator batches,
   each band ordered by target length, so that a batch holds pairs of similar Tq *and* Tt;
3. each batch is gathered into [n, Tq_max, Tt_max] (zero outside each pair's block) and goes
   through the same comparator as the one-query scorers (``comparator_student``: the fused first
   layer, ``precision``), which is batch-invariant: a pair's score does not depend on its company,
   to float rounding of different shapes (~1e-9 measured).

A lone query gets the batches :func:`fine_similarity_packed` would give it (sorted by target
length, the same ``batch_size``, bounded in cells), hence the same scores bit for bit (up to
several hundred targets; past that the one-query scorer cuts its batches at other places).
Pooled pairs go 8 to a CPU call (``POOLED_CPU_BATCH_SIZE``). Each query may carry its own deadline:
a late query's remaining pairs are dropped from the next batches and it gets a
``DeadlineExceededError`` in place of scores, while the others are scored on. Memory: the
matrices of at most ``GROUP_ELEMENTS / 2`` frame pairs are held at once (more pairs are scored
in rounds, one after the other), and a comparator call holds at most ``*_BATCH_CELLS`` cells.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from dns_milvus.errors import DeadlineExceededError, InvalidInputError
from dns_milvus.models import FineSimilarityNetwork
from dns_milvus.similarity.comparator import comparator_student, resolve_precision
from dns_milvus.similarity.fine import (
    CPU_BATCH_CELLS,
    CPU_BATCH_SIZE,
    CUDA_BATCH_CELLS,
    CUDA_BATCH_SIZE,
    GROUP_ELEMENTS,
    _check_float_video,
    _check_targets,
    _combine_on,
    _groups,
    _resolve_device,
    _StageClock,
    prepare_for_inference,
)
from dns_milvus.similarity.hamming import check_packed_video, packed_frame_similarity
from dns_milvus.similarity.threads import intra_op_threads, resolve_threads

#: Comparator batches a band of similar query lengths holds; within a band pairs are ordered by
#: target length. Simulated on 16 requests of 20 pairs (queries and targets of 30-120 frames),
#: the padded cells are 1.15x the real ones at 8 pairs a call in bands of 6 batches, 1.24x at 16
#: in bands of 4, against 1.55x for each query's 20 targets padded to their longest.
BAND_BATCHES = 6

#: Pairs a comparator call on CPU when several queries are pooled. The comparator's cost a cell
#: measured 153, 150, 171 ns at 8, 16, 32 pairs a call (1 thread, 76 x 76 frames, fused first
#: layer, AVX-512 Xeon): small calls keep their intermediates in cache, and pad less. The
#: one-query scorers keep 32.
POOLED_CPU_BATCH_SIZE = 8

#: Compact frame matrices [Tq, sum(Tt)] of one query against some of its targets (by index).
CompactFrameMatrices = Callable[[list[int]], Tensor]


@dataclass
class _Query:
    length: int
    target_lengths: list[int]
    frame_matrices: CompactFrameMatrices
    floats_per_frame: int  # intermediate floats a target frame costs while its matrices are built
    deadline: float | None


def fine_similarity_packed_many(
    student: FineSimilarityNetwork,
    queries_packed: Sequence[Tensor],
    targets_packed: Sequence[Sequence[Tensor]],
    *,
    deadlines: Sequence[float | None] | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    backend: str = "auto",
    timings: dict[str, float] | None = None,
    channels_last: bool = True,
    precision: str = "float32",
    threads: int | None = None,
) -> list[Tensor | DeadlineExceededError]:
    """:func:`~dns_milvus.similarity.fine.fine_similarity_packed` for several queries at once.

    ``queries_packed[i]`` uint8 [Tq_i, R, L/8] is scored against each of ``targets_packed[i]``
    (uint8 [Tt, R, L/8]; queries may differ in length, all share R and L). Returns, for each
    query, float32 [len(targets_packed[i])] on the student's device, equal to its
    ``fine_similarity_packed`` scores within float rounding (identical batches for a lone
    query); or, where ``deadlines[i]`` (a ``time.monotonic()`` value) passed before all of its
    pairs were scored, a ``DeadlineExceededError`` (its remaining pairs were dropped, the other
    queries were scored on). Other options as in ``fine_similarity_packed``; ``batch_size`` is
    the pairs of one comparator call, from any queries.
    """
    fg_type = getattr(student, "fg_type", None)
    if fg_type != "bin":
        raise InvalidInputError(f"packed codes need a binarization student (fg_type 'bin'), got {fg_type!r}")
    device = _resolve_device(student, device)
    bits = int(student.index_dims)
    jobs = _check_jobs(queries_packed, targets_packed, deadlines)
    prepared: list[_Query] = []
    regions = width = None
    for i, (query, targets, deadline) in enumerate(jobs):
        query = check_packed_video(query, f"query {i}", regions, width).to(device)
        regions, width = query.shape[1], query.shape[2]
        if 8 * width != bits:
            raise InvalidInputError(
                f"expected packed codes uint8 [T, R, {bits // 8}] for a {bits}-bit student, "
                f"got query {i} of shape [{', '.join(str(int(s)) for s in query.shape)}]"
            )
        checked = [
            check_packed_video(t, f"target {j} of query {i}", regions, width)
            for j, t in enumerate(_check_targets(targets))
        ]

        def frame_matrices(indices: list[int], query: Tensor = query, targets: list = checked) -> Tensor:
            frames = _combine_on(device, [targets[k] for k in indices], torch.cat)
            return packed_frame_similarity(query, frames, backend=backend)

        prepared.append(
            _Query(
                query.shape[0], [t.shape[0] for t in checked], frame_matrices, 2 * query.shape[0], deadline
            )
        )
    with torch.inference_mode():
        return _score_many(
            student, prepared, device=device, batch_size=batch_size, timings=timings,
            channels_last=channels_last, precision=precision, threads=threads,
        )  # fmt: skip


def fine_similarity_float_many(
    student: FineSimilarityNetwork,
    queries: Sequence[Tensor],
    targets: Sequence[Sequence[Tensor]],
    *,
    deadlines: Sequence[float | None] | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    timings: dict[str, float] | None = None,
    channels_last: bool = True,
    precision: str = "float32",
    threads: int | None = None,
) -> list[Tensor | DeadlineExceededError]:
    """:func:`fine_similarity_packed_many` for float region tensors (float16 as stored, or
    float32, [T, R, D]): each query's result equals its
    :func:`~dns_milvus.similarity.fine.fine_similarity_float` scores within float rounding."""
    device = _resolve_device(student, device)
    compute_dtype = next(student.parameters()).dtype
    dims = int(student.index_dims)
    jobs = _check_jobs(queries, targets, deadlines)
    prepared: list[_Query] = []
    regions = None
    for i, (query, target_list, deadline) in enumerate(jobs):
        query = _check_float_video(query, f"query {i}", regions, dims).to(device)
        regions = query.shape[1]
        checked = [
            _check_float_video(t, f"target {j} of query {i}", regions, dims)
            for j, t in enumerate(_check_targets(target_list))
        ]

        def frame_matrices(indices: list[int], query: Tensor = query, targets: list = checked) -> Tensor:
            group = [targets[k] for k in indices]
            padded = _combine_on(device, group, lambda ts: pad_sequence(ts, batch_first=True)).to(
                compute_dtype
            )
            lengths = torch.tensor([t.shape[0] for t in group], device=device)
            mask = torch.arange(padded.shape[1], device=device)[None, :] < lengths[:, None]
            f2f = student.frame_to_frame_similarity(query.unsqueeze(0), padded, None, mask)[0]
            return f2f.permute(1, 0, 2)[:, mask]  # [Tq, sum(Tt)]: the real columns, target by target

        floats_per_frame = query.shape[0] * regions * regions
        prepared.append(
            _Query(query.shape[0], [t.shape[0] for t in checked], frame_matrices, floats_per_frame, deadline)
        )
    with torch.inference_mode():
        return _score_many(
            student, prepared, device=device, batch_size=batch_size, timings=timings,
            channels_last=channels_last, precision=precision, threads=threads,
        )  # fmt: skip


def _check_jobs(
    queries: object, targets: object, deadlines: Sequence[float | None] | None
) -> list[tuple[object, object, float | None]]:
    for name, value in (("queries", queries), ("targets", targets)):
        if isinstance(value, Tensor) or not isinstance(value, Sequence):
            raise InvalidInputError(
                f"expected {name} as a sequence (one entry a query), got {type(value).__name__}"
            )
    assert isinstance(queries, Sequence) and isinstance(targets, Sequence)
    if len(queries) == 0:
        raise InvalidInputError("expected at least one query, got an empty sequence")
    if len(targets) != len(queries):
        raise InvalidInputError(
            f"expected one target list a query, got {len(queries)} queries and {len(targets)} target lists"
        )
    deadlines = [None] * len(queries) if deadlines is None else list(deadlines)
    if len(deadlines) != len(queries):
        raise InvalidInputError(
            f"expected one deadline (or None) a query, got {len(deadlines)} for {len(queries)} queries"
        )
    return list(zip(queries, targets, deadlines, strict=True))


def _score_many(
    student: FineSimilarityNetwork,
    queries: list[_Query],
    *,
    device: torch.device,
    batch_size: int | None,
    timings: dict[str, float] | None,
    channels_last: bool,
    precision: str,
    threads: int | None,
) -> list[Tensor | DeadlineExceededError]:
    """The shared driver: rounds of pooled pairs, compact frame matrices, banded comparator batches."""
    dtype = resolve_precision(precision, device)
    thread_count = resolve_threads(threads)
    if channels_last and device.type == "cpu":
        prepare_for_inference(student)
    comparator = comparator_student(student, dtype)
    if batch_size is None:
        if device.type == "cuda":
            batch_size = CUDA_BATCH_SIZE
        else:  # a lone query is batched as the one-query scorer does: bit-identical scores
            batch_size = POOLED_CPU_BATCH_SIZE if len(queries) > 1 else CPU_BATCH_SIZE
    if batch_size < 1:
        raise InvalidInputError(f"expected batch_size >= 1, got {batch_size}")
    max_cells = CUDA_BATCH_CELLS if device.type == "cuda" else CPU_BATCH_CELLS
    # every pair: its query, its target's index in that query's list, both lengths
    owner = np.concatenate([np.full(len(q.target_lengths), i, dtype=np.int64) for i, q in enumerate(queries)])
    # pairs are numbered query by query, so a pair's number is its query's offset + its target index
    target = np.concatenate([np.arange(len(q.target_lengths), dtype=np.int64) for q in queries])
    query_len = np.array([queries[i].length for i in owner], dtype=np.int64)
    target_len = np.concatenate([np.asarray(q.target_lengths, dtype=np.int64) for q in queries])
    scores = torch.empty(len(owner), dtype=torch.float32, device=device)  # by pair number
    late: dict[int, DeadlineExceededError] = {}
    scored = np.zeros(len(queries), dtype=np.int64)
    clock = _StageClock(device if timings is not None else None)
    stage_seconds = {"frame_matrices": 0.0, "comparator": 0.0}

    def check_deadlines(members: np.ndarray) -> None:
        """Fail the queries among ``members`` whose deadline has passed."""
        pending = [i for i in np.unique(owner[members]).tolist() if i not in late]
        if all(queries[i].deadline is None for i in pending):
            return
        if device.type == "cuda":  # launches are asynchronous: wait for the work queued so far
            torch.cuda.synchronize(device)
        now = time.monotonic()
        for i in pending:
            deadline = queries[i].deadline
            if deadline is not None and now > deadline:
                late[i] = DeadlineExceededError(
                    f"deadline exceeded during fine-grained scoring ({scored[i]} of "
                    f"{len(queries[i].target_lengths)} targets scored); the rest was dropped"
                )

    with intra_op_threads(thread_count) if device.type == "cpu" else contextlib.nullcontext():
        # a round's matrices exist twice at most (the kernels' output, then the flat buffer)
        for round_pairs in _rounds(query_len * target_len, GROUP_ELEMENTS // 2):
            check_deadlines(round_pairs)
            round_pairs = round_pairs[[i not in late for i in owner[round_pairs].tolist()]]
            if round_pairs.size == 0:
                continue
            buffer, offsets, row_stride = _compact_matrices(
                queries, owner, target, target_len, round_pairs, device
            )
            stage_seconds["frame_matrices"] += clock.lap()
            for batch in _comparator_batches(round_pairs, query_len, target_len, batch_size, max_cells):
                check_deadlines(batch)
                batch = batch[[i not in late for i in owner[batch].tolist()]]
                if batch.size == 0:
                    continue
                ql = torch.from_numpy(query_len[batch]).to(device)
                tl = torch.from_numpy(target_len[batch]).to(device)
                f2f = _gather(buffer, offsets[batch], row_stride[batch], ql, tl, device)
                sims = comparator.similarity_from_frame_matrix(f2f, ql, tl)
                scores[torch.from_numpy(batch).to(device)] = sims.to(torch.float32)
                scored += np.bincount(owner[batch], minlength=len(queries))
            stage_seconds["comparator"] += clock.lap()
    if timings is not None:
        for stage, seconds in stage_seconds.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    per_query = torch.split(scores, [len(q.target_lengths) for q in queries])
    return [late.get(i, per_query[i]) for i in range(len(queries))]


def _rounds(pair_cells: np.ndarray, budget: int) -> list[np.ndarray]:
    """Consecutive runs of pairs whose frame matrices (cells) fit ``budget``; at least one pair."""
    runs, start, total = [], 0, 0
    for index, cells in enumerate(pair_cells.tolist()):
        if total + cells > budget and index > start:
            runs.append(np.arange(start, index))
            start, total = index, 0
        total += cells
    runs.append(np.arange(start, len(pair_cells)))
    return runs


def _compact_matrices(
    queries: list[_Query],
    owner: np.ndarray,
    target: np.ndarray,
    target_len: np.ndarray,
    pairs: np.ndarray,
    device: torch.device,
) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """The frame matrices of ``pairs`` in one flat buffer, ending with one zero cell.

    Returns (buffer, offset of each pair's first cell, each pair's row stride), indexed by pair
    number; a pair's cell (i, j) is at ``offset + i * stride + j``."""
    offsets = np.zeros(len(owner), dtype=np.int64)
    row_stride = np.zeros(len(owner), dtype=np.int64)
    pieces: list[Tensor] = []
    start = 0
    for i in np.unique(owner[pairs]).tolist():
        q = queries[i]
        mine = pairs[owner[pairs] == i]
        mine = mine[np.argsort(target_len[mine], kind="stable")]  # groups pad little when sorted
        lengths = target_len[mine].tolist()
        for first, stop in _groups(lengths, q.floats_per_frame, GROUP_ELEMENTS):
            group = mine[first:stop]
            block = q.frame_matrices(target[group].tolist())  # [Tq, sum(Tt)]
            columns = np.concatenate([[0], np.cumsum(target_len[group])[:-1]])
            offsets[group] = start + columns
            row_stride[group] = block.shape[1]
            pieces.append(block.reshape(-1).to(torch.float32))
            start += block.numel()
    pieces.append(torch.zeros(1, dtype=torch.float32, device=device))
    return torch.cat(pieces), offsets, row_stride


def _comparator_batches(
    pairs: np.ndarray, query_len: np.ndarray, target_len: np.ndarray, batch_size: int, max_cells: int
) -> list[np.ndarray]:
    """``pairs`` cut into comparator batches of similar lengths: ordered by query length, then in
    bands of ``BAND_BATCHES`` batches, each band ordered by target length; a batch holds at most
    ``batch_size`` pairs and ``max_cells`` padded cells (at least one pair)."""
    by_query = pairs[np.lexsort((target_len[pairs], query_len[pairs]))]
    band = BAND_BATCHES * batch_size
    batches = []
    for band_start in range(0, len(by_query), band):
        members = by_query[band_start : band_start + band]
        members = members[np.argsort(target_len[members], kind="stable")]
        first = 0
        while first < len(members):
            last = min(first + batch_size, len(members))
            while last > first + 1 and _cells(members[first:last], query_len, target_len) > max_cells:
                last -= 1
            batches.append(members[first:last])
            first = last
    return batches


def _cells(batch: np.ndarray, query_len: np.ndarray, target_len: np.ndarray) -> int:
    """Padded cells of a comparator batch: pairs x longest query x longest target."""
    return len(batch) * int(query_len[batch].max()) * int(target_len[batch].max())


def _gather(
    buffer: Tensor, offsets: np.ndarray, row_stride: np.ndarray, ql: Tensor, tl: Tensor, device: torch.device
) -> Tensor:
    """[n, max Tq, max Tt] frame matrices of a batch from the flat buffer, zero outside each pair."""
    rows = torch.arange(int(ql.max()), device=device)
    cols = torch.arange(int(tl.max()), device=device)
    first = torch.from_numpy(offsets).to(device)[:, None]
    stride = torch.from_numpy(row_stride).to(device)[:, None]
    index = (first + rows[None, :] * stride)[:, :, None] + cols[None, None, :]
    inside = (rows[None, :, None] < ql[:, None, None]) & (cols[None, None, :] < tl[:, None, None])
    return buffer[index.masked_fill_(~inside, buffer.numel() - 1)]
