"""The re-ranker sidecar over a real gRPC channel on loopback, and its client ``RemoteReranker``.

Servers run in-process (``BackgroundServer``) on free ports, except the SIGTERM test, which
starts the real entry point in a subprocess. The model set is a small one of seeded random
networks: the tests compare paths with each other, never against fixed scores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dns_milvus.engine import LocalReranker, ModelSet, SelectionPolicy, VideoRecord
from dns_milvus.engine.rerank import STAGE_FINE_MISSING, Candidate, RerankResult
from dns_milvus.errors import BackendUnavailableError, DeadlineExceededError, InvalidInputError
from dns_milvus.rpc import (
    ModelSetMismatchError,
    RemoteReranker,
    RerankerAuthError,
    RerankerOverloadedError,
    RerankerTimeoutError,
    convert,
)
from dns_milvus.rpc import generate as rpc_generate
from dns_milvus.rpc import rerank_pb2 as pb
from dns_milvus.rpc import rerank_pb2_grpc as pb_grpc
from dns_milvus.sidecar.config import ServerConfig, load_config
from dns_milvus.sidecar.server import BackgroundServer
from dns_milvus.store import LocalStore, ObjectStore, encode_fine_tensor, fine_key
from dns_milvus.testing.synthetic import candidates_for, write_corpus, write_model_set

COLLECTION = "videos"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Stage2:
    """A model set, a store holding a small corpus, and the engine's own re-ranker over them."""

    model_dir: Path
    models: ModelSet
    store: ObjectStore
    store_dir: Path
    corpus: dict[str, VideoRecord]
    local: LocalReranker

    @property
    def query(self) -> VideoRecord:
        return self.corpus["v0"]

    def candidates(self) -> list[Candidate]:
        return candidates_for(self.query, self.corpus, COLLECTION)

    def config(self, **overrides: object) -> ServerConfig:
        base = ServerConfig(
            model_set=str(self.model_dir),
            store=str(self.store_dir),
            grpc_port=0,
            http_port=-1,
            max_wait_ms=1.0,
            # One thread, as the local reranker: float sums split over another number of threads
            # round differently (1 ulp), and the automatic count follows the machine's load.
            fine_threads=1,
        )
        return dataclasses.replace(base, **overrides)


def build_stage2(root: Path, selector_segments: int = 0) -> Stage2:
    """A 16-video corpus under ``root`` (the HTTP tests build theirs the same way); with
    ``selector_segments`` > 0 the selector reads segment matches and the corpus keeps codes."""
    model_dir = write_model_set(
        root / "models", name="sidecar-test", seed=7, selector_segments=selector_segments
    )
    models = ModelSet.load(model_dir, device="cpu")
    store = LocalStore(root / "objects")
    corpus = write_corpus(models, store, COLLECTION, 16, seed=3)
    local = LocalReranker(models, store, fine_threads=1)
    return Stage2(model_dir, models, store, root / "objects", corpus, local)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage2]:
    built = build_stage2(tmp_path_factory.mktemp("sidecar"))
    yield built
    built.store.close()


@pytest.fixture
def start_server(stage2: Stage2) -> Iterator[Callable[..., BackgroundServer]]:
    """Start sidecars with config overrides; every one is stopped after the test."""
    started: list[BackgroundServer] = []

    def start(**overrides: object) -> BackgroundServer:
        server = BackgroundServer(stage2.config(**overrides), stage2.models, stage2.store).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def server(stage2: Stage2) -> Iterator[BackgroundServer]:
    with BackgroundServer(stage2.config(), stage2.models, stage2.store) as running:
        yield running


def hits_of(result: RerankResult) -> list[tuple]:
    return [
        (h.video_id, h.score, h.coarse_score, h.selector_confidence, h.fine_score, h.stage)
        for h in result.hits
    ]


def inline_request(
    stage2: Stage2, candidates: list[Candidate] | None = None, **fields: object
) -> pb.RerankRequest:
    request = pb.RerankRequest(
        inline=convert.inline_query_to_proto(stage2.query),
        candidates=convert.candidates_to_proto(stage2.candidates() if candidates is None else candidates),
        policy=pb.SelectionPolicy(kind=pb.POLICY_KIND_PERCENT, value=50.0),
        top_k=10,
    )
    for name, value in fields.items():
        if isinstance(value, Message):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def call(target: str, request: pb.RerankRequest, **kwargs: object) -> pb.RerankResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.RerankerStub(channel).Rerank(request, timeout=30, **kwargs)


