"""Sidecar configuration: command-line flags, each with a ``DNS_RERANKER_*`` environment default.

A flag given on the command line wins over the environment, which wins over the built-in
default; ``--help`` lists every option with its variable.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from dns_milvus.errors import InvalidInputError

ENV_PREFIX = "DNS_RERANKER_"


@dataclass
class ServerConfig:
    model_set: str = ""
    store: str = ""
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8080
    device: str = "auto"
    token: str = ""
    token_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    max_message_bytes: int = 64 << 20
    max_candidates: int = 20_000
    max_query_frames: int = 10_000
    max_frame_pairs: int = 100_000_000
    max_inflight: int = 64
    max_queue_pairs: int = 65_536
    max_queue_frame_pairs: int = 1 << 28
    max_batch_pairs: int = 4096
    max_batch_frame_pairs: int = 1 << 22
    max_wait_ms: float = 2.0
    http_timeout_s: float = 30.0
    cache_bytes: int = 1 << 30
    query_ttl_s: float = 600.0
    query_store_bytes: int = 256 << 20
    grace_s: float = 20.0
    max_connection_age_s: float = 0.0
    torch_threads: int = 0
    fine_precision: str = "float32"
    fine_threads: int = 0
    fine_scorers: int = 1
    log_level: str = "INFO"
    port_file: str = ""

    def bearer_token(self) -> str:
        """The token from ``token`` or, when set, the first line of ``token_file``."""
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise InvalidInputError(f"cannot read --token-file {self.token_file}: {exc}") from exc
        return self.token

    def validate(self) -> ServerConfig:
        if not self.model_set:
            raise InvalidInputError("--model-set (DNS_RERANKER_MODEL_SET) is required: a model-set directory")
        if not self.store:
            raise InvalidInputError(
                "--store (DNS_RERANKER_STORE) is required: the object store URI the indexer uses"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidInputError("TLS needs both --tls-cert and --tls-key (PEM files)")
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if not -1 <= port <= 65535:
                raise InvalidInputError(
                    f"--{name.replace('_', '-')} must be 0..65535 (0 = any free port, -1 = off)"
                )
        if self.grpc_port == -1:
            raise InvalidInputError("--grpc-port cannot be -1: the gRPC service is always on")
        positive = (
            "max_message_bytes",
            "max_candidates",
            "max_query_frames",
            "max_frame_pairs",
            "max_inflight",
            "max_queue_pairs",
            "max_queue_frame_pairs",
            "fine_scorers",
            "max_batch_pairs",
            "max_batch_frame_pairs",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_wait_ms", "http_timeout_s", "cache_bytes", "query_store_bytes", "grace_s",
            "max_connection_age_s", "torch_threads", "fine_threads",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise InvalidInputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.query_ttl_s <= 0:
            raise InvalidInputError(f"--query-ttl-s must be > 0, got {self.query_ttl_s}")
        from dns_milvus.similarity.comparator import PRECISIONS  # imports torch: only once validating

        if self.fine_precision not in PRECISIONS:
            raise InvalidInputError(
                f"--fine-precision must be one of {', '.join(PRECISIONS)}, got {self.fine_precision!r}"
            )
        return self


_HELP = {
    "model_set": "model-set directory (manifest.json + checkpoints)",
    "store": "object store URI of the fine tensors (directory, file:///path, s3://bucket/prefix?endpoint_url=...)",
    "host": "address to listen on (0.0.0.0 in containers)",
    "grpc_port": "gRPC port (0 = any free port)",
    "http_port": "HTTP port: rerank endpoints, /metrics, /healthz (0 = any free port, -1 = off)",
    "device": "torch device: auto (CUDA when available, else CPU), cpu, cuda, cuda:N",
    "token": "bearer token clients must send (prefer --token-file or the environment)",
    "token_file": "file holding the bearer token",
    "tls_cert": "PEM certificate chain for TLS (gRPC and HTTP)",
    "tls_key": "PEM private key for TLS",
    "max_message_bytes": "largest request or response message / HTTP body",
    "max_candidates": "most candidates (documents) in one request",
    "max_query_frames": "most frames of an inline query's fine tensor",
    "max_frame_pairs": "most fine-grained work one request may ask for: query frames x the frames of "
    "every candidate it scores (more is refused with INVALID_ARGUMENT / 400)",
    "max_inflight": "most requests in flight; more are refused with RESOURCE_EXHAUSTED / 429",
    "max_queue_pairs": "most query/target pairs queued for the fine-grained student",
    "max_queue_frame_pairs": "most fine-grained work queued, in query x target frame pairs; more is "
    "refused with RESOURCE_EXHAUSTED / 429",
    "max_batch_pairs": "pairs that close a batch of fine-grained work",
    "max_batch_frame_pairs": "query x target frame pairs that close a batch (its frame matrices take 4 "
    "bytes each); a bigger request is scored in slices of this size, interleaved with other requests' work",
    "max_wait_ms": "longest a job waits for a batch to fill",
    "http_timeout_s": "deadline of an HTTP rerank request (0 = none); past it the answer is 504 and "
    "its remaining work is dropped",
    "cache_bytes": "byte budget of the decoded fine-tensor cache",
    "query_ttl_s": "lifetime of a query uploaded over HTTP (POST /v1/queries)",
    "query_store_bytes": "byte budget of uploaded queries (oldest evicted first)",
    "grace_s": "on SIGTERM, how long in-flight requests may finish",
    "max_connection_age_s": "close each client connection after this long (in-flight calls finish "
    "first; 0 = never): clients of a DNS name resolve it again and reach replicas added since",
    "torch_threads": "torch intra-op threads (0 = torch's default)",
    "fine_precision": "arithmetic of the fine student's comparator on CPU/CUDA: float32, bfloat16 (faster "
    "where the hardware has native bfloat16, scores within ~1e-3; refused elsewhere) or auto",
    "fine_threads": "CPU threads of one fine-scoring call (0 = as many as other processes leave idle, "
    "at most torch's)",
    "fine_scorers": "fine-grained batches scored at the same time, each in its own thread (with "
    "--fine-threads 0 the idle cores are shared by the busy ones); on 2 shared CPU cores two measured "
    "slower than one",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "port_file": "write the bound ports here as JSON once serving (for supervisors and tests)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dns-milvus serve-reranker",
        description="DnS stage-2 re-ranker: gRPC service, Cohere/TEI-style HTTP rerank endpoints, metrics.",
        epilog=f"Every option also reads {ENV_PREFIX}<NAME> from the environment (e.g. {ENV_PREFIX}HOST).",
    )
    for f in fields(ServerConfig):
        env = ENV_PREFIX + f.name.upper()
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=type(f.default),
            default=None,
            help=f"{_HELP[f.name]} [env {env}; default {f.default!r}]",
        )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    """Parse flags over environment over defaults; raises ``InvalidInputError`` on a bad value."""
    environ = dict(os.environ if environ is None else environ)
    args = build_parser().parse_args(argv)
    values = {}
    for f in fields(ServerConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = given
            continue
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            try:
                values[f.name] = type(f.default)(raw)
            except ValueError:
                raise InvalidInputError(
                    f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {type(f.default).__name__}"
                ) from None
    return ServerConfig(**values).validate()
