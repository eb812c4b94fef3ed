"""The sidecar's HTTP rerank endpoints (Cohere and TEI shapes), query upload, metrics, health,
and Milvus Lite calling the sidecar through its model-rerank function."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dns_milvus.engine import SelectionPolicy
from dns_milvus.rpc import convert
from dns_milvus.sidecar.server import BackgroundServer
from dns_milvus.store import fine_key
from tests.test_rerank_service import (
    COLLECTION,
    Stage2,
    build_stage2,
    long_candidates,
    long_query,
    wait_until,
)

MODEL_SET = "sidecar-test"
TOKEN = "t0ken"


@pytest.fixture(scope="module")
def stage2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage2]:
    built = build_stage2(tmp_path_factory.mktemp("sidecar-http"))
    yield built
    built.store.close()


@pytest.fixture(scope="module")
def http(stage2: Stage2) -> Iterator[BackgroundServer]:
    config = stage2.config(http_port=0, token=TOKEN, max_candidates=50, max_message_bytes=256 << 10)
    with BackgroundServer(config, stage2.models, stage2.store) as server:
        yield server


def request(
    server: BackgroundServer,
    path: str,
    body: Any = None,
    *,
    token: str | None = TOKEN,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    """(status, parsed JSON or text) of one HTTP call; errors are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(server.http_url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            status, payload, kind = reply.status, reply.read(), reply.headers.get_content_type()
    except urllib.error.HTTPError as err:
        status, payload, kind = err.code, err.read(), err.headers.get_content_type()
    return status, json.loads(payload) if kind == "application/json" else payload.decode()


def expected_order(stage2: Stage2, keys: list[str]) -> list[tuple[int, float]]:
    """(document index, score) best first, as the engine's own stage 2 ranks them with policy 'all'."""
    by_key = {c.fine_key: c for c in stage2.candidates()}
    result = stage2.local.rerank(
        stage2.query, [by_key[k] for k in keys], SelectionPolicy("all", 0), len(keys)
    )
    return [(keys.index(fine_key(COLLECTION, h.video_id)), h.score) for h in result.hits]


def test_cohere_rerank_of_an_indexed_query(stage2: Stage2, http: BackgroundServer) -> None:
    keys = [c.fine_key for c in stage2.candidates()]
    body = {"model": MODEL_SET, "query": f"dns:v1:video:{COLLECTION}:v0", "documents": keys}
    status, reply = request(http, "/v2/rerank", body)
    assert status == 200
    assert [(r["index"], r["relevance_score"]) for r in reply["results"]] == expected_order(stage2, keys)
    assert "warnings" not in reply["meta"]

    # /rerank is the path Milvus Lite calls
    status, top = request(http, "/rerank", {**body, "top_n": 3, "return_documents": True})
    assert status == 200 and top["results"] == [
        {**r, "document": {"text": keys[r["index"]]}} for r in reply["results"][:3]
    ]


def test_tei_rerank(stage2: Stage2, http: BackgroundServer) -> None:
    keys = [c.fine_key for c in stage2.candidates()][:6]
    status, reply = request(http, "/rerank", {"query": f"dns:v1:video:{COLLECTION}:v0", "texts": keys})
    assert status == 200
    assert [(r["index"], r["score"]) for r in reply] == expected_order(stage2, keys)


def test_uploaded_query_handles(stage2: Stage2, http: BackgroundServer) -> None:
    keys = [c.fine_key for c in stage2.candidates()]
    inline = convert.inline_query_to_proto(stage2.query)
    upload = {
        "fine": base64.b64encode(inline.fine).decode(),
        "fine_shape": list(inline.fine_shape),
        "payload_kind": "packed_bits",
        "self_sim": inline.self_sim,
    }
    status, created = request(http, "/v1/queries", upload)
    assert status == 201 and created["query"].startswith("dns:v1:query:") and created["expires_in_s"] > 0
    status, binary = request(
        http, "/v1/queries", raw=inline.SerializeToString(), content_type="application/x-protobuf"
    )
    assert status == 201 and binary["query"] != created["query"]
    for handle in (created["query"], binary["query"]):
        status, reply = request(http, "/v2/rerank", {"query": handle, "documents": keys})
        assert status == 200
        assert [(r["index"], r["relevance_score"]) for r in reply["results"]] == expected_order(stage2, keys)

    status, reply = request(http, "/v2/rerank", {"query": "dns:v1:query:nope", "documents": keys})
    assert status == 404 and "POST /v1/queries" in reply["message"]
    status, reply = request(http, "/v1/queries", {**upload, "fine_shape": [1, 2, 3]})
    assert status == 400 and "body.fine_shape" in reply["message"]
    status, reply = request(http, "/v1/queries", {**upload, "fine": "***"})
    assert status == 400 and "base64" in reply["message"]


def test_a_missing_object_scores_zero_with_a_warning(stage2: Stage2, http: BackgroundServer) -> None:
    keys = [*(c.fine_key for c in stage2.candidates()[:4]), fine_key(COLLECTION, "deleted-video")]
    status, reply = request(http, "/v2/rerank", {"query": f"dns:v1:video:{COLLECTION}:v0", "documents": keys})
    assert status == 200
    assert reply["results"][-1] == {"index": 4, "relevance_score": 0.0}
    assert len(reply["meta"]["warnings"]) == 1 and keys[4] in reply["meta"]["warnings"][0]
    assert str(stage2.store_dir) not in reply["meta"]["warnings"][0]  # where the store lives stays private


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"query": "dns:v1:video:videos:v0", "documents": ["../../etc/passwd"]}, 400, "documents[0]"),
        (
            {"query": "dns:v1:video:videos:v0", "documents": "videos/a.dnsf"},
            400,
            "documents: expected a list",
        ),
        ({"query": "dns:v1:video:videos:v0"}, 400, "documents: required"),
        ({"query": "a cat on a skateboard", "documents": []}, 400, "dns:v1:video:<collection>:<video_id>"),
        ({"query": "dns:v1:video:bad-name!:v0", "documents": []}, 400, "collection name"),
        ({"query": 42, "documents": []}, 400, "query: expected a string"),
        ({"query": "dns:v1:video:videos:v0", "documents": [], "top_n": 0}, 400, "top_n"),
        ({"query": "dns:v1:video:videos:v0", "documents": ["k"] * 51}, 400, "limit is 50"),
        ({"model": "rerank-v3.5", "query": "dns:v1:video:videos:v0", "documents": []}, 409, "model_name"),
        ({"query": "dns:v1:video:videos:nobody", "documents": ["videos/a.dnsf"]}, 404, "nobody"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_malformed_bodies_are_refused_with_a_clear_message(
    http: BackgroundServer, body: Any, status: int, needle: str
) -> None:
    got, reply = request(http, "/v2/rerank", body)
    assert (got, needle in reply["message"]) == (status, True), reply


def _upload(stage2: Stage2, **changes: Any) -> dict[str, Any]:
    inline = convert.inline_query_to_proto(stage2.query)
    body = {
        "fine": base64.b64encode(inline.fine).decode(),
        "fine_shape": list(inline.fine_shape),
        "payload_kind": "packed_bits",
        "self_sim": inline.self_sim,
    }
    return {**body, **changes}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"fine_shape": True}, "body.fine_shape"),
        ("first frame count true", "body.fine_shape"),
        ({"self_sim": 10**400}, "body.self_sim"),
        ({"self_sim": True}, "body.self_sim"),
        ({"coarse": [0.5, 10**400]}, "body.coarse[1]"),
        ({"coarse": [False]}, "body.coarse[0]"),
        ({"fine_shape": [10**400, 9, 8]}, "body.fine_shape"),
    ],
)
def test_upload_refuses_booleans_and_huge_integers(
    stage2: Stage2, http: BackgroundServer, change: Any, needle: str
) -> None:
    body = _upload(stage2)
    if change == "first frame count true":  # JSON true must not pass for a frame count of 1
        body["fine_shape"][0] = True
        body["fine"] = base64.b64encode(base64.b64decode(body["fine"])[: 9 * 8]).decode()
    else:
        body.update(change)
    status, reply = request(http, "/v1/queries", body)
    assert (status, needle in reply["message"]) == (400, True), reply


