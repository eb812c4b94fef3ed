"""One Milvus collection per DnS index: writes, stage-1 search and reads.

Read-your-writes on both backends, at the lowest cost each allows:

- Milvus Lite searches rows it has not flushed by brute force, very slowly (seconds a query
  at 10k rows), and flushing is cheap. Writes therefore mark the collection dirty and the
  next read flushes once.
- On a server, ``Strong`` reads wait for the next time tick (~200 ms a request), while
  ``Session`` reads wait only for this process's own last write (a few ms). ``Session`` is
  the default. Milvus 2.3 reports no timestamp for deletes, so ``Session`` cannot track
  them; ``delete`` therefore ends with one ``Strong`` read, after which the deletion is
  visible. Pass ``consistency="Strong"`` to also see other processes' writes at once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
from pymilvus import MilvusClient

from dns_milvus.errors import InvalidInputError, NotFoundError
from dns_milvus.ids import validate_video_id
from dns_milvus.milvus import schema as s
from dns_milvus.milvus._checks import require_int, require_seconds
from dns_milvus.milvus.connection import backend_kind, display_uri, translate_errors
from dns_milvus.milvus.filters import Filter, as_filter, ids_filter
from dns_milvus.milvus.index import METRIC, IndexConfig
from dns_milvus.milvus.rows import (
    CandidateHit,
    VideoRow,
    check_vectors,
    decode_segments,
    entity_to_row,
    now_ms,
    row_to_entity,
)

Consistency = Literal["Strong", "Session", "Bounded", "Eventually"]

#: Milvus's largest top-k.
MAX_LIMIT = 16384
#: Fields stage 2 needs on every hit (segment codes for a selector that reads them; "" costs
#: nothing where there are none); ``search(output_fields=...)`` adds to them.
HIT_FIELDS = (s.F_SELF_SIM, s.F_FINE_KEY, s.F_N_FRAMES, s.F_PAYLOAD_KIND, s.F_SEGMENTS)
OPTIONAL_HIT_FIELDS = (s.F_METADATA, s.F_MODEL_SET, s.F_INGESTED_AT)
ALL_FIELDS = (s.F_ID, s.F_COARSE, *s.SCALAR_FIELDS[1:])

_UPSERT_MAX_ROWS = 1000
_UPSERT_MAX_BYTES = 16 * 2**20
_IDS_PER_FILTER = 256
_QUERIES_PER_SEARCH = 256
#: How long a row count sizes IVF searches before it is counted again (counting scans rows on Lite).
_ROW_COUNT_TTL_S = 60.0

log = logging.getLogger(__name__)


class VideoCollection:
    """A DnS index's Milvus collection. Make one with ``create`` or ``open``."""

    def __init__(
        self,
        client: MilvusClient,
        info: s.CollectionInfo,
        *,
        consistency: Consistency = "Session",
        timeout: float = 60.0,
    ) -> None:
        if consistency not in ("Strong", "Session", "Bounded", "Eventually"):
            raise InvalidInputError(
                f"consistency must be Strong, Session, Bounded or Eventually, got {consistency!r}"
            )
        self.client = client
        self.info = info
        self.consistency: Consistency = consistency
        self.timeout = require_seconds(timeout, "timeout")
        self.backend = backend_kind(client)
        self._where = display_uri(client)
        self._unflushed = False
        self._row_count: tuple[int, float] | None = None  # (rows, time.monotonic() when counted)
        self._warned_fewer_hits = False

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        client: MilvusClient,
        name: str,
        *,
        model_set: str,
        dim: int = s.DEFAULT_DIM,
        index: IndexConfig | None = None,
        exist_ok: bool = True,
        consistency: Consistency = "Session",
        timeout: float = 60.0,
    ) -> VideoCollection:
        """Create the collection (or, with ``exist_ok``, open it after checking it matches)."""
        name = s.validate_collection_name(name)
        dim = s.validate_dim(dim)
        model_set = s.validate_model_set(model_set)
        where = display_uri(client)
        if cls.exists(client, name):
            if not exist_ok:
                raise InvalidInputError(f"collection {name!r} already exists at {where}")
            return cls.open(
                client,
                name,
                dim=dim,
                model_set=model_set,
                index=index,
                consistency=consistency,
                timeout=timeout,
            )
        index = index or IndexConfig()
        with translate_errors(f"create collection {name!r}", where):
            client.create_collection(
                name,
                schema=s.build_schema(dim),
                index_params=_coarse_index_params(client, index),
                properties=s.collection_properties(dim, model_set),
                consistency_level=consistency,
                timeout=timeout,
            )
        info = s.CollectionInfo(name, dim, model_set, s.SCHEMA_VERSION, index)
        return cls(client, info, consistency=consistency, timeout=timeout)

    @classmethod
    def open(
        cls,
        client: MilvusClient,
        name: str,
        *,
        dim: int | None = None,
        model_set: str | None = None,
        index: IndexConfig | None = None,
        consistency: Consistency = "Session",
        timeout: float = 60.0,
    ) -> VideoCollection:
        """Open an existing collection, checking its schema (and ``dim``/``model_set`` if given).

        ``index`` gives search-time parameters (nprobe, ef); its kind must match the built index
        (change the index with ``set_index``), whose build parameters are kept.
        """
        name = s.validate_collection_name(name)
        where = display_uri(client)
        if not cls.exists(client, name):
            raise NotFoundError(f"collection {name!r} does not exist at {where}; create it first")
        with translate_errors(f"describe collection {name!r}", where):
            description = client.describe_collection(name, timeout=timeout)
        found_dim, found_model_set = s.check_description(name, description)
        if dim is not None and s.validate_dim(dim) != found_dim:
            raise s.SchemaMismatchError(f"collection {name!r} holds {found_dim}-d vectors, not {dim}-d")
        if model_set is not None and s.validate_model_set(model_set) != found_model_set:
            raise s.ModelSetMismatchError(
                f"collection {name!r} was built by model set {found_model_set!r}, not {model_set!r}"
            )
        with translate_errors(f"describe the index of {name!r}", where):
            index_names = client.list_indexes(name, field_name=s.F_COARSE, timeout=timeout)
            if not index_names:
                raise s.SchemaMismatchError(f"collection {name!r} has no index on its {s.F_COARSE!r} field")
            built = client.describe_index(name, index_names[0], timeout=timeout)
        if str(built.get("metric_type", "")).upper() != METRIC:
            raise s.SchemaMismatchError(
                f"collection {name!r} indexes {s.F_COARSE!r} with metric {built.get('metric_type')}; "
                "expected IP"
            )
        existing = IndexConfig.from_description(built)
        if index is not None and index.kind != existing.kind:
            raise InvalidInputError(
                f"collection {name!r} has a {existing.kind} index, not {index.kind}; "
                "use set_index() to change it"
            )
        if index is not None:
            existing = replace(existing, nprobe=index.nprobe, ef=index.ef)
        with translate_errors(f"load collection {name!r}", where):
            client.load_collection(name, timeout=timeout)
        info = s.CollectionInfo(name, found_dim, found_model_set, s.SCHEMA_VERSION, existing)
        return cls(client, info, consistency=consistency, timeout=timeout)

    @staticmethod
    def exists(client: MilvusClient, name: str) -> bool:
        name = s.validate_collection_name(name)
        with translate_errors(f"look up collection {name!r}", display_uri(client)):
            return bool(client.has_collection(name))

    def drop(self) -> None:
        """Delete the collection and all its rows."""
        with self._errors("drop the collection"):
            self.client.drop_collection(self.name, timeout=self.timeout)
        self._unflushed = False

    def set_index(self, index: IndexConfig) -> None:
        """Rebuild the coarse-vector index (e.g. FLAT -> IVF_FLAT once the collection has grown)."""
        if not isinstance(index, IndexConfig):
            raise InvalidInputError(f"set_index expects an IndexConfig, got {type(index).__name__}")
        self._settle()
        with self._errors(f"rebuild the index as {index.kind}"):
            self.client.release_collection(self.name, timeout=self.timeout)
            built = self.client.list_indexes(self.name, field_name=s.F_COARSE, timeout=self.timeout)
            for index_name in built:
                self.client.drop_index(self.name, index_name, timeout=self.timeout)
            self.client.create_index(
                self.name, _coarse_index_params(self.client, index), timeout=self.timeout
            )
            self.client.load_collection(self.name, timeout=self.timeout)
        self.info = s.CollectionInfo(self.name, self.dim, self.model_set, self.info.schema_version, index)
        self._warned_fewer_hits = False

    # -- properties --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def model_set(self) -> str:
        return self.info.model_set

    def require_model_set(self, tag: str) -> None:
        """Refuse vectors from networks other than those that built this collection."""
        if tag != self.model_set:
            raise s.ModelSetMismatchError(
                f"collection {self.name!r} was built by model set {self.model_set!r}; "
                f"vectors of model set {tag!r} are not comparable with it"
            )

    # -- writes ------------------------------------------------------------------------------

    def upsert(self, rows: Sequence[VideoRow]) -> int:
        """Insert or replace rows (idempotent per video id); returns the number written.

        Every row is validated before anything is written; ids repeated within one call are
        refused. Rows are sent in batches, so a backend failure midway can leave earlier
        batches written (re-running the same upsert is safe).
        """
        if isinstance(rows, VideoRow):
            rows = [rows]
        stamp = now_ms()
        entities = [row_to_entity(row, self.dim, self.model_set, stamp) for row in rows]
        _refuse_duplicates([e[s.F_ID] for e in entities])
        for batch in _batches(entities):
            with self._errors(f"upsert {len(batch)} rows"):
                self.client.upsert(self.name, batch, timeout=self.timeout)
            self._unflushed = True
        return len(entities)

    def check_row(self, row: VideoRow) -> None:
        """Raise ``InvalidInputError`` naming the video if ``upsert`` would refuse ``row``, so that a
        writer can refuse a video before it writes anything else for it (its object)."""
        row_to_entity(row, self.dim, self.model_set, now_ms())

    def delete(self, video_ids: Iterable[str]) -> None:
        """Delete the rows of ``video_ids`` (ids without a row are ignored)."""
        ids = _unique_ids(video_ids)
        last: Filter | None = None
        for chunk in _chunks(ids, _IDS_PER_FILTER):
            last = ids_filter(chunk)
            with self._errors(f"delete {len(chunk)} rows"):
                self.client.delete(self.name, filter=last.render(), timeout=self.timeout)
            self._unflushed = True
            self._row_count = None  # fewer rows: a stale count would probe too few IVF lists
        if last is not None and self.backend == "server" and self.consistency == "Session":
            # One Strong read waits until the server has applied the deletes (see module doc).
            with self._errors("confirm the delete"):
                self.client.query(
                    self.name,
                    filter=last.render(),
                    output_fields=["count(*)"],
                    consistency_level="Strong",
                    timeout=self.timeout,
                )

    def flush(self) -> None:
        """Persist buffered writes. On Lite this is what makes them fast to search; on a
        server it seals segments so their index is built (worth it after bulk ingestion)."""
        with self._errors("flush"):
            self.client.flush(self.name, timeout=self.timeout)
        self._unflushed = False

    # -- reads -------------------------------------------------------------------------------

    def search(
        self,
        vectors: np.ndarray,
        limit: int,
        *,
        filter: Filter | str | None = None,
        filter_params: Mapping[str, Any] | None = None,
        output_fields: Sequence[str] = (s.F_METADATA,),
        search_params: Mapping[str, Any] | None = None,
        model_set: str | None = None,
    ) -> list[list[CandidateHit]]:
        """Top-``limit`` rows by inner product for each query vector of ``vectors`` [Q, dim].

        ``filter`` is a ``Filter`` or a Milvus expression template whose ``{name}`` placeholders
        take ``filter_params`` (values are encoded, never spliced; the template is trusted).
        ``output_fields`` adds optional fields (metadata, model_set, ingested_at) to the hits.
        ``search_params`` overrides the index's (e.g. ``{"nprobe": 32}``). With ``model_set``,
        vectors from other networks than the collection's are refused.

        IVF_FLAT probes enough lists to return ``limit`` hits from the collection's rows
        (``IndexConfig.search_params``); a selective filter leaves fewer rows in those lists, so
        raise nprobe through ``search_params`` for filtered searches that come back short. An
        ANN search without a filter that still returns fewer than min(limit, rows) hits logs
        one warning per collection saying which index setting to change.
        """
        if model_set is not None:
            self.require_model_set(model_set)
        queries = check_vectors(vectors, self.dim)
        limit = require_int(limit, "search limit", 1, MAX_LIMIT)
        extra = list(output_fields)
        unknown = sorted(set(extra) - set(OPTIONAL_HIT_FIELDS))
        if unknown:
            raise InvalidInputError(
                f"unknown output fields {unknown}; choose from {list(OPTIONAL_HIT_FIELDS)}"
            )
        expr = as_filter(filter, filter_params).render() if filter is not None else ""
        index = self.info.index
        params = index.search_params(limit, self._known_rows() if index.kind == "IVF_FLAT" else None)
        if search_params:
            params = {**params, "params": {**params["params"], **dict(search_params)}}
        fields = [*HIT_FIELDS, *dict.fromkeys(extra)]
        self._settle()
        hits: list[list[CandidateHit]] = []
        for start in range(0, len(queries), _QUERIES_PER_SEARCH):
            batch = queries[start : start + _QUERIES_PER_SEARCH]
            with self._errors("search", user_filter=expr or None):
                result = self.client.search(
                    self.name,
                    data=list(batch),
                    filter=expr,
                    limit=limit,
                    output_fields=fields,
                    search_params=params,
                    anns_field=s.F_COARSE,
                    consistency_level=self.consistency,
                    timeout=self.timeout,
                )
            hits.extend([_to_hit(hit, self.dim) for hit in per_query] for per_query in result)
        if not expr and index.kind != "FLAT":
            self._check_hit_count(hits, limit, params["params"])
        return hits

    def get(self, video_ids: Iterable[str], *, with_vectors: bool = False) -> dict[str, VideoRow]:
        """The rows of ``video_ids`` that exist, by id (missing ids are absent)."""
        ids = _unique_ids(video_ids)
        fields = [*s.SCALAR_FIELDS, *([s.F_COARSE] if with_vectors else [])]
        self._settle()
        found: dict[str, VideoRow] = {}
        for chunk in _chunks(ids, _IDS_PER_FILTER):
            with self._errors(f"get {len(chunk)} rows"):
                entities = self.client.query(
                    self.name,
                    filter=ids_filter(chunk).render(),
                    output_fields=fields,
                    consistency_level=self.consistency,
                    timeout=self.timeout,
                )
            for entity in entities:
                row = entity_to_row(entity, self.dim, with_vector=with_vectors)
                found[row.video_id] = row
        return found

    def count(self) -> int:
        """Number of rows."""
        self._settle()
        with self._errors("count rows"):
            result = self.client.query(
                self.name,
                filter="",
                output_fields=["count(*)"],
                consistency_level=self.consistency,
                timeout=self.timeout,
            )
        rows = int(result[0]["count(*)"])
        self._row_count = (rows, time.monotonic())
        return rows

    def iter_rows(
        self, fields: Sequence[str] | None = None, batch_size: int = 1000
    ) -> Iterator[dict[str, Any]]:
        """Every row as a dict of ``fields`` (default: all; ``video_id`` always included),
        fetched ``batch_size`` rows at a time. ``coarse`` comes back as float32 arrays,
        ``segments`` as uint8 [S, dim/8] arrays (None for a row without codes)."""
        wanted = list(dict.fromkeys([s.F_ID, *(fields if fields is not None else ALL_FIELDS)]))
        unknown = sorted(set(wanted) - set(ALL_FIELDS))
        if unknown:
            raise InvalidInputError(f"unknown fields {unknown}; choose from {list(ALL_FIELDS)}")
        batch_size = require_int(batch_size, "batch_size", 1, MAX_LIMIT)
        self._settle()
        with self._errors("start iterating rows"):
            iterator = self.client.query_iterator(
                self.name, batch_size=batch_size, filter="", output_fields=wanted, timeout=self.timeout
            )
        try:
            while True:
                with self._errors("iterate rows"):
                    batch = iterator.next()
                if not batch:
                    return
                for entity in batch:
                    row = {name: entity[name] for name in wanted}
                    if s.F_COARSE in row:
                        row[s.F_COARSE] = np.asarray(row[s.F_COARSE], dtype=np.float32)
                    if s.F_SEGMENTS in row:
                        row[s.F_SEGMENTS] = decode_segments(row[s.F_SEGMENTS], self.dim, row[s.F_ID])
                    yield row
        finally:
            iterator.close()

    # -- helpers -----------------------------------------------------------------------------

    def _settle(self) -> None:
        """On Lite, flush pending writes before a read (unflushed rows are searched slowly)."""
        if self._unflushed and self.backend == "lite":
            self.flush()

    def _known_rows(self) -> int:
        """The row count, counted again after ``_ROW_COUNT_TTL_S`` or a delete. Rows upserted
        since only make it an underestimate, which raises IVF's nprobe (never lowers it)."""
        counted = self._row_count
        if counted is None or time.monotonic() - counted[1] > _ROW_COUNT_TTL_S:
            return self.count()
        return counted[0]

    def _check_hit_count(self, hits: list[list[CandidateHit]], limit: int, params: Mapping[str, Any]) -> None:
        """Warn once if an ANN search returned fewer hits than the collection could fill."""
        fewest = min(len(per_query) for per_query in hits)
        if fewest >= limit or self._warned_fewer_hits or fewest >= self._known_rows():
            return
        rows = self.count()  # the cached count may be stale: count before warning
        if fewest >= min(limit, rows):
            return
        self._warned_fewer_hits = True
        log.warning(
            "a search of collection %r at %s returned %d hits where %d were asked and it holds %d rows "
            "(%s index, search params %s): %s. Logged once per collection.",
            self.name,
            self._where,
            fewest,
            limit,
            rows,
            self.info.index.kind,
            dict(params),
            self.info.index.fewer_hits_advice(),
        )

    def _errors(self, action: str, *, user_filter: str | None = None) -> Any:
        return translate_errors(f"{action} in {self.name!r}", self._where, user_filter=user_filter)

    def __repr__(self) -> str:
        return (
            f"VideoCollection({self.name!r}, dim={self.dim}, model_set={self.model_set!r}, "
            f"index={self.info.index.kind}, backend={self.backend})"
        )


