"""Bulk ingestion of video collections: files, directories, globs, HDF5 features, arrays."""

from dns_milvus.ingest.pipeline import STAGES, IngestReport, ingest
from dns_milvus.ingest.sources import (
    SourceItem,
    array_source,
    file_source,
    hdf5_source,
    video_files,
    video_source,
)

__all__ = [
    "STAGES",
    "IngestReport",
    "SourceItem",
    "array_source",
    "file_source",
    "hdf5_source",
    "ingest",
    "video_files",
    "video_source",
]
