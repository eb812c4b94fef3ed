"""Dynamic batching of the fine-grained student's work across concurrent requests.

Each request runs the engine's ``LocalReranker.rerank`` in its own worker thread (selector,
object fetches and the merge stay the engine's code). Only the fine-grained scoring, the part
that wants the GPU, is handed over: ``BatchingReranker.fine_scores`` submits a job to the
``FineBatcher`` and waits on its future. The batcher is an asyncio task that collects jobs
until the oldest has waited ``max_wait_ms`` or ``max_batch_pairs`` query/target pairs are
pending, then runs the whole batch in ONE dedicated thread, so

- the device sees one stream of back-to-back batches instead of many threads contending;
- while a batch runs, the next one accumulates; it starts as soon as the device is free
  (jobs that already waited their ``max_wait_ms`` are not held back again);
- the event loop never blocks on torch.

Admission is bounded in pairs (``max_queue_pairs``, queued + running): past it a submission
fails at once with ``OverloadedError`` instead of growing memory. A job whose request was cancelled
or whose deadline passed is dropped when its batch is formed, before any work is done for it.
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
)
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


@dataclass
class FineJob:
    query: VideoRecord
    targets: Sequence[np.ndarray]
    ticket: Ticket
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def pairs(self) -> int:
        return len(self.targets)


@dataclass
class BatchStats:
    """What the batcher did, for metrics and the load benchmark."""

    batches: int = 0
    jobs: int = 0
    pairs: int = 0
    dropped_jobs: int = 0
    busy_s: float = 0.0  # time the scoring thread spent computing


class FineBatcher:
    """Collects fine-scoring jobs from request threads and scores them in batches.

    Args:
        score_jobs: scores a batch: one float32 array per job (runs in the scoring thread).
        max_batch_pairs: a batch closes when it holds this many pairs (a larger single job runs alone).
        max_wait_ms: the longest the oldest job of a forming batch waits for company.
        max_queue_pairs: pairs admitted (queued + running) before submissions are refused.
        on_batch: called in the event loop after each batch with (jobs, pairs, seconds, queue waits).
    """

    def __init__(
        self,
        score_jobs: Callable[[Sequence[FineJob]], list[np.ndarray]],
        *,
        max_batch_pairs: int = 4096,
        max_wait_ms: float = 2.0,
        max_queue_pairs: int = 65536,
        on_batch: Callable[[int, int, float, list[float]], None] | None = None,
    ) -> None:
        if max_batch_pairs < 1 or max_queue_pairs < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_pairs and max_queue_pairs must be >= 1 and max_wait_ms >= 0")
        self.score_jobs = score_jobs
        self.max_batch_pairs = max_batch_pairs
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_pairs = max_queue_pairs
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._jobs: collections.deque[FineJob] = collections.deque()
        self._admitted_pairs = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fine-scorer")

    @property
    def admitted_pairs(self) -> int:
        return self._admitted_pairs

    def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = self._loop.create_task(self._run(), name="fine-batcher")

    async def stop(self) -> None:
        """Fail whatever is still queued with ``ShuttingDownError`` and stop the task and the thread."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
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
            self._admitted_pairs += job.pairs
        self._loop.call_soon_threadsafe(self._enqueue, job)
        return job.future

    def _enqueue(self, job: FineJob) -> None:
        if self._closed:
            self._finish(job, error=ShuttingDownError("re-ranker is shutting down"))
            return
        self._jobs.append(job)
        assert self._wakeup is not None
        self._wakeup.set()

    async def _run(self) -> None:
        assert self._loop is not None
        while True:
            batch = await self._next_batch()
            live = []
            for job in batch:
                try:
                    job.ticket.check()
                except DnSError as exc:
                    self.stats.dropped_jobs += 1
                    self._finish(job, error=exc)
                    continue
                live.append(job)
            if not live:
                continue
            started = time.monotonic()
            waits = [started - job.enqueued for job in live]
            for job, wait in zip(live, waits, strict=True):
                job.ticket.queue_ms += wait * 1000.0
            try:
                results = await self._loop.run_in_executor(self._scorer, self._score, live)
            except BaseException as exc:  # a failed batch fails its jobs, never the batcher
                for job in live:
                    error = exc if isinstance(exc, Exception) else ShuttingDownError(str(exc))
                    self._finish(job, error=error)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            busy = time.monotonic() - started
            pairs = sum(job.pairs for job in live)
            self.stats.batches += 1
            self.stats.jobs += len(live)
            self.stats.pairs += pairs
            self.stats.busy_s += busy
            for job, result in zip(live, results, strict=True):
                if isinstance(result, Exception):
                    self._finish(job, error=result)
                else:
                    self._finish(job, result=result)
            if self.on_batch is not None:
                self.on_batch(len(live), pairs, busy, waits)

    async def _next_batch(self) -> list[FineJob]:
        assert self._wakeup is not None
        while not self._jobs:
            self._wakeup.clear()
            await self._wakeup.wait()
        # Hold the batch open until the oldest job has waited max_wait or enough pairs are here.
        while True:
            queued = sum(job.pairs for job in self._jobs)
            remaining = self._jobs[0].enqueued + self.max_wait_s - time.monotonic()
            if queued >= self.max_batch_pairs or remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        batch = [self._jobs.popleft()]
        pairs = batch[0].pairs
        while self._jobs and pairs + self._jobs[0].pairs <= self.max_batch_pairs:
            job = self._jobs.popleft()
            batch.append(job)
            pairs += job.pairs
        return batch

    def _score(self, jobs: Sequence[FineJob]) -> list[np.ndarray | Exception]:
        """Runs in the scoring thread: the whole batch, then each job alone if the batch failed."""
        with torch.inference_mode():
            try:
                return list(self.score_jobs(jobs))
            except Exception:
                if len(jobs) == 1:
                    raise
            out: list[np.ndarray | Exception] = []
            for job in jobs:  # isolate the job that broke the batch
                try:
                    out.extend(self.score_jobs([job]))
                except Exception as exc:
                    out.append(exc)
            return out

    def _finish(
        self, job: FineJob, *, result: np.ndarray | None = None, error: BaseException | None = None
    ) -> None:
        with self._lock:
            self._admitted_pairs -= job.pairs
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)


