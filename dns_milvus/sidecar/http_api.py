"""HTTP endpoints: Cohere- and TEI-compatible rerank, query upload, metrics, health.

Vector databases call external rerankers with text: one query string and one string per
candidate ("document"). Here those strings NAME stored representations instead of holding text:

- a document is the candidate's ``fine_key`` (the object-store key of its fine tensor; the
  collection's ``fine_key`` VARCHAR field, so Milvus can pass it as the rerank input field);
- the query is ``dns:v1:video:<collection>:<video_id>`` for an indexed video, or the handle
  ``dns:v1:query:<id>`` that ``POST /v1/queries`` returns for an uploaded query record.

The protocols carry no stage-1 scores, so the selector cannot run: every document goes to the
fine-grained student (policy ``all``) and ``relevance_score`` is its similarity rescaled to
[0, 1]. Milvus already did the coarse selection when it chose the documents. Under policy ``all``
the selector is not consulted, so a model set whose selector reads segment codes (which documents
do not carry) serves these protocols too.

Endpoints (bearer token required when the server has one, except /metrics and /healthz):

- ``POST /v2/rerank``, ``POST /v1/rerank``, ``POST /rerank``: Cohere body
  ``{model, query, documents, top_n}`` -> ``{id, results: [{index, relevance_score}], meta}``;
  on ``/rerank`` a TEI body ``{query, texts}`` -> ``[{index, score}]`` (told apart by its keys);
- ``POST /v1/queries``: upload a query record -> ``{query: "dns:v1:query:...", expires_in_s}``;
- ``GET /v1/info``, ``GET /metrics`` (Prometheus), ``GET /healthz``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from dns_milvus.engine.modelset import VideoRecord
from dns_milvus.engine.policy import SelectionPolicy
from dns_milvus.engine.rerank import Candidate, RerankResult
from dns_milvus.errors import InvalidInputError, NotFoundError
from dns_milvus.ids import validate_video_id
from dns_milvus.rpc import convert
from dns_milvus.rpc import rerank_pb2 as pb
from dns_milvus.sidecar.core import IndexedRef, QuerySpec, RerankCore, Stage2Request
from dns_milvus.store import validate_collection, validate_key

log = logging.getLogger("dns_milvus.sidecar.http")

QUERY_PREFIX = "dns:v1:query:"
VIDEO_PREFIX = "dns:v1:video:"
_QUERY_FORMS = (
    f"'{VIDEO_PREFIX}<collection>:<video_id>' or a '{QUERY_PREFIX}<id>' handle from POST /v1/queries"
)
_POLICY_ALL = SelectionPolicy("all", 0.0)
_CORE_KEY = web.AppKey("core", RerankCore)
_QUERIES_KEY = web.AppKey("queries", "QueryStore")


class QueryStore:
    """Uploaded query records by handle, each for ``ttl_s``, within a byte budget (oldest out first)."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, VideoRecord]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, record: VideoRecord) -> str:
        size = _record_bytes(record)
        if size > self.max_bytes:
            raise InvalidInputError(
                f"query is {size} bytes; the server keeps uploaded queries up to {self.max_bytes}"
            )
        handle = QUERY_PREFIX + secrets.token_urlsafe(18)
        with self._lock:
            self._purge(time.monotonic())
            self._items[handle] = (time.monotonic() + self.ttl_s, record)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, old) = self._items.popitem(last=False)
                self._bytes -= _record_bytes(old)
        return handle

    def get(self, handle: str) -> VideoRecord | None:
        with self._lock:
            self._purge(time.monotonic())
            item = self._items.get(handle)
            return item[1] if item else None

    def __len__(self) -> int:
        return len(self._items)

    def _purge(self, now: float) -> None:
        # Insertion order is expiry order (one TTL for all), so expired entries are at the front.
        while self._items:
            handle, (expires, record) = next(iter(self._items.items()))
            if expires > now:
                break
            del self._items[handle]
            self._bytes -= _record_bytes(record)


def _record_bytes(record: VideoRecord) -> int:
    return int(record.fine.nbytes) + int(record.coarse.nbytes) + 256


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_query(text: object, queries: QueryStore) -> QuerySpec:
    """The query a rerank request names (see the module docstring for the two forms)."""
    if not isinstance(text, str):
        raise InvalidInputError(f"query: expected a string, {_QUERY_FORMS}; got {type(text).__name__}")
    if text.startswith(QUERY_PREFIX):
        record = queries.get(text)
        if record is None:
            raise NotFoundError(
                f"query: handle {text[:64]!r} is unknown or expired; upload it again (POST /v1/queries)"
            )
        return record
    if text.startswith(VIDEO_PREFIX):
        collection, sep, video_id = text[len(VIDEO_PREFIX) :].partition(":")
        if sep:
            try:
                return IndexedRef(validate_collection(collection), validate_video_id(video_id))
            except InvalidInputError as exc:
                raise InvalidInputError(f"query: {exc}") from None
    raise InvalidInputError(f"query: {text[:80]!r} does not parse; expected {_QUERY_FORMS}")


