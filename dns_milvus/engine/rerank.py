"""Stage 2 of DnS search: the selector picks candidates, the fine student re-scores them.

Coarse and fine scores are merged by the model set's rule (``ModelSet.merge``, defined in
``dns_milvus.scoring``: the release's replacement, calibrated scores, or a reordering of the
re-ranked candidates among their coarse positions).

``LocalReranker`` runs in-process; the gRPC sidecar wraps the same class, and the engine's
remote mode talks to it through ``Reranker``, so both paths share this code.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from dns_milvus.engine.cache import ByteLRUCache
from dns_milvus.engine.policy import SelectionPolicy
from dns_milvus.engine.record import VideoRecord
from dns_milvus.errors import CorruptObjectError, InvalidInputError
from dns_milvus.scoring import ScoreMerge, fine_unit, segment_matches
from dns_milvus.store import ObjectStore, decode_fine_tensor

STAGE_FINE = "fine"
STAGE_COARSE = "coarse"
STAGE_FINE_MISSING = "coarse-fine-missing"

#: Upper bound on candidates in one re-rank call: bounds memory of a single request.
MAX_CANDIDATES = 20_000


@dataclass
class Candidate:
    """A stage-1 hit as Milvus returns it."""

    video_id: str
    coarse_score: float
    self_sim: float
    fine_key: str
    n_frames: int = 0
    payload_kind: str = ""
    metadata: dict[str, Any] | None = None
    #: The target's segment codes uint8 [S, dim/8] (``VideoRecord.segments``), which a selector
    #: with a segment-match input reads; None where the index keeps none.
    segments: np.ndarray | None = None


@dataclass
class SearchHit:
    """One ranked result with the provenance of its score."""

    video_id: str
    score: float
    coarse_score: float
    selector_confidence: float | None
    fine_score: float | None
    stage: str
    metadata: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RerankResult:
    hits: list[SearchHit]
    timings_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    degraded: bool = False
    n_candidates: int = 0
    n_reranked: int = 0


class Reranker(Protocol):
    """Stage 2: anything that turns candidates into a merged ranking."""

    def rerank(
        self, query: VideoRecord, candidates: Sequence[Candidate], policy: SelectionPolicy, top_k: int
    ) -> RerankResult: ...


class Stage2Models(Protocol):
    """What a search uses of a model set: ``ModelSet`` (torch networks, CPU or CUDA) or
    ``NumpyModelSet`` (its NumPy stage 2, ``dns_milvus.engine.numpy_set``)."""

    name: str
    tag: str
    coarse_dim: int
    payload_kind: str
    merge: ScoreMerge

    @property
    def selector_segments(self) -> int: ...

    def check_fine_options(self, precision: str, threads: int | None) -> None: ...

    def selector_confidence(
        self,
        query_self_sim: float,
        self_sims: np.ndarray,
        coarse_scores: np.ndarray,
        segment_match: np.ndarray | None = None,
    ) -> np.ndarray: ...

    def fine_similarity(
        self,
        query: np.ndarray,
        targets: Sequence[np.ndarray],
        *,
        deadline: float | None = None,
        precision: str = "float32",
        threads: int | None = None,
    ) -> np.ndarray: ...


class LocalReranker:
    """Runs the selector and the fine student in this process (CPU or CUDA).

    ``fine_precision`` (``float32``, ``bfloat16``, ``auto``) and ``fine_threads`` (None: as many
    as other processes leave idle) are the fine scorers' ``precision`` and ``threads``
    (``dns_milvus.similarity``); an unknown precision, or bfloat16 where the hardware has no
    native bfloat16 arithmetic, is refused here, before any request.
    """

    def __init__(
        self,
        models: Stage2Models,
        store: ObjectStore,
        *,
        cache_bytes: int = 256 << 20,
        fine_precision: str = "float32",
        fine_threads: int | None = None,
    ) -> None:
        self.models = models
        self.store = store
        self.cache = ByteLRUCache(cache_bytes)
        models.check_fine_options(fine_precision, fine_threads)
        self.fine_precision = fine_precision
        self.fine_threads = fine_threads

    def selector_confidence(self, query: VideoRecord, candidates: Sequence[Candidate]) -> np.ndarray:
        """The selector's probability that each pair needs the fine student."""
        if not candidates:
            return np.zeros(0, dtype=np.float32)
        return self.models.selector_confidence(
            query.self_sim,
            np.array([c.self_sim for c in candidates], dtype=np.float32),
            np.array([c.coarse_score for c in candidates], dtype=np.float32),
            self.segment_match(query, candidates),
        )

    def segment_match(self, query: VideoRecord, candidates: Sequence[Candidate]) -> np.ndarray | None:
        """The selector's segment-match input of each candidate, or None for a release-layout
        selector. A candidate without segment codes is refused: the index was built without
        them (by a model set whose selector reads none); re-index with this model set."""
        segments = self.models.selector_segments
        if not segments:
            return None
        missing = [c.video_id for c in candidates if c.segments is None]
        if missing:
            raise InvalidInputError(
                f"{len(missing)} candidates carry no segment codes (first: {missing[0]!r}); the "
                f"model set's selector reads the codes of {segments} segments a video, which an "
                "index built by this model set stores: re-index the collection with it"
            )
        codes = [c.segments for c in candidates]
        bad = next((c for c in candidates if c.segments.shape[0] != segments), None)
        if bad is not None:
            raise InvalidInputError(
                f"candidate {bad.video_id!r} has {bad.segments.shape[0]} segment codes; the model "
                f"set's selector reads {segments}"
            )
        return segment_matches(query.coarse, codes)

    def fetch_fine(self, candidates: Sequence[Candidate]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Fine tensors of the candidates by video id, through the cache; and the errors by id."""
        tensors: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        to_fetch: dict[str, Candidate] = {}
        for c in candidates:
            cached = self.cache.get(c.fine_key)
            if cached is not None:
                tensors[c.video_id] = cached
            else:
                to_fetch[c.fine_key] = c
        if to_fetch:
            fetched = self.store.get_many(list(to_fetch))
            for key, c in to_fetch.items():
                data = fetched.get(key)
                if isinstance(data, Exception) or data is None:
                    errors[c.video_id] = str(data) if data is not None else f"object {key} missing"
                    continue
                try:
                    ft = decode_fine_tensor(data, video_id=c.video_id)
                except CorruptObjectError as exc:
                    errors[c.video_id] = str(exc)
                    continue
                if ft.kind != self.models.payload_kind:
                    errors[c.video_id] = (
                        f"stored fine tensor of {c.video_id!r} is {ft.kind}, the model set needs "
                        f"{self.models.payload_kind}"
                    )
                    continue
                tensors[c.video_id] = ft.array
                self.cache.put(key, ft.array)
        return tensors, errors

    def fine_scores(
        self, query: VideoRecord, targets: Sequence[np.ndarray], *, deadline: float | None = None
    ) -> np.ndarray:
        """Raw fine-student similarities (in [-1, 1]) of the query against each target.

        Past ``deadline`` (a ``time.monotonic()`` value) the kernels stop between comparator
        batches and raise ``DeadlineExceededError``: a late caller's work is not finished for nobody.
        """
        if not targets:
            return np.zeros(0, dtype=np.float32)
        return self.models.fine_similarity(
            query.fine, targets, deadline=deadline, precision=self.fine_precision, threads=self.fine_threads
        )

    def rerank(
        self, query: VideoRecord, candidates: Sequence[Candidate], policy: SelectionPolicy, top_k: int
    ) -> RerankResult:
        if top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {top_k}")
        if len(candidates) > MAX_CANDIDATES:
            raise InvalidInputError(
                f"{len(candidates)} candidates in one request; the limit is {MAX_CANDIDATES}"
            )
        if query.payload_kind != self.models.payload_kind:
            raise InvalidInputError(
                f"query fine tensor is {query.payload_kind}; the model set needs {self.models.payload_kind}"
            )
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        confidence: np.ndarray | None = None
        if policy.uses_selector:  # none and all choose without it: no confidence worth computing
            confidence = self.selector_confidence(query, candidates)
        selected = policy.select(np.zeros(len(candidates)) if confidence is None else confidence)
        timings["selector_ms"] = _ms_since(t0)

        t1 = time.perf_counter()
        chosen = [candidates[i] for i in selected]
        tensors, errors = self.fetch_fine(chosen)
        timings["fetch_ms"] = _ms_since(t1)

        t2 = time.perf_counter()
        scored = [i for i in selected if candidates[i].video_id in tensors]
        raw = self.fine_scores(query, [tensors[candidates[i].video_id] for i in scored])
        timings["fine_ms"] = _ms_since(t2)

        fine_unit_scores = np.full(len(candidates), np.nan)
        fine_unit_scores[scored] = fine_unit(raw)
        fine_by_index = {int(i): float(fine_unit_scores[i]) for i in scored}
        selected_set = {int(i) for i in selected}
        coarse = np.array([c.coarse_score for c in candidates], dtype=np.float64)
        scores = self.models.merge.merged(coarse, fine_unit_scores)
        hits = []
        # Only the returned hits are built: K is typically 1000, top_k 10.
        for i in _top_indices(scores, [c.video_id for c in candidates], top_k):
            c = candidates[i]
            fine = fine_by_index.get(i)
            if fine is not None:
                stage = STAGE_FINE
            else:
                stage = STAGE_FINE_MISSING if i in selected_set else STAGE_COARSE
            hits.append(
                SearchHit(
                    video_id=c.video_id,
                    score=float(scores[i]),
                    coarse_score=float(c.coarse_score),
                    selector_confidence=None if confidence is None else float(confidence[i]),
                    fine_score=fine,
                    stage=stage,
                    metadata=c.metadata,
                )
            )
        warnings = [f"fine tensor unavailable for {vid!r}: {msg}" for vid, msg in errors.items()]
        return RerankResult(
            hits=hits,
            timings_ms=timings,
            warnings=warnings,
            n_candidates=len(candidates),
            n_reranked=len(scored),
        )


def coarse_only(candidates: Sequence[Candidate], top_k: int, reason: str) -> RerankResult:
    """The stage-1 ranking, flagged as degraded: what search returns when stage 2 is unavailable."""
    scores = np.array([c.coarse_score for c in candidates], dtype=np.float64)
    best = [candidates[i] for i in _top_indices(scores, [c.video_id for c in candidates], top_k)]
    hits = []
    for c in best:
        score = float(c.coarse_score)
        hits.append(SearchHit(c.video_id, score, score, None, None, STAGE_COARSE, c.metadata))
    return RerankResult(hits=hits, warnings=[reason], degraded=True, n_candidates=len(candidates))


def _top_indices(scores: np.ndarray, video_ids: Sequence[str], top_k: int) -> list[int]:
    """Indices of the ``top_k`` best candidates, by score descending then video id ascending.

    A partial selection keeps everything tied with the k-th score, so ties at the cut are
    broken by id exactly as a full sort would.
    """
    if top_k < len(scores):
        kth = -np.partition(-scores, top_k - 1)[top_k - 1]
        pool = np.flatnonzero(scores >= kth).tolist()
    else:
        pool = range(len(scores))
    return sorted(pool, key=lambda i: (-scores[i], video_ids[i]))[:top_k]


def _ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1000.0


__all__ = [
    "MAX_CANDIDATES",
    "Candidate",
    "LocalReranker",
    "RerankResult",
    "Reranker",
    "SearchHit",
    "Stage2Models",
    "coarse_only",
]
