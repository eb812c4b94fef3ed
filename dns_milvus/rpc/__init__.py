"""The SDK side of the re-ranker contract (``proto/dns/rerank/v1/rerank.proto``).

``RemoteReranker`` is a ``Reranker`` that runs stage 2 on a sidecar. The protobuf messages and
gRPC stubs are public here as ``rerank_pb2`` and ``rerank_pb2_grpc`` (``from dns_milvus.rpc import
rerank_pb2 as pb``); their generated files live in ``_generated`` (regenerate with ``python -m
dns_milvus.rpc.generate``). Names are imported on first use, so the generator runs even when
the generated modules are missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dns_milvus.rpc._generated import rerank_pb2, rerank_pb2_grpc
    from dns_milvus.rpc.client import (
        DEFAULT_MAX_MESSAGE_BYTES,
        ModelSetMismatchError,
        RemoteReranker,
        RemoteRerankerError,
        RerankerAuthError,
        RerankerOverloadedError,
        RerankerTimeoutError,
        error_from_status,
    )

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ModelSetMismatchError",
    "RemoteReranker",
    "RemoteRerankerError",
    "RerankerAuthError",
    "RerankerOverloadedError",
    "RerankerTimeoutError",
    "error_from_status",
    "rerank_pb2",
    "rerank_pb2_grpc",
]

#: The generated modules, under public names (the server and the client import them from here).
_GENERATED = ("rerank_pb2", "rerank_pb2_grpc")


def __getattr__(name: str) -> Any:
    if name in _GENERATED:
        import importlib

        return importlib.import_module(f"dns_milvus.rpc._generated.{name}")
    if name in __all__:
        from dns_milvus.rpc import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
