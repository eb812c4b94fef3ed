"""The DnS engine: model sets, two-stage search and the index that composes Milvus and storage."""

from dns_milvus.engine.index import DnSIndex, RepairReport, SearchResponse
from dns_milvus.engine.modelset import ModelSet, VideoRecord, resolve_device
from dns_milvus.engine.policy import SelectionPolicy
from dns_milvus.engine.rerank import Candidate, LocalReranker, Reranker, RerankResult, SearchHit

__all__ = [
    "Candidate",
    "DnSIndex",
    "LocalReranker",
    "ModelSet",
    "RepairReport",
    "RerankResult",
    "Reranker",
    "SearchHit",
    "SearchResponse",
    "SelectionPolicy",
    "VideoRecord",
    "resolve_device",
]