def call_error(target: str, request: pb.RerankRequest, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(target, request, **kwargs)
    return info.value


def wait_until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# -- the contract and its generated code ----------------------------------------------------------


def test_generated_descriptor_matches_the_proto(tmp_path: Path) -> None:
    """Whatever grpcio-tools version is installed, the checked-in modules describe the .proto as it is."""
    from grpc_tools import protoc

    out = tmp_path / "rerank.desc"
    assert protoc.main(["protoc", f"-I{rpc_generate.PROTO_ROOT}", f"--descriptor_set_out={out}",
                        *rpc_generate.PROTO_FILES]) == 0  # fmt: skip
    from google.protobuf import descriptor_pb2

    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    messages = list(fresh.message_type)
    while messages:  # json_name is derived from the field name; the Python generator leaves it out
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            field.ClearField("json_name")
    assert fresh == descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)


def test_generated_code_is_byte_identical_to_a_fresh_generation() -> None:
    checked_in = (rpc_generate.GENERATED_DIR / "rerank_pb2_grpc.py").read_text()
    if f"GRPC_GENERATED_VERSION = '{rpc_generate.tools_version()}'" not in checked_in:
        pytest.skip(f"grpcio-tools {rpc_generate.tools_version()} is not the version that generated the code")
    assert rpc_generate.stale_files() == [], "run: python -m dns_milvus.rpc.generate"


# -- results equal the engine's own stage 2 -------------------------------------------------------


@pytest.mark.parametrize("policy", ["50%", "count:4", "threshold:0.5", "all", "none"])
def test_remote_rerank_equals_local_reranker(stage2: Stage2, server: BackgroundServer, policy: str) -> None:
    selection = SelectionPolicy.parse(policy)
    expected = stage2.local.rerank(stage2.query, stage2.candidates(), selection, 8)
    with RemoteReranker(server.grpc_target) as remote:
        got = remote.rerank(stage2.query, stage2.candidates(), selection, 8)
    assert hits_of(got) == hits_of(expected)
    assert (got.n_candidates, got.n_reranked, got.warnings) == (
        expected.n_candidates,
        expected.n_reranked,
        [],
    )
    assert {"selector_ms", "fetch_ms", "fine_ms", "queue_ms", "total_ms", "rpc_ms"} <= got.timings_ms.keys()


def test_indexed_query_equals_inline_query(stage2: Stage2, server: BackgroundServer) -> None:
    policy = SelectionPolicy("percent", 50)
    inline = stage2.local.rerank(stage2.query, stage2.candidates(), policy, 10)
    with RemoteReranker(server.grpc_target, collection=COLLECTION) as by_reference:
        got = by_reference.rerank(stage2.query, stage2.candidates(), policy, 10)
    assert hits_of(got) == hits_of(inline)

    request = pb.RerankRequest(
        indexed=pb.IndexedQuery(collection=COLLECTION, video_id="v0"),
        candidates=convert.candidates_to_proto(stage2.candidates()),
        policy=pb.SelectionPolicy(kind=pb.POLICY_KIND_PERCENT, value=50.0),
        top_k=10,
    )
    err = call_error(server.grpc_target, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "indexed.self_sim" in err.details()

    request.policy.kind = pb.POLICY_KIND_ALL  # the fine-grained student alone needs no self-similarity
    everything = stage2.local.rerank(stage2.query, stage2.candidates(), SelectionPolicy("all", 0), 10)
    assert [(h.video_id, h.fine_score) for h in call(server.grpc_target, request).hits] == [
        (h.video_id, h.fine_score) for h in everything.hits
    ]

    request.indexed.video_id = "never-indexed"
    err = call_error(server.grpc_target, request)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "never-indexed" in err.details()


def test_query_sent_by_reference_falls_back_to_inline_when_not_stored(
    stage2: Stage2, server: BackgroundServer
) -> None:
    query = dataclasses.replace(stage2.query, video_id="only-in-memory")
    policy = SelectionPolicy("all", 0)
    with RemoteReranker(server.grpc_target, collection=COLLECTION) as remote:
        got = remote.rerank(query, stage2.candidates(), policy, 5)
    assert hits_of(got) == hits_of(stage2.local.rerank(query, stage2.candidates(), policy, 5))


def test_empty_candidates_give_an_empty_result(stage2: Stage2, server: BackgroundServer) -> None:
    response = call(server.grpc_target, inline_request(stage2, candidates=[]))
    assert list(response.hits) == [] and response.n_candidates == 0 and response.n_reranked == 0


def test_missing_objects_fall_back_to_coarse_with_warnings(stage2: Stage2, server: BackgroundServer) -> None:
    candidates = [
        *stage2.candidates(),
        Candidate("ghost", 0.99, 0.5, fine_key(COLLECTION, "ghost")),  # a row whose object is gone
    ]
    policy = SelectionPolicy("all", 0)
    expected = stage2.local.rerank(stage2.query, candidates, policy, 20)
    with RemoteReranker(server.grpc_target) as remote:
        got = remote.rerank(stage2.query, candidates, policy, 20)
    assert hits_of(got) == hits_of(expected)
    ghost = next(h for h in got.hits if h.video_id == "ghost")
    assert ghost.stage == STAGE_FINE_MISSING and ghost.score == pytest.approx(0.99)
    assert len(got.warnings) == 1 and "ghost" in got.warnings[0]
    assert str(stage2.store_dir) not in got.warnings[0]  # clients learn the key, not where the store is


# -- a selector that reads the candidates' segment codes ------------------------------------------

SEGMENTS = 4


@pytest.fixture(scope="module")
def segment_stage2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage2]:
    built = build_stage2(tmp_path_factory.mktemp("sidecar-segments"), selector_segments=SEGMENTS)
    yield built
    built.store.close()


