"""The DnS student networks: the coarse-grained student (one vector a video) and the
fine-grained students (a region tensor a video, compared by the video comparator).

Constructor options carry the release's argument names, so a release file's ``args`` maps
onto them, and the state_dict keys are the release's.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from dns_milvus.errors import InvalidInputError
from dns_milvus.models._validate import vector_batch, video_batch
from dns_milvus.models.layers import BinarizationLayer, HAttention, NetVLAD, VideoComparator
from dns_milvus.models.packed import (
    encoder_layer,
    packed_batch,
    pad_packed,
    segment_frames,
    supports_encoder_layer,
)
from dns_milvus.models.pairwise import FineSimilarityNetwork


class CoarseGrainedStudent(nn.Module):
    """Indexes a video as one L2-normalised vector; similarity is the dot product.

    Region features -> attention -> sum over regions -> L2-normalise -> transformer encoder over
    the frames (padded frames masked out of the keys) -> NetVLAD over the real frames -> L2.
    """

    def __init__(
        self,
        dims: int = 512,
        attention: bool = True,
        transformer: bool = True,
        transformer_heads: int = 8,
        transformer_feedforward_dims: int = 2048,
        transformer_layers: int = 1,
        netvlad: bool = True,
        netvlad_clusters: int = 64,
        netvlad_outdims: int | None = 1024,
    ) -> None:
        super().__init__()
        self.dims = dims
        self._config = {
            "dims": dims, "attention": attention, "transformer": transformer,
            "transformer_heads": transformer_heads,
            "transformer_feedforward_dims": transformer_feedforward_dims,
            "transformer_layers": transformer_layers, "netvlad": netvlad,
            "netvlad_clusters": netvlad_clusters, "netvlad_outdims": netvlad_outdims,
        }  # fmt: skip
        if attention:
            self.attention = HAttention(dims)
        if transformer:
            layer = nn.TransformerEncoderLayer(
                dims, transformer_heads, transformer_feedforward_dims, batch_first=True
            )
            # Nested tensors would only skip padded frames, which the key padding mask already
            # keeps out of every real frame's output; the dense path is simpler and warns nothing.
            self.transformer = nn.TransformerEncoder(
                layer, transformer_layers, nn.LayerNorm(dims), enable_nested_tensor=False
            )
            for module in self.transformer.modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        if netvlad:
            self.netvlad = NetVLAD(dims, netvlad_clusters, outdims=netvlad_outdims)

    def config(self) -> dict[str, Any]:
        """Constructor options: ``CoarseGrainedStudent(**net.config())`` builds the same shape."""
        return dict(self._config)

    @property
    def output_dim(self) -> int:
        """Size of the video vector."""
        return self.netvlad.outdims if hasattr(self, "netvlad") else self.dims

    def _weight(self) -> Tensor:
        return next(self.parameters())

    def index_video(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Region features ``[T, R, dims]`` or ``[B, T, R, dims]`` with an optional frame mask
        -> L2-normalised video vectors ``[output_dim]`` or ``[B, output_dim]``."""
        batch = video_batch(x, mask, dim=self.dims, like=self._weight())
        frame_mask = batch.mask if batch.padded else None
        x = self._frame_vectors(batch.features)  # [B, T, D]
        if hasattr(self, "transformer"):
            x = self.transformer(x, src_key_padding_mask=None if frame_mask is None else ~frame_mask)
        return batch.unbatch(self._pool(x, frame_mask, batch.lengths))

    def index_packed(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Packed region features ``[N, R, dims]`` of videos with ``lengths`` ``[B]`` (see
        :mod:`dns_milvus.models.packed`) -> video vectors ``[B, output_dim]``, equal to
        :meth:`index_video` on the padded batch; no padded frame goes through the transformer."""
        x, lengths = packed_batch(x, lengths, dim=self.dims, like=self._weight())
        if self.training or not all(map(supports_encoder_layer, self._encoder_layers())):
            padded, mask = pad_packed(x, lengths)
            return self.index_video(padded, mask)
        x = self._frame_vectors(x)  # [N, D]
        if hasattr(self, "transformer"):
            for layer in self._encoder_layers():
                x = encoder_layer(layer, x, lengths)
            if self.transformer.norm is not None:
                x = self.transformer.norm(x)
        frames, mask = pad_packed(x, lengths)
        return self._pool(frames, mask, lengths)

    def index_segments_packed(self, x: Tensor, lengths: Tensor, segments: int) -> Tensor:
        """Video vectors of ``segments`` consecutive parts of each video of a packed batch
        (:func:`~dns_milvus.models.packed.segment_frames`) -> ``[B, segments, output_dim]``.
        A copy that fills only part of a longer video dominates one of its segments while it
        is a fraction of the whole video's vector: the selector reads them (DnS selector with
        segment match, ``SelectorNetwork(segments=S)``)."""
        x, lengths = packed_batch(x, lengths, dim=self.dims, like=self._weight())
        index, sizes = segment_frames(lengths, segments)
        return self.index_packed(x[index], sizes).reshape(len(lengths), segments, -1)

    def _encoder_layers(self) -> list[nn.Module]:
        return list(self.transformer.layers) if hasattr(self, "transformer") else []

    def _frame_vectors(self, x: Tensor) -> Tensor:
        """Region features [..., R, dims] -> L2-normalised frame vectors [..., dims]."""
        if hasattr(self, "attention"):
            x = self.attention(x)
        return F.normalize(x.sum(dim=-2), p=2, dim=-1)

    def _pool(self, x: Tensor, frame_mask: Tensor | None, lengths: Tensor) -> Tensor:
        """Frame vectors [B, T, D] (``frame_mask`` None: no padding) -> L2-normalised [B, out]."""
        if hasattr(self, "netvlad"):
            x = self.netvlad(x, frame_mask)
        else:
            if frame_mask is not None:
                x = x.masked_fill(~frame_mask.unsqueeze(-1), 0.0)
            x = x.sum(1) / lengths[:, None].to(x.dtype)
        return F.normalize(x, p=2, dim=-1)

    def calculate_video_similarity(self, query: Tensor, target: Tensor) -> Tensor:
        """Dot products of video vectors: query ``[Bq, d]`` x target ``[Bt, d]`` -> ``[Bq, Bt]``;
        an unbatched ``[d]`` side drops its axis."""
        q, q_batched = vector_batch(query, dim=self.output_dim, like=self._weight(), what="query vectors")
        t, t_batched = vector_batch(target, dim=self.output_dim, like=self._weight(), what="target vectors")
        sim = q @ t.T
        if not t_batched:
            sim = sim[:, 0]
        return sim if q_batched else sim[0]

    def forward(self, query: Tensor, target: Tensor) -> Tensor:
        """Similarity of aligned pairs of video vectors ``[N, d]`` x ``[N, d]`` -> ``[N]`` (training)."""
        q, _ = vector_batch(query, dim=self.output_dim, like=self._weight(), what="query vectors")
        t, _ = vector_batch(target, dim=self.output_dim, like=self._weight(), what="target vectors")
        if q.shape != t.shape:
            raise InvalidInputError(
                f"expected aligned pairs of vectors [N, {self.output_dim}], "
                f"got {list(q.shape)} and {list(t.shape)}"
            )
        return (q * t).sum(-1)


class FineGrainedStudent(FineSimilarityNetwork):
    """Indexes a video as a region tensor and compares two videos with the video comparator.

    Three kinds, as in the release: with ``attention`` (float region vectors weighted by
    attention), with ``binarization`` (region codes in {-1, +1} of ``bits`` bits at evaluation,
    a zero projection giving +1; their tensor dot is divided by ``bits``, so it equals
    1 - 2 hamming / bits), or plain. In training mode binarization gives the smooth surrogate.
    """

    def __init__(
        self, dims: int = 512, attention: bool = False, binarization: bool = False, bits: int = 512
    ) -> None:
        super().__init__()
        if attention and binarization:
            raise InvalidInputError("a fine-grained student has either attention or binarization, not both")
        self.dims = dims
        self.fg_type = "bin" if binarization else "att" if attention else "none"
        if binarization:
            self.binarization = BinarizationLayer(dims, bits)
        elif attention:
            self.attention = HAttention(dims)
        self.visil_head = VideoComparator()

    def config(self) -> dict[str, Any]:
        """Constructor options: ``FineGrainedStudent(**net.config())`` builds the same shape."""
        return {
            "dims": self.dims,
            "attention": self.fg_type == "att",
            "binarization": self.fg_type == "bin",
            "bits": self.binarization.bits if self.fg_type == "bin" else self.dims,
        }

    @property
    def index_dims(self) -> int:
        return self.binarization.bits if self.fg_type == "bin" else self.dims

    @property
    def output_dim(self) -> int:
        """Last dimension of an indexed tensor (bits for the binarization student)."""
        return self.index_dims

    @property
    def _f2f_scale(self) -> float:
        return 1.0 / self.binarization.bits if self.fg_type == "bin" else 1.0

    def index_packed_signs(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Binarization student: packed region features ``[N, R, dims]`` -> codes as booleans
        ``[N, R, bits]`` (True = +1), the signs of :meth:`index_packed` without float codes."""
        if self.fg_type != "bin":
            raise InvalidInputError(f"only a binarization student has binary codes, not {self.fg_type!r}")
        x, _ = packed_batch(x, lengths, dim=self.dims, like=self.visil_head.conv1.weight)
        return self.binarization.signs(x)

    def _index(self, x: Tensor) -> Tensor:
        if self.fg_type == "bin":
            return self.binarization(x)
        if self.fg_type == "att":
            return self.attention(x)
        return x
