"""The ``dns.rerank.v1.Reranker`` gRPC service, bearer-token authentication, health and reflection."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dns_milvus.rpc import convert
from dns_milvus.rpc import rerank_pb2 as pb
from dns_milvus.rpc import rerank_pb2_grpc as pb_grpc
from dns_milvus.sidecar.core import IndexedRef, QuerySpec, RerankCore, Stage2Request

log = logging.getLogger("dns_milvus.sidecar.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Reranker"].full_name


class RerankerService(pb_grpc.RerankerServicer):
    def __init__(self, core: RerankCore) -> None:
        self.core = core

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        t0 = time.perf_counter()
        status = "ok"
        try:
            core = self.core
            core.check_model(request.model_set, request.model_tag)
            core.check_candidate_count(len(request.candidates))  # before parsing them
            return await core.run(
                lambda: self._parse(request),
                lambda result: convert.result_to_proto(
                    result, model_set=core.models.name, model_tag=core.models.tag
                ),
                timeout_s=context.time_remaining(),
            )
        except Exception as exc:
            err = self.core.status(exc)
            status = err.name
            if err.name == "internal":
                log.exception("rerank failed", extra={"request_id": request.request_id})
            await context.abort(err.grpc_code, err.message)
            raise  # abort raises; this line is never reached
        except BaseException:  # cancelled by the client or by shutdown
            status = "cancelled"
            raise
        finally:
            seconds = time.perf_counter() - t0
            self.core.metrics.observe_request("grpc", "Rerank", status, seconds)
            log.info(
                "rerank",
                extra={
                    "protocol": "grpc", "status": status, "duration_ms": round(seconds * 1000.0, 3),
                    "n_candidates": len(request.candidates), "top_k": request.top_k,
                    "request_id": request.request_id or None,
                },
            )  # fmt: skip

    def _parse(self, request: pb.RerankRequest) -> Stage2Request:
        """The request's fields, validated (runs in the request's worker thread)."""
        core = self.core
        which = request.WhichOneof("query")
        query: QuerySpec
        if which == "inline":
            query = convert.inline_query_from_proto(
                request.inline,
                payload_kind=core.models.payload_kind,
                fine_dim=core.fine_dim,
                coarse_dim=core.models.coarse_dim,
                max_frames=core.config.max_query_frames,
            )
        elif which == "indexed":
            query = IndexedRef(
                *convert.indexed_query_from_proto(request.indexed, coarse_dim=core.models.coarse_dim)
            )
        else:
            raise convert.field_error("query", "set either indexed or inline")
        return Stage2Request(
            query,
            convert.candidates_from_proto(request.candidates, coarse_dim=core.models.coarse_dim),
            convert.policy_from_proto(request.policy),
            request.top_k,
        )

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInfoResponse:
        info = self.core.info()
        info["payload_kind"] = convert.PAYLOAD_TO_PROTO[info["payload_kind"]]
        self.core.metrics.observe_request("grpc", "GetInfo", "ok", 0.0)
        return pb.GetInfoResponse(**info)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (health checks stay open for probes)."""

    def __init__(self, token: str, exempt_prefixes: tuple[str, ...] = (f"/{health.SERVICE_NAME}/",)) -> None:
        self._expected = f"Bearer {token}".encode()
        self._exempt = exempt_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._exempt):
            return handler
        given = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self._expected):
            return handler
        return _refusing_handler(
            handler, "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"
        )


def _refusing_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""

    async def deny(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request_or_iterator: object, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)


@dataclass(frozen=True)
class MalformedRequest:
    """What the deserializer hands the handler for bytes that do not parse as the request type."""

    message: str


def _lenient_parser(message_type: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    # gRPC answers a deserializer's exception with UNKNOWN; a malformed body is the client's error.
    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return MalformedRequest(f"request is not a valid {message_type.DESCRIPTOR.full_name} message")

    return parse


def _refusing_malformed(
    core: RerankCore, name: str, method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]:
    async def handle(request: Message | MalformedRequest, context: grpc.aio.ServicerContext) -> Message:
        if isinstance(request, MalformedRequest):
            core.metrics.observe_request("grpc", name, "invalid_argument", 0.0)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return handle


def add_services(server: grpc.aio.Server, core: RerankCore) -> health.aio.HealthServicer:
    """Register the re-ranker, health and reflection services; returns the health servicer.

    The re-ranker's handlers are built from the service descriptor (not the generated
    ``add_RerankerServicer_to_server``) so that undecodable requests answer INVALID_ARGUMENT.
    """
    servicer = RerankerService(core)
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            _refusing_malformed(core, method.name, getattr(servicer, method.name)),
            request_deserializer=_lenient_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
        for method in pb.DESCRIPTOR.services_by_name["Reranker"].methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