@pytest.fixture(scope="module")
def segment_server(segment_stage2: Stage2) -> Iterator[BackgroundServer]:
    with BackgroundServer(segment_stage2.config(), segment_stage2.models, segment_stage2.store) as running:
        yield running


def without_codes(candidates: list[Candidate]) -> list[Candidate]:
    return [dataclasses.replace(c, segments=None) for c in candidates]


@pytest.mark.parametrize("policy", ["50%", "count:4", "threshold:0.5", "all"])
def test_segment_codes_travel_and_the_remote_selector_equals_the_local_one(
    segment_stage2: Stage2, segment_server: BackgroundServer, policy: str
) -> None:
    stage2 = segment_stage2
    candidates = stage2.candidates()
    assert all(c.segments is not None and c.segments.shape[0] == SEGMENTS for c in candidates)
    selection = SelectionPolicy.parse(policy)
    expected = stage2.local.rerank(stage2.query, candidates, selection, 8)
    for collection in (None, COLLECTION):  # the query inline, and by reference with its coarse vector
        with RemoteReranker(segment_server.grpc_target, collection=collection) as remote:
            got = remote.rerank(stage2.query, candidates, selection, 8)
        assert hits_of(got) == hits_of(expected), collection
        assert (got.n_reranked, got.warnings) == (expected.n_reranked, [])
    # policy all re-ranks everything without consulting the selector
    assert all((h.selector_confidence is None) == (policy == "all") for h in got.hits)
    request = convert.candidates_to_proto(candidates)
    decoded = convert.candidates_from_proto(request, coarse_dim=stage2.models.coarse_dim)
    for sent, back in zip(candidates, decoded, strict=True):
        np.testing.assert_array_equal(back.segments, sent.segments)


def test_candidates_without_codes_are_invalid_argument_for_a_selector_that_reads_them(
    segment_stage2: Stage2, segment_server: BackgroundServer
) -> None:
    candidates = segment_stage2.candidates()
    bare = without_codes(candidates)
    err = call_error(segment_server.grpc_target, inline_request(segment_stage2, candidates=bare))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "carry no segment codes" in err.details() and repr(bare[0].video_id) in err.details()
    one_bare = [*candidates[:3], *bare[3:4], *candidates[4:]]  # one candidate without codes is enough
    with RemoteReranker(segment_server.grpc_target) as remote:
        with pytest.raises(InvalidInputError, match=f"first: {bare[3].video_id!r}"):
            remote.rerank(segment_stage2.query, one_bare, SelectionPolicy("percent", 50), 5)
        # policies none and all consult no selector: they need no codes
        for policy in (SelectionPolicy("none", 0), SelectionPolicy("all", 0)):
            got = remote.rerank(segment_stage2.query, bare, policy, 5)
            assert hits_of(got) == hits_of(segment_stage2.local.rerank(segment_stage2.query, bare, policy, 5))


