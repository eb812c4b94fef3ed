"""Rows of a DnS collection: what is written per video and what a stage-1 search returns."""

from __future__ import annotations

import base64
import json
import math
import re
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dns_milvus.errors import InvalidInputError
from dns_milvus.ids import validate_video_id
from dns_milvus.milvus import schema as s
from dns_milvus.milvus._checks import require_int

_PAYLOAD_KIND = re.compile(r"[a-z0-9_]{1,32}\Z")
_INT32_MAX = 2**31 - 1


@dataclass
class VideoRow:
    """One video's row. ``coarse`` is None when a read did not ask for vectors.

    ``model_set`` defaults to the collection's on upsert; ``ingested_at`` (unix ms) to the
    time of the upsert. ``segments``: the video's segment codes, uint8 [S, dim/8]
    (``VideoRecord.segments``), or None where its model set's selector reads none.
    """

    video_id: str
    coarse: np.ndarray | None
    self_sim: float
    fine_key: str
    n_frames: int
    payload_kind: str
    metadata: dict[str, Any] = field(default_factory=dict)
    model_set: str | None = None
    ingested_at: int | None = None
    segments: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class CandidateHit:
    """A stage-1 hit: the coarse similarity (inner product) and what stage 2 needs."""

    video_id: str
    score: float
    self_sim: float
    fine_key: str
    n_frames: int
    payload_kind: str
    metadata: dict[str, Any] = field(default_factory=dict)
    model_set: str | None = None
    ingested_at: int | None = None
    segments: np.ndarray | None = None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def check_vectors(vectors: object, dim: int, what: str = "query vectors") -> np.ndarray:
    """``vectors`` as a C-contiguous float32 array [N, dim] of finite values."""
    arr = np.asarray(vectors)
    if not _is_real(arr):
        raise InvalidInputError(f"{what} must be real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != dim or arr.shape[0] == 0:
        raise InvalidInputError(f"{what} must have shape [N >= 1, {dim}], got {list(arr.shape)}")
    with np.errstate(over="ignore"):  # float64 values beyond float32 become Inf, caught below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))[:10].tolist()
        raise InvalidInputError(f"{what} contain NaN or Inf (rows {bad})")
    return arr


def _is_real(arr: np.ndarray) -> bool:
    return arr.dtype.kind in "fiu"


def row_to_entity(row: VideoRow, dim: int, model_set: str, ingested_at: int) -> dict[str, Any]:
    """Validate ``row`` and return the dict Milvus stores; raises ``InvalidInputError`` naming the id."""
    if not isinstance(row, VideoRow):
        raise InvalidInputError(f"upsert expects VideoRow objects, got {type(row).__name__}")
    video_id = validate_video_id(row.video_id)

    def bad(message: str) -> InvalidInputError:
        return InvalidInputError(f"video {video_id!r}: {message}")

    if row.coarse is None:
        raise bad(f"coarse vector is missing; expected float32 [{dim}]")
    coarse = np.asarray(row.coarse)
    if coarse.shape != (dim,) or not _is_real(coarse):
        raise bad(f"coarse vector must be float32 [{dim}], got {coarse.dtype} {list(coarse.shape)}")
    with np.errstate(over="ignore"):  # float64 values beyond float32 become Inf, caught below
        coarse = coarse.astype(np.float32)
    if not np.isfinite(coarse).all():
        raise bad("coarse vector contains NaN or Inf")
    self_sim = row.self_sim
    if (
        isinstance(self_sim, bool)
        or not isinstance(self_sim, int | float | np.floating | np.integer)
        or not math.isfinite(float(self_sim))
    ):
        raise bad(f"self_sim must be a finite number, got {self_sim!r}")
    try:
        n_frames = require_int(row.n_frames, "n_frames", 1, _INT32_MAX)
        stamp = require_int(
            ingested_at if row.ingested_at is None else row.ingested_at, "ingested_at (unix ms)", 0, 2**63 - 1
        )
    except InvalidInputError as exc:
        raise bad(str(exc)) from None
    if not isinstance(row.payload_kind, str) or not _PAYLOAD_KIND.match(row.payload_kind):
        raise bad(f"payload_kind must be 1-32 characters of a-z, 0-9 or _, got {row.payload_kind!r}")
    _check_text(row.fine_key, "fine_key", s.MAX_FINE_KEY_BYTES, bad)
    segments = encode_segments(row.segments, dim, bad)
    tag = model_set if row.model_set is None else row.model_set
    if tag != model_set:
        raise s.ModelSetMismatchError(
            f"video {video_id!r} was indexed by model set {tag!r}, but the collection holds model set "
            f"{model_set!r}"
        )
    return {
        s.F_ID: video_id,
        s.F_COARSE: coarse,
        s.F_SELF_SIM: float(self_sim),
        s.F_FINE_KEY: row.fine_key,
        s.F_N_FRAMES: n_frames,
        s.F_PAYLOAD_KIND: row.payload_kind,
        s.F_INGESTED_AT: stamp,
        s.F_MODEL_SET: tag,
        s.F_METADATA: _check_metadata(row.metadata, bad),
        s.F_SEGMENTS: segments,
    }


def _check_text(value: object, name: str, max_bytes: int, bad: Any) -> None:
    if not isinstance(value, str) or not value:
        raise bad(f"{name} must be a non-empty string, got {value!r}")
    if len(value.encode("utf-8", errors="surrogatepass")) > max_bytes:
        raise bad(f"{name} is longer than {max_bytes} bytes")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise bad(f"{name} contains control characters or lone surrogates")


def encode_segments(codes: object, dim: int, bad: Callable[[str], InvalidInputError]) -> str:
    """Segment codes uint8 [S >= 1, dim/8] (or None) as the ``segments`` field's text: base64 of
    their bytes ("" for None). ``bad(message)`` makes the error naming the video."""
    if codes is None:
        return ""
    width = dim // 8
    try:
        arr = np.asarray(codes)
    except (TypeError, ValueError):  # ragged nested lists
        raise bad(f"segment codes must be uint8 [S >= 1, {width}], got {type(codes).__name__}") from None
    if dim % 8:
        raise bad(f"segment codes need a vector dimension that is a multiple of 8; the collection's is {dim}")
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != width or arr.shape[0] < 1:
        raise bad(f"segment codes must be uint8 [S >= 1, {width}], got {arr.dtype} {list(arr.shape)}")
    # base64 makes 4 characters of every 3 bytes.
    max_bytes = s.MAX_SEGMENTS_CHARS // 4 * 3
    if arr.nbytes > max_bytes:
        raise bad(
            f"segment codes take {arr.nbytes} bytes ({arr.shape[0]} segments); the field holds at most "
            f"{max_bytes} bytes ({max_bytes // width} segments of {width} bytes)"
        )
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii")


def decode_segments(text: str, dim: int, video_id: str) -> np.ndarray | None:
    """The ``segments`` field's text -> uint8 [S, dim/8], or None for "" (a row without codes)."""
    if not text:
        return None
    width = dim // 8
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error
        raw = b""
    if not raw or not width or len(raw) % width:
        raise InvalidInputError(
            f"video {video_id!r}: its stored segment codes are not base64 of uint8 [S, {width}] "
            f"({len(text)} characters); the row was not written by dns-milvus: index the video again"
        )
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, width).copy()


