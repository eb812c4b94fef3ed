"""Concurrent sidecar requests scored in shared comparator calls, over real gRPC on loopback.

The shipped model set (``dns_milvus/assets``) serves a small corpus of videos of different
lengths (random region features through its real networks). Requests sent at once land in one
batch, whose pairs (different queries, different lengths) are pooled into shared comparator
calls; their answers must equal those of the same requests sent one at a time, to 1e-5. Deadlines
and requests over the work limits must still fail cleanly, alone, inside a shared batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import grpc
import numpy as np
import pytest

from dns_milvus.config import DEFAULT_MODEL_SET
from dns_milvus.engine import ModelSet, SelectionPolicy, VideoRecord
from dns_milvus.engine.rerank import Candidate
from dns_milvus.rpc import convert
from dns_milvus.rpc import rerank_pb2 as pb
from dns_milvus.rpc import rerank_pb2_grpc as pb_grpc
from dns_milvus.sidecar.config import ServerConfig
from dns_milvus.sidecar.server import BackgroundServer
from dns_milvus.store import LocalStore
from dns_milvus.testing.synthetic import candidates_for, write_corpus
from tests.test_rerank_service import wait_until

COLLECTION = "videos"
TOLERANCE = 1e-5


@dataclasses.dataclass
class Shipped:
    models: ModelSet
    store: LocalStore
    store_dir: Path
    corpus: dict[str, VideoRecord]

    def config(self, **overrides: object) -> ServerConfig:
        base = ServerConfig(
            model_set=str(DEFAULT_MODEL_SET),
            store=str(self.store_dir),
            grpc_port=0,
            http_port=-1,
            fine_threads=1,
        )
        return dataclasses.replace(base, **overrides)

    def request(
        self, query: VideoRecord, policy: SelectionPolicy = SelectionPolicy("all", 0), top_k: int = 30
    ) -> pb.RerankRequest:
        return pb.RerankRequest(
            inline=convert.inline_query_to_proto(query),
            candidates=convert.candidates_to_proto(self.candidates(query)),
            policy=convert.policy_to_proto(policy),
            top_k=top_k,
        )

    def candidates(self, query: VideoRecord) -> list[Candidate]:
        return candidates_for(query, self.corpus, COLLECTION)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shipped]:
    root = tmp_path_factory.mktemp("sidecar-batching")
    models = ModelSet.load(DEFAULT_MODEL_SET, device="cpu")
    store = LocalStore(root / "objects")
    # lengths spread over 4-40 frames: the batch mixes queries and targets of different lengths
    corpus = write_corpus(models, store, COLLECTION, 20, seed=11, frames=(4, 40))
    yield Shipped(models, store, root / "objects", corpus)
    store.close()


@pytest.fixture
def start_server(shipped: Shipped) -> Iterator[Callable[..., BackgroundServer]]:
    started: list[BackgroundServer] = []

    def start(**overrides: object) -> BackgroundServer:
        server = BackgroundServer(shipped.config(**overrides), shipped.models, shipped.store).start(
            timeout_s=120
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace_s=1.0)


def hits(response: pb.RerankResponse) -> list[tuple[str, float, float, int]]:
    return [(h.video_id, h.score, h.fine_score, h.stage) for h in response.hits]


def assert_same_hits(got: pb.RerankResponse, expected: pb.RerankResponse) -> None:
    """Same candidates in the same order and stages, scores within ``TOLERANCE``."""
    assert [(h[0], h[3]) for h in hits(got)] == [(h[0], h[3]) for h in hits(expected)]
    np.testing.assert_allclose(
        [h[1:3] for h in hits(got)], [h[1:3] for h in hits(expected)], rtol=0, atol=TOLERANCE
    )


def one_at_a_time(server: BackgroundServer, requests: list[pb.RerankRequest]) -> list[pb.RerankResponse]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.RerankerStub(channel)
        return [stub.Rerank(request, timeout=120) for request in requests]


def all_at_once(server: BackgroundServer, requests: list[tuple[pb.RerankRequest, float]]) -> list[Future]:
    """Send every (request, timeout) at once; the futures of their answers."""
    channel = grpc.insecure_channel(server.grpc_target)
    stub = pb_grpc.RerankerStub(channel)
    futures = [stub.Rerank.future(request, timeout=timeout) for request, timeout in requests]
    for future in futures:
        future.add_done_callback(lambda _: None)
    return futures


def queries_of_different_lengths(shipped: Shipped, count: int) -> list[VideoRecord]:
    by_length = sorted(shipped.corpus.values(), key=lambda r: r.n_frames)
    picked = [by_length[i] for i in np.linspace(0, len(by_length) - 1, count).astype(int)]
    assert len({r.n_frames for r in picked}) > 1
    return picked


def test_concurrent_requests_equal_the_same_requests_one_at_a_time(
    shipped: Shipped, start_server: Callable[..., BackgroundServer]
) -> None:
    queries = queries_of_different_lengths(shipped, 6)
    requests = [shipped.request(q) for q in queries[:3]]
    requests += [shipped.request(q, SelectionPolicy("percent", 50.0), top_k=8) for q in queries[3:]]
    alone = one_at_a_time(start_server(max_wait_ms=0.0), requests)
    batching = start_server(max_wait_ms=3000.0)  # holds the first batch open until all have arrived
    together = [f.result() for f in all_at_once(batching, [(r, 120.0) for r in requests])]
    for got, expected in zip(together, alone, strict=True):
        assert got.n_reranked == expected.n_reranked > 0
        assert_same_hits(got, expected)
    stats = batching.server.core.reranker.batcher.stats
    assert stats.jobs == len(requests) and stats.batches < len(requests)  # they shared batches


def test_a_late_request_fails_alone_inside_a_shared_batch(
    shipped: Shipped, start_server: Callable[..., BackgroundServer]
) -> None:
    first, second = queries_of_different_lengths(shipped, 2)
    (expected,) = one_at_a_time(start_server(max_wait_ms=0.0), [shipped.request(second)])
    server = start_server(max_wait_ms=1500.0)
    # the first request's deadline passes while the batch waits for company; the second's does not
    late, on_time = all_at_once(server, [(shipped.request(first), 0.3), (shipped.request(second), 120.0)])
    with pytest.raises(grpc.RpcError) as info:
        late.result()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_same_hits(on_time.result(), expected)
    batcher = server.server.core.reranker.batcher
    wait_until(lambda: batcher.admitted_pairs == 0 and batcher.admitted_frame_pairs == 0)
    assert batcher.stats.jobs == 1  # only the request on time was scored to the end
    assert len(one_at_a_time(server, [shipped.request(first)])[0].hits) > 0  # and it serves on


def test_a_request_over_the_work_limit_fails_alone_beside_others(
    shipped: Shipped, start_server: Callable[..., BackgroundServer]
) -> None:
    short, long = queries_of_different_lengths(shipped, 2)
    limit = short.n_frames * sum(c.n_frames for c in shipped.candidates(short))  # just fits
    assert long.n_frames * sum(c.n_frames for c in shipped.candidates(long)) > limit
    (expected,) = one_at_a_time(start_server(max_wait_ms=0.0), [shipped.request(short)])
    server = start_server(max_wait_ms=1500.0, max_frame_pairs=limit)
    too_big, fine = all_at_once(server, [(shipped.request(long), 120.0), (shipped.request(short), 120.0)])
    with pytest.raises(grpc.RpcError) as info:
        too_big.result()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_frame_pairs" in info.value.details() and str(limit) in info.value.details()
    assert_same_hits(fine.result(), expected)


def test_queued_work_is_capped_in_frame_pairs(
    shipped: Shipped, start_server: Callable[..., BackgroundServer]
) -> None:
    first, second = queries_of_different_lengths(shipped, 2)
    cap = first.n_frames * sum(c.n_frames for c in shipped.candidates(first)) - 1
    server = start_server(max_wait_ms=5000.0, max_queue_frame_pairs=cap)
    batcher = server.server.core.reranker.batcher
    (admitted,) = all_at_once(server, [(shipped.request(first), 120.0)])  # over the cap, but alone
    wait_until(lambda: batcher.admitted_frame_pairs > cap)
    with pytest.raises(grpc.RpcError) as info:
        one_at_a_time(server, [shipped.request(second)])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "frame pairs" in info.value.details() and str(cap) in info.value.details()
    assert len(admitted.result().hits) > 0
    wait_until(lambda: batcher.admitted_frame_pairs == 0)
