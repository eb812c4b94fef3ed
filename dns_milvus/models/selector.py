"""The DnS selector network: decides which query-target pairs the fine-grained student
re-ranks, from each video's self-similarity and the pair's coarse similarity (Kordopatis-Zilos
et al., "DnS: Distill-and-Select for Efficient and Accurate Video Indexing and Retrieval", IJCV
2022, section 4.3).

``segments=S`` adds a fourth input, the segment match (``dns_milvus.scoring.segment_matches``):
how well the query's coarse vector agrees with the best of the target's S segment codes. The
three release inputs cannot tell a target that hides a copy in one part of a longer video from
an unrelated one with the same coarse score; the segment match can, for 128 bytes a segment.
Release checkpoints (three inputs) load and run unchanged."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dns_milvus.errors import InvalidInputError
from dns_milvus.models._validate import selector_input, video_batch
from dns_milvus.models.layers import HAttention, VideoComparator, masked_mean
from dns_milvus.models.packed import length_groups, packed_batch, pad_packed
from dns_milvus.scoring import check_segment_input

#: Videos a comparator call when computing self-similarities (grouped by length).
COMPARATOR_GROUP = 8


class SelectorMLP(nn.Module):
    """[N, 3] -> [N, 1] confidence: (Linear without bias, BatchNorm, ReLU, Dropout) x
    (1 + num_layers), then Linear and Sigmoid. Indices in ``model`` are the release's."""

    def __init__(self, input_size: int = 3, hidden_size: int = 100, num_layers: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_size
        for _ in range(1 + num_layers):
            layers += [
                nn.Linear(width, hidden_size, bias=False),
                nn.BatchNorm1d(hidden_size),
                nn.ReLU(),
                nn.Dropout(0.5),
            ]
            width = hidden_size
        layers += [nn.Linear(hidden_size, 1), nn.Sigmoid()]
        self.model = nn.Sequential(*layers)
        for module in self.model:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)

    def forward(self, z: Tensor) -> Tensor:
        return self.model(z)


class SelectorNetwork(nn.Module):
    """Self-similarity of a video (``index_video``) and the re-ranking confidence of a pair
    (``forward``).

    Self-similarity: attention on region vectors, the video's frame-to-frame matrix with itself
    averaged over both region axes, the video comparator, and the mean of its output over the
    real cells (no Hardtanh). Confidence input order: [self_sim(query), self_sim(target),
    coarse_similarity].
    """

    def __init__(
        self, dims: int = 512, hidden_size: int = 100, num_layers: int = 1, segments: int = 0
    ) -> None:
        super().__init__()
        if segments < 0:
            raise InvalidInputError(f"segments must be >= 0 (0: the release's three inputs), got {segments}")
        self.dims = dims
        self.segments = segments
        self.attention = HAttention(dims)
        self.visil_head = VideoComparator()
        self.mlp = SelectorMLP(self.input_size, hidden_size, num_layers)
        self._config = {
            "dims": dims,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "segments": segments,
        }

    @property
    def input_size(self) -> int:
        """3 (the release's inputs), or 4 with the segment match."""
        return 4 if self.segments else 3

    def config(self) -> dict[str, Any]:
        """Constructor options: ``SelectorNetwork(**net.config())`` builds the same shape."""
        return dict(self._config)

    def index_video(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Region features ``[T, R, dims]`` or ``[B, T, R, dims]`` with an optional frame mask
        -> self-similarity, a scalar or ``[B]``."""
        batch = video_batch(x, mask, dim=self.dims, like=self.visil_head.conv1.weight)
        # The mean over both region axes of the region dot products is the dot product of the
        # region means: one [T, D] x [D, T] product instead of a [T, R, R, T] tensor.
        frames = self.attention(batch.features).mean(dim=2)
        frames = frames.masked_fill(~batch.mask.unsqueeze(-1), 0.0)
        return batch.unbatch(self._self_similarity(frames, batch.lengths))

    def index_packed(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Packed region features ``[N, R, dims]`` of videos with ``lengths`` ``[B]`` (see
        :mod:`dns_milvus.models.packed`) -> self-similarities ``[B]``, equal to
        :meth:`index_video` on the padded batch; the attention sees no padded frame."""
        x, lengths = packed_batch(x, lengths, dim=self.dims, like=self.visil_head.conv1.weight)
        frames, _ = pad_packed(self.attention(x).mean(dim=1), lengths)  # zero-padded [B, T, D]
        return self._self_similarity(frames, lengths)

    def _self_similarity(self, frames: Tensor, lengths: Tensor) -> Tensor:
        """Zero-padded frame vectors [B, T, D] -> [B]. The comparator's cost grows with the square
        of the padded length, so videos go through it in groups of similar length."""
        out = torch.empty(len(lengths), dtype=frames.dtype, device=frames.device)
        for group in length_groups(lengths, COMPARATOR_GROUP):
            n = lengths[group]
            longest = int(n.max())
            part = frames[group, :longest]
            sim = torch.bmm(part, part.transpose(1, 2))
            out[group] = masked_mean(*self.visil_head.compare(sim, n, n))
        return out

    def pair_confidence(
        self,
        query_self: Tensor | float,
        target_self: Tensor,
        coarse: Tensor,
        segment_match: Tensor | None = None,
    ) -> Tensor:
        """Confidences ``[N]`` of pairs from the query's self-similarity (one value, or one a pair),
        the targets' ``[N]``, the pairs' coarse similarities ``[N]`` and, for a selector with
        ``segments``, their segment matches ``[N]``: the one place that lays out the selector's
        input, in the order the release trained it with (the segment match last)."""
        check_segment_input(self.segments, segment_match is not None)
        like = self.visil_head.conv1.weight
        target_self = torch.as_tensor(target_self).to(like.device, like.dtype)
        query_self = torch.as_tensor(query_self).to(like.device, like.dtype).expand_as(target_self)
        columns = [query_self, target_self, torch.as_tensor(coarse).to(target_self)]
        if segment_match is not None:
            columns.append(torch.as_tensor(segment_match).to(target_self))
        return self(torch.stack(columns, dim=-1))

    def forward(self, z: Tensor) -> Tensor:
        """Selector inputs ``[N, 3]`` (or ``[3]``; 4 with ``segments``) -> confidence that the
        fine-grained student changes the pair's score, ``[N]`` (or a scalar) in (0, 1)."""
        z, batched = selector_input(z, self.input_size, like=self.visil_head.conv1.weight)
        out = self.mlp(z).squeeze(-1)
        return out if batched else out[0]