def _check_metadata(metadata: object, bad: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise bad(f"metadata must be a dict with string keys, got {type(metadata).__name__}")
    try:
        text = json.dumps(dict(metadata), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise bad(f"metadata must be JSON-serialisable without NaN/Inf: {exc}") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise bad("metadata contains lone surrogates (not valid UTF-8)") from None
    if size > s.MAX_METADATA_BYTES:
        raise bad(f"metadata is larger than {s.MAX_METADATA_BYTES} bytes as JSON")
    # Store the JSON round-trip so what is read back equals what was written.
    return json.loads(text)


def entity_to_row(entity: Mapping[str, Any], dim: int, *, with_vector: bool) -> VideoRow:
    coarse = np.asarray(entity[s.F_COARSE], dtype=np.float32) if with_vector else None
    return VideoRow(
        video_id=entity[s.F_ID],
        coarse=coarse,
        self_sim=float(entity[s.F_SELF_SIM]),
        fine_key=entity[s.F_FINE_KEY],
        n_frames=int(entity[s.F_N_FRAMES]),
        payload_kind=entity[s.F_PAYLOAD_KIND],
        metadata=dict(entity.get(s.F_METADATA) or {}),
        model_set=entity[s.F_MODEL_SET],
        ingested_at=int(entity[s.F_INGESTED_AT]),
        segments=decode_segments(entity[s.F_SEGMENTS], dim, entity[s.F_ID]),
    )
