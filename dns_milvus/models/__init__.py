"""Torch networks of Distill-and-Select, state_dict-compatible with the DnS release.

Region features are float32 ``[T, R, D]`` for one video or ``[B, T, R, D]`` with a frame mask
``[B, T]`` (True = real frame, padding at the end). Every network gives the same result for a
video inside any padded batch as for the video alone. For indexing, ``index_packed`` takes the
videos concatenated along frames instead (``dns_milvus.models.packed``): no padding computed.
"""

from dns_milvus.models.checkpoint import (
    KIND_DESCRIPTIONS,
    NETWORK_KINDS,
    build_from_state_dict,
    load_checkpoint,
    network_kind,
    save_checkpoint,
)
from dns_milvus.models.layers import (
    MIN_COMPARATOR_FRAMES,
    BinarizationLayer,
    HAttention,
    L2Attention,
    NetVLAD,
    VideoComparator,
    frame_chamfer,
    region_chamfer,
    upsample_short_videos,
)
from dns_milvus.models.pairwise import FineSimilarityNetwork, similarity_regularization
from dns_milvus.models.selector import SelectorMLP, SelectorNetwork
from dns_milvus.models.students import CoarseGrainedStudent, FineGrainedStudent
from dns_milvus.models.teacher import TeacherEnsemble, ViSiLTeacher

__all__ = [
    "KIND_DESCRIPTIONS",
    "MIN_COMPARATOR_FRAMES",
    "NETWORK_KINDS",
    "BinarizationLayer",
    "CoarseGrainedStudent",
    "FineGrainedStudent",
    "FineSimilarityNetwork",
    "HAttention",
    "L2Attention",
    "NetVLAD",
    "SelectorMLP",
    "SelectorNetwork",
    "TeacherEnsemble",
    "ViSiLTeacher",
    "VideoComparator",
    "build_from_state_dict",
    "frame_chamfer",
    "load_checkpoint",
    "network_kind",
    "region_chamfer",
    "save_checkpoint",
    "similarity_regularization",
    "upsample_short_videos",
]
