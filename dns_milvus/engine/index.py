"""``DnSIndex``: the SDK entry point. Two-stage DnS search over Milvus + object storage.

Writes follow one rule: a video's fine tensor is written to the object store and verified
before its Milvus row is upserted; deletes remove the row first, then the object. A crash
can therefore leave an orphan object (``repair`` removes it), never a row without its object.
Every video is checked (features, network outputs, metadata) before anything of it is
written, so a video that cannot be stored leaves nothing behind.

Each object's header names its video and frame count (``dns_milvus.store.fine_format``), so
a read detects an object damaged, truncated or copied under another video's key. ``repair``
never deletes an orphan younger than its grace period (a writer may be about to upsert its
row), nor, without ``force``, more than a small share of the store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np

from dns_milvus.config import DEFAULT_REPAIR_GRACE_S
from dns_milvus.engine.numpy_set import NumpyModelSet, open_model_set
from dns_milvus.engine.policy import SelectionPolicy
from dns_milvus.engine.record import VideoRecord
from dns_milvus.engine.rerank import (
    Candidate,
    LocalReranker,
    Reranker,
    RerankResult,
    SearchHit,
    Stage2Models,
    coarse_only,
)
from dns_milvus.errors import (
    BackendUnavailableError,
    CorruptObjectError,
    DnSError,
    IncompleteDeleteError,
    InvalidInputError,
    NotFoundError,
    RepairRefusedError,
)
from dns_milvus.ids import validate_video_id
from dns_milvus.milvus import IndexConfig, VideoCollection, VideoRow, connect, display_uri
from dns_milvus.milvus.bulk import import_rows, require_import_api
from dns_milvus.milvus.rows import now_ms
from dns_milvus.store import (
    ObjectInfo,
    ObjectStore,
    StoreAccessError,
    decode_fine_tensor,
    encode_fine_tensor,
    fine_key,
    fine_key_prefix,
    open_store,
    put_verified,
)

if TYPE_CHECKING:
    import torch

    from dns_milvus.engine.modelset import ModelSet
    from dns_milvus.ingest.pipeline import IngestReport

# torch is imported only where networks run: a search by an indexed id may need none of it.
Query = Union[VideoRecord, np.ndarray, "torch.Tensor", os.PathLike, str]

#: Largest number of stage-1 candidates a search may ask Milvus for.
MAX_CANDIDATES_K = 16_384
#: Largest share of a collection's objects ``repair --fix`` deletes without ``force``.
REPAIR_MAX_DELETE_SHARE = 0.10
#: What ``verify_objects`` reports for an object that is not there.
OBJECT_MISSING = "object is missing"
# Objects read at a time when verifying (bounds memory: fine tensors are tens of KB).
_VERIFY_CHUNK = 256

log = logging.getLogger(__name__)


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
    """What ``DnSIndex.repair`` found and did.

    ``orphan_objects``: objects no row points at; ``young_orphans``: those of them written
    within the grace period, left alone; ``deleted_objects``: those ``fix`` deleted.
    ``rows_missing_object`` / ``rows_damaged_object`` (``deep`` only, with the reason): rows
    whose video must be indexed again (``reindex``), which an ingest of the same inputs does.
    """

    rows_checked: int = 0
    objects_checked: int = 0
    orphan_objects: list[str] = field(default_factory=list)
    rows_missing_object: list[str] = field(default_factory=list)
    rows_damaged_object: dict[str, str] = field(default_factory=dict)
    young_orphans: list[str] = field(default_factory=list)
    deleted_objects: list[str] = field(default_factory=list)
    deep: bool = False
    grace_period_s: float = DEFAULT_REPAIR_GRACE_S
    fixed: bool = False

    @property
    def reindex(self) -> list[str]:
        """Videos whose row has no usable object: index them again (an ingest heals them)."""
        return sorted({*self.rows_missing_object, *self.rows_damaged_object})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "reindex": self.reindex}


@dataclass(frozen=True)
class PreparedWrite:
    """A video checked and encoded by ``DnSIndex.prepare_writes``: its row and its object."""

    row: VideoRow
    blob: bytes


class DnSIndex:
    """A DnS video index: coarse vectors in Milvus, fine tensors in an object store.

    Args:
        uri: Milvus URI: a local file (Milvus Lite, the embedded default) or ``http://host:19530``.
        store: object store URI/path (``./objects``, ``s3://bucket/prefix?endpoint_url=...``) or instance.
        models: a ``ModelSet``, a ``NumpyModelSet`` or the path of a model-set directory. On the CPU,
            a directory whose set has NumPy inference weights opens as a ``NumpyModelSet``
            (``dns_milvus.engine.numpy_set``): stage 2 runs with them, and the torch networks
            (``models``) load only when something must be indexed, so a search by an indexed id
            never imports torch.
        collection: Milvus collection name (one collection per DnS index).
        reranker: stage 2; defaults to ``LocalReranker`` (in-process). Pass a remote one to use a sidecar.
        on_stage2_error: ``"degrade"`` returns the coarse ranking flagged ``degraded`` when a remote
            stage 2 fails; ``"raise"`` propagates the error.
    """

    def __init__(
        self,
        uri: str = "./dns-milvus.db",
        *,
        models: ModelSet | NumpyModelSet | str | Path,
        store: str | ObjectStore = "./dns-objects",
        collection: str = "videos",
        token: str | None = None,
        index: IndexConfig | None = None,
        reranker: Reranker | None = None,
        device: str | None = None,
        on_stage2_error: Literal["degrade", "raise"] = "degrade",
    ) -> None:
        # What another process needs to open this index itself (``ingest_on_ray``'s workers).
        self.models_dir = Path(models) if isinstance(models, str | os.PathLike) else None
        if self.models_dir is not None:
            models = open_model_set(self.models_dir, device)
        elif isinstance(models, NumpyModelSet):
            self.models_dir = models.directory
        #: What a search runs: the NumPy stage 2 where the set has one, else the torch networks.
        self.stage2_models: Stage2Models = models
        self.store = store if not isinstance(store, str) else open_store(store)
        self.client = connect(uri, token=token)
        self.uri = uri
        self.store_uri = store if isinstance(store, str) else None
        self.token = token
        existed = VideoCollection.exists(self.client, collection)
        self.collection = VideoCollection.create(
            self.client,
            collection,
            model_set=self.stage2_models.tag,
            dim=self.stage2_models.coarse_dim,
            index=index,
            exist_ok=True,
        )
        if not existed:
            self._warn_if_store_holds_objects()
        self.local_reranker = LocalReranker(self.stage2_models, self.store)
        self.reranker: Reranker = reranker or self.local_reranker
        if on_stage2_error not in ("degrade", "raise"):
            raise InvalidInputError(f"on_stage2_error must be 'degrade' or 'raise', got {on_stage2_error!r}")
        self.on_stage2_error = on_stage2_error

    @property
    def models(self) -> ModelSet:
        """The model set's torch networks: loaded on first use where a NumPy stage 2 serves searches."""
        models = self.stage2_models
        return models.torch_models() if isinstance(models, NumpyModelSet) else models  # type: ignore[return-value]

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
        *,
        import_dir: str | Path | None = None,
        server_dir: str | None = None,
    ) -> list[VideoRecord]:
        """Index a batch of videos: networks, then objects (verified), then Milvus rows.

        ``import_dir``: write the rows through Milvus's bulk import (``write_prepared``) instead
        of upserts: for loading many videos at once into a Milvus server."""
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
        self.write_records(records, metadata, import_dir=import_dir, server_dir=server_dir)
        return records

    def write_records(
        self,
        records: Sequence[VideoRecord],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        import_dir: str | Path | None = None,
        server_dir: str | None = None,
    ) -> dict[str, float]:
        """Persist indexed videos: each object is written and verified before its row is upserted.

        Every video is checked first; if any cannot be stored, ``InvalidInputError`` names them
        and nothing is written. Returns the time spent on the object store and on Milvus, in ms.
        """
        prepared, failed = self.prepare_writes(records, metadata)
        if failed:
            shown = "; ".join(f"{vid!r}: {why}" for vid, why in list(failed.items())[:5])
            raise InvalidInputError(
                f"{len(failed)} of {len(records)} videos cannot be stored, so nothing was written: {shown}"
            )
        return self.write_prepared(prepared, import_dir=import_dir, server_dir=server_dir)

    def prepare_writes(
        self, records: Sequence[VideoRecord], metadata: Sequence[Mapping[str, Any] | None] | None = None
    ) -> tuple[list[PreparedWrite], dict[str, str]]:
        """Check and encode indexed videos for ``write_prepared``, writing nothing.

        Returns the videos that pass every check (a valid id, a finite coarse vector and
        self-similarity, metadata that is JSON without NaN/Inf, an encodable fine tensor, the
        segment codes the model set's selector reads) and,
        by video id, why each other one does not: a caller can store the good ones and report
        the rest, and a refused video leaves no object behind.
        """
        metadata = list(metadata) if metadata is not None else [None] * len(records)
        if len(metadata) != len(records):
            raise InvalidInputError(f"{len(records)} records but {len(metadata)} metadata entries")
        now = now_ms()
        prepared: list[PreparedWrite] = []
        failed: dict[str, str] = {}
        for record, meta in zip(records, metadata):
            try:
                video_id = validate_video_id(record.video_id)
                row = VideoRow(
                    video_id=video_id,
                    coarse=record.coarse,
                    self_sim=record.self_sim,
                    fine_key=fine_key(self.name, video_id),
                    n_frames=record.n_frames,
                    payload_kind=record.payload_kind,
                    ingested_at=now,
                    metadata=dict(meta or {}),
                    segments=record.segments,
                )
                self.collection.check_row(row)
                self._check_segment_count(row)
                blob = encode_fine_tensor(record.fine, record.payload_kind, video_id=video_id)
            except (InvalidInputError, TypeError, ValueError) as exc:  # dict(meta) of a non-mapping
                failed[str(record.video_id)] = str(exc)
                continue
            prepared.append(PreparedWrite(row, blob))
        return prepared, failed

    def _check_segment_count(self, row: VideoRow) -> None:
        """Refuse a row whose segment codes (checked in form by ``check_row``) are not the
        number the model set's selector reads: stage 2 refuses every search that finds it."""
        expected = self.stage2_models.selector_segments
        found = 0 if row.segments is None else len(row.segments)
        if expected and found != expected:
            raise InvalidInputError(
                f"video {row.video_id!r} has {found} segment codes; the model set's selector reads the "
                f"codes of {expected} segments a video: index it with this model set"
            )

    def write_prepared(
        self,
        prepared: Sequence[PreparedWrite],
        *,
        import_dir: str | Path | None = None,
        server_dir: str | None = None,
    ) -> dict[str, float]:
        """Write checked videos: every object (verified), then the rows. Returns the time spent
        on the object store and on Milvus, in milliseconds.

        With ``import_dir`` the rows go through Milvus's bulk import: Parquet files written
        there, imported by the server (which must read that directory, as ``server_dir`` if it
        sees it under another path), each id then read back (``dns_milvus.milvus.bulk``). Rows
        whose id is already indexed are upserted. Milvus Lite has no import
        (``BulkImportUnsupportedError``, raised before any object is written)."""
        if not prepared:
            return {"store_ms": 0.0, "milvus_ms": 0.0}
        if import_dir is not None:
            require_import_api(self.collection)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(8, len(prepared))) as pool:
            list(pool.map(lambda p: put_verified(self.store, p.row.fine_key, p.blob), prepared))
        store_ms = _ms(t0)
        t1 = time.perf_counter()
        if import_dir is None:
            self.collection.upsert([p.row for p in prepared])
        else:
            import_rows(self.collection, [p.row for p in prepared], import_dir, server_dir=server_dir)
        for p in prepared:  # a re-written video must not be re-ranked with its old tensor
            self.local_reranker.cache.discard(p.row.fine_key)
        return {"store_ms": store_ms, "milvus_ms": _ms(t1)}

    def ingest_on_ray(
        self, inputs: Iterable[str | os.PathLike], *, address: str | None = None, **options: Any
    ) -> IngestReport:
        """Index video files on a Ray cluster: decoding, feature extraction and indexing run as
        Ray Data stages on its workers, each of which opens this index itself (so it must have
        been opened with a model-set directory, a store URI and a Milvus server URI). Resumable
        and idempotent like ``dns_milvus.ingest.ingest``, whose report it returns; ``options``:
        see ``dns_milvus.ingest.distributed.ingest_on_ray``. Needs the ``ray`` extra."""
        from dns_milvus.ingest.distributed import ingest_on_ray

        return ingest_on_ray(self, inputs, address=address, **options)

    def delete(self, video_ids: Iterable[str]) -> int:
        """Delete videos: rows first, then objects. Unknown ids are ignored; returns how many existed.

        If the store refuses to delete an object (read-only, unreachable) the rows stay deleted
        and ``IncompleteDeleteError`` says which objects remain: ``repair`` removes them later.
        """
        ids = [validate_video_id(v) for v in video_ids]
        if not ids:
            return 0
        existing = self.collection.get(ids)
        self.collection.delete(list(existing))
        keys = [row.fine_key for row in existing.values()]
        for done, key in enumerate(keys):
            self.local_reranker.cache.discard(key)
            try:
                self.store.delete(key)
            except DnSError as exc:  # the store as a whole refuses: the other deletes would too
                raise IncompleteDeleteError(
                    f"deleted {len(keys)} videos from collection {self.name!r}, but {len(keys) - done} of "
                    f"their objects remain in the store ({exc}): the videos are gone from the index; "
                    "`dns-milvus repair --fix` (DnSIndex.repair(fix=True)) deletes the objects left "
                    "behind once the store accepts deletes"
                ) from exc
        return len(existing)

    # -- reading -------------------------------------------------------------------------------

    def count(self) -> int:
        return self.collection.count()

    def get(self, video_ids: Iterable[str], *, with_fine: bool = False) -> dict[str, dict[str, Any]]:
        """Stored rows (and optionally the decoded fine tensors) of the given ids; unknown ids are absent.

        Vectors and segment codes are left out of the rows; ``with_fine``'s records carry them."""
        ids = [validate_video_id(v) for v in video_ids]
        rows = self.collection.get(ids, with_vectors=with_fine)
        out: dict[str, dict[str, Any]] = {}
        for vid, row in rows.items():
            item = {k: v for k, v in dataclasses.asdict(row).items() if k not in ("coarse", "segments")}
            if with_fine:
                item["record"] = self.load_record(vid, row)
            out[vid] = item
        return out

    def load_record(self, video_id: str, row: VideoRow | None = None) -> VideoRecord:
        """The full indexed representation of a stored video (row + fine tensor)."""
        if row is None or row.coarse is None:
            found = self.collection.get([validate_video_id(video_id)], with_vectors=True)
            if video_id not in found:
                raise NotFoundError(f"video {video_id!r} is not in collection {self.name!r}")
            row = found[video_id]
        data = self.store.get(row.fine_key)
        ft = decode_fine_tensor(data, video_id=video_id, key=row.fine_key, n_frames=row.n_frames)
        return VideoRecord(
            coarse=np.asarray(row.coarse, dtype=np.float32),
            self_sim=float(row.self_sim),
            fine=ft.array,
            payload_kind=ft.kind,
            video_id=video_id,
            segments=row.segments,
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
        if isinstance(query, np.ndarray) or _is_tensor(query):
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
                Candidate(
                    h.video_id,
                    h.score,
                    h.self_sim,
                    h.fine_key,
                    h.n_frames,
                    h.payload_kind,
                    h.metadata,
                    segments=h.segments,
                )
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
                    segments=row["segments"],
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

    def verify_objects(self, objects: Mapping[str, tuple[str, int]]) -> dict[str, str]:
        """Read and verify the objects of ``{video id: (fine key, frames)}``.

        Returns, by video id, why an object cannot be used: ``OBJECT_MISSING``, or the reason it
        does not verify (checksum, truncation, header, another video's object, another frame
        count). Videos whose object is sound are absent. A store that fails as a whole
        (unreachable, refusing credentials) raises instead of marking every video.
        """
        problems: dict[str, str] = {}
        items = list(objects.items())
        for start in range(0, len(items), _VERIFY_CHUNK):
            chunk = items[start : start + _VERIFY_CHUNK]
            fetched = self.store.get_many([key for _, (key, _) in chunk])
            for video_id, (key, frames) in chunk:
                data = fetched[key]
                if isinstance(data, BackendUnavailableError | StoreAccessError):
                    raise data
                if isinstance(data, Exception):
                    problems[video_id] = OBJECT_MISSING if isinstance(data, NotFoundError) else str(data)
                    continue
                try:
                    decode_fine_tensor(data, video_id, key=key, n_frames=frames)
                except CorruptObjectError as exc:
                    problems[video_id] = str(exc)
        return problems

    def repair(
        self,
        *,
        fix: bool = False,
        deep: bool = False,
        force: bool = False,
        grace_period_s: float = DEFAULT_REPAIR_GRACE_S,
    ) -> RepairReport:
        """Check that rows and objects match; with ``fix``, delete orphan objects.

        One listing of the store finds orphan objects (no row points at them) and rows whose
        object is missing. ``deep`` also reads every row's object and verifies its checksum and
        its binding to the video and frame count (``rows_damaged_object``). Rows without a usable
        object are reported, never deleted (that would lose the id silently): index those videos
        again; an ingest of the same inputs does, as it re-indexes rows whose object is missing or
        does not verify.

        ``fix`` deletes the orphans last written at least ``grace_period_s`` ago (0: all): a
        younger one may be the object of a row a writer is about to upsert, so repair is safe
        beside ingestion. Without ``force`` it refuses (``RepairRefusedError``, nothing deleted)
        when the collection has no rows or when more than ``REPAIR_MAX_DELETE_SHARE`` of the
        collection's objects (and more than one) would go: that is what a damaged or wrong
        database looks like, and deleting would lose the fine tensors of every video in it.
        """
        is_number = isinstance(grace_period_s, int | float) and not isinstance(grace_period_s, bool)
        if not is_number or not grace_period_s >= 0:
            raise InvalidInputError(f"grace_period_s must be seconds >= 0, got {grace_period_s!r}")
        report = RepairReport(deep=deep, grace_period_s=float(grace_period_s))
        referenced: dict[str, tuple[str, int]] = {}  # fine key -> (video id, frames)
        for row in self.collection.iter_rows(["fine_key", "n_frames"]):
            referenced[row["fine_key"]] = (row["video_id"], int(row["n_frames"]))
            report.rows_checked += 1
        stored = {info.key: info for info in self.store.iter_objects(prefix=fine_key_prefix(self.name))}
        report.objects_checked = len(stored)
        report.orphan_objects = sorted(key for key in stored if key not in referenced)
        missing = {vid: key for key, (vid, _) in referenced.items() if key not in stored}
        if deep:
            present = {vid: (key, frames) for key, (vid, frames) in referenced.items() if key in stored}
            for vid, why in self.verify_objects(present).items():
                if why == OBJECT_MISSING:  # deleted since the listing
                    missing[vid] = present[vid][0]
                else:
                    report.rows_damaged_object[vid] = why
            report.rows_damaged_object = dict(sorted(report.rows_damaged_object.items()))
        report.rows_missing_object = sorted(self._still_missing(missing))
        report.young_orphans = [
            key for key in report.orphan_objects if _is_young(stored[key], report.grace_period_s)
        ]
        if fix:
            young = set(report.young_orphans)
            doomed = [key for key in report.orphan_objects if key not in young]
            if not force:
                self._refuse_mass_delete(len(doomed), report)
            for key in doomed:
                # Stat again: a writer may have put this key since the listing (its row follows).
                info = self.store.stat(key)
                if info is None:
                    continue
                if _is_young(info, report.grace_period_s):
                    report.young_orphans.append(key)
                    continue
                self.store.delete(key)
                report.deleted_objects.append(key)
            report.fixed = True
        return report

    def _still_missing(self, missing: Mapping[str, str]) -> list[str]:
        """The ids of ``missing`` ({video id: key}) whose row still points at an absent object: a
        video deleted while repair ran (row, then object) is not a row without its object."""
        if not missing:
            return []
        rows = self.collection.get(list(missing))
        return [
            vid
            for vid, key in missing.items()
            if vid in rows and rows[vid].fine_key == key and not self.store.exists(key)
        ]

    def _refuse_mass_delete(self, n_delete: int, report: RepairReport) -> None:
        objects = report.objects_checked
        limit = max(1, int(REPAIR_MAX_DELETE_SHARE * objects))
        if n_delete == 0 or (report.rows_checked > 0 and n_delete <= limit):
            return
        if report.rows_checked == 0:
            why = f"collection {self.name!r} has no rows, while the store holds {objects} objects of it"
        else:
            why = (
                f"that is {n_delete} of the collection's {objects} objects, more than "
                f"{REPAIR_MAX_DELETE_SHARE:.0%}"
            )
        raise RepairRefusedError(
            f"repair --fix refused to delete {n_delete} orphan objects (nothing was deleted): {why}. "
            f"A damaged or wrong database looks like this (a Milvus Lite database whose files were "
            f"damaged can open empty), and deleting would lose these videos' fine tensors. Check that "
            f"{display_uri(self.client)} and collection {self.name!r} are the ones these objects belong "
            "to; a damaged database is recovered by moving it aside and ingesting again. If the orphans "
            "really are unwanted (e.g. most videos were deleted), run again with --force (force=True)."
        )

    def _warn_if_store_holds_objects(self) -> None:
        """A collection created just now whose objects are already in the store is most often a
        database that was lost, damaged or not the one meant: say so before ``repair`` runs."""
        first = next(iter(self.store.iter_keys(prefix=fine_key_prefix(self.name))), None)
        if first is not None:
            log.warning(
                "collection %r did not exist at %s and was created empty, but %r holds objects of it "
                "(e.g. %s): if the database was damaged or is not the one meant, do not run repair "
                "--fix (it refuses to delete them without --force); ingest again to re-index them",
                self.name,
                display_uri(self.client),
                self.store,
                first,
            )

    def stats(self) -> dict[str, Any]:
        models = self.stage2_models
        return {
            "collection": self.name,
            "uri": self.uri,
            "videos": self.count(),
            "model_set": models.name,
            "model_tag": models.tag,
            "payload_kind": models.payload_kind,
            "device": str(models.device),
        }

    def close(self) -> None:
        self.store.close()
        self.client.close()

    def __enter__(self) -> DnSIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_tensor(x: object) -> bool:
    """Whether ``x`` is a torch tensor; without torch imported it cannot be one."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check_k(top_k: int, candidates: int) -> None:
    if top_k < 1:
        raise InvalidInputError(f"top_k must be >= 1, got {top_k}")
    if not 1 <= candidates <= MAX_CANDIDATES_K:
        raise InvalidInputError(f"candidates must be in 1..{MAX_CANDIDATES_K}, got {candidates}")


def _ms(t: float) -> float:
    return (time.perf_counter() - t) * 1000.0


def _is_young(info: ObjectInfo, grace_period_s: float) -> bool:
    return grace_period_s > 0 and time.time() - info.modified < grace_period_s