def test_segment_codes_of_a_wrong_length_are_invalid_argument(
    segment_stage2: Stage2, segment_server: BackgroundServer
) -> None:
    width = segment_stage2.models.coarse_dim // 8
    request = inline_request(segment_stage2)
    request.candidates[1].segments = request.candidates[1].segments[:-1]  # not a multiple of a code
    err = call_error(segment_server.grpc_target, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "candidates[1].segments" in err.details() and f"multiple of {width}" in err.details()

    request = inline_request(segment_stage2)
    request.candidates[1].segments = request.candidates[1].segments[: 2 * width]  # whole codes, too few
    err = call_error(segment_server.grpc_target, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 segment codes" in err.details() and f"reads {SEGMENTS}" in err.details()


def test_a_selector_that_reads_codes_needs_the_query_coarse_vector(
    segment_stage2: Stage2, segment_server: BackgroundServer
) -> None:
    indexed = inline_request(segment_stage2)
    indexed.indexed.CopyFrom(pb.IndexedQuery(collection=COLLECTION, video_id="v0", self_sim=0.5))
    inline = inline_request(segment_stage2)
    del inline.inline.coarse[:]
    for request, field in ((indexed, "indexed.coarse"), (inline, "inline.coarse")):
        err = call_error(segment_server.grpc_target, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.details()
        request.policy.kind = pb.POLICY_KIND_NONE  # no selector, no segment match
        assert len(call(segment_server.grpc_target, request).hits) == 10
    indexed.indexed.coarse.extend([0.1] * 3)
    err = call_error(segment_server.grpc_target, indexed)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "indexed.coarse" in err.details()


def test_get_info_says_how_many_segments_the_selector_reads(
    server: BackgroundServer, segment_server: BackgroundServer
) -> None:
    for running, segments in ((server, 0), (segment_server, SEGMENTS)):
        with grpc.insecure_channel(running.grpc_target) as channel:
            reply = pb_grpc.RerankerStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
        assert reply.selector_segments == segments
        with RemoteReranker(running.grpc_target) as remote:
            assert remote.info()["selector_segments"] == segments


# -- bad requests --------------------------------------------------------------------------------


def _corrupt(request: pb.RerankRequest, change: str) -> str:
    """Apply one defect; returns the field name the error must mention."""
    if change == "fine bytes":
        request.inline.fine = request.inline.fine[:-3]
        return "inline.fine"
    if change == "fine shape":
        request.inline.fine_shape[2] = 7
        return "inline.fine_shape"
    if change == "payload kind":
        request.inline.payload_kind = pb.PAYLOAD_KIND_FLOAT16
        return "inline.payload_kind"
    if change == "coarse dim":
        request.inline.coarse.append(0.5)
        return "inline.coarse"
    if change == "nan score":
        request.candidates[2].coarse_score = float("nan")
        return "candidates[2].coarse_score"
    if change == "key":
        request.candidates[1].fine_key = "../../etc/passwd"
        return "candidates[1].fine_key"
    if change == "duplicate id":
        request.candidates[3].video_id = request.candidates[0].video_id
        return "candidates[3].video_id"
    if change == "empty id":
        request.candidates[0].video_id = ""
        return "candidates[0].video_id"
    if change == "policy value":
        request.policy.value = 140.0
        return "policy"
    if change == "top_k":
        request.top_k = 0
        return "top_k"
    if change == "no query":
        request.ClearField("inline")
        return "query"
    if change == "segment codes":  # checked against coarse_dim even where the selector reads none
        request.candidates[2].segments = b"\x01" * 5
        return "candidates[2].segments"
    raise AssertionError(change)


@pytest.mark.parametrize(
    "change",
    ["fine bytes", "fine shape", "payload kind", "coarse dim", "nan score", "key", "duplicate id", "empty id",
     "policy value", "top_k", "no query", "segment codes"],
)  # fmt: skip
def test_malformed_requests_are_invalid_argument_naming_the_field(
    stage2: Stage2, server: BackgroundServer, change: str
) -> None:
    request = inline_request(stage2)
    field = _corrupt(request, change)
    err = call_error(server.grpc_target, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()


@pytest.mark.parametrize("method", ["Rerank", "GetInfo"])
def test_undecodable_requests_are_invalid_argument(server: BackgroundServer, method: str) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        raw = channel.unary_unary(
            f"/dns.rerank.v1.Reranker/{method}", request_serializer=bytes, response_deserializer=bytes
        )
        for garbage in (b"\xff\xff\xff", b"\x0a\x05abc"):  # corrupt wire format; truncated field
            with pytest.raises(grpc.RpcError) as info:
                raw(garbage, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, garbage
            assert "not a valid dns.rerank.v1." in info.value.details()
    with RemoteReranker(server.grpc_target) as remote:
        assert remote.info()["model_set"] == "sidecar-test"


def test_too_many_candidates_are_refused_and_the_server_stays_up(
    stage2: Stage2, server: BackgroundServer
) -> None:
    template = stage2.candidates()[0]
    many = [dataclasses.replace(template, video_id=f"c{i}") for i in range(100_000)]
    err = call_error(server.grpc_target, inline_request(stage2, candidates=many))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "100000" in err.details() and "20000" in err.details()
    assert len(call(server.grpc_target, inline_request(stage2)).hits) == 10


def test_oversized_messages_are_refused_on_both_sides(
    stage2: Stage2, start_server: Callable[..., BackgroundServer]
) -> None:
    small = start_server(max_message_bytes=4096)
    big = VideoRecord(
        coarse=stage2.query.coarse,
        self_sim=0.1,
        fine=np.zeros((40, 9, 8), np.uint8),
        payload_kind="packed_bits",
    )
    request = inline_request(stage2)
    request.inline.CopyFrom(convert.inline_query_to_proto(big))
    err = call_error(small.grpc_target, request)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "message" in err.details().lower()
    with RemoteReranker(small.grpc_target, max_message_bytes=4096) as remote:
        with pytest.raises(InvalidInputError, match="max_message_bytes=4096"):
            remote.rerank(big, stage2.candidates(), SelectionPolicy("all", 0), 5)
        assert (
            len(remote.rerank(stage2.query, stage2.candidates()[:3], SelectionPolicy("all", 0), 5).hits) == 3
        )


def test_model_set_mismatch_is_failed_precondition(stage2: Stage2, server: BackgroundServer) -> None:
    err = call_error(server.grpc_target, inline_request(stage2, model_set="another-set"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "sidecar-test" in err.details()
    with (
        RemoteReranker(server.grpc_target, model_set="sidecar-test", model_tag="0123abcd") as remote,
        pytest.raises(ModelSetMismatchError, match="0123abcd"),
    ):
        remote.rerank(stage2.query, stage2.candidates(), SelectionPolicy("all", 0), 3)
    with RemoteReranker(server.grpc_target, model_set="sidecar-test", model_tag=stage2.models.tag) as remote:
        assert remote.info()["model_tag"] == stage2.models.tag
        assert len(remote.rerank(stage2.query, stage2.candidates(), SelectionPolicy("all", 0), 3).hits) == 3


# -- service plumbing: health, reflection, auth, TLS ------------------------------------------------


def test_health_is_serving_and_reflection_lists_the_service(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "dns.rerank.v1.Reranker"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"dns.rerank.v1.Reranker", "grpc.health.v1.Health"} <= names


def test_a_wrong_token_is_unauthenticated(
    stage2: Stage2, start_server: Callable[..., BackgroundServer]
) -> None:
    secured = start_server(token="s3cret")
    for token in (None, "wrong"):
        with (
            RemoteReranker(secured.grpc_target, token=token) as remote,
            pytest.raises(RerankerAuthError, match="UNAUTHENTICATED"),
        ):
            remote.rerank(stage2.query, stage2.candidates(), SelectionPolicy("all", 0), 3)
    with RemoteReranker(secured.grpc_target, token="s3cret") as remote:
        assert len(remote.rerank(stage2.query, stage2.candidates(), SelectionPolicy("all", 0), 3).hits) == 3
    with grpc.insecure_channel(secured.grpc_target) as channel:  # probes need no token
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tls(stage2: Stage2, start_server: Callable[..., BackgroundServer], tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    secure = start_server(tls_cert=str(cert), tls_key=str(key), http_port=0)
    port = secure.server.grpc_port
    with RemoteReranker(f"localhost:{port}", tls=cert) as remote:
        assert len(remote.rerank(stage2.query, stage2.candidates(), SelectionPolicy("all", 0), 3).hits) == 3
    with (
        RemoteReranker(f"localhost:{port}", timeout_s=3) as plaintext,
        pytest.raises(BackendUnavailableError),
    ):
        plaintext.rerank(stage2.query, stage2.candidates(), SelectionPolicy("all", 0), 3)
    import ssl

    context = ssl.create_default_context(cafile=str(cert))
    with urllib.request.urlopen(
        secure.http_url.replace("127.0.0.1", "localhost") + "/healthz", context=context
    ) as r:
        assert json.load(r)["status"] == "SERVING"


# -- load, cancellation, deadlines ---------------------------------------------------------------


def test_a_client_that_goes_away_mid_request_leaves_the_server_healthy(
    stage2: Stage2, start_server: Callable[..., BackgroundServer]
) -> None:
    slow = start_server(max_wait_ms=1500.0)  # each job waits in the batcher long enough to be cancelled
    batcher = slow.server.core.reranker.batcher
    channel = grpc.insecure_channel(slow.grpc_target)
    pending = pb_grpc.RerankerStub(channel).Rerank.future(inline_request(stage2), timeout=30)
    wait_until(lambda: batcher.admitted_pairs > 0)
    channel.close()
    assert pending.exception() is not None
    wait_until(lambda: slow.server.core.inflight == 0 and batcher.admitted_pairs == 0)
    assert batcher.stats.dropped_jobs == 1 and batcher.stats.batches == 0  # its work never ran
    assert len(call(slow.grpc_target, inline_request(stage2)).hits) == 10


def test_overload_is_resource_exhausted(
    stage2: Stage2, start_server: Callable[..., BackgroundServer]
) -> None:
    for limits in ({"max_inflight": 1}, {"max_queue_pairs": 10}):
        busy = start_server(max_wait_ms=1500.0, **limits)
        with grpc.insecure_channel(busy.grpc_target) as channel:
            first = pb_grpc.RerankerStub(channel).Rerank.future(
                inline_request(stage2, policy=pb.SelectionPolicy(kind=pb.POLICY_KIND_ALL)), timeout=30
            )
            wait_until(lambda busy=busy: busy.server.core.reranker.batcher.admitted_pairs > 0)
            err = call_error(busy.grpc_target, inline_request(stage2))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, limits
            with RemoteReranker(busy.grpc_target) as remote, pytest.raises(RerankerOverloadedError):
                remote.rerank(stage2.query, stage2.candidates(), SelectionPolicy("all", 0), 3)
            assert len(first.result().hits) == 10  # the admitted request still completes


def test_deadline_exceeded_maps_to_timeout_and_drops_the_work(
    stage2: Stage2, start_server: Callable[..., BackgroundServer]
) -> None:
    slow = start_server(max_wait_ms=1500.0)
    with (
        RemoteReranker(slow.grpc_target, timeout_s=0.2) as remote,
        pytest.raises(RerankerTimeoutError) as info,
    ):
        remote.rerank(stage2.query, stage2.candidates(), SelectionPolicy("all", 0), 3)
    assert isinstance(info.value, TimeoutError)
    batcher = slow.server.core.reranker.batcher
    # The late request's job is dropped from the batcher (or never submitted): nothing is scored.
    wait_until(lambda: slow.server.core.inflight == 0 and batcher.admitted_pairs == 0)
    assert (batcher.stats.batches, batcher.stats.jobs) == (0, 0)


def test_concurrent_requests_are_batched_and_each_equals_its_local_result(
    stage2: Stage2, start_server: Callable[..., BackgroundServer]
) -> None:
    batching = start_server(max_wait_ms=500.0)
    queries = list(stage2.corpus.values())[:6]
    policy = SelectionPolicy("all", 0)
    with grpc.insecure_channel(batching.grpc_target) as channel:
        stub = pb_grpc.RerankerStub(channel)
        futures = []
        for query in queries:
            request = pb.RerankRequest(
                inline=convert.inline_query_to_proto(query),
                candidates=convert.candidates_to_proto(candidates_for(query, stage2.corpus, COLLECTION)),
                policy=convert.policy_to_proto(policy),
                top_k=5,
            )
            futures.append(stub.Rerank.future(request, timeout=60))
        responses = [f.result() for f in futures]
    for query, response in zip(queries, responses, strict=True):
        expected = stage2.local.rerank(query, candidates_for(query, stage2.corpus, COLLECTION), policy, 5)
        # pooled into shared comparator calls: equal to float rounding of the batch shapes
        assert [h.video_id for h in response.hits] == [h.video_id for h in expected.hits]
        np.testing.assert_allclose(
            [h.score for h in response.hits], [h.score for h in expected.hits], rtol=0, atol=1e-5
        )
    stats = batching.server.core.reranker.batcher.stats
    assert stats.jobs == len(queries) and stats.batches < len(queries)


# -- bounded work: per-request limit, deadlines inside fine scoring, fair slicing --------------------


def long_query(stage2: Stage2, frames: int, seed: int = 0) -> VideoRecord:
    """A query of ``frames`` random packed frames (what a long inline query costs)."""
    rng = np.random.default_rng(seed)
    width = stage2.query.fine.shape[2]
    fine = rng.integers(0, 256, (frames, 9, width), dtype=np.uint8)
    return VideoRecord(coarse=np.zeros(0, np.float32), self_sim=0.5, fine=fine, payload_kind="packed_bits")


def long_candidates(stage2: Stage2, n: int, frames: int, prefix: str) -> list[Candidate]:
    """``n`` stored videos of ``frames`` random packed frames each, as stage-1 candidates."""
    rng = np.random.default_rng(len(prefix) + n + frames)
    width = stage2.query.fine.shape[2]
    out = []
    for i in range(n):
        vid = f"{prefix}{i}"
        fine = rng.integers(0, 256, (frames, 9, width), dtype=np.uint8)
        key = fine_key(COLLECTION, vid)
        if not stage2.store.exists(key):
            stage2.store.put(key, encode_fine_tensor(fine, "packed_bits"))
        out.append(Candidate(vid, 0.5 - i / 1000.0, 0.5, key, n_frames=frames, payload_kind="packed_bits"))
    return out


def count_comparator_calls(models: ModelSet, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = models.fine.similarity_from_frame_matrix

    def counting(f2f: object, *args: object) -> object:
        calls.append(1)
        return real(f2f, *args)

    monkeypatch.setattr(models.fine, "similarity_from_frame_matrix", counting)
    return calls


def test_a_request_over_the_work_limit_is_invalid_argument_naming_the_limit(
    stage2: Stage2, start_server: Callable[..., BackgroundServer]
) -> None:
    limited = start_server(max_frame_pairs=5_000)
    query = long_query(stage2, 200)
    with RemoteReranker(limited.grpc_target) as remote:
        with pytest.raises(InvalidInputError, match="max_frame_pairs") as info:
            remote.rerank(query, stage2.candidates(), SelectionPolicy("all", 0), 5)
        assert "INVALID_ARGUMENT" in str(info.value) and "5000" in str(info.value)
        # the limit counts the candidates the policy selects: fewer of them fit
        assert len(remote.rerank(query, stage2.candidates(), SelectionPolicy("count", 1), 5).hits) == 5
    assert limited.server.core.reranker.batcher.stats.jobs == 1  # the refused request scored nothing


def test_fine_scores_honour_a_deadline(stage2: Stage2) -> None:
    target = stage2.corpus["v1"].fine
    with pytest.raises(DeadlineExceededError):
        stage2.local.fine_scores(stage2.query, [target], deadline=time.monotonic() - 1.0)
    assert stage2.local.fine_scores(stage2.query, [target], deadline=time.monotonic() + 600).shape == (1,)


def test_a_request_past_its_deadline_stops_its_fine_scoring(
    stage2: Stage2, start_server: Callable[..., BackgroundServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """2000 query frames against 100 videos of 500 frames in one slice: ~50 comparator calls of
    2 pairs, far more than 1 s of work. The 1 s deadline passes early (before or during the first
    calls, depending on the machine's load); the rest must never run. That the kernels stop
    between two comparator calls is checked without a clock in tests/test_similarity*.py."""
    busy = start_server(max_frame_pairs=10**9, max_batch_frame_pairs=10**9)
    candidates = long_candidates(stage2, 100, 500, prefix="long")
    everything = pb.SelectionPolicy(kind=pb.POLICY_KIND_ALL)
    request = inline_request(stage2, candidates=candidates, policy=everything)
    request.inline.CopyFrom(convert.inline_query_to_proto(long_query(stage2, 2000)))
    calls = count_comparator_calls(stage2.models, monkeypatch)
    with grpc.insecure_channel(busy.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.RerankerStub(channel).Rerank(request, timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    core = busy.server.core
    wait_until(lambda: core.inflight == 0 and core.reranker.batcher.admitted_pairs == 0, timeout_s=60)
    assert len(calls) < 25, len(calls)
    assert len(call(busy.grpc_target, inline_request(stage2)).hits) == 10  # and it serves on


def test_small_requests_flow_while_a_big_one_is_scored_in_slices(
    stage2: Stage2, start_server: Callable[..., BackgroundServer]
) -> None:
    """A big request is cut into slices of max_batch_frame_pairs; a small one that arrives
    meanwhile runs after the current slice, not after the whole big request."""
    sliced = start_server(max_frame_pairs=10**9, max_batch_frame_pairs=100_000)
    big_query, candidates = long_query(stage2, 1000, seed=1), long_candidates(stage2, 48, 100, prefix="mid")
    policy = SelectionPolicy("all", 0)
    request = pb.RerankRequest(
        inline=convert.inline_query_to_proto(big_query), candidates=convert.candidates_to_proto(candidates),
        policy=convert.policy_to_proto(policy), top_k=48,
    )  # fmt: skip
    batcher = sliced.server.core.reranker.batcher
    with grpc.insecure_channel(sliced.grpc_target) as channel:
        big = pb_grpc.RerankerStub(channel).Rerank.future(request, timeout=600)
        wait_until(lambda: batcher.stats.batches >= 1, timeout_s=120)  # its first slice is done
        small = call(sliced.grpc_target, inline_request(stage2))
        assert not big.done() and len(small.hits) == 10  # the small one did not wait for the big one
        response = big.result()
    assert batcher.stats.slices >= 48 + 1
    expected = stage2.local.rerank(big_query, candidates, policy, 48)
    assert [h.video_id for h in response.hits] == [h.video_id for h in expected.hits]
    np.testing.assert_allclose(
        [h.fine_score for h in response.hits], [h.fine_score for h in expected.hits], rtol=0, atol=1e-5
    )


# -- degradation through the SDK ------------------------------------------------------------------


def test_dnsindex_degrades_when_the_sidecar_is_down(stage2: Stage2, tmp_path: Path) -> None:
    from dns_milvus.engine import DnSIndex

    server = BackgroundServer(stage2.config(), stage2.models, stage2.store).start()
    target = server.grpc_target
    remote = RemoteReranker(target, timeout_s=5)
    with DnSIndex(str(tmp_path / "lite.db"), models=stage2.models, store=stage2.store, collection=COLLECTION,
                  reranker=remote) as index:  # fmt: skip
        index.write_records(list(stage2.corpus.values()))
        served = index.search("v0", top_k=5, candidates=15, policy="all")
        # every other video is a candidate, so the sidecar ranks them as the engine does in-process
        local = index.local_reranker.rerank(stage2.query, stage2.candidates(), SelectionPolicy("all", 0), 5)
        assert not served.degraded and [h.video_id for h in served.hits] == [h.video_id for h in local.hits]
        server.stop(grace_s=1.0)
        degraded = index.search("v0", top_k=5, candidates=15, policy="all")
    remote.close()
    assert degraded.degraded and degraded.n_reranked == 0
    assert all(h.stage == "coarse" for h in degraded.hits)
    assert "stage 2 unavailable" in degraded.warnings[0]


# -- the real entry point: configuration, SIGTERM drain ------------------------------------------------


def test_config_reads_flags_over_environment_over_defaults() -> None:
    env = {"DNS_RERANKER_MODEL_SET": "/m", "DNS_RERANKER_STORE": "/s", "DNS_RERANKER_MAX_WAIT_MS": "7.5",
           "DNS_RERANKER_GRPC_PORT": "6000"}  # fmt: skip
    config = load_config(["--grpc-port", "7000"], environ=env)
    assert (config.model_set, config.store, config.max_wait_ms, config.grpc_port) == ("/m", "/s", 7.5, 7000)
    assert config.http_port == ServerConfig.http_port
    with pytest.raises(InvalidInputError, match="DNS_RERANKER_MAX_INFLIGHT"):
        load_config([], environ={**env, "DNS_RERANKER_MAX_INFLIGHT": "many"})
    with pytest.raises(InvalidInputError, match="--model-set"):
        load_config([], environ={})
    with pytest.raises(InvalidInputError, match="tls-key"):
        load_config(["--tls-cert", "c.pem"], environ=env)


def test_main_reports_configuration_errors_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    from dns_milvus.sidecar.server import main

    assert main(["--store", "/tmp/x"]) == 2
    assert "--model-set" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports torch and loads the model set
def test_sigterm_drains_in_flight_requests_then_exits(stage2: Stage2, tmp_path: Path) -> None:
    port_file = tmp_path / "ports.json"
    env = {
        **os.environ,
        "DNS_RERANKER_MODEL_SET": str(stage2.model_dir),
        "DNS_RERANKER_STORE": str(stage2.store_dir),
        "DNS_RERANKER_GRPC_PORT": "0",
        "DNS_RERANKER_HTTP_PORT": "0",
        "DNS_RERANKER_PORT_FILE": str(port_file),
        "DNS_RERANKER_MAX_WAIT_MS": "1500",
        "DNS_RERANKER_TORCH_THREADS": "1",
        "DNS_RERANKER_DEVICE": "cpu",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dns_milvus.sidecar"], cwd=REPO_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: port_file.exists() or proc.poll() is not None, timeout_s=120)
        assert proc.poll() is None, proc.communicate()[1]
        ports = json.loads(port_file.read_text())
        target = f"127.0.0.1:{ports['grpc_port']}"
        with grpc.insecure_channel(target) as channel:
            pending = pb_grpc.RerankerStub(channel).Rerank.future(inline_request(stage2), timeout=60)

            def queued() -> bool:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['http_port']}/metrics") as r:
                    return "dns_reranker_queued_pairs 0.0" not in r.read().decode()

            wait_until(queued)
            proc.send_signal(signal.SIGTERM)
            assert len(pending.result().hits) == 10  # in flight at SIGTERM: completed, not cut
        assert proc.wait(timeout=60) == 0
        with pytest.raises(grpc.RpcError) as info:
            call(target, inline_request(stage2))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert [e["msg"] for e in logs if e["msg"] in ("serving", "draining", "stopped")] == [
            "serving",
            "draining",
            "stopped",
        ]
        assert any(e["msg"] == "rerank" and e["status"] == "ok" for e in logs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_remote_errors_are_dns_errors_of_the_right_kind(stage2: Stage2, server: BackgroundServer) -> None:
    with RemoteReranker(server.grpc_target) as remote:
        with pytest.raises(InvalidInputError, match="top_k"):
            remote.rerank(stage2.query, stage2.candidates(), SelectionPolicy("all", 0), 0)
        request = dataclasses.replace(stage2.query, fine=stage2.query.fine[:, :, :3])
        with pytest.raises(InvalidInputError, match=r"inline\.fine_shape"):
            remote.rerank(request, stage2.candidates(), SelectionPolicy("all", 0), 3)
