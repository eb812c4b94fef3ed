"""Dynamic batching of the fine-grained student's work across concurrent requests.

Each request runs the engine's ``LocalReranker.rerank`` in its own worker thread (selector,
object fetches and the merge stay the engine's code). Only the fine-grained scoring, the part
that wants the GPU, is handed over: ``BatchingReranker.fine_scores`` submits a job to the
``FineBatcher`` and waits on its future. The batcher is an asyncio task that collects jobs
until the oldest has waited ``max_wait_ms`` or a batch's worth of work is pending, then runs
the batch in a dedicated thread (``scorers`` of them, 1 by default), so

- the device sees a few streams of back-to-back batches instead of many threads contending;
- while the scorers are busy, the next batch accumulates; it starts as soon as one is free
  (jobs that already waited their ``max_wait_ms`` are not held back again);
- the event loop never blocks on torch.

A batch is scored in shared comparator calls: the pairs of every request in it, whatever their
query and lengths, are pooled and packed into comparator batches of similar query and target
lengths (``dns_milvus.similarity.many``), so concurrent requests fill each other's calls
instead of each padding its own to its longest candidate.

Work is measured in pairs (query/target) and in frame pairs (query frames x target frames,
what the comparator's cost grows with). A batch holds at most ``max_batch_pairs`` and
``max_batch_frame_pairs``; a bigger job is cut into slices of that size, and after each slice
its rest goes behind the jobs that arrived meanwhile (round robin), so small requests keep
flowing while a big one runs. One request may ask for at most ``max_frame_pairs`` frame pairs
(``WorkLimitError``, INVALID_ARGUMENT, before any fine-grained work).

Admission is bounded in pairs (``max_queue_pairs``) and in frame pairs
(``max_queue_frame_pairs``), queued + running: past either a submission fails at once with
``OverloadedError`` instead of growing memory and queueing time. The frame matrices of one
batch (4 bytes a frame pair) are what scoring holds in memory, so ``max_batch_frame_pairs``
bounds it. A job whose request was cancelled or whose deadline passed is dropped before its
next slice; inside a batch each request's deadline is checked before every comparator call,
and a late request's remaining pairs leave the batch while the others are scored on.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from dns_milvus.engine.modelset import ModelSet, VideoRecord
from dns_milvus.engine.rerank import LocalReranker
from dns_milvus.errors import (
    DeadlineExceededError,
    DnSError,
    OverloadedError,
    RequestCancelledError,
    ShuttingDownError,
    WorkLimitError,
)
from dns_milvus.similarity import resolve_threads
from dns_milvus.similarity.many import fine_similarity_float_many, fine_similarity_packed_many
from dns_milvus.store import ObjectStore


@dataclass
class Ticket:
    """One request's deadline and cancellation flag, seen by the threads that work for it."""

    deadline: float | None = None  # time.monotonic() value
    cancelled: bool = False
    queue_ms: float = 0.0  # time its fine-grained jobs waited for a batch

    def check(self) -> None:
        if self.cancelled:
            raise RequestCancelledError("request cancelled by the client")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceededError("deadline exceeded before the re-ranking work ran")


#: The ticket of the request a worker thread is serving (contexts are copied into threads).
current_ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("current_ticket", default=None)


@dataclass(eq=False)
class FineJob:
    """One request's fine-grained work: a query against its targets, scored slice by slice."""

    query: VideoRecord
    targets: Sequence[np.ndarray]
    ticket: Ticket
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)  # first arrival: holds a batch open once
    queued_at: float = 0.0  # latest entry into the queue (slices wait from here)
    next_target: int = 0  # targets before it have been handed to a batch
    unscored: int = 0
    finished: bool = False
    scores: np.ndarray = field(init=False)
    _frames_before: np.ndarray = field(init=False)  # cumulative target frames, for slice costs

    def __post_init__(self) -> None:
        self.queued_at = self.enqueued
        self.unscored = len(self.targets)
        self.scores = np.zeros(len(self.targets), dtype=np.float32)
        lengths = [int(t.shape[0]) for t in self.targets]
        self._frames_before = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    @property
    def pairs(self) -> int:
        return len(self.targets)

    @property
    def query_frames(self) -> int:
        return int(self.query.fine.shape[0])

    def frame_pairs(self, start: int = 0, stop: int | None = None) -> int:
        """Query frames x target frames of targets ``start:stop``: the comparator's work."""
        stop = self.pairs if stop is None else stop
        return self.query_frames * int(self._frames_before[stop] - self._frames_before[start])

    def slice_end(self, max_pairs: int, max_frame_pairs: int) -> int:
        """End of the longest slice from ``next_target`` within both budgets (may be empty)."""
        start = self.next_target
        if max_pairs <= 0 or max_frame_pairs <= 0:
            return start
        budget = self._frames_before[start] + max_frame_pairs // max(self.query_frames, 1)
        fits = int(np.searchsorted(self._frames_before, budget, side="right")) - 1
        return max(start, min(self.pairs, start + max_pairs, fits))


