"""The locally built stack (docker/docker-compose.local.yml): Milvus standalone, SeaweedFS as S3
and the re-ranker sidecar, each in its container, host networking on loopback.

The tests index a synthetic corpus through the SDK into the containerised Milvus and S3, search
with the containerised sidecar as stage 2 and compare with stage 2 in-process, check health
checks and metrics, stop the sidecar in the middle of a stream of searches, and restart Milvus
(gracefully and by a kill) with rows written just before. Skipped without a Docker engine
(see conftest.py); ``bash docker/dev-engine.sh up`` starts one.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from dns_milvus.engine import DnSIndex, ModelSet, SearchResponse, SelectionPolicy
from dns_milvus.rpc import RemoteReranker
from dns_milvus.store import decode_fine_tensor, fine_key, open_store
from dns_milvus.testing.synthetic import random_features
from tests.docker.conftest import MODEL_SET, SERVICES, Stack, http_get, wait_for_milvus

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

COLLECTION = "stack_videos"
N_VIDEOS = 12
POLICY = SelectionPolicy("percent", 50)


def _milvus_client(stack: Stack):  # -> pymilvus.MilvusClient
    from pymilvus import MilvusClient

    return MilvusClient(stack.milvus_uri, timeout=30)


def _s3_client(stack: Stack):  # -> boto3 S3 client
    return boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=stack.access_key,
        aws_secret_access_key=stack.secret_key,
    )


def _metric(stack: Stack, name: str, **labels: str) -> float:
    """The value of one sample of the sidecar's /metrics (0 when absent)."""
    status, body = http_get(f"{stack.sidecar_http}/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _reranks_served(stack: Stack) -> float:
    return _metric(stack, "dns_reranker_requests_total", protocol="grpc", method="Rerank", status="ok")


@pytest.fixture(scope="module")
def models(stack_model_set: Path) -> ModelSet:
    return ModelSet.load(stack_model_set, device="cpu")


@pytest.fixture(scope="module")
def indexed(stack: Stack, models: ModelSet) -> Iterator[DnSIndex]:
    """``N_VIDEOS`` random videos indexed through the SDK into the stack's Milvus and S3."""
    store = open_store(stack.store_uri, access_key=stack.access_key, secret_key=stack.secret_key)
    index = DnSIndex(stack.milvus_uri, models=models, store=store, collection=COLLECTION)
    ids = [f"v{i}" for i in range(N_VIDEOS)]
    index.add_many(ids, random_features(N_VIDEOS, dims=models.feature_dim, seed=5))
    index.collection.flush()
    yield index
    index.close()  # the volumes go with the stack


@pytest.fixture
def remote(stack: Stack) -> Iterator[RemoteReranker]:
    with RemoteReranker(stack.grpc_target, model_set=MODEL_SET, timeout_s=10.0) as reranker:
        yield reranker


def _search(index: DnSIndex, reranker: RemoteReranker | None, query: str, **kw: object) -> SearchResponse:
    index.reranker = reranker or index.local_reranker
    try:
        return index.search(query, top_k=5, candidates=N_VIDEOS - 1, policy=POLICY, **kw)  # type: ignore[arg-type]
    finally:
        index.reranker = index.local_reranker


def test_every_container_is_healthy_on_host_networking_and_answers(stack: Stack, models: ModelSet) -> None:
    for service in SERVICES:
        details = stack.inspect(service)
        assert details["State"]["Health"]["Status"] == "healthy", service  # the image's HEALTHCHECK
        assert details["HostConfig"]["NetworkMode"] == "host", service
    # The sidecar: HTTP and gRPC health, the mounted model set, metrics.
    status, body = http_get(f"{stack.sidecar_http}/healthz")
    assert (status, json.loads(body)["status"]) == (200, "SERVING")
    status, body = http_get(f"{stack.sidecar_http}/v1/info")
    info = json.loads(body)
    assert (info["model_set"], info["model_tag"], info["device"]) == (MODEL_SET, models.tag, "cpu")
    with grpc.insecure_channel(stack.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "dns.rerank.v1.Reranker"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    status, body = http_get(f"{stack.sidecar_http}/metrics")
    assert status == 200
    families = {family.name for family in text_string_to_metric_families(body.decode())}
    expected = {"dns_reranker_requests", "dns_reranker_inflight_requests", "dns_reranker_stage_seconds"}
    assert expected <= families
    # Milvus's own health endpoint, and S3's.
    assert http_get(f"http://127.0.0.1:{stack.milvus_health_port}/healthz")[0] == 200
    assert http_get(f"{stack.s3_endpoint}/healthz")[0] == 200


def test_ingest_through_the_sdk_lands_in_the_containers(stack: Stack, indexed: DnSIndex) -> None:
    ids = [f"v{i}" for i in range(N_VIDEOS)]
    client = _milvus_client(stack)
    try:
        rows = client.query(
            COLLECTION, filter="", output_fields=["video_id", "fine_key", "n_frames"],
            limit=100, consistency_level="Strong",
        )  # fmt: skip
    finally:
        client.close()
    assert sorted(r["video_id"] for r in rows) == sorted(ids)
    assert all(r["fine_key"] == fine_key(COLLECTION, r["video_id"]) for r in rows)
    # Every row's object is in the bucket, bound to its video, with the row's frame count.
    s3 = _s3_client(stack)
    listed = s3.list_objects_v2(Bucket=stack.bucket, Prefix="objects/")
    keys = sorted(o["Key"] for o in listed.get("Contents", []))
    assert keys == sorted(f"objects/{r['fine_key']}" for r in rows)
    for row in rows:
        body = s3.get_object(Bucket=stack.bucket, Key=f"objects/{row['fine_key']}")["Body"].read()
        tensor = decode_fine_tensor(body, row["video_id"], n_frames=row["n_frames"])
        assert tensor.bound and tensor.n_frames == row["n_frames"]


def test_search_with_the_sidecar_equals_search_in_process(
    stack: Stack, indexed: DnSIndex, remote: RemoteReranker
) -> None:
    served_before = _reranks_served(stack)
    queries = ["v0", "v5", "v9"]
    for query in queries:
        local = _search(indexed, None, query)
        served = _search(indexed, remote, query)
        assert not served.degraded and served.warnings == []
        assert served.n_reranked == local.n_reranked > 0
        assert [(h.video_id, h.stage) for h in served.hits] == [(h.video_id, h.stage) for h in local.hits]
        assert [h.score for h in served.hits] == pytest.approx([h.score for h in local.hits], abs=1e-5)
        assert [h.fine_score for h in served.hits] == pytest.approx(
            [h.fine_score for h in local.hits], abs=1e-5
        )
    served_after = _reranks_served(stack)
    assert served_after - served_before == len(queries)


def test_docker_stop_of_the_sidecar_mid_search_degrades_and_fails_nothing(
    stack: Stack, indexed: DnSIndex, remote: RemoteReranker
) -> None:
    coarse = indexed.search("v3", top_k=5, candidates=N_VIDEOS - 1, policy=SelectionPolicy("none", 0))
    results: list[tuple[float, float, SearchResponse]] = []
    failures: list[str] = []
    done = threading.Event()

    def search_until_done() -> None:
        while not done.is_set():
            began = time.monotonic()
            try:
                response = _search(indexed, remote, "v3")
            except Exception as exc:  # a failed search is what this test counts
                failures.append(repr(exc))
            else:
                results.append((began, time.monotonic(), response))
            time.sleep(0.02)

    def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{what}: {len(results)} searches, failures {failures[:3]}"
            time.sleep(0.05)

    searcher = threading.Thread(target=search_until_done, daemon=True)
    searcher.start()
    try:
        wait_for(lambda: sum(not r.degraded for _, _, r in results) >= 5, "searches before the stop")
        stop_began = time.monotonic()
        stack.compose.execute("stop -t 20 sidecar")
        stop_ended = time.monotonic()
        wait_for(lambda: sum(b > stop_ended for b, _, _ in results) >= 5, "searches after the stop")
    finally:
        done.set()
        searcher.join(timeout=30)
        stack.compose.execute("start sidecar")
    assert failures == []
    before = [r for _, end, r in results if end < stop_began]
    after = [r for began, _, r in results if began > stop_ended]
    assert before and not any(r.degraded for r in before)
    assert after and all(r.degraded for r in after)
    for response in after:  # the coarse ranking, flagged and explained
        assert any("stage 2 unavailable" in w for w in response.warnings)
        assert [(h.video_id, h.stage) for h in response.hits] == [(h.video_id, h.stage) for h in coarse.hits]
        assert [h.score for h in response.hits] == pytest.approx([h.score for h in coarse.hits], abs=1e-6)
    # docker stop drained the sidecar: it logged so and exited 0.
    assert stack.inspect("sidecar")["State"]["ExitCode"] == 0
    logs = stack.logs("sidecar")
    assert '"msg": "draining"' in logs and '"drained": true' in logs
    # Started again, it serves stage 2 again: the same client gets through once its channel
    # reconnects (gRPC retries a refused connection with a backoff of a few seconds).
    stack.wait_healthy("sidecar", timeout=120)
    deadline = time.monotonic() + 60
    while (again := _search(indexed, remote, "v3")).degraded:
        assert time.monotonic() < deadline, again.warnings
        time.sleep(0.5)
    assert again.n_reranked > 0


def test_a_restart_of_milvus_keeps_every_acknowledged_row(stack: Stack, models: ModelSet) -> None:
    store = open_store(stack.store_uri, access_key=stack.access_key, secret_key=stack.secret_key)
    features = random_features(30, dims=models.feature_dim, seed=9)
    acknowledged: list[str] = []

    def write(ids: list[str], batch: list[np.ndarray]) -> None:
        index = DnSIndex(stack.milvus_uri, models=models, store=store, collection="stack_restart")
        try:
            index.add_many(ids, batch)  # returned: Milvus acknowledged the rows
            acknowledged.extend(ids)
        finally:
            index.close()

    def rows_after_restart() -> list[str]:
        stack.wait_healthy("milvus", timeout=180)
        wait_for_milvus(stack.milvus_uri)
        client = _milvus_client(stack)
        deadline = time.monotonic() + 120
        try:
            while True:  # the collection is loaded again in the background after a start
                try:
                    rows = client.query(
                        "stack_restart", filter="", output_fields=["video_id"], limit=1000,
                        consistency_level="Strong",
                    )  # fmt: skip
                    return sorted(r["video_id"] for r in rows)
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)
        finally:
            client.close()

    # A graceful restart (docker restart: SIGTERM, then start) right after the writes...
    write([f"a{i}" for i in range(15)], features[:15])
    stack.compose.execute("restart -t 30 milvus")
    assert rows_after_restart() == sorted(acknowledged)
    # ... and a crash (SIGKILL) right after more writes.
    write([f"b{i}" for i in range(15)], features[15:])
    container = stack.container("milvus")
    stack.compose.execute("kill -s SIGKILL milvus")
    assert stack.inspect("milvus")["State"]["Running"] is False
    stack.compose.execute("start milvus")
    assert stack.container("milvus") == container
    assert rows_after_restart() == sorted(acknowledged)
    # The restarted server answers searches over the rows written before both restarts.
    index = DnSIndex(stack.milvus_uri, models=models, store=store, collection="stack_restart")
    try:
        response = index.search("b3", top_k=5, candidates=20, policy=POLICY)
        assert len(response.hits) == 5 and not response.degraded
        assert index.count() == len(acknowledged) == 30
    finally:
        index.close()
