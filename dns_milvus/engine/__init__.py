"""The DnS engine: model sets, two-stage search and the index that composes Milvus and storage.

Names are imported on first use: ``DnSIndex`` and a search by an indexed id need no torch, which
``ModelSet`` (and ``resolve_device``) import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dns_milvus.engine.index import DnSIndex, RepairReport, SearchResponse
    from dns_milvus.engine.modelset import ModelSet, resolve_device
    from dns_milvus.engine.numpy_set import NumpyModelSet
    from dns_milvus.engine.policy import SelectionPolicy
    from dns_milvus.engine.record import VideoRecord
    from dns_milvus.engine.rerank import Candidate, LocalReranker, Reranker, RerankResult, SearchHit

#: Public name -> the module that defines it.
_EXPORTS = {
    "Candidate": "rerank",
    "DnSIndex": "index",
    "LocalReranker": "rerank",
    "ModelSet": "modelset",
    "NumpyModelSet": "numpy_set",
    "RepairReport": "index",
    "RerankResult": "rerank",
    "Reranker": "rerank",
    "SearchHit": "rerank",
    "SearchResponse": "index",
    "SelectionPolicy": "policy",
    "VideoRecord": "record",
    "resolve_device": "modelset",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


__all__ = [
    "Candidate",
    "DnSIndex",
    "LocalReranker",
    "ModelSet",
    "NumpyModelSet",
    "RepairReport",
    "RerankResult",
    "Reranker",
    "SearchHit",
    "SearchResponse",
    "SelectionPolicy",
    "VideoRecord",
    "resolve_device",
]
