"""The Milvus layer: connection, collection schema, writes and stage-1 (coarse) search.

Uses pymilvus and numpy only. Works the same on Milvus Lite (a local ``*.db`` file) and on a
Milvus server.
"""

from dns_milvus.milvus.collection import HIT_FIELDS, OPTIONAL_HIT_FIELDS, Consistency, VideoCollection
from dns_milvus.milvus.connection import (
    MilvusLiteDamagedError,
    MilvusOperationError,
    backend_kind,
    connect,
    display_uri,
    redact_uri,
    release_lite,
)
from dns_milvus.milvus.filters import Filter, ids_filter, metadata_filter, render_filter, render_literal
from dns_milvus.milvus.index import IndexConfig
from dns_milvus.milvus.rows import CandidateHit, VideoRow
from dns_milvus.milvus.schema import (
    DEFAULT_DIM,
    SCHEMA_VERSION,
    CollectionInfo,
    ModelSetMismatchError,
    SchemaMismatchError,
)

__all__ = [
    "DEFAULT_DIM",
    "HIT_FIELDS",
    "OPTIONAL_HIT_FIELDS",
    "SCHEMA_VERSION",
    "CandidateHit",
    "CollectionInfo",
    "Consistency",
    "Filter",
    "IndexConfig",
    "MilvusLiteDamagedError",
    "MilvusOperationError",
    "ModelSetMismatchError",
    "SchemaMismatchError",
    "VideoCollection",
    "VideoRow",
    "backend_kind",
    "connect",
    "display_uri",
    "ids_filter",
    "metadata_filter",
    "redact_uri",
    "release_lite",
    "render_filter",
    "render_literal",
]
