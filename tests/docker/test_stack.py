"""The whole stack of docker/docker-compose.yml: Milvus standalone + etcd + MinIO + the sidecar.

Skipped without a Docker engine (see conftest.py). With one, ``docker compose up --build
--wait`` builds the sidecar image and starts everything; the tests index a small synthetic
corpus through the SDK (Milvus rows, MinIO objects) and check that stage 2 on the sidecar,
stage 2 in-process and Milvus's own rerank hook (TEI provider -> sidecar) agree.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dns_milvus.engine import DnSIndex, ModelSet, SelectionPolicy
from dns_milvus.rpc import RemoteReranker
from dns_milvus.store import fine_key, open_store
from dns_milvus.testing.synthetic import random_features
from tests.docker.conftest import MODEL_SET

pytestmark = pytest.mark.docker

COLLECTION = "stack_videos"
MINIO_USER = MINIO_PASSWORD = "minioadmin"


@dataclass
class Stack:
    ip: str
    milvus_port: int
    minio_port: int
    grpc_port: int
    http_port: int

    @property
    def sidecar_http(self) -> str:
        return f"http://{self.ip}:{self.http_port}"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def stack(docker_ip: str, docker_services: Any) -> Stack:
    running = Stack(
        ip=docker_ip,
        milvus_port=docker_services.port_for("standalone", 19530),
        minio_port=docker_services.port_for("minio", 9000),
        grpc_port=docker_services.port_for("sidecar", 50051),
        http_port=docker_services.port_for("sidecar", 8080),
    )
    docker_services.wait_until_responsive(
        check=lambda: _healthy(f"{running.sidecar_http}/healthz"), timeout=180.0, pause=1.0
    )
    return running


@pytest.fixture(scope="session")
def indexed(stack: Stack, stack_model_set: Path) -> Iterator[DnSIndex]:
    """12 random videos indexed through the SDK into the stack's Milvus and MinIO."""
    models = ModelSet.load(stack_model_set, device="cpu")
    store = open_store(
        f"s3://dns-fine/objects?endpoint_url=http://{stack.ip}:{stack.minio_port}&create_bucket=true",
        access_key=MINIO_USER,
        secret_key=MINIO_PASSWORD,
    )
    index = DnSIndex(
        f"http://{stack.ip}:{stack.milvus_port}", models=models, store=store, collection=COLLECTION
    )
    index.add_many([f"v{i}" for i in range(12)], random_features(12, dims=models.feature_dim, seed=5))
    index.collection.flush()
    yield index
    index.delete([f"v{i}" for i in range(12)])
    index.close()


def test_sidecar_is_healthy_and_serves_the_mounted_model_set(stack: Stack, stack_model_set: Path) -> None:
    with urllib.request.urlopen(f"{stack.sidecar_http}/v1/info", timeout=10) as reply:
        info = json.load(reply)
    assert info["model_set"] == MODEL_SET
    assert info["model_tag"] == ModelSet.load(stack_model_set, device="cpu").tag
    with grpc.insecure_channel(f"{stack.ip}:{stack.grpc_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_search_with_the_sidecar_equals_search_in_process(stack: Stack, indexed: DnSIndex) -> None:
    policy = SelectionPolicy("percent", 50)
    local = indexed.search("v0", top_k=5, candidates=11, policy=policy)
    with RemoteReranker(f"{stack.ip}:{stack.grpc_port}", model_set=MODEL_SET) as remote:
        indexed.reranker = remote
        try:
            served = indexed.search("v0", top_k=5, candidates=11, policy=policy)
        finally:
            indexed.reranker = indexed.local_reranker
    assert not served.degraded and served.warnings == []
    assert [(h.video_id, h.stage) for h in served.hits] == [(h.video_id, h.stage) for h in local.hits]
    assert [h.score for h in served.hits] == pytest.approx([h.score for h in local.hits], abs=1e-6)


def test_milvus_calls_the_sidecar_through_its_tei_rerank_function(stack: Stack, indexed: DnSIndex) -> None:
    from pymilvus import Function, FunctionType

    query = f"dns:v1:video:{COLLECTION}:v0"
    ranker = Function(
        name="dns_stage2",
        input_field_names=["fine_key"],
        function_type=FunctionType.RERANK,
        params={
            "reranker": "model",
            "provider": "tei",
            "queries": [query],
            "endpoint": "http://sidecar:8080",  # Milvus reaches the sidecar on the compose network
        },
    )
    record = indexed.load_record("v0")
    hits = indexed.client.search(
        COLLECTION, data=[record.coarse.tolist()], anns_field="coarse", limit=12,
        output_fields=["fine_key"], ranker=ranker,
    )[0]  # fmt: skip
    keys = [fine_key(COLLECTION, f"v{i}") for i in range(12)]
    body = json.dumps({"query": query, "texts": keys}).encode()
    request = urllib.request.Request(
        f"{stack.sidecar_http}/rerank", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        expected = json.load(reply)
    assert [h["fine_key"] for h in hits] == [keys[r["index"]] for r in expected]
    assert [h["distance"] for h in hits] == pytest.approx([r["score"] for r in expected], rel=1e-6)
