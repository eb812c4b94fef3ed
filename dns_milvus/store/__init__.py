"""Object storage for fine-grained tensors: backends, keys and the fine-tensor file format.

numpy only: nothing here imports torch or Milvus. ``S3Store`` needs boto3 (``dns-milvus[s3]``)
and is imported on first use, so a local-only install works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dns_milvus.store.base import (
    ObjectInfo,
    ObjectStore,
    StoreAccessError,
    fine_key,
    fine_key_prefix,
    put_verified,
    validate_collection,
    validate_key,
)
from dns_milvus.store.fine_format import (
    HEADER_SIZE,
    FineKind,
    FineTensor,
    decode_fine_tensor,
    encode_fine_tensor,
    fine_object_size,
)
from dns_milvus.store.local import LocalStore
from dns_milvus.store.uri import open_store

if TYPE_CHECKING:
    from dns_milvus.store.s3 import S3Store

__all__ = [
    "HEADER_SIZE",
    "FineKind",
    "FineTensor",
    "LocalStore",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "StoreAccessError",
    "decode_fine_tensor",
    "encode_fine_tensor",
    "fine_key",
    "fine_key_prefix",
    "fine_object_size",
    "open_store",
    "put_verified",
    "validate_collection",
    "validate_key",
]


def __getattr__(name: str) -> Any:
    if name == "S3Store":
        from dns_milvus.store.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
