"""``RemoteReranker``: stage 2 of DnS search on a re-ranker sidecar, over gRPC.

It implements the engine's ``Reranker`` protocol, so ``DnSIndex(..., reranker=RemoteReranker(...))``
sends each query's candidates to the sidecar. Failures that mean "stage 2 is not available
right now" (server down, overloaded, too slow) raise ``BackendUnavailableError`` or
``TimeoutError`` subclasses, which ``DnSIndex`` turns into a coarse ranking flagged degraded;
every other status becomes a ``DnSError`` subclass carrying the server's message.

Replicas: the target may name several sidecars (a list, ``"h1:p,h2:p"``, or one DNS name that
resolves to several addresses, such as a Kubernetes headless Service). gRPC itself balances
over them: one channel, the ``round_robin`` policy, the client-side health check (a replica
that is not SERVING, e.g. draining, gets no calls) and a retry policy (a call that fails with
UNAVAILABLE, e.g. because its replica died mid-call, is sent again to the next ready replica).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
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

#: Attempts of one call (the first included) when it fails with UNAVAILABLE; each retry goes
#: through the balancer again, so it lands on the next ready replica. gRPC caps this at 5.
DEFAULT_MAX_ATTEMPTS = 3

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Reranker"].full_name
_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")

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


def error_from_status(exc: grpc.RpcError, target: str, replicas: int | None = 1) -> DnSError:
    """The ``DnSError`` for a failed call, with the server's message and the status name.

    ``replicas`` is how many addresses the target names (None: a DNS name); with more than one,
    UNAVAILABLE means that no replica could serve the call, and the message says so."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    cls = _STATUS_ERRORS.get(code, RemoteRerankerError)
    if code == grpc.StatusCode.UNAVAILABLE and replicas != 1:
        count = f"{replicas} replicas" if replicas else "every address its name resolves to"
        message = (
            f"no re-ranker replica of {target} could serve the call ({count}, each ready one tried): "
            f"{code.name}: {details}"
        )
    else:
        message = f"re-ranker {target} answered {code.name}: {details}"
    error = cls(message)
    error.status_code = code.name  # type: ignore[attr-defined]
    return error


@dataclass(frozen=True)
class ChannelTarget:
    """Where a channel connects: the gRPC target URI, what to call it in messages, and the
    authority (TLS server name) when the URI holds resolved addresses instead of a name."""

    uri: str
    shown: str
    replicas: int | None  # addresses known up front; None when a DNS name decides at run time
    authority: str | None = None


def channel_target(addresses: str | Sequence[str]) -> ChannelTarget:
    """The gRPC target of one or several sidecar addresses.

    - one ``host:port`` (or a gRPC target URI such as ``dns:///name:port``,
      ``ipv4:10.0.0.1:50051,10.0.0.2:50051``): used as it is; a DNS name is resolved by gRPC,
      every address it returns is a replica, and it is resolved again when a connection drops;
    - several ``host:port`` (a list, or one string with commas): IP addresses go into one
      ``ipv4:`` / ``ipv6:`` target; host names are resolved here, once.
    """
    if isinstance(addresses, str):
        text = addresses.strip()
        if text.startswith(_TARGET_SCHEMES):
            return ChannelTarget(text, text, _count_listed(text))
        items = [a.strip() for a in text.split(",")]
    elif isinstance(addresses, Sequence):
        items = [a.strip() if isinstance(a, str) else a for a in addresses]
    else:
        items = [addresses]
    if not items or any(not isinstance(a, str) or not a for a in items):
        raise InvalidInputError(
            f"re-ranker target must be 'host:port', several separated by commas, or a list of them; "
            f"got {addresses!r}"
        )
    hosts = [_split_host_port(a) for a in items]
    if len(hosts) == 1:
        host, port = hosts[0]
        literal = _ip_literal(host)
        uri = f"[{host}]:{port}" if literal and literal.version == 6 else f"{host}:{port}"
        return ChannelTarget(uri, uri, 1 if literal else None)
    resolved: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    for host, port in hosts:
        literal = _ip_literal(host)
        resolved += [(literal, port)] if literal else [(ip, port) for ip in _resolve(host, port)]
    versions = {ip.version for ip, _ in resolved}
    if len(versions) > 1:
        raise InvalidInputError(
            f"re-ranker addresses {','.join(items)} mix IPv4 and IPv6; give addresses of one family "
            "or one DNS name that resolves to every replica"
        )
    unique = list(dict.fromkeys(resolved))
    listed = ",".join(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}" for ip, port in unique)
    first_host = hosts[0][0]
    authority = None if _ip_literal(first_host) else f"{first_host}:{hosts[0][1]}"
    return ChannelTarget(f"ipv{versions.pop()}:{listed}", ",".join(items), len(unique), authority)


def _split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    ipv6_unbracketed = ":" in host and not bracketed
    if not host or ipv6_unbracketed or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(
            f"re-ranker address {address!r} is not 'host:port' (IPv6 as '[::1]:50051'); several "
            "replicas are 'host:port,host:port'"
        )
    return host, int(port)


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses of ``host``, IPv4 first (a name with both would otherwise mix families)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BackendUnavailableError(f"re-ranker host {host!r} does not resolve: {exc.strerror}") from None
    found = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    v4 = [ip for ip in found if ip.version == 4]
    return v4 or found


