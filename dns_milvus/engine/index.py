"""``DnSIndex``: the SDK entry point. Two-stage DnS search over Milvus + object storage.

Writes follow one rule: a video's fine tensor is written to the object store and verified
before its Milvus row is upserted; deletes remove the row first, then the object. A crash
can therefore leave an orphan object (``repair`` removes it), never a row without its object.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dns_milvus.engine.modelset import ModelSet, VideoRecord
from dns_milvus.engine.policy import SelectionPolicy
from dns_milvus.engine.rerank import (
    Candidate,
    LocalReranker,
    Reranker,
    RerankResult,
    SearchHit,
    coarse_only,
)
from dns_milvus.errors import BackendUnavailableError, InvalidInputError, NotFoundError
from dns_milvus.ids import validate_video_id
from dns_milvus.milvus import IndexConfig, VideoCollection, VideoRow, connect
from dns_milvus.store import ObjectStore, encode_fine_tensor, fine_key, open_store, put_verified

Query = VideoRecord | np.ndarray | torch.Tensor | os.PathLike | str

#: Largest number of stage-1 candidates a search may ask Milvus for.
MAX_CANDIDATES_K = 16_384


@dataclass
class SearchResponse:
    """Ranked hits plus how they were obtained."""

    hits: list[SearchHit]
    timings_ms: dict[str, float]
    policy: str
    n_candidates: int
    n_reranked: int
    degraded: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hits": [h.to_dict() for h in self.hits],
            "timings_ms": self.timings_ms,
            "policy": self.policy,
            "n_candidates": self.n_candidates,
            "n_reranked": self.n_reranked,
            "degraded": self.degraded,
            "warnings": self.warnings,
        }


@dataclass
class RepairReport:
    rows_checked: int = 0
    objects_checked: int = 0
    orphan_objects: list[str] = field(default_factory=list)
    rows_missing_object: list[str] = field(default_factory=list)
    fixed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class DnSIndex:
    """A DnS video index: coarse vectors in Milvus, fine tensors in an object store.

    Args:
        uri: Milvus URI: a local file (Milvus Lite, the embedded default) or ``http://host:19530``.
        store: object store URI/path (``./objects``, ``s3://bucket/prefix?endpoint_url=...``) or instance.
        models: a ``ModelSet`` or the path of a model-set directory.
        collection: Milvus collection name (one collection per DnS index).
        reranker: stage 2; defaults to ``LocalReranker`` (in-process). Pass a remote one to use a sidecar.
        on_stage2_error: ``"degrade"`` returns the coarse ranking flagged ``degraded`` when a remote
            stage 2 fails; ``"raise"`` propagates the error.
    """

    def __init__(
        self,
        uri: str = "./dns-milvus.db",
        *,
        models: ModelSet | str | Path,
        store: str | ObjectStore = "./dns-objects",
        collection: str = "videos",
        token: str | None = None,
        index: IndexConfig | None = None,
        reranker: Reranker | None = None,
        device: str | None = None,
        on_stage2_error: Literal["degrade", "raise"] = "degrade",
    ) -> None:
        self.models = models if isinstance(models, ModelSet) else ModelSet.load(models, device=device)
        self.store = store if not isinstance(store, str) else open_store(store)
        self.client = connect(uri, token=token)
        self.uri = uri
        self.collection = VideoCollection.create(
            self.client,
            collection,
            model_set=self.models.tag,
            dim=self.models.coarse_dim,
            index=index,
            exist_ok=True,
        )
        self.local_reranker = LocalReranker(self.models, self.store)
        self.reranker: Reranker = reranker or self.local_reranker
        if on_stage2_error not in ("degrade", "raise"):
            raise InvalidInputError(f"on_stage2_error must be 'degrade' or 'raise', got {on_stage2_error!r}")
        self.on_stage2_error = on_stage2_error

    @property
    def name(self) -> str:
        return self.collection.name

    # -- writing -------------------------------------------------------------------------------

    def add(
        self,
        video_id: str,
        features: np.ndarray | torch.Tensor,
        metadata: Mapping[str, Any] | None = None,
    ) -> VideoRecord:
        """Index one video from its region features [T, R, D] (idempotent upsert)."""
        return self.add_many([video_id], [features], [metadata])[0]

    def add_video(
        self,
        video_id: str,
        path: str | os.PathLike,
        metadata: Mapping[str, Any] | None = None,
        *,
        max_frames: int | None = None,
    ) -> VideoRecord:
        """Decode a video file, extract its features and index it."""
        return self.add(video_id, self.models.extract_video(path, max_frames=max_frames), metadata)

    def add_many(
        self,
        video_ids: Sequence[str],
        features: Sequence[np.ndarray | torch.Tensor],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[VideoRecord]:
        """Index a batch of videos: networks, then objects (verified), then Milvus rows."""
        if len(video_ids) != len(features):
            raise InvalidInputError(f"{len(video_ids)} ids but {len(features)} feature tensors")
        metadata = list(metadata) if metadata is not None else [None] * len(video_ids)
        for vid in video_ids:
            validate_video_id(vid)
        seen: set[str] = set()
        dupes = sorted({v for v in video_ids if v in seen or seen.add(v)})  # type: ignore[func-returns-value]
        if dupes:
            raise InvalidInputError(f"duplicate video ids in one batch: {dupes[:10]}")
        records = self.models.index_features(features)
        for vid, rec in zip(video_ids, records):
            rec.video_id = vid
        self.write_records(records, metadata)
        return records

    def write_records(
        self, records: Sequence[VideoRecord], metadata: Sequence[Mapping[str, Any] | None] | None = None
    ) -> dict[str, float]:
        """Persist indexed videos: each object is written and verified before its row is upserted.

        Returns the time spent on the object store and on Milvus, in milliseconds.
        """
        if not records:
            return {"store_ms": 0.0, "milvus_ms": 0.0}
        t0 = time.perf_counter()
        metadata = list(metadata) if metadata is not None else [None] * len(records)
        keys = [fine_key(self.name, r.video_id) for r in records]  # type: ignore[arg-type]
        blobs = [encode_fine_tensor(r.fine, r.payload_kind) for r in records]
        with ThreadPoolExecutor(max_workers=min(8, len(records))) as pool:
            list(pool.map(lambda kb: put_verified(self.store, kb[0], kb[1]), zip(keys, blobs)))
        store_ms = _ms(t0)
        t1 = time.perf_counter()
        now = int(time.time() * 1000)
        rows = [
            VideoRow(
                video_id=r.video_id,  # type: ignore[arg-type]
                coarse=r.coarse,
                self_sim=r.self_sim,
                fine_key=key,
                n_frames=r.n_frames,
                payload_kind=r.payload_kind,
                ingested_at=now,
                metadata=dict(meta or {}),
            )
            for r, key, meta in zip(records, keys, metadata)
        ]
        self.collection.upsert(rows)
        return {"store_ms": store_ms, "milvus_ms": _ms(t1)}

    def delete(self, video_ids: Iterable[str]) -> int:
        """Delete videos: rows first, then objects. Unknown ids are ignored; returns how many existed."""
        ids = [validate_video_id(v) for v in video_ids]
        if not ids:
            return 0
        existing = self.collection.get(ids)
        self.collection.delete(list(existing))
        for row in existing.values():
            self.store.delete(row.fine_key)
            self.local_reranker.cache.discard(row.fine_key)
        return len(existing)

    # -- reading -------------------------------------------------------------------------------

    def count(self) -> int:
        return self.collection.count()

    def get(self, video_ids: Iterable[str], *, with_fine: bool = False) -> dict[str, dict[str, Any]]:
        """Stored rows (and optionally the decoded fine tensors) of the given ids; unknown ids are absent."""
        ids = [validate_video_id(v) for v in video_ids]
        rows = self.collection.get(ids, with_vectors=with_fine)
        out: dict[str, dict[str, Any]] = {}
        for vid, row in rows.items():
            item = {k: v for k, v in dataclasses.asdict(row).items() if k != "coarse"}
            if with_fine:
                item["record"] = self.load_record(vid, row)
            out[vid] = item
        return out

    def load_record(self, video_id: str, row: VideoRow | None = None) -> VideoRecord:
        """The full indexed representation of a stored video (row + fine tensor)."""
        from dns_milvus.store import decode_fine_tensor

        if row is None or row.coarse is None:
            found = self.collection.get([validate_video_id(video_id)], with_vectors=True)
            if video_id not in found:
                raise NotFoundError(f"video {video_id!r} is not in collection {self.name!r}")
            row = found[video_id]
        ft = decode_fine_tensor(self.store.get(row.fine_key), video_id=video_id)
        return VideoRecord(
            coarse=np.asarray(row.coarse, dtype=np.float32),
            self_sim=float(row.self_sim),
            fine=ft.array,
            payload_kind=ft.kind,
            video_id=video_id,
        )

    # -- searching -----------------------------------------------------------------------------

    def encode_query(self, query: Query, *, max_frames: int | None = None) -> VideoRecord:
        """Turn a query (features, video file, indexed id or record) into its indexed form."""
        if isinstance(query, VideoRecord):
            return query
        if isinstance(query, str):
            return self.load_record(query)
        if isinstance(query, os.PathLike):
            features = self.models.extract_video(query, max_frames=max_frames)
            return self.models.index_features([features])[0]
        if isinstance(query, np.ndarray | torch.Tensor):
            return self.models.index_features([query])[0]
        raise InvalidInputError(
            "query must be region features (array [T, R, D]), a video file (pathlib.Path), "
            f"an indexed video id (str) or a VideoRecord; got {type(query).__name__}"
        )

    def search(
        self,
        query: Query,
        top_k: int = 10,
        *,
        candidates: int = 1000,
        policy: SelectionPolicy | str = "5%",
        filter: str | None = None,
        filter_params: Mapping[str, Any] | None = None,
        exclude_self: bool = True,
    ) -> SearchResponse:
        """Two-stage DnS search.

        Stage 1 asks Milvus for the ``candidates`` nearest coarse vectors (optionally filtered);
        stage 2 lets the selector pick candidates by ``policy`` for the fine student and merges.
        A query given as an indexed id is left out of its own results unless ``exclude_self=False``.
        """
        return self.search_batch(
            [query],
            top_k,
            candidates=candidates,
            policy=policy,
            filter=filter,
            filter_params=filter_params,
            exclude_self=exclude_self,
        )[0]

    def search_batch(
        self,
        queries: Sequence[Query],
        top_k: int = 10,
        *,
        candidates: int = 1000,
        policy: SelectionPolicy | str = "5%",
        filter: str | None = None,
        filter_params: Mapping[str, Any] | None = None,
        exclude_self: bool = True,
    ) -> list[SearchResponse]:
        """``search`` for many queries; stage 1 is one Milvus call for all of them."""
        policy = SelectionPolicy.parse(policy) if isinstance(policy, str) else policy
        _check_k(top_k, candidates)
        t0 = time.perf_counter()
        records = [self.encode_query(q) for q in queries]
        encode_ms = _ms(t0)
        if not records:
            return []
        self_ids = [q if isinstance(q, str) and exclude_self else None for q in queries]
        limit = min(candidates + (1 if any(self_ids) else 0), MAX_CANDIDATES_K)
        t1 = time.perf_counter()
        hits = self.collection.search(
            np.stack([r.coarse for r in records]), limit, filter=filter, filter_params=filter_params
        )
        stage1_ms = _ms(t1) / len(records)
        responses = []
        for record, self_id, query_hits in zip(records, self_ids, hits):
            cands = [
                Candidate(h.video_id, h.score, h.self_sim, h.fine_key, h.n_frames, h.payload_kind, h.metadata)
                for h in query_hits
                if h.video_id != self_id
            ][:candidates]
            result = self._stage2(record, cands, policy, top_k)
            timings = {"encode_ms": encode_ms / len(records), "stage1_ms": stage1_ms, **result.timings_ms}
            responses.append(
                SearchResponse(
                    hits=result.hits,
                    timings_ms=timings,
                    policy=str(policy),
                    n_candidates=result.n_candidates,
                    n_reranked=result.n_reranked,
                    degraded=result.degraded,
                    warnings=result.warnings,
                )
            )
        return responses

    def exhaustive_search(
        self,
        query: Query,
        top_k: int = 10,
        *,
        policy: SelectionPolicy | str = "5%",
        exclude_self: bool = True,
    ) -> SearchResponse:
        """The paper's protocol: coarse scores and the selector over EVERY indexed video (no ANN)."""
        policy = SelectionPolicy.parse(policy) if isinstance(policy, str) else policy
        t0 = time.perf_counter()
        record = self.encode_query(query)
        self_id = query if isinstance(query, str) and exclude_self else None
        cands = []
        t1 = time.perf_counter()
        for row in self.collection.iter_rows():
            if row["video_id"] == self_id:
                continue
            cands.append(
                Candidate(
                    row["video_id"],
                    float(np.dot(record.coarse, row["coarse"])),
                    row["self_sim"],
                    row["fine_key"],
                    row["n_frames"],
                    row["payload_kind"],
                    row["metadata"],
                )
            )
        scan_ms = _ms(t1)
        result = self.local_reranker.rerank(record, cands, policy, top_k)
        return SearchResponse(
            hits=result.hits,
            timings_ms={
                "encode_ms": _ms(t0) - scan_ms - sum(result.timings_ms.values()),
                "scan_ms": scan_ms,
                **result.timings_ms,
            },
            policy=str(policy),
            n_candidates=len(cands),
            n_reranked=result.n_reranked,
            warnings=result.warnings,
        )

    def _stage2(
        self, record: VideoRecord, cands: list[Candidate], policy: SelectionPolicy, top_k: int
    ) -> RerankResult:
        if self.reranker is self.local_reranker:
            return self.local_reranker.rerank(record, cands, policy, top_k)
        try:
            return self.reranker.rerank(record, cands, policy, top_k)
        except (BackendUnavailableError, TimeoutError) as exc:
            if self.on_stage2_error == "raise":
                raise
            return coarse_only(cands, top_k, f"stage 2 unavailable, coarse ranking returned: {exc}")

    # -- maintenance ---------------------------------------------------------------------------

    def repair(self, *, fix: bool = False) -> RepairReport:
        """Find orphan objects (no row points at them) and rows whose object is missing.

        With ``fix=True`` orphan objects are deleted; rows without an object are reported
        (their video must be re-ingested; deleting them would lose the id silently).
        """
        report = RepairReport()
        referenced: dict[str, str] = {}
        for row in self.collection.iter_rows(["fine_key"]):
            referenced[row["fine_key"]] = row["video_id"]
            report.rows_checked += 1
        stored = set()
        for key in self.store.iter_keys(prefix=f"{self.name}/"):
            stored.add(key)
            report.objects_checked += 1
            if key not in referenced:
                report.orphan_objects.append(key)
        report.rows_missing_object = sorted(vid for key, vid in referenced.items() if key not in stored)
        if fix:
            for key in report.orphan_objects:
                self.store.delete(key)
            report.fixed = True
        return report

    def stats(self) -> dict[str, Any]:
        return {
            "collection": self.name,
            "uri": self.uri,
            "videos": self.count(),
            "model_set": self.models.name,
            "model_tag": self.models.tag,
            "payload_kind": self.models.payload_kind,
            "device": str(self.models.device),
        }

    def close(self) -> None:
        self.store.close()
        self.client.close()

    def __enter__(self) -> DnSIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_k(top_k: int, candidates: int) -> None:
    if top_k < 1:
        raise InvalidInputError(f"top_k must be >= 1, got {top_k}")
    if not 1 <= candidates <= MAX_CANDIDATES_K:
        raise InvalidInputError(f"candidates must be in 1..{MAX_CANDIDATES_K}, got {candidates}")


def _ms(t: float) -> float:
    return (time.perf_counter() - t) * 1000.0
