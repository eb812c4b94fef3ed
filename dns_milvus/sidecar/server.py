"""The re-ranker sidecar process: gRPC + HTTP on one event loop, one model set, one batcher.

    dns-milvus serve-reranker --model-set ./models/dns --store s3://videos/fine?endpoint_url=... \\
        --host 0.0.0.0 --grpc-port 50051 --http-port 8080

Lifecycle: load the model set (CUDA when available, else CPU) and open the store; start the
batcher, the gRPC server (re-ranker, health, reflection) and the HTTP app; mark health
SERVING. On SIGTERM/SIGINT: mark NOT_SERVING, stop accepting, let in-flight requests finish
within ``--grace-s``, then cancel what is left and exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import torch
from aiohttp import web

from dns_milvus.engine.modelset import ModelSet
from dns_milvus.errors import DnSError
from dns_milvus.sidecar.config import ServerConfig, load_config
from dns_milvus.sidecar.core import RerankCore
from dns_milvus.sidecar.grpc_service import BearerTokenInterceptor, add_services, set_serving
from dns_milvus.sidecar.http_api import build_app
from dns_milvus.sidecar.jsonlog import configure_logging
from dns_milvus.sidecar.metrics import Metrics
from dns_milvus.similarity import resolve_precision
from dns_milvus.store import ObjectStore, open_store

log = logging.getLogger("dns_milvus.sidecar.server")


class SidecarServer:
    """The sidecar's servers around one ``RerankCore``; start and drain on a running event loop."""

    def __init__(self, config: ServerConfig, models: ModelSet, store: ObjectStore) -> None:
        self.config = config
        self.token = config.bearer_token()
        self.core = RerankCore(models, store, config, Metrics())
        self.grpc_port = 0
        self.http_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._health = None

    async def start(self) -> None:
        cfg = self.config
        await self.core.start()
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ]
        if cfg.max_connection_age_s > 0:  # clients reconnect, resolving the replicas' name again
            options += [
                ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(cfg.grace_s * 1000)),
            ]
        interceptors = [BearerTokenInterceptor(self.token)] if self.token else []
        self._grpc = grpc.aio.server(interceptors=interceptors, options=options)
        self._health = add_services(self._grpc, self.core)
        address = f"{cfg.host}:{cfg.grpc_port}"
        if cfg.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
            )
            self.grpc_port = self._grpc.add_secure_port(address, creds)
        else:
            self.grpc_port = self._grpc.add_insecure_port(address)
        await self._grpc.start()
        if cfg.http_port >= 0:
            self._http = web.AppRunner(
                build_app(self.core, self.token), access_log=None, shutdown_timeout=cfg.grace_s
            )
            await self._http.setup()
            tls = None
            if cfg.tls_cert:
                tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                tls.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            site = web.TCPSite(self._http, cfg.host, cfg.http_port, ssl_context=tls)
            await site.start()
            self.http_port = int(self._http.addresses[0][1])
        await set_serving(self._health, True)
        if cfg.port_file:
            _write_json_atomically(
                Path(cfg.port_file),
                {"grpc_port": self.grpc_port, "http_port": self.http_port, "pid": os.getpid()},
            )
        log.info(
            "serving",
            extra={
                "grpc_port": self.grpc_port, "http_port": self.http_port or None,
                "tls": bool(cfg.tls_cert), "auth": bool(self.token), "model_set": self.core.models.name,
                "model_tag": self.core.models.tag, "device": str(self.core.models.device),
            },
        )  # fmt: skip

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting, give in-flight requests ``grace_s`` to finish, then stop everything."""
        grace = self.config.grace_s if grace_s is None else grace_s
        log.info("draining", extra={"inflight": self.core.inflight, "grace_s": grace})
        self.core.draining = True
        if self._health is not None:
            await set_serving(self._health, False)
        stopping = []
        if self._grpc is not None:
            stopping.append(self._grpc.stop(grace))
        if self._http is not None:
            stopping.append(self._http.cleanup())
        await asyncio.gather(*stopping, return_exceptions=True)
        finished = await self.core.wait_idle(0.1)
        await self.core.stop()
        self.core.store.close()
        log.info("stopped", extra={"drained": finished})


async def serve(config: ServerConfig, models: ModelSet, store: ObjectStore, stop: asyncio.Event) -> None:
    """Run a sidecar until ``stop`` is set, then drain it."""
    server = SidecarServer(config, models, store)
    await server.start()
    await stop.wait()
    await server.drain()


def load_resources(config: ServerConfig) -> tuple[ModelSet, ObjectStore]:
    """The model set on the configured device and the object store."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    models = ModelSet.load(config.model_set, device=config.device)
    resolve_precision(config.fine_precision, models.device)  # unsupported bfloat16: refused at start
    return models, open_store(config.store)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dns-milvus serve-reranker``; returns the exit code."""
    if argv and argv[0] == "--":  # `dns-milvus serve-reranker -- --flag ...` passes the separator on
        argv = argv[1:]
    try:
        config = load_config(argv)
        configure_logging(config.log_level)
        models, store = load_resources(config)
    except DnSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, models, store, stop)

    try:
        asyncio.run(run())
    except OSError as exc:  # e.g. the port is taken
        log.error("cannot serve", extra={"error": str(exc)})
        return 1
    return 0


class BackgroundServer:
    """A sidecar on its own event loop in a daemon thread: for tests, benchmarks and notebooks.

    with BackgroundServer(config, models, store) as server:
        reranker = RemoteReranker(server.grpc_target)
    """

    def __init__(self, config: ServerConfig, models: ModelSet, store: ObjectStore) -> None:
        self.config = replace(config, port_file="")
        self._models = models
        self._store = store
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dns-reranker", daemon=True)
        self.server: SidecarServer | None = None

    @property
    def grpc_target(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        assert self.server is not None
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.server.http_port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()

        async def start() -> SidecarServer:
            server = SidecarServer(self.config, self._models, self._store)
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout_s)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        if self.server is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.drain(grace_s), self._loop).result(grace_s + 30.0)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10.0)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