@dataclass(frozen=True)
class FineSlice:
    """Targets ``start:stop`` of a job: what one batch computes for it."""

    job: FineJob
    start: int
    stop: int

    @property
    def query(self) -> VideoRecord:
        return self.job.query

    @property
    def targets(self) -> Sequence[np.ndarray]:
        return self.job.targets[self.start : self.stop]

    @property
    def deadline(self) -> float | None:
        return self.job.ticket.deadline

    @property
    def pairs(self) -> int:
        return self.stop - self.start


@dataclass
class BatchStats:
    """What the batcher did, for metrics and the load benchmark."""

    batches: int = 0
    jobs: int = 0  # jobs scored to the end
    slices: int = 0
    pairs: int = 0
    frame_pairs: int = 0
    dropped_jobs: int = 0  # cancelled, late or failed before they were scored to the end
    busy_s: float = 0.0  # time the scoring thread spent computing


class FineBatcher:
    """Collects fine-scoring jobs from request threads and scores them in batches.

    Args:
        score_slices: scores a batch: one float32 array (or the exception that stopped it) per
            slice (runs in the scoring thread).
        max_batch_pairs: a batch closes when it holds this many pairs.
        max_batch_frame_pairs: ... or this many frame pairs; a bigger job is cut into slices.
        max_wait_ms: the longest the oldest job of a forming batch waits for company.
        max_queue_pairs: pairs admitted (queued + running) before submissions are refused.
        max_queue_frame_pairs: ... and frame pairs (a single job bigger than it is admitted alone).
        scorers: batches scored at the same time, each in its own thread.
        on_batch: called in the event loop after each batch with (jobs, pairs, seconds, queue waits).
    """

    def __init__(
        self,
        score_slices: Callable[[Sequence[FineSlice]], list[np.ndarray | Exception]],
        *,
        max_batch_pairs: int = 4096,
        max_batch_frame_pairs: int = 1 << 22,
        max_wait_ms: float = 2.0,
        max_queue_pairs: int = 65536,
        max_queue_frame_pairs: int = 1 << 28,
        scorers: int = 1,
        on_batch: Callable[[int, int, float, list[float]], None] | None = None,
    ) -> None:
        limits = (max_batch_pairs, max_batch_frame_pairs, max_queue_pairs, max_queue_frame_pairs, scorers)
        if min(limits) < 1 or max_wait_ms < 0:
            raise ValueError(
                "max_batch_pairs, max_batch_frame_pairs, max_queue_pairs, max_queue_frame_pairs and scorers "
                "must be >= 1, max_wait_ms >= 0"
            )
        self.score_slices = score_slices
        self.max_batch_pairs = max_batch_pairs
        self.max_batch_frame_pairs = max_batch_frame_pairs
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_pairs = max_queue_pairs
        self.max_queue_frame_pairs = max_queue_frame_pairs
        self.scorers = scorers
        self.busy_scorers = 0  # batches being scored now (read by the scorers to share the cores)
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._jobs: collections.deque[FineJob] = collections.deque()
        self._admitted_pairs = 0
        self._admitted_frame_pairs = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._scorer = ThreadPoolExecutor(max_workers=scorers, thread_name_prefix="fine-scorer")

    @property
    def admitted_pairs(self) -> int:
        return self._admitted_pairs

    @property
    def admitted_frame_pairs(self) -> int:
        return self._admitted_frame_pairs

    def start(self) -> None:
        """Start the batching tasks (one a scorer) on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._tasks = [
            self._loop.create_task(self._run(), name=f"fine-batcher-{i}") for i in range(self.scorers)
        ]

    async def stop(self) -> None:
        """Fail whatever is still queued with ``ShuttingDownError`` and stop the tasks and threads."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._jobs:
            self._finish(self._jobs.popleft(), error=ShuttingDownError("re-ranker is shutting down"))
        self._scorer.shutdown(wait=True)

    def submit(self, query: VideoRecord, targets: Sequence[np.ndarray], ticket: Ticket) -> Future:
        """Queue a job (from any thread); the future resolves to float32 scores [len(targets)]."""
        ticket.check()
        job = FineJob(query, targets, ticket)
        with self._lock:
            if self._closed or self._loop is None:
                raise ShuttingDownError("re-ranker is shutting down")
            if self._admitted_pairs + job.pairs > self.max_queue_pairs and self._admitted_pairs > 0:
                raise OverloadedError(
                    f"re-ranker queue is full ({self._admitted_pairs} query/target pairs pending, limit "
                    f"{self.max_queue_pairs}); retry later"
                )
            work = job.frame_pairs()
            if (
                self._admitted_frame_pairs + work > self.max_queue_frame_pairs
                and self._admitted_frame_pairs > 0
            ):
                raise OverloadedError(
                    f"re-ranker queue is full ({self._admitted_frame_pairs} frame pairs of fine-grained work "
                    f"pending, limit {self.max_queue_frame_pairs}; this request needs {work}); retry later"
                )
            self._admitted_pairs += job.pairs
            self._admitted_frame_pairs += work
        self._loop.call_soon_threadsafe(self._enqueue, job)
        return job.future

    def _enqueue(self, job: FineJob) -> None:
        if self._closed:
            self._finish(job, error=ShuttingDownError("re-ranker is shutting down"))
            return
        job.queued_at = time.monotonic()
        self._jobs.append(job)
        assert self._wakeup is not None
        self._wakeup.set()

    async def _run(self) -> None:
        assert self._loop is not None
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            started = time.monotonic()
            waits = [started - piece.job.queued_at for piece in batch]
            for piece, wait in zip(batch, waits, strict=True):
                piece.job.ticket.queue_ms += wait * 1000.0
            self.busy_scorers += 1
            try:
                results = await self._loop.run_in_executor(self._scorer, self._score, batch)
            except BaseException as exc:  # a failed batch fails its jobs, never the batcher
                for piece in batch:
                    error = exc if isinstance(exc, Exception) else ShuttingDownError(str(exc))
                    self._finish(piece.job, error=error)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            finally:
                self.busy_scorers -= 1
            busy = time.monotonic() - started
            pairs = sum(piece.pairs for piece in batch)
            self.stats.batches += 1
            self.stats.slices += len(batch)
            self.stats.pairs += pairs
            self.stats.frame_pairs += sum(piece.job.frame_pairs(piece.start, piece.stop) for piece in batch)
            self.stats.busy_s += busy
            for piece, result in zip(batch, results, strict=True):
                job = piece.job
                if isinstance(result, Exception):
                    self._finish(job, error=result)
                    continue
                job.scores[piece.start : piece.stop] = result
                job.unscored -= piece.pairs
                if job.unscored == 0:
                    self.stats.jobs += 1
                    self._finish(job, result=job.scores)
                elif job.next_target < job.pairs and not job.finished:
                    self._enqueue(job)  # its rest goes behind the jobs that arrived meanwhile
            if self.on_batch is not None:
                self.on_batch(len(batch), pairs, busy, waits)

    async def _next_batch(self) -> list[FineSlice]:
        assert self._wakeup is not None
        while not self._jobs:
            self._wakeup.clear()
            await self._wakeup.wait()
        # Hold the batch open until the oldest job has waited max_wait or a batch's worth is here.
        while self._jobs:
            queued_pairs = sum(job.pairs - job.next_target for job in self._jobs)
            queued_work = sum(job.frame_pairs(job.next_target) for job in self._jobs)
            remaining = self._jobs[0].enqueued + self.max_wait_s - time.monotonic()
            if queued_pairs >= self.max_batch_pairs or queued_work >= self.max_batch_frame_pairs:
                break
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        return self._take_batch()

    def _take_batch(self) -> list[FineSlice]:
        """Slices from the front of the queue within the batch budgets; a job that does not fit
        whole contributes what fits (at least one target when the batch is empty) and waits,
        out of the queue, until this batch is done. Cancelled and late jobs are dropped here."""
        batch: list[FineSlice] = []
        pairs = work = 0
        while self._jobs:
            job = self._jobs[0]
            try:
                job.ticket.check()
            except DnSError as exc:
                self._jobs.popleft()
                self._finish(job, error=exc)
                continue
            stop = job.slice_end(self.max_batch_pairs - pairs, self.max_batch_frame_pairs - work)
            if stop == job.next_target:
                if batch:
                    break
                stop += 1  # one target runs whatever its size (the request limit bounds it)
            self._jobs.popleft()
            batch.append(FineSlice(job, job.next_target, stop))
            pairs += stop - job.next_target
            work += job.frame_pairs(job.next_target, stop)
            job.next_target = stop
            if stop < job.pairs:
                break  # the batch is full
        return batch

    def _score(self, batch: Sequence[FineSlice]) -> list[np.ndarray | Exception]:
        """Runs in the scoring thread: the whole batch, then each slice alone if the batch failed."""
        with torch.inference_mode():
            try:
                return list(self.score_slices(batch))
            except Exception:
                if len(batch) == 1:
                    raise
            out: list[np.ndarray | Exception] = []
            for piece in batch:  # isolate the slice that broke the batch
                try:
                    out.extend(self.score_slices([piece]))
                except Exception as exc:
                    out.append(exc)
            return out

    def _finish(
        self, job: FineJob, *, result: np.ndarray | None = None, error: BaseException | None = None
    ) -> None:
        if job.finished:
            return
        job.finished = True
        with self._lock:
            self._admitted_pairs -= job.pairs
            self._admitted_frame_pairs -= job.frame_pairs()
        if error is not None and job.unscored > 0:
            self.stats.dropped_jobs += 1
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)


