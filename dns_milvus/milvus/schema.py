"""The Milvus collection schema of a DnS index, and the check that an existing one matches.

One row per video. Collection-level facts (schema version, vector dimension, model set) are
collection properties, which both Milvus Lite 3.x and the server keep (Lite drops the
collection description, so it is not used).

Version 2 added each video's segment codes (``F_SEGMENTS``), which a selector with a
segment-match input reads; a version-1 collection is refused with how to re-create it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pymilvus import CollectionSchema, DataType, MilvusClient

from dns_milvus.errors import InvalidInputError
from dns_milvus.ids import MAX_ID_BYTES
from dns_milvus.milvus._checks import require_int
from dns_milvus.milvus.index import IndexConfig

SCHEMA_VERSION = 2
DEFAULT_DIM = 1024

F_ID = "video_id"
F_COARSE = "coarse"
F_SELF_SIM = "self_sim"
F_FINE_KEY = "fine_key"
F_N_FRAMES = "n_frames"
F_PAYLOAD_KIND = "payload_kind"
F_INGESTED_AT = "ingested_at"
F_MODEL_SET = "model_set"
F_METADATA = "metadata"
#: Segment codes (``VideoRecord.segments``, uint8 [S, dim/8]) as base64 of their bytes; "" for none.
#: A string because Milvus Lite has no binary-vector type.
F_SEGMENTS = "segments"

MAX_FINE_KEY_BYTES = 1024
MAX_PAYLOAD_KIND_BYTES = 32
MAX_MODEL_SET_BYTES = 64
#: Milvus's default limit on one JSON value.
MAX_METADATA_BYTES = 65536
#: Milvus's largest VARCHAR.
MAX_SEGMENTS_CHARS = 65535

PROP_SCHEMA_VERSION = "dns.schema_version"
PROP_DIM = "dns.dim"
PROP_MODEL_SET = "dns.model_set"

_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}\Z")


class SchemaMismatchError(InvalidInputError):
    """An existing collection whose schema is not the one this release reads and writes."""


class ModelSetMismatchError(InvalidInputError):
    """Vectors or rows produced by other networks than the ones that built the collection."""


def expected_fields(dim: int) -> dict[str, tuple[DataType, dict[str, int]]]:
    """Field name -> (type, type parameters) of schema version ``SCHEMA_VERSION``."""
    return {
        F_ID: (DataType.VARCHAR, {"max_length": MAX_ID_BYTES}),
        F_COARSE: (DataType.FLOAT_VECTOR, {"dim": dim}),
        F_SELF_SIM: (DataType.FLOAT, {}),
        F_FINE_KEY: (DataType.VARCHAR, {"max_length": MAX_FINE_KEY_BYTES}),
        F_N_FRAMES: (DataType.INT32, {}),
        F_PAYLOAD_KIND: (DataType.VARCHAR, {"max_length": MAX_PAYLOAD_KIND_BYTES}),
        F_INGESTED_AT: (DataType.INT64, {}),
        F_MODEL_SET: (DataType.VARCHAR, {"max_length": MAX_MODEL_SET_BYTES}),
        F_METADATA: (DataType.JSON, {}),
        F_SEGMENTS: (DataType.VARCHAR, {"max_length": MAX_SEGMENTS_CHARS}),
    }


#: Every scalar field, in schema order.
SCALAR_FIELDS = tuple(f for f in expected_fields(1) if f != F_COARSE)


def build_schema(dim: int) -> CollectionSchema:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    for name, (dtype, params) in expected_fields(dim).items():
        schema.add_field(name, dtype, is_primary=(name == F_ID), **params)
    return schema


def validate_collection_name(name: object) -> str:
    if not isinstance(name, str) or not _COLLECTION_NAME.match(name):
        raise InvalidInputError(
            f"collection name must be 1-255 letters, digits or underscores, not starting with a digit; "
            f"got {name!r}"
        )
    return name


def validate_dim(dim: object) -> int:
    return require_int(dim, "vector dimension", 2, 32768)


def validate_model_set(tag: object) -> str:
    if (
        not isinstance(tag, str)
        or not tag
        or not tag.isprintable()
        or len(tag.encode("utf-8", errors="surrogatepass")) > MAX_MODEL_SET_BYTES
    ):
        raise InvalidInputError(
            f"model-set tag must be a non-empty printable string of at most {MAX_MODEL_SET_BYTES} bytes, "
            f"got {tag!r}"
        )
    return tag


def collection_properties(dim: int, model_set: str) -> dict[str, str]:
    return {PROP_SCHEMA_VERSION: str(SCHEMA_VERSION), PROP_DIM: str(dim), PROP_MODEL_SET: model_set}


@dataclass(frozen=True)
class CollectionInfo:
    """What a DnS collection records about itself."""

    name: str
    dim: int
    model_set: str
    schema_version: int
    index: IndexConfig


def check_description(name: str, description: Mapping[str, Any]) -> tuple[int, str]:
    """Verify a ``describe_collection`` result against this release's schema.

    Returns (dim, model set). Raises ``SchemaMismatchError`` listing every difference.
    """
    props = {str(k): str(v) for k, v in (description.get("properties") or {}).items()}
    if PROP_SCHEMA_VERSION not in props:
        raise SchemaMismatchError(
            f"collection {name!r} was not created by dns-milvus (it has no {PROP_SCHEMA_VERSION} property)"
        )
    if props[PROP_SCHEMA_VERSION] != str(SCHEMA_VERSION):
        raise SchemaMismatchError(_version_mismatch(name, props[PROP_SCHEMA_VERSION]))
    try:
        dim = validate_dim(int(props.get(PROP_DIM, "")))
        model_set = validate_model_set(props.get(PROP_MODEL_SET, ""))
    except (ValueError, InvalidInputError) as exc:
        raise SchemaMismatchError(f"collection {name!r} has unreadable dns.* properties: {exc}") from None

    found = {f["name"]: f for f in description.get("fields", [])}
    problems: list[str] = []
    for field_name, (dtype, params) in expected_fields(dim).items():
        actual = found.pop(field_name, None)
        if actual is None:
            problems.append(f"field {field_name!r} is missing")
            continue
        if actual.get("type") != dtype:
            found_type = _type_name(actual.get("type"))
            problems.append(f"field {field_name!r} is {found_type}, expected {dtype.name}")
        for key, value in params.items():
            got = (actual.get("params") or {}).get(key)
            if got is None or int(got) != value:
                problems.append(f"field {field_name!r} has {key}={got}, expected {value}")
        if bool(actual.get("is_primary", False)) != (field_name == F_ID):
            problems.append(f"field {field_name!r} has the wrong primary-key flag")
    problems.extend(f"unexpected field {extra!r}" for extra in found)
    if problems:
        raise SchemaMismatchError(
            f"collection {name!r} does not match schema version {SCHEMA_VERSION}: " + "; ".join(problems)
        )
    return dim, model_set


def _version_mismatch(name: str, found: str) -> str:
    message = f"collection {name!r} has schema version {found}; this release reads version {SCHEMA_VERSION}"
    if found == "1":
        # The codes come from the video's features, not from its row: only indexing again makes them.
        message += (
            f": version 1 predates segment codes (the {F_SEGMENTS!r} field, which a selector with a "
            "segment-match input reads). Re-create the collection: drop it (or use another collection "
            "name) and index its videos again with the model set (dns-milvus ingest, or "
            "DnSIndex.add_many), which writes every row with its codes"
        )
    return message


def _type_name(dtype: object) -> str:
    return getattr(dtype, "name", str(dtype))
