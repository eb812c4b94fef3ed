"""``RemoteReranker``: stage 2 of DnS search on a re-ranker sidecar, over gRPC.

It implements the engine's ``Reranker`` protocol, so ``DnSIndex(..., reranker=RemoteReranker(...))``
sends each query's candidates to the sidecar. Failures that mean "stage 2 is not available
right now" (server down, overloaded, too slow) raise ``BackendUnavailableError`` or
``TimeoutError`` subclasses, which ``DnSIndex`` turns into a coarse ranking flagged degraded;
every other status becomes a ``DnSError`` subclass carrying the server's message.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from dns_milvus.engine.modelset import VideoRecord
from dns_milvus.engine.policy import SelectionPolicy
from dns_milvus.engine.rerank import Candidate, RerankResult
from dns_milvus.errors import (
    BackendUnavailableError,
    DnSError,
    InvalidInputError,
    ModelSetMismatchError,
    NotFoundError,
    RemoteRerankerError,
    RerankerAuthError,
    RerankerOverloadedError,
    RerankerTimeoutError,
)
from dns_milvus.rpc import convert
from dns_milvus.rpc._generated import rerank_pb2 as pb
from dns_milvus.rpc._generated import rerank_pb2_grpc as pb_grpc

#: Default cap on one message in either direction (gRPC's own default is 4 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20

_STATUS_ERRORS: dict[grpc.StatusCode, type[DnSError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: ModelSetMismatchError,
    grpc.StatusCode.UNAUTHENTICATED: RerankerAuthError,
    grpc.StatusCode.PERMISSION_DENIED: RerankerAuthError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RerankerOverloadedError,
    grpc.StatusCode.UNAVAILABLE: BackendUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: RerankerTimeoutError,
    grpc.StatusCode.CANCELLED: BackendUnavailableError,
}


def error_from_status(exc: grpc.RpcError, target: str) -> DnSError:
    """The ``DnSError`` for a failed call, with the server's message and the status name."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    cls = _STATUS_ERRORS.get(code, RemoteRerankerError)
    error = cls(f"re-ranker {target} answered {code.name}: {details}")
    error.status_code = code.name  # type: ignore[attr-defined]
    return error


class RemoteReranker:
    """A ``Reranker`` that calls a dns-milvus re-ranker sidecar.

    Args:
        target: ``host:port`` of the sidecar's gRPC port.
        token: bearer token, sent as ``authorization: Bearer <token>`` metadata.
        tls: ``False`` for plaintext, ``True`` for TLS with the system's root certificates, or
            the path of a PEM root certificate (a private CA or a self-signed server).
        timeout_s: deadline of each call; past it the call fails with ``RerankerTimeoutError``.
        max_message_bytes: largest request or response; a larger request is refused here,
            before it is sent.
        model_set, model_tag: checked by the server against the model set it serves (empty or
            ``None`` skips the check); a mismatch raises ``ModelSetMismatchError``.
        collection: when set, a query that carries a ``video_id`` is sent by reference (the
            server reads its fine tensor from the shared object store, so the request carries
            no tensor); if the server does not find it the query is sent again in full.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool | str | Path = False,
        timeout_s: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        model_set: str | None = None,
        model_tag: str | None = None,
        collection: str | None = None,
    ) -> None:
        if not isinstance(target, str) or not target:
            raise InvalidInputError(f"re-ranker target must be 'host:port', got {target!r}")
        if timeout_s <= 0:
            raise InvalidInputError(f"timeout_s must be > 0, got {timeout_s}")
        if max_message_bytes < 1024:
            raise InvalidInputError(f"max_message_bytes must be >= 1024, got {max_message_bytes}")
        self.target = target
        self.timeout_s = float(timeout_s)
        self.max_message_bytes = int(max_message_bytes)
        self.model_set = model_set or ""
        self.model_tag = model_tag or ""
        self.collection = collection
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        if tls:
            root = Path(tls).read_bytes() if not isinstance(tls, bool) else None
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.RerankerStub(self._channel)

    def rerank(
        self, query: VideoRecord, candidates: Sequence[Candidate], policy: SelectionPolicy, top_k: int
    ) -> RerankResult:
        """Stage 2 on the sidecar: the same ranking ``LocalReranker.rerank`` gives on that machine."""
        request = pb.RerankRequest(
            candidates=convert.candidates_to_proto(candidates),
            policy=convert.policy_to_proto(policy),
            top_k=top_k,
            model_set=self.model_set,
            model_tag=self.model_tag,
        )
        if self.collection and query.video_id:
            request.indexed.CopyFrom(
                pb.IndexedQuery(collection=self.collection, video_id=query.video_id, self_sim=query.self_sim)
            )
            try:
                return self._call(request, candidates)
            except NotFoundError:
                pass  # not in the server's store (yet): send the tensor itself
        request.inline.CopyFrom(convert.inline_query_to_proto(query))
        return self._call(request, candidates)

    def info(self) -> dict[str, Any]:
        """What the sidecar serves: model set, tag, payload kind, device and limits."""
        try:
            reply = self._stub.GetInfo(pb.GetInfoRequest(), timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_status(exc, self.target) from None
        return {
            "model_set": reply.model_set,
            "model_tag": reply.model_tag,
            "payload_kind": convert.PAYLOAD_FROM_PROTO.get(reply.payload_kind, ""),
            "coarse_dim": reply.coarse_dim,
            "device": reply.device,
            "max_candidates": reply.max_candidates,
            "max_message_bytes": reply.max_message_bytes,
            "server_version": reply.server_version,
        }

    def _call(self, request: pb.RerankRequest, candidates: Sequence[Candidate]) -> RerankResult:
        size = request.ByteSize()
        if size > self.max_message_bytes:
            raise InvalidInputError(
                f"re-rank request is {size} bytes ({len(candidates)} candidates); the limit is "
                f"max_message_bytes={self.max_message_bytes}: send fewer candidates or raise the limit"
            )
        t0 = time.perf_counter()
        try:
            reply = self._stub.Rerank(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_status(exc, self.target) from None
        rpc_ms = (time.perf_counter() - t0) * 1000.0
        return convert.result_from_proto(reply, candidates, {"rpc_ms": rpc_ms})

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteReranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
