"""The ViSiL teacher network of DnS.

ViSiL compares two videos like the fine-grained students (region tensor dot -> Chamfer ->
video comparator -> Hardtanh -> Chamfer) but weights the region vectors with its own
l2-attention. Features are the region features of the rest of the project (PCA-whitened,
L2-normalised, ``dims`` dimensions); whitening happens in feature extraction, not here.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from dns_milvus.models.layers import L2Attention, VideoComparator
from dns_milvus.models.pairwise import FineSimilarityNetwork


class ViSiLTeacher(FineSimilarityNetwork):
    """ViSiL: l2-attention on region vectors and the video comparator; trainable.

    ``index_video`` / ``calculate_video_similarity`` follow the fine-grained students' contract;
    ``forward`` gives aligned-pair similarities and the similarity regularisation loss for
    training with the triplet loss.
    """

    def __init__(self, dims: int = 512) -> None:
        super().__init__()
        self.dims = dims
        self.attention = L2Attention(dims)
        self.visil_head = VideoComparator()

    def config(self) -> dict[str, Any]:
        """Constructor options: ``ViSiLTeacher(**net.config())`` builds the same shape."""
        return {"dims": self.dims}

    @property
    def index_dims(self) -> int:
        return self.dims

    @property
    def output_dim(self) -> int:
        """Last dimension of an indexed tensor."""
        return self.dims

    def _index(self, x: Tensor) -> Tensor:
        return self.attention(x)
