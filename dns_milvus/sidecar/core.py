"""The protocol-neutral heart of the sidecar: admission, query resolution, stage 2, errors.

The gRPC service and the HTTP endpoints both call ``RerankCore.rerank``; it admits the request
(bounded in-flight count), runs the engine's stage 2 in a worker thread with the request's
``Ticket`` (deadline, cancellation) visible to the batcher, and maps failures to one status
table shared by both protocols.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib.metadata
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import grpc
import numpy as np

from dns_milvus.engine.modelset import ModelSet, VideoRecord
from dns_milvus.engine.policy import SelectionPolicy
from dns_milvus.engine.rerank import MAX_CANDIDATES, Candidate, RerankResult
from dns_milvus.errors import (
    BackendUnavailableError,
    CorruptObjectError,
    DeadlineExceededError,
    InvalidInputError,
    ModelSetMismatchError,
    NotFoundError,
    OverloadedError,
    RequestCancelledError,
    ShuttingDownError,
)
from dns_milvus.sidecar.batching import BatchingReranker, Ticket, current_ticket
from dns_milvus.sidecar.config import ServerConfig
from dns_milvus.sidecar.metrics import Metrics
from dns_milvus.store import ObjectStore, StoreAccessError, decode_fine_tensor, fine_key

# (error type, gRPC status, HTTP status, short name for metrics); the first match wins.
_STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode, int, str], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_argument"),
    (NotFoundError, grpc.StatusCode.NOT_FOUND, 404, "not_found"),
    (ModelSetMismatchError, grpc.StatusCode.FAILED_PRECONDITION, 409, "failed_precondition"),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "resource_exhausted"),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE, 503, "unavailable"),
    (BackendUnavailableError, grpc.StatusCode.UNAVAILABLE, 503, "unavailable"),
    (StoreAccessError, grpc.StatusCode.UNAVAILABLE, 503, "unavailable"),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED, 504, "deadline_exceeded"),
    (RequestCancelledError, grpc.StatusCode.CANCELLED, 499, "cancelled"),
    (CorruptObjectError, grpc.StatusCode.DATA_LOSS, 500, "data_loss"),
)


@dataclass(frozen=True)
class ErrorStatus:
    grpc_code: grpc.StatusCode
    http_status: int
    name: str
    message: str


def classify(exc: BaseException) -> ErrorStatus:
    """The status both protocols answer for ``exc``; unexpected errors say no more than INTERNAL."""
    for cls, code, http, name in _STATUS_TABLE:
        if isinstance(exc, cls):
            return ErrorStatus(code, http, name, str(exc))
    return ErrorStatus(grpc.StatusCode.INTERNAL, 500, "internal", f"internal error ({type(exc).__name__})")


@dataclass(frozen=True)
class IndexedRef:
    """A query named by collection and video id; its fine tensor is read from the store. The
    store lacks its self-similarity and coarse vector: the client passes them (Milvus fields)."""

    collection: str
    video_id: str
    self_sim: float | None = None
    #: float32 [coarse_dim], or empty when not given (only a segment-reading selector needs it).
    coarse: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))


QuerySpec = VideoRecord | IndexedRef
T = TypeVar("T")


@dataclass(frozen=True)
class Stage2Request:
    """What stage 2 needs, parsed from either protocol."""

    query: QuerySpec
    candidates: Sequence[Candidate]
    policy: SelectionPolicy
    top_k: int


class RerankCore:
    """Stage 2 for many concurrent requests over one model set, one store and one batcher."""

    def __init__(self, models: ModelSet, store: ObjectStore, config: ServerConfig, metrics: Metrics) -> None:
        self.models = models
        self.store = store
        self.config = config
        self.metrics = metrics
        self._store_locations = _store_locations(store)
        self.max_candidates = min(config.max_candidates, MAX_CANDIDATES)
        self.reranker = BatchingReranker(
            models,
            store,
            cache_bytes=config.cache_bytes,
            max_frame_pairs=config.max_frame_pairs,
            fine_precision=config.fine_precision,
            fine_threads=config.fine_threads or None,
            batcher_options={
                "max_batch_pairs": config.max_batch_pairs,
                "max_batch_frame_pairs": config.max_batch_frame_pairs,
                "max_wait_ms": config.max_wait_ms,
                "max_queue_pairs": config.max_queue_pairs,
                "max_queue_frame_pairs": config.max_queue_frame_pairs,
                "scorers": config.fine_scorers,
                "on_batch": metrics.observe_batch,
            },
        )
        # One thread per admitted request: a waiting request holds a thread, never the loop.
        self._workers = ThreadPoolExecutor(max_workers=config.max_inflight, thread_name_prefix="rerank")
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self.draining = False
        metrics.bind(self)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def fine_dim(self) -> int:
        return int(self.models.fine.output_dim)

    async def start(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()
        self.reranker.batcher.start()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight (at most ``timeout_s``); whether that happened."""
        assert self._idle is not None
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        self.draining = True
        await self.reranker.batcher.stop()
        self._workers.shutdown(wait=False, cancel_futures=True)

    def redact(self, text: str) -> str:
        """``text`` without where the object store lives (its root directory, endpoint): store
        errors name it, and warnings and error messages go to clients."""
        for location in self._store_locations:
            text = text.replace(location, "the object store")
        return text

    def status(self, exc: BaseException) -> ErrorStatus:
        """``classify(exc)`` with a message fit for a client."""
        err = classify(exc)
        return replace(err, message=self.redact(err.message))

    def check_model(self, model_set: str, model_tag: str) -> None:
        if model_set and model_set != self.models.name:
            raise ModelSetMismatchError(
                f"request is for model set {model_set!r}; this server serves {self.models.name!r}"
            )
        if model_tag and model_tag != self.models.tag:
            raise ModelSetMismatchError(
                f"request is for model tag {model_tag!r}; this server serves model set "
                f"{self.models.name!r} with tag {self.models.tag!r}"
            )

    def check_candidate_count(self, n: int, field: str = "candidates") -> None:
        if n > self.max_candidates:
            raise InvalidInputError(f"{field}: {n} given; the limit is {self.max_candidates} a request")

    async def run(
        self,
        prepare: Callable[[], Stage2Request],
        finish: Callable[[RerankResult], T],
        *,
        timeout_s: float | None = None,
    ) -> T:
        """Admit a request and serve it in a worker thread: ``prepare`` (parse and validate the
        protocol's message), stage 2, then ``finish`` (build the reply). Parsing a large request
        therefore never blocks the event loop.

        Raises ``ShuttingDownError`` while draining, ``OverloadedError`` past ``max_inflight`` and
        ``DeadlineExceededError`` once ``timeout_s`` has passed (the answer does not wait for the
        worker; its remaining work stops at the deadline). A cancelled caller
        (``asyncio.CancelledError``) drops the request's pending batch work.
        """
        if self.draining:
            raise ShuttingDownError("re-ranker is shutting down; retry on another replica")
        if self._inflight >= self.config.max_inflight:
            raise OverloadedError(
                f"re-ranker has {self._inflight} requests in flight "
                f"(limit {self.config.max_inflight}); retry later"
            )
        ticket = Ticket(deadline=time.monotonic() + timeout_s if timeout_s is not None else None)
        context = contextvars.copy_context()
        context.run(current_ticket.set, ticket)
        self._admit()
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._workers, context.run, self._work, prepare, finish, ticket)
        except RuntimeError:  # executor shut down between the draining check and here
            self._release()
            raise ShuttingDownError("re-ranker is shutting down; retry on another replica") from None
        # The slot is released when the thread is done, not when the caller stops waiting.
        future.add_done_callback(self._work_done)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.CancelledError:
            ticket.cancelled = True
            raise
        except asyncio.TimeoutError:
            if future.done():  # the worker's own deadline error (a TimeoutError too)
                raise
            raise DeadlineExceededError(
                f"deadline of {timeout_s:.3g} s exceeded; the request's remaining work is dropped"
            ) from None

    async def rerank(
        self,
        query: QuerySpec,
        candidates: Sequence[Candidate],
        policy: SelectionPolicy,
        top_k: int,
        *,
        timeout_s: float | None = None,
    ) -> RerankResult:
        """``run`` for arguments that are already parsed."""
        request = Stage2Request(query, candidates, policy, top_k)
        return await self.run(lambda: request, lambda result: result, timeout_s=timeout_s)

    def _work(
        self, prepare: Callable[[], Stage2Request], finish: Callable[[RerankResult], T], ticket: Ticket
    ) -> T:
        t0 = time.perf_counter()
        ticket.check()
        request = prepare()
        self.check_candidate_count(len(request.candidates))
        query = request.query
        if isinstance(query, IndexedRef) and query.self_sim is None and request.policy.uses_selector:
            raise InvalidInputError(
                f"indexed.self_sim: required by policy {request.policy} (the selector needs the query's "
                "self-similarity); give it, or use policy 'all' or 'none'"
            )
        # A selector that reads segment matches compares the query's coarse vector with the codes.
        reads_coarse = self.models.selector_segments and request.policy.uses_selector and request.candidates
        if reads_coarse and not query.coarse.size:
            where = "indexed" if isinstance(query, IndexedRef) else "inline"
            raise InvalidInputError(
                f"{where}.coarse: required by policy {request.policy} (the model set's selector matches "
                "the query's coarse vector against the candidates' segment codes); give it, or use "
                "policy 'all' or 'none'"
            )
        record = self.load_indexed(query) if isinstance(query, IndexedRef) else query
        result = self.reranker.rerank(record, request.candidates, request.policy, request.top_k)
        result.warnings = [self.redact(w) for w in result.warnings]
        result.timings_ms["queue_ms"] = ticket.queue_ms
        result.timings_ms["total_ms"] = (time.perf_counter() - t0) * 1000.0
        self.metrics.observe_timings(result.timings_ms)
        return finish(result)

    def load_indexed(self, ref: IndexedRef) -> VideoRecord:
        """The query record of an indexed video, its fine tensor read through the cache."""
        key = fine_key(ref.collection, ref.video_id)
        array = self.reranker.cache.get(key)
        if array is None:
            try:
                data = self.store.get(key)
            except NotFoundError:
                raise NotFoundError(
                    f"indexed query {ref.video_id!r} of collection {ref.collection!r} has no fine tensor in "
                    f"the store (key {key}); is it indexed, and does the server use the indexer's store?"
                ) from None
            tensor = decode_fine_tensor(data, video_id=ref.video_id, key=key)
            if tensor.kind != self.models.payload_kind:
                raise ModelSetMismatchError(
                    f"indexed query {ref.video_id!r} is stored as {tensor.kind.value}; the served model set "
                    f"{self.models.name!r} needs {self.models.payload_kind}"
                )
            array = tensor.array
            self.reranker.cache.put(key, array)
        return VideoRecord(
            coarse=ref.coarse,
            self_sim=float(ref.self_sim) if ref.self_sim is not None else 0.0,
            fine=array,
            payload_kind=self.models.payload_kind,
            video_id=ref.video_id,
        )

    def info(self) -> dict[str, Any]:
        return {
            "model_set": self.models.name,
            "model_tag": self.models.tag,
            "payload_kind": self.models.payload_kind,
            "coarse_dim": self.models.coarse_dim,
            "selector_segments": self.models.selector_segments,
            "device": str(self.models.device),
            "max_candidates": self.max_candidates,
            "max_message_bytes": self.config.max_message_bytes,
            "server_version": _server_version(),
        }

    def _admit(self) -> None:
        self._inflight += 1
        if self._idle is not None:
            self._idle.clear()

    def _release(self) -> None:
        # Runs on the event loop (asyncio future callbacks do).
        self._inflight -= 1
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()

    def _work_done(self, future: asyncio.Future) -> None:
        self._release()
        if not future.cancelled():
            future.exception()  # a caller that left (deadline, cancel) never reads it: not worth a log


def _store_locations(store: ObjectStore) -> list[str]:
    """The strings by which store errors say where the store is, longest first."""
    found = {repr(store)}
    for attribute in ("root", "endpoint_url"):  # LocalStore's directory, S3Store's endpoint
        value = getattr(store, attribute, None)
        if value:
            found.add(str(value))
    return sorted(found, key=len, reverse=True)


def _server_version() -> str:
    try:
        return importlib.metadata.version("dns-milvus")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