def parse_documents(documents: object, field: str, limit: int) -> list[str]:
    """Fine-tensor keys of the documents (plain strings, or Cohere's ``{"text": ...}`` objects)."""
    if not isinstance(documents, list):
        raise InvalidInputError(
            f"{field}: expected a list of fine_key strings, got {type(documents).__name__}"
        )
    if len(documents) > limit:
        raise InvalidInputError(f"{field}: {len(documents)} given; the limit is {limit} a request")
    keys = []
    for i, doc in enumerate(documents):
        text = doc.get("text") if isinstance(doc, dict) else doc
        try:
            keys.append(validate_key(text))
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"{field}[{i}]: {exc}; documents must be the collection's fine_key field values"
            ) from None
    return keys


async def score_documents(
    core: RerankCore, queries: QueryStore, query_text: object, documents: object, field: str
) -> tuple[list[str], list[float], list[str]]:
    """(document keys, fine-grained relevance of each, warnings); a missing tensor scores 0 with a
    warning. Parsing runs in the request's worker thread, like the scoring."""
    keys: list[str] = []

    def prepare() -> Stage2Request:
        query = parse_query(query_text, queries)
        keys.extend(parse_documents(documents, field, core.max_candidates))
        unique = list(dict.fromkeys(keys))  # a key listed twice is scored once
        candidates = [Candidate(video_id=key, coarse_score=0.0, self_sim=0.0, fine_key=key) for key in unique]
        return Stage2Request(query, candidates, _POLICY_ALL, max(len(candidates), 1))

    def finish(result: RerankResult) -> tuple[list[float], list[str]]:
        by_key = {hit.video_id: hit.score for hit in result.hits}
        return [by_key[key] for key in keys], result.warnings

    scores, warnings = await core.run(prepare, finish, timeout_s=core.config.http_timeout_s or None)
    return keys, scores, warnings


