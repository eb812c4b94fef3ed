"""Bulk ingestion of video collections: files, directories, globs, HDF5 features, arrays."""

from dns_milvus.ingest.pipeline import IngestReport, ingest
from dns_milvus.ingest.sources import SourceItem, array_source, file_source, hdf5_source, video_files

__all__ = [
    "IngestReport",
    "SourceItem",
    "array_source",
    "file_source",
    "hdf5_source",
    "ingest",
    "video_files",
]