def test_deeply_nested_json_is_400(http: BackgroundServer) -> None:
    for path in ("/v2/rerank", "/rerank", "/v1/queries"):
        status, reply = request(http, path, raw=b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        assert status == 400 and "nested" in reply["message"], (path, reply)
    assert request(http, "/healthz")[0] == 200


def test_not_json_and_too_large_bodies(http: BackgroundServer) -> None:
    status, reply = request(http, "/v2/rerank", raw=b"{not json")
    assert status == 400 and "not valid JSON" in reply["message"]
    status, reply = request(http, "/v2/rerank", raw=b"x" * (300 << 10))
    assert status == 413 and str(256 << 10) in reply["message"]


def test_http_rerank_has_a_deadline(stage2: Stage2) -> None:
    """Past http_timeout_s the answer is 504 and the request's fine-grained work stops."""
    keys = [c.fine_key for c in long_candidates(stage2, 100, 500, prefix="long")]
    config = stage2.config(
        http_port=0, http_timeout_s=1.0, max_frame_pairs=10**9, max_batch_frame_pairs=10**9
    )
    with BackgroundServer(config, stage2.models, stage2.store) as server:
        inline = convert.inline_query_to_proto(long_query(stage2, 2000))
        raw = inline.SerializeToString()
        status, created = request(server, "/v1/queries", raw=raw, content_type="application/x-protobuf")
        assert status == 201
        status, reply = request(server, "/v2/rerank", {"query": created["query"], "documents": keys})
        assert status == 504 and "deadline" in reply["message"]
        core = server.server.core
        wait_until(lambda: core.inflight == 0 and core.reranker.batcher.admitted_pairs == 0, timeout_s=60)
        documents = [c.fine_key for c in stage2.candidates()]
        small = {"query": f"dns:v1:video:{COLLECTION}:v0", "documents": documents}
        assert request(server, "/v2/rerank", small)[0] == 200


def test_bearer_token_is_required_except_for_probes_and_metrics(http: BackgroundServer) -> None:
    body = {"query": f"dns:v1:video:{COLLECTION}:v0", "documents": []}
    for token in (None, "wrong"):
        status, reply = request(http, "/v2/rerank", body, token=token)
        assert status == 401 and "Bearer" in reply["message"]
    assert request(http, "/v2/rerank", body)[0] == 200
    status, health = request(http, "/healthz", token=None)
    assert status == 200 and health["status"] == "SERVING"
    status, metrics = request(http, "/metrics", token=None)
    assert status == 200
    assert 'dns_reranker_requests_total{method="/v2/rerank",protocol="http",status="http_401"}' in metrics
    assert "dns_reranker_cache_hit_ratio" in metrics and "dns_reranker_batch_pairs_bucket" in metrics
    status, info = request(http, "/v1/info")
    assert status == 200 and info["model_set"] == MODEL_SET and info["payload_kind"] == "packed_bits"
    assert info["selector_segments"] == 0


def test_a_selector_that_reads_segment_codes_is_served_over_http(tmp_path: Path) -> None:
    """Documents carry no segment codes; under policy all the selector is not consulted, so a set
    whose selector reads codes ranks documents as its own stage 2 does."""
    segments = build_stage2(tmp_path, selector_segments=4)
    try:
        with BackgroundServer(segments.config(http_port=0), segments.models, segments.store) as server:
            keys = [c.fine_key for c in segments.candidates()]
            query = f"dns:v1:video:{COLLECTION}:v0"
            for path, body, results in (("/v2/rerank", {"query": query, "documents": keys}, "results"),
                                        ("/rerank", {"query": query, "texts": keys}, None)):  # fmt: skip
                status, reply = request(server, path, body, token=None)
                assert status == 200, reply
                ranked = reply[results] if results else reply
                got = [(r["index"], r.get("relevance_score", r.get("score"))) for r in ranked]
                assert got == expected_order(segments, keys)
            status, info = request(server, "/v1/info", token=None)
            assert status == 200 and info["selector_segments"] == 4
    finally:
        segments.store.close()


def test_milvus_lite_reranks_search_hits_through_the_sidecar(
    stage2: Stage2, http: BackgroundServer, tmp_path: Path
) -> None:
    """Milvus Lite's model-rerank function (provider 'cohere') POSTs {base_url}/rerank with the
    rerank field of each hit; the hits come back in the sidecar's order with its scores."""
    from pymilvus import Function, FunctionType

    from dns_milvus.engine import DnSIndex

    with DnSIndex(
        str(tmp_path / "lite.db"), models=stage2.models, store=stage2.store, collection=COLLECTION
    ) as index:
        index.write_records(list(stage2.corpus.values()))
        index.collection.flush()
        ranker = Function(
            name="dns_stage2",
            input_field_names=["fine_key"],
            function_type=FunctionType.RERANK,
            params={
                "reranker": "model",
                "provider": "cohere",
                "queries": [f"dns:v1:video:{COLLECTION}:v0"],
                "base_url": http.http_url,
                "api_key": TOKEN,
                "model_name": MODEL_SET,
            },
        )
        hits = index.client.search(
            COLLECTION, data=[stage2.query.coarse.tolist()], anns_field="coarse", limit=4,
            output_fields=["fine_key"], ranker=ranker,
        )[0]  # fmt: skip
    # Lite hands the reranker 10 x limit candidates: here every video, the query included.
    keys = [fine_key(COLLECTION, vid) for vid in stage2.corpus]
    status, reply = request(http, "/v2/rerank", {"query": f"dns:v1:video:{COLLECTION}:v0", "documents": keys})
    assert status == 200
    expected = [(list(stage2.corpus)[r["index"]], r["relevance_score"]) for r in reply["results"][:4]]
    assert [h["video_id"] for h in hits] == [vid for vid, _ in expected]
    assert [h["distance"] for h in hits] == pytest.approx([score for _, score in expected], rel=1e-6)
