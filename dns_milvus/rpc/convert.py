"""Conversions between the engine's stage-2 types and the ``dns.rerank.v1`` messages.

Both sides of the contract use this module: the client turns a query, candidates and a
policy into a ``RerankRequest`` and a ``RerankResponse`` back into a ``RerankResult``; the
server does the reverse. Parsing validates every field and raises ``InvalidInputError``
whose message starts with the field's path (``candidates[3].fine_key: ...``), so the server
can answer INVALID_ARGUMENT with it verbatim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from dns_milvus.engine.modelset import PAYLOAD_FLOAT16, PAYLOAD_PACKED, VideoRecord
from dns_milvus.engine.policy import SelectionPolicy
from dns_milvus.engine.rerank import (
    STAGE_COARSE,
    STAGE_FINE,
    STAGE_FINE_MISSING,
    Candidate,
    RerankResult,
    SearchHit,
)
from dns_milvus.errors import DnSError, InvalidInputError
from dns_milvus.ids import validate_video_id
from dns_milvus.rpc._generated import rerank_pb2 as pb
from dns_milvus.store import validate_collection, validate_key

T = TypeVar("T")

PAYLOAD_TO_PROTO = {PAYLOAD_PACKED: pb.PAYLOAD_KIND_PACKED_BITS, PAYLOAD_FLOAT16: pb.PAYLOAD_KIND_FLOAT16}
PAYLOAD_FROM_PROTO = {v: k for k, v in PAYLOAD_TO_PROTO.items()}
POLICY_TO_PROTO = {
    "percent": pb.POLICY_KIND_PERCENT,
    "count": pb.POLICY_KIND_COUNT,
    "threshold": pb.POLICY_KIND_THRESHOLD,
    "none": pb.POLICY_KIND_NONE,
    "all": pb.POLICY_KIND_ALL,
}
POLICY_FROM_PROTO = {**{v: k for k, v in POLICY_TO_PROTO.items()}, pb.POLICY_KIND_UNSPECIFIED: "percent"}
STAGE_TO_PROTO = {
    STAGE_FINE: pb.STAGE_FINE,
    STAGE_COARSE: pb.STAGE_COARSE,
    STAGE_FINE_MISSING: pb.STAGE_COARSE_FINE_MISSING,
}
STAGE_FROM_PROTO = {v: k for k, v in STAGE_TO_PROTO.items()}

#: Element types of the two fine-tensor layouts (float16 travels little-endian).
PAYLOAD_DTYPES = {PAYLOAD_PACKED: np.dtype(np.uint8), PAYLOAD_FLOAT16: np.dtype("<f2")}


def field_error(field: str, message: str) -> InvalidInputError:
    """An ``InvalidInputError`` whose message starts with the request field it is about."""
    return InvalidInputError(f"{field}: {message}")


# -- client side: engine types -> messages --------------------------------------------------------


def inline_query_to_proto(query: VideoRecord) -> pb.InlineQuery:
    """The query record as an ``InlineQuery`` (the fine tensor's raw C-order bytes)."""
    if query.payload_kind not in PAYLOAD_DTYPES:
        raise InvalidInputError(
            f"query payload kind {query.payload_kind!r} is unknown; "
            f"expected {PAYLOAD_PACKED} or {PAYLOAD_FLOAT16}"
        )
    fine = np.ascontiguousarray(query.fine, dtype=PAYLOAD_DTYPES[query.payload_kind])
    if fine.ndim != 3:
        raise InvalidInputError(f"query fine tensor must be [T, R, C], got shape {list(fine.shape)}")
    return pb.InlineQuery(
        coarse=_coarse_list(query),
        self_sim=float(query.self_sim),
        fine=fine.tobytes(),
        payload_kind=PAYLOAD_TO_PROTO[query.payload_kind],
        fine_shape=list(fine.shape),
    )


def indexed_query_to_proto(query: VideoRecord, collection: str) -> pb.IndexedQuery:
    """The query by reference: the server reads its fine tensor from the store; its coarse vector
    (which the store lacks) travels for a selector that reads segment matches."""
    return pb.IndexedQuery(
        collection=collection,
        video_id=query.video_id or "",
        self_sim=float(query.self_sim),
        coarse=_coarse_list(query),
    )


def _coarse_list(query: VideoRecord) -> list[float]:
    if query.coarse is None:
        return []
    return list(map(float, np.asarray(query.coarse, dtype=np.float32).reshape(-1)))


def candidates_to_proto(candidates: Sequence[Candidate]) -> list[pb.Candidate]:
    return [
        pb.Candidate(
            video_id=c.video_id,
            coarse_score=float(c.coarse_score),
            self_sim=float(c.self_sim),
            fine_key=c.fine_key,
            n_frames=max(int(c.n_frames or 0), 0),
            payload_kind=PAYLOAD_TO_PROTO.get(c.payload_kind, pb.PAYLOAD_KIND_UNSPECIFIED),
            segments=segment_codes_to_bytes(c.segments, f"candidate {c.video_id!r}"),
        )
        for c in candidates
    ]


def segment_codes_to_bytes(codes: np.ndarray | None, owner: str = "candidate") -> bytes:
    """Segment codes uint8 [S, coarse_dim/8] as ``Candidate.segments`` carries them (row-major;
    empty for none). The inverse of :func:`segment_codes_from_bytes`."""
    if codes is None:
        return b""
    if codes.dtype != np.uint8 or codes.ndim != 2 or not codes.size:
        raise InvalidInputError(
            f"{owner}: segment codes must be uint8 [S, coarse_dim/8] with S >= 1, "
            f"got {codes.dtype} {list(codes.shape)}"
        )
    return np.ascontiguousarray(codes).tobytes()


def policy_to_proto(policy: SelectionPolicy) -> pb.SelectionPolicy:
    return pb.SelectionPolicy(kind=POLICY_TO_PROTO[policy.kind], value=float(policy.value))


def result_from_proto(
    response: pb.RerankResponse,
    candidates: Sequence[Candidate],
    extra_timings: Mapping[str, float] | None = None,
) -> RerankResult:
    """The response as a ``RerankResult``; each hit gets back its candidate's metadata."""
    metadata = {c.video_id: c.metadata for c in candidates}
    hits = [
        SearchHit(
            video_id=h.video_id,
            score=h.score,
            coarse_score=h.coarse_score,
            selector_confidence=h.selector_confidence if h.HasField("selector_confidence") else None,
            fine_score=h.fine_score if h.HasField("fine_score") else None,
            stage=STAGE_FROM_PROTO.get(h.stage, STAGE_COARSE),
            metadata=metadata.get(h.video_id),
        )
        for h in response.hits
    ]
    return RerankResult(
        hits=hits,
        timings_ms={**dict(response.timings_ms), **(extra_timings or {})},
        warnings=list(response.warnings),
        n_candidates=response.n_candidates,
        n_reranked=response.n_reranked,
    )


# -- server side: messages -> engine types ---------------------------------------------------------


def inline_query_from_proto(
    msg: pb.InlineQuery,
    *,
    payload_kind: str,
    fine_dim: int,
    coarse_dim: int,
    max_frames: int,
    field: str = "inline",
) -> VideoRecord:
    """Validate an ``InlineQuery`` against the served model set and build its ``VideoRecord``.

    ``fine_dim`` is the fine student's code length L (packed bits) or dimension D (float16).
    """
    kind = PAYLOAD_FROM_PROTO.get(msg.payload_kind)
    if kind is None:
        raise field_error(f"{field}.payload_kind", "must be PAYLOAD_KIND_PACKED_BITS or PAYLOAD_KIND_FLOAT16")
    if kind != payload_kind:
        raise field_error(f"{field}.payload_kind", f"is {kind}; the served model set needs {payload_kind}")
    shape = tuple(int(s) for s in msg.fine_shape)
    last = fine_dim // 8 if kind == PAYLOAD_PACKED else fine_dim
    expected = f"[T, R, {last}] with 1 <= T <= {max_frames} and R >= 1"
    if len(shape) != 3 or 0 in shape or shape[0] > max_frames or shape[2] != last:
        raise field_error(f"{field}.fine_shape", f"is {list(shape)}; expected {expected}")
    dtype = PAYLOAD_DTYPES[kind]
    needed = math.prod(shape) * dtype.itemsize
    if len(msg.fine) != needed:
        raise field_error(
            f"{field}.fine", f"holds {len(msg.fine)} bytes; fine_shape {list(shape)} of {kind} needs {needed}"
        )
    fine = np.frombuffer(msg.fine, dtype=dtype).reshape(shape)
    if kind == PAYLOAD_FLOAT16 and not np.isfinite(fine).all():
        raise field_error(f"{field}.fine", "float16 values must be finite (found NaN or Inf)")
    self_sim = _finite(msg.self_sim, f"{field}.self_sim")
    coarse = _coarse_vector(msg.coarse, coarse_dim, f"{field}.coarse")
    return VideoRecord(coarse=coarse, self_sim=self_sim, fine=fine, payload_kind=kind)


def indexed_query_from_proto(
    msg: pb.IndexedQuery, *, coarse_dim: int, field: str = "indexed"
) -> tuple[str, str, float | None, np.ndarray]:
    """(collection, video_id, self_sim or None, coarse vector, empty when not given) of an
    ``IndexedQuery``, validated."""
    collection = _wrap(validate_collection, msg.collection, f"{field}.collection")
    video_id = _wrap(validate_video_id, msg.video_id, f"{field}.video_id")
    self_sim = _finite(msg.self_sim, f"{field}.self_sim") if msg.HasField("self_sim") else None
    return collection, video_id, self_sim, _coarse_vector(msg.coarse, coarse_dim, f"{field}.coarse")


def segment_codes_from_bytes(data: bytes, *, coarse_dim: int, field: str) -> np.ndarray | None:
    """``Candidate.segments`` as uint8 [S, coarse_dim/8] (read-only), None when empty; a length
    that is not a multiple of coarse_dim/8 is refused."""
    if not data:
        return None
    width = coarse_dim // 8
    if len(data) % width:
        raise field_error(
            field,
            f"holds {len(data)} bytes; expected a positive multiple of {width} "
            f"(S segment codes of coarse_dim/8 = {coarse_dim}/8 bytes each), or none",
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, width)


def candidates_from_proto(
    msgs: Sequence[pb.Candidate], *, coarse_dim: int, field: str = "candidates"
) -> list[Candidate]:
    """Validated candidates: ids and keys well-formed, scores finite, ids distinct, segment codes
    (if any) rows of ``coarse_dim`` sign bits."""
    out = []
    seen: dict[str, int] = {}
    for i, m in enumerate(msgs):
        where = f"{field}[{i}]"
        vid = _wrap(validate_video_id, m.video_id, f"{where}.video_id")
        if vid in seen:
            raise field_error(
                f"{where}.video_id", f"{vid!r} repeats {field}[{seen[vid]}]; ids must be distinct"
            )
        seen[vid] = i
        out.append(
            Candidate(
                video_id=vid,
                coarse_score=_finite(m.coarse_score, f"{where}.coarse_score"),
                self_sim=_finite(m.self_sim, f"{where}.self_sim"),
                fine_key=_wrap(validate_key, m.fine_key, f"{where}.fine_key"),
                n_frames=m.n_frames,
                payload_kind=PAYLOAD_FROM_PROTO.get(m.payload_kind, ""),
                segments=segment_codes_from_bytes(
                    m.segments, coarse_dim=coarse_dim, field=f"{where}.segments"
                ),
            )
        )
    return out


def policy_from_proto(msg: pb.SelectionPolicy, field: str = "policy") -> SelectionPolicy:
    kind = POLICY_FROM_PROTO.get(msg.kind)
    if kind is None:
        raise field_error(f"{field}.kind", f"unknown value {msg.kind}; expected a PolicyKind")
    return _wrap(lambda v: SelectionPolicy(kind, v), msg.value, field)


def result_to_proto(result: RerankResult, *, model_set: str, model_tag: str) -> pb.RerankResponse:
    response = pb.RerankResponse(
        warnings=result.warnings,
        n_candidates=result.n_candidates,
        n_reranked=result.n_reranked,
        model_set=model_set,
        model_tag=model_tag,
    )
    for h in result.hits:
        hit = response.hits.add(
            video_id=h.video_id, score=h.score, coarse_score=h.coarse_score, stage=STAGE_TO_PROTO[h.stage]
        )
        if h.selector_confidence is not None:
            hit.selector_confidence = h.selector_confidence
        if h.fine_score is not None:
            hit.fine_score = h.fine_score
    response.timings_ms.update(result.timings_ms)
    return response


def _coarse_vector(values: Sequence[float], coarse_dim: int, field: str) -> np.ndarray:
    """A query's coarse vector, float32 [coarse_dim], or empty when none is given."""
    coarse = np.asarray(values, dtype=np.float32)
    if coarse.size and (coarse.size != coarse_dim or not np.isfinite(coarse).all()):
        raise field_error(field, f"expected {coarse_dim} finite floats or none, got {coarse.size}")
    return coarse


def _finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise field_error(field, f"must be a finite number, got {value}")
    return float(value)


def _wrap(check: Callable[[Any], T], value: object, field: str) -> T:
    """Run a validator and prefix its error with the field path."""
    try:
        return check(value)
    except DnSError as exc:
        raise field_error(field, str(exc)) from None