def _ranked(scores: list[float], top_n: int | None) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[:top_n] if top_n is not None else order


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidInputError(f"body: not valid JSON ({exc})") from None
    except RecursionError:  # the parser recurses once a nesting level
        raise InvalidInputError("body: JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidInputError(f"body: expected a JSON object, got {type(body).__name__}")
    return body


def _top_n(body: dict[str, Any]) -> int | None:
    top_n = body.get("top_n")
    if top_n is None:
        return None
    if not _is_int(top_n) or top_n < 1:
        raise InvalidInputError(f"top_n: expected an integer >= 1, got {top_n!r}")
    return top_n


async def rerank_handler(request: web.Request) -> web.Response:
    core = request.app[_CORE_KEY]
    body = await _json_body(request)
    if "texts" in body and request.path == "/rerank":
        return await _tei_rerank(core, request.app[_QUERIES_KEY], body)
    return await _cohere_rerank(core, request.app[_QUERIES_KEY], body)


async def _cohere_rerank(core: RerankCore, queries: QueryStore, body: dict[str, Any]) -> web.Response:
    model = body.get("model")
    if model not in (None, "", core.models.name):
        raise HttpError(
            409,
            f"model: {str(model)[:80]!r} is not served here; "
            f"this server serves model set {core.models.name!r} "
            f"(with Milvus, set the function's model_name param to {core.models.name!r})",
        )
    if "documents" not in body:
        raise InvalidInputError("documents: required (a list of fine_key strings)")
    top_n = _top_n(body)
    keys, scores, warnings = await score_documents(
        core, queries, body.get("query"), body["documents"], "documents"
    )
    results = [{"index": i, "relevance_score": scores[i]} for i in _ranked(scores, top_n)]
    if body.get("return_documents"):
        for r in results:
            r["document"] = {"text": keys[r["index"]]}
    meta: dict[str, Any] = {"api_version": {"version": "2"}, "model_set": core.models.name}
    if warnings:
        meta["warnings"] = warnings
    return web.json_response({"id": str(uuid.uuid4()), "results": results, "meta": meta})


async def _tei_rerank(core: RerankCore, queries: QueryStore, body: dict[str, Any]) -> web.Response:
    keys, scores, warnings = await score_documents(core, queries, body.get("query"), body["texts"], "texts")
    results: list[dict[str, Any]] = [{"index": i, "score": scores[i]} for i in _ranked(scores, None)]
    if body.get("return_text"):
        for r in results:
            r["text"] = keys[r["index"]]
    headers = {"X-DnS-Warnings": str(len(warnings))} if warnings else None
    return web.json_response(results, headers=headers)


async def upload_query_handler(request: web.Request) -> web.Response:
    """``POST /v1/queries``: a query record as JSON (fine tensor base64) or as a binary ``InlineQuery``."""
    core = request.app[_CORE_KEY]
    if request.content_type == "application/x-protobuf":
        msg = pb.InlineQuery()
        try:
            msg.ParseFromString(await request.read())
        except Exception:  # protobuf's DecodeError has no stable import path across versions
            raise InvalidInputError("body: not a serialized dns.rerank.v1.InlineQuery") from None
    else:
        msg = _inline_query_from_json(await _json_body(request))
    record = convert.inline_query_from_proto(
        msg, payload_kind=core.models.payload_kind, fine_dim=core.fine_dim,
        coarse_dim=core.models.coarse_dim, max_frames=core.config.max_query_frames, field="body",
    )  # fmt: skip
    queries: QueryStore = request.app[_QUERIES_KEY]
    handle = queries.put(record)
    return web.json_response({"query": handle, "expires_in_s": queries.ttl_s}, status=201)


def _inline_query_from_json(body: dict[str, Any]) -> pb.InlineQuery:
    kind = convert.PAYLOAD_TO_PROTO.get(body.get("payload_kind"))  # type: ignore[arg-type]
    if kind is None:
        raise InvalidInputError(f"body.payload_kind: expected {' or '.join(convert.PAYLOAD_TO_PROTO)}")
    try:
        fine = base64.b64decode(body.get("fine", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise InvalidInputError("body.fine: expected the fine tensor's bytes, base64-encoded") from None
    shape, coarse = body.get("fine_shape"), body.get("coarse", [])
    if not isinstance(shape, list) or not all(_is_int(s) and 0 <= s < 2**32 for s in shape):
        raise InvalidInputError("body.fine_shape: expected [T, R, C] as non-negative integers")
    if not isinstance(coarse, list):
        raise InvalidInputError("body.coarse: expected a list of numbers (or leave it out)")
    return pb.InlineQuery(
        coarse=[_json_float(v, f"body.coarse[{i}]") for i, v in enumerate(coarse)],
        self_sim=_json_float(body.get("self_sim", 0.0), "body.self_sim"),
        fine=fine,
        payload_kind=kind,
        fine_shape=shape,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _json_float(value: object, field: str) -> float:
    """A JSON number as a float: booleans and non-numbers are refused, and so are integers too
    large for a float (JSON integers have no size limit)."""
    if not (_is_int(value) or isinstance(value, float)):
        raise InvalidInputError(f"{field}: expected a number, got {type(value).__name__}")
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise InvalidInputError(f"{field}: {value.bit_length()}-bit integer is out of range") from None  # type: ignore[union-attr]


async def info_handler(request: web.Request) -> web.Response:
    return web.json_response(request.app[_CORE_KEY].info())


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[_CORE_KEY].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def health_handler(request: web.Request) -> web.Response:
    core = request.app[_CORE_KEY]
    if core.draining:
        return web.json_response({"status": "NOT_SERVING"}, status=503)
    return web.json_response({"status": "SERVING", "inflight": core.inflight})


def _middlewares(core: RerankCore, token: str) -> list:
    expected = f"Bearer {token}".encode()
    open_paths = ("/metrics", "/healthz")

    @web.middleware
    async def errors_auth_metrics(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        status = "ok"
        try:
            if token and request.path not in open_paths:
                given = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    raise HttpError(
                        401, "missing or wrong bearer token (header 'Authorization: Bearer <token>')"
                    )
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: 404 route, 405 method, 413 body too large
            status = f"http_{exc.status}"
            return _error(
                exc.status,
                exc.reason if exc.status != 413 else f"body exceeds {core.config.max_message_bytes} bytes",
            )
        except HttpError as exc:
            status = f"http_{exc.status}"
            return _error(exc.status, str(exc))
        except Exception as exc:
            err = core.status(exc)
            status = err.name
            if err.name == "internal":
                log.exception("http request failed", extra={"path": request.path})
            return _error(err.http_status, err.message)
        finally:
            if request.path not in open_paths:
                seconds = time.perf_counter() - t0
                core.metrics.observe_request("http", _route_label(request), status, seconds)
                log.info("http", extra={"protocol": "http", "path": request.path[:200], "status": status,
                                        "duration_ms": round(seconds * 1000.0, 3)})  # fmt: skip

    return [errors_auth_metrics]


def _route_label(request: web.Request) -> str:
    """The route's own path for metrics: raw paths of unknown routes would grow labels without bound."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _error(status: int, message: str) -> web.Response:
    # "message" is what Cohere clients read, "error" what TEI clients read.
    return web.json_response({"message": message, "error": message}, status=status)


def build_app(core: RerankCore, token: str = "") -> web.Application:
    app = web.Application(
        middlewares=_middlewares(core, token), client_max_size=core.config.max_message_bytes
    )
    app[_CORE_KEY] = core
    app[_QUERIES_KEY] = QueryStore(core.config.query_store_bytes, core.config.query_ttl_s)
    app.router.add_post("/v2/rerank", rerank_handler)
    app.router.add_post("/v1/rerank", rerank_handler)
    app.router.add_post("/rerank", rerank_handler)
    app.router.add_post("/v1/queries", upload_query_handler)
    app.router.add_get("/v1/info", info_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", health_handler)
    return app