def _count_listed(uri: str) -> int | None:
    """Addresses in an ``ipv4:`` / ``ipv6:`` target; None for a name gRPC resolves."""
    scheme, _, rest = uri.partition(":")
    return len(rest.split(",")) if scheme in ("ipv4", "ipv6") else None


def service_config(max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> str:
    """The channel's service config: round robin over the replicas that pass the health check,
    and retries of UNAVAILABLE calls (only calls whose replica sent no response yet are retried)."""
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        # The sidecar reports its Reranker service SERVING while up and NOT_SERVING as it drains.
        "healthCheckConfig": {"serviceName": SERVICE_NAME},
    }
    if max_attempts > 1:  # gRPC refuses a retry policy of one attempt
        retry = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.05s",
            "maxBackoff": "0.5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
        config["methodConfig"] = [{"name": [{"service": SERVICE_NAME}], "retryPolicy": retry}]
    return json.dumps(config)


class RemoteReranker:
    """A ``Reranker`` that calls a dns-milvus re-ranker sidecar, or several replicas of it.

    Args:
        target: ``host:port`` of the sidecar's gRPC port; several replicas as a list or a
            comma-separated string, or one DNS name that resolves to all of them (see
            ``channel_target``). Calls are balanced round robin over the replicas whose health
            check says SERVING; a call that fails as UNAVAILABLE is retried on another one.
        token: bearer token, sent as ``authorization: Bearer <token>`` metadata.
        tls: ``False`` for plaintext, ``True`` for TLS with the system's root certificates, or
            the path of a PEM root certificate (a private CA or a self-signed server).
        timeout_s: deadline of each call; past it the call fails with ``RerankerTimeoutError``.
        max_message_bytes: largest request or response; a larger request is refused here,
            before it is sent.
        max_attempts: attempts of a call that fails with UNAVAILABLE (2-5; 1 turns retries off).
        channel_options: more gRPC channel arguments (keepalive, DNS re-resolution rate, ...);
            one named here replaces this class's own setting of it.
        model_set, model_tag: checked by the server against the model set it serves (empty or
            ``None`` skips the check); a mismatch raises ``ModelSetMismatchError``.
        collection: when set, a query that carries a ``video_id`` is sent by reference (the
            server reads its fine tensor from the shared object store, so the request carries
            no tensor); if the server does not find it the query is sent again in full.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str | None = None,
        tls: bool | str | Path = False,
        timeout_s: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        channel_options: Sequence[tuple[str, Any]] = (),
        model_set: str | None = None,
        model_tag: str | None = None,
        collection: str | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise InvalidInputError(f"timeout_s must be > 0, got {timeout_s}")
        if max_message_bytes < 1024:
            raise InvalidInputError(f"max_message_bytes must be >= 1024, got {max_message_bytes}")
        if not 1 <= max_attempts <= 5:
            raise InvalidInputError(f"max_attempts must be 1..5 (gRPC's cap), got {max_attempts}")
        channel = channel_target(target)
        self.target = channel.shown
        self.replicas = channel.replicas
        self.timeout_s = float(timeout_s)
        self.max_message_bytes = int(max_message_bytes)
        self.model_set = model_set or ""
        self.model_tag = model_tag or ""
        self.collection = collection
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.service_config", service_config(max_attempts)),
            ("grpc.enable_retries", int(max_attempts > 1)),
            # A request is kept for its retry only up to this size; past it the call is not retried.
            ("grpc.per_rpc_retry_buffer_size", self.max_message_bytes),
        ]
        if channel.authority:
            options.append(("grpc.default_authority", channel.authority))
        overridden = {name for name, _ in channel_options}
        options = [option for option in options if option[0] not in overridden] + list(channel_options)
        if tls:
            root = Path(tls).read_bytes() if not isinstance(tls, bool) else None
            creds = grpc.ssl_channel_credentials(root)
            self._channel = grpc.secure_channel(channel.uri, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(channel.uri, options=options)
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
            request.indexed.CopyFrom(convert.indexed_query_to_proto(query, self.collection))
            try:
                return self._call(request, candidates)
            except NotFoundError:
                pass  # not in the server's store (yet): send the tensor itself
        request.inline.CopyFrom(convert.inline_query_to_proto(query))
        return self._call(request, candidates)

    def info(self) -> dict[str, Any]:
        """What the sidecar serves: model set, tag, payload kind, the segments its selector reads,
        device and limits."""
        try:
            reply = self._stub.GetInfo(pb.GetInfoRequest(), timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_status(exc, self.target, self.replicas) from None
        return {
            "model_set": reply.model_set,
            "model_tag": reply.model_tag,
            "payload_kind": convert.PAYLOAD_FROM_PROTO.get(reply.payload_kind, ""),
            "coarse_dim": reply.coarse_dim,
            "device": reply.device,
            "max_candidates": reply.max_candidates,
            "max_message_bytes": reply.max_message_bytes,
            "server_version": reply.server_version,
            "selector_segments": reply.selector_segments,
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
            raise error_from_status(exc, self.target, self.replicas) from None
        rpc_ms = (time.perf_counter() - t0) * 1000.0
        return convert.result_from_proto(reply, candidates, {"rpc_ms": rpc_ms})

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteReranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
