"""Packed binary codes and the fine-grained similarity kernels of DnS stage 2.

- :mod:`~dns_milvus.similarity.codes`: ±1 codes <-> packed uint8 (torch or numpy).
- :mod:`~dns_milvus.similarity.hamming`: frame-to-frame similarity straight from packed codes
  (a C XOR/popcount kernel on CPU, an exact ±1 GEMM anywhere else).
- :mod:`~dns_milvus.similarity.fine`: one query against many targets through the fine student's
  video comparator, from packed codes or from float16/float32 region tensors.
- :mod:`~dns_milvus.similarity.comparator`: the comparator as the scorers run it (a fused first
  layer on CPU; ``precision`` float32 or bfloat16).
- :mod:`~dns_milvus.similarity.threads`: how many CPU threads a scoring call uses.
"""

from dns_milvus.similarity.codes import pack_codes, pack_signs, unpack_codes
from dns_milvus.similarity.comparator import PRECISIONS, resolve_precision
from dns_milvus.similarity.fine import fine_similarity_float, fine_similarity_packed, prepare_for_inference
from dns_milvus.similarity.hamming import (
    packed_frame_similarity,
    packed_frame_to_frame,
    resolve_backend,
)
from dns_milvus.similarity.threads import resolve_threads

__all__ = [
    "PRECISIONS",
    "fine_similarity_float",
    "fine_similarity_packed",
    "pack_codes",
    "pack_signs",
    "packed_frame_similarity",
    "packed_frame_to_frame",
    "prepare_for_inference",
    "resolve_backend",
    "resolve_precision",
    "resolve_threads",
    "unpack_codes",
]