class BatchingReranker(LocalReranker):
    """``LocalReranker`` whose fine-grained scoring goes through a shared ``FineBatcher``.

    Everything else (selector, fetch through the cache, merge) is the engine's code, so a
    request's ranking equals ``LocalReranker.rerank`` on the same inputs.
    """

    def __init__(
        self, models: ModelSet, store: ObjectStore, *, cache_bytes: int, batcher_options: dict
    ) -> None:
        super().__init__(models, store, cache_bytes=cache_bytes)
        self.batcher = FineBatcher(self.score_jobs, **batcher_options)

    def fine_scores(self, query: VideoRecord, targets: Sequence[np.ndarray]) -> np.ndarray:
        if not targets:
            return np.zeros(0, dtype=np.float32)
        ticket = current_ticket.get() or Ticket()
        return self.batcher.submit(query, targets, ticket).result()

    def fetch_fine(self, candidates):  # type: ignore[no-untyped-def]
        ticket = current_ticket.get()
        if ticket is not None:
            ticket.check()  # a cancelled or late request fetches nothing
        return super().fetch_fine(candidates)

    def score_jobs(self, jobs: Sequence[FineJob]) -> list[np.ndarray]:
        """Score a batch in the scoring thread. Jobs whose query is the same tensor (an uploaded
        query handle, or an indexed query read through the cache, used by concurrent requests)
        share one kernel call; each call is itself batched over its targets by the kernels."""
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(id(job.query.fine), []).append(i)
        out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(jobs)
        for members in groups.values():
            targets = [t for i in members for t in jobs[i].targets]
            scores = LocalReranker.fine_scores(self, jobs[members[0]].query, targets)
            start = 0
            for i in members:
                out[i] = scores[start : start + jobs[i].pairs]
                start += jobs[i].pairs
        return out