def _coarse_index_params(client: MilvusClient, index: IndexConfig) -> Any:
    params = client.prepare_index_params()
    params.add_index(
        field_name=s.F_COARSE, index_type=index.kind, metric_type=METRIC, params=index.index_params()
    )
    return params


def _to_hit(hit: Mapping[str, Any], dim: int) -> CandidateHit:
    entity = hit["entity"]
    video_id = hit.id  # type: ignore[attr-defined]  # pymilvus Hit: the primary key on every backend
    return CandidateHit(
        video_id=video_id,
        score=float(hit["distance"]),
        self_sim=float(entity[s.F_SELF_SIM]),
        fine_key=entity[s.F_FINE_KEY],
        n_frames=int(entity[s.F_N_FRAMES]),
        payload_kind=entity[s.F_PAYLOAD_KIND],
        metadata=dict(entity.get(s.F_METADATA) or {}),
        model_set=entity.get(s.F_MODEL_SET),
        ingested_at=entity.get(s.F_INGESTED_AT),
        segments=decode_segments(entity[s.F_SEGMENTS], dim, video_id),
    )


def _unique_ids(video_ids: Iterable[str]) -> list[str]:
    if isinstance(video_ids, str):
        raise InvalidInputError("expected a list of video ids, got a single string")
    return list(dict.fromkeys(validate_video_id(v) for v in video_ids))


def _refuse_duplicates(ids: list[str]) -> None:
    repeated = [video_id for video_id, n in Counter(ids).items() if n > 1]
    if repeated:
        shown = sorted(repeated)[:20]
        raise InvalidInputError(
            f"upsert got {len(repeated)} video ids more than once in one call: {shown}; "
            "give each id once (nothing was written)"
        )


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _batches(entities: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Groups of at most ``_UPSERT_MAX_ROWS`` rows and about ``_UPSERT_MAX_BYTES`` each."""
    batch: list[dict[str, Any]] = []
    size = 0
    for entity in entities:
        row_bytes = (
            entity[s.F_COARSE].nbytes
            + len(str(entity[s.F_METADATA]))
            + len(entity[s.F_SEGMENTS])
            + 2 * s.MAX_FINE_KEY_BYTES
        )
        if batch and (len(batch) >= _UPSERT_MAX_ROWS or size + row_bytes > _UPSERT_MAX_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(entity)
        size += row_bytes
    if batch:
        yield batch
