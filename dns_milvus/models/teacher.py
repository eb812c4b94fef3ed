"""The ViSiL teacher network of DnS.

ViSiL compares two videos like the fine-grained students (region tensor dot -> Chamfer ->
video comparator -> Hardtanh -> Chamfer) but weights the region vectors with its own
l2-attention. Features are the region features of the rest of the project (PCA-whitened,
L2-normalised, ``dims`` dimensions); whitening happens in feature extraction, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dns_milvus.errors import InvalidInputError
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


class TeacherEnsemble(nn.Module):
    """Several ViSiL teachers (trained alike from different seeds); a pair's similarity is the
    mean of theirs.

    A teacher trained on little footage depends on its seed: on the held-out copy benchmark,
    single teachers of one recipe spread over several points of mAP, and their mean ranks above
    all of them (docs/training.md). Distilling from the mean gives the students one steadier
    target. Same contract as one teacher: the indexed tensor holds the members' indexed tensors
    side by side on the last axis (``members * dims`` values a region).
    """

    def __init__(self, members: int = 2, dims: int = 512) -> None:
        super().__init__()
        if members < 1:
            raise InvalidInputError(f"a teacher ensemble needs at least one member, got {members}")
        self.dims = dims
        self.members = nn.ModuleList(ViSiLTeacher(dims) for _ in range(members))

    @classmethod
    def of(cls, teachers: Sequence[ViSiLTeacher]) -> TeacherEnsemble:
        """The ensemble of trained ``teachers`` (their weights are copied)."""
        dims = {t.dims for t in teachers}
        if len(dims) != 1:
            raise InvalidInputError(f"ensemble members must share their feature size, got {sorted(dims)}")
        ensemble = cls(len(teachers), dims.pop())
        for member, teacher in zip(ensemble.members, teachers, strict=True):
            member.load_state_dict(teacher.state_dict())
        return ensemble.eval()

    def config(self) -> dict[str, Any]:
        return {"members": len(self.members), "dims": self.dims}

    @property
    def index_dims(self) -> int:
        return self.dims * len(self.members)

    @property
    def output_dim(self) -> int:
        return self.index_dims

    def index_video(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Region features ``[T, R, dims]`` or ``[B, T, R, dims]`` -> ``[..., members * dims]``."""
        return torch.cat([m.index_video(x, mask) for m in self.members], dim=-1)

    def index_packed(self, x: Tensor, lengths: Tensor) -> Tensor:
        return torch.cat([m.index_packed(x, lengths) for m in self.members], dim=-1)

    def calculate_video_similarity(
        self,
        query: Tensor,
        target: Tensor,
        query_mask: Tensor | None = None,
        target_mask: Tensor | None = None,
    ) -> Tensor:
        """Mean of the members' similarities (see ``ViSiLTeacher.calculate_video_similarity``)."""
        for name, t in (("indexed query tensors", query), ("indexed target tensors", target)):
            if t.shape[-1] != self.index_dims:
                raise InvalidInputError(
                    f"expected {name} with {self.index_dims} values a region "
                    f"({len(self.members)} members x {self.dims}), got shape {list(t.shape)}"
                )
        sims = [
            m.calculate_video_similarity(q, t, query_mask, target_mask)
            for m, q, t in zip(
                self.members, query.split(self.dims, dim=-1), target.split(self.dims, dim=-1), strict=True
            )
        ]
        return torch.stack(sims).mean(dim=0)