class BatchingReranker(LocalReranker):
    """``LocalReranker`` whose fine-grained scoring goes through a shared ``FineBatcher``.

    Everything else (selector, fetch through the cache, merge) is the engine's code, so a
    request's ranking equals ``LocalReranker.rerank`` on the same inputs: bit for bit when it is
    scored alone, to float rounding (~1e-9) when its pairs share comparator calls with others.
    """

    def __init__(
        self,
        models: ModelSet,
        store: ObjectStore,
        *,
        cache_bytes: int,
        max_frame_pairs: int,
        batcher_options: dict,
        fine_precision: str = "float32",
        fine_threads: int | None = None,
    ) -> None:
        super().__init__(
            models, store, cache_bytes=cache_bytes, fine_precision=fine_precision, fine_threads=fine_threads
        )
        self.max_frame_pairs = max_frame_pairs
        self.batcher = FineBatcher(self.score_slices, **batcher_options)

    def fine_scores(
        self, query: VideoRecord, targets: Sequence[np.ndarray], *, deadline: float | None = None
    ) -> np.ndarray:
        if not targets:
            return np.zeros(0, dtype=np.float32)
        query_frames = int(query.fine.shape[0])
        target_frames = sum(int(t.shape[0]) for t in targets)
        if query_frames * target_frames > self.max_frame_pairs:
            raise WorkLimitError(
                f"request needs {query_frames} query frames x {target_frames} frames of {len(targets)} "
                f"candidates = {query_frames * target_frames} frame pairs of fine-grained scoring; the "
                f"limit is {self.max_frame_pairs} a request (max_frame_pairs): send a shorter query, "
                "fewer candidates or a selecting policy"
            )
        ticket = current_ticket.get() or Ticket(deadline=deadline)
        return self.batcher.submit(query, targets, ticket).result()

    def fetch_fine(self, candidates):  # type: ignore[no-untyped-def]
        ticket = current_ticket.get()
        if ticket is not None:
            ticket.check()  # a cancelled or late request fetches nothing
        return super().fetch_fine(candidates)

    def score_slices(self, batch: Sequence[FineSlice]) -> list[np.ndarray | Exception]:
        """Score a batch in the scoring thread: the pairs of all its slices in shared comparator
        calls, each slice stopping at its own request's deadline (a late slice gets the error,
        the others their scores)."""
        many = (
            fine_similarity_packed_many
            if self.models.payload_kind == "packed_bits"
            else fine_similarity_float_many
        )
        queries = [torch.from_numpy(np.require(piece.query.fine, requirements=["C", "W"])) for piece in batch]
        targets = [
            [torch.from_numpy(np.require(t, requirements=["C", "W"])) for t in piece.targets]
            for piece in batch
        ]
        threads = self.fine_threads
        if threads is None and self.models.device.type == "cpu":  # the idle cores, shared by busy scorers
            threads = max(1, resolve_threads(None) // max(1, self.batcher.busy_scorers))
        results = many(
            self.models.fine, queries, targets, deadlines=[piece.deadline for piece in batch],
            device=self.models.device, precision=self.fine_precision, threads=threads,
        )  # fmt: skip
        return [r if isinstance(r, Exception) else r.float().cpu().numpy() for r in results]
