"""Building blocks of the DnS networks.

Parameter names and shapes follow the public DnS release so that its checkpoints load as they
are (``attention.transform``, ``binarization.W``, ``netvlad.*``, ``visil_head.conv1`` ...).
Everything here is device-agnostic and works on padded batches described by per-item lengths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dns_milvus.models._validate import frame_matrix_batch

#: The comparator pools the time axes twice; shorter videos are up-sampled to this many frames.
MIN_COMPARATOR_FRAMES = 4


class HAttention(nn.Module):
    """Attention of the students and the selector: ``x * sigmoid(u . tanh(W x + b))``, one weight
    a region vector."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.transform = nn.Linear(dims, dims)
        self.context_vector = nn.Linear(dims, 1, bias=False)
        nn.init.xavier_uniform_(self.transform.weight)
        nn.init.zeros_(self.transform.bias)
        nn.init.xavier_uniform_(self.context_vector.weight)

    def weights(self, x: Tensor) -> Tensor:
        """Attention weights ``[..., 1]`` in (0, 1)."""
        return torch.sigmoid(self.context_vector(torch.tanh(self.transform(x))))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights(x)


class L2Attention(nn.Module):
    """Attention of the ViSiL teacher: ``x * (u . x / 2 + 1/2)`` with a unit-length context vector,
    so L2-normalised inputs get weights in [0, 1].

    The context vector is normalised in the forward pass rather than after each optimiser step:
    a stored unit vector gives the same result, and training needs no constraint hook.
    """

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.context_vector = nn.Linear(dims, 1, bias=False)
        if not self.context_vector.weight.is_meta:  # a random start (see NetVLAD)
            nn.init.normal_(self.context_vector.weight)
            with torch.no_grad():
                self.context_vector.weight.copy_(F.normalize(self.context_vector.weight, dim=-1))

    def weights(self, x: Tensor) -> Tensor:
        """Attention weights ``[..., 1]``."""
        return F.linear(x, F.normalize(self.context_vector.weight, dim=-1)) / 2.0 + 0.5

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights(x)


class BinarizationLayer(nn.Module):
    """Projects L2-normalised region vectors with ``W`` [dims, bits] and binarises them.

    Training uses the smooth surrogate ``erf(x / sqrt(2 sigma))``; evaluation gives codes in
    {-1, +1}. A projection of exactly 0 maps to +1 (bit 1): every code must be packable to one
    bit, so a third value is never produced.
    """

    def __init__(self, dims: int, bits: int | None = None, sigma: float = 1e-6) -> None:
        super().__init__()
        self.sigma = sigma
        self.W = nn.Parameter(torch.empty(dims, bits if bits is not None else dims))
        nn.init.orthogonal_(self.W)  # a rotation-like start, as ITQ would give

    @property
    def bits(self) -> int:
        return int(self.W.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return torch.erf(self._project(x) / math.sqrt(2.0 * self.sigma))
        return self.signs(x).to(self.W.dtype).mul_(2.0).sub_(1.0)  # {-1, +1}

    def signs(self, x: Tensor) -> Tensor:
        """The evaluation codes as booleans (True = +1): what packing needs, a quarter of the
        memory of the float codes."""
        return self._project(x) >= 0

    def _project(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2, dim=-1) @ self.W

    def extra_repr(self) -> str:
        return f"dims={self.W.shape[0]}, bits={self.W.shape[1]}, sigma={self.sigma}"


class NetVLAD(nn.Module):
    """NetVLAD pooling of frame vectors: soft-assignment by a 1x1 convolution, residuals to
    the centroids summed over real frames, intra- and L2-normalisation, an optional linear
    reduction without bias, and a LayerNorm.
    """

    def __init__(self, dims: int, num_clusters: int, outdims: int | None = None) -> None:
        super().__init__()
        self.dims = dims
        self.num_clusters = num_clusters
        self.centroids = nn.Parameter(torch.empty(num_clusters, dims))
        # A network built on the meta device receives a checkpoint's weights: it skips the random
        # starts, whose meta kernels (randn, normal_, normalize ...) are torch's Python references,
        # and their first call imports torch's compiler stack and sympy (~1 s).
        starts = not self.centroids.is_meta
        if starts:
            with torch.no_grad():  # the draws of torch.randn(...) / sqrt(dims)
                self.centroids.normal_().div_(math.sqrt(dims))
        self.conv = nn.Conv2d(dims, num_clusters, kernel_size=1, bias=False)
        with torch.no_grad():  # start with assignments by similarity to the centroids
            self.conv.weight.copy_(self.centroids[:, :, None, None])
        vlad_dims = num_clusters * dims
        if outdims is not None:
            self.reduction_layer = nn.Linear(vlad_dims, outdims, bias=False)
            if starts:
                nn.init.normal_(self.reduction_layer.weight, std=1.0 / math.sqrt(vlad_dims))
        self.outdims = outdims if outdims is not None else vlad_dims
        self.norm = nn.LayerNorm(self.outdims)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x`` [B, T, D] frame vectors, ``mask`` [B, T] (True = real) -> [B, outdims]."""
        # The 1x1 convolution is a linear map of each frame vector; applying it as one is faster.
        assignment = torch.softmax(F.linear(x, self.conv.weight.flatten(1)), dim=-1)  # [B, T, K]
        if mask is not None:
            assignment = assignment * mask.unsqueeze(-1).to(assignment.dtype)
        # sum_t a_tk (x_t - c_k) = (A^T X)_k - c_k sum_t a_tk: all clusters at once.
        vlad = assignment.transpose(1, 2) @ x - self.centroids * assignment.sum(1).unsqueeze(-1)
        vlad = F.normalize(vlad, p=2, dim=2).flatten(1)
        vlad = F.normalize(vlad, p=2, dim=1)
        if hasattr(self, "reduction_layer"):
            vlad = self.reduction_layer(vlad)
        return self.norm(vlad)


def _outside(x: Tensor, query_lengths: Tensor, target_lengths: Tensor) -> Tensor | None:
    """Mask [N, 1, H, W] of the cells of ``x`` [N, C, H, W] outside each item's ``[:Hq, :Wt]``
    block, or None when every item fills the whole map."""
    height, width = x.shape[-2], x.shape[-1]
    if bool((query_lengths >= height).all() & (target_lengths >= width).all()):
        return None
    rows = torch.arange(height, device=x.device)[None, :] < query_lengths[:, None]
    cols = torch.arange(width, device=x.device)[None, :] < target_lengths[:, None]
    return ~(rows[:, None, :, None] & cols[:, None, None, :])


def _zero_outside(x: Tensor, query_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """Zero the cells of ``x`` [N, C, H, W] outside each item's ``[:Hq, :Wt]`` block (a new tensor)."""
    outside = _outside(x, query_lengths, target_lengths)
    return x if outside is None else x.masked_fill(outside, 0.0)


def _zero_outside_(x: Tensor, query_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """:func:`_zero_outside` in place, for intermediates no one else holds (saves a full copy)."""
    outside = _outside(x, query_lengths, target_lengths)
    return x if outside is None else x.masked_fill_(outside, 0.0)


def _rectify_inside_(x: Tensor, query_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """Zero the cells outside each item's block, then ReLU, both in place."""
    return F.relu(_zero_outside_(x, query_lengths, target_lengths), inplace=True)


def _repeat_factor(lengths: Tensor) -> Tensor:
    """How many times each frame is repeated: ceil(4 / length) below 4 frames, else 1."""
    ceil_ratio = (MIN_COMPARATOR_FRAMES + lengths - 1) // lengths.clamp(min=1)
    return torch.where(lengths < MIN_COMPARATOR_FRAMES, ceil_ratio, 1)


def _repeat_short_axis(sim: Tensor, lengths: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """Repeat each of the first ``lengths`` rows (axis 1) or columns (axis 2) ceil(4 / length)
    times for items shorter than 4; other items are left as they are."""
    factor = _repeat_factor(lengths)
    new_lengths = lengths * factor
    size = max(sim.shape[axis], int(new_lengths.max()))
    source = torch.arange(size, device=sim.device)[None, :] // factor[:, None]
    source = source.clamp(max=sim.shape[axis] - 1)  # cells past the length are zeroed later
    if axis == 1:
        index = source[:, :, None].expand(-1, -1, sim.shape[2])
    else:
        index = source[:, None, :].expand(-1, sim.shape[1], -1)
    return torch.gather(sim, axis, index), new_lengths


def upsample_short_videos(
    sim: Tensor, query_lengths: Tensor, target_lengths: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest-neighbour temporal up-sampling of frame-to-frame matrices ``[N, Tq, Tt]`` whose
    query or target has fewer than 4 frames: each frame is repeated ceil(4 / length) times
    (1 -> 4, 2 -> 4, 3 -> 6 frames), which is what a slowed-down copy of the video would give.
    """
    if bool((query_lengths >= MIN_COMPARATOR_FRAMES).all() & (target_lengths >= MIN_COMPARATOR_FRAMES).all()):
        return sim, query_lengths, target_lengths
    sim, query_lengths = _repeat_short_axis(sim, query_lengths, 1)
    sim, target_lengths = _repeat_short_axis(sim, target_lengths, 2)
    return sim, query_lengths, target_lengths


class VideoComparator(nn.Module):
    """The ViSiL video comparator CNN over frame-to-frame similarity matrices.

    conv3x3(1->32) -> ReLU -> maxpool 2x2 -> conv3x3(32->64) -> ReLU -> maxpool 2x2 ->
    conv3x3(64->128) -> ReLU -> conv1x1(128->1), every 3x3 convolution with one cell of zero
    padding.

    Batch invariance: each item's real block is ``query_lengths[i] x target_lengths[i]``. Every
    cell outside it is zeroed before a convolution can read it (on the input and after each
    pooling), and each pooling halves the lengths with floor, so a pooled cell is computed only
    from real cells. An item's output is therefore the same inside any padded batch as alone,
    where the borders are the convolutions' own zero padding. Output cells outside the output
    lengths are zero.

    Short videos: the comparator pools each time axis twice, so an axis with fewer than 4 real
    frames is first up-sampled by repeating each frame ceil(4 / length) times (1 -> 4, 2 -> 4,
    3 -> 6 frames); see :func:`upsample_short_videos`. The returned lengths account for it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fconv = nn.Conv2d(128, 1, 1)
        for conv in (self.conv1, self.conv2, self.conv3, self.fconv):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        """Lengths of the output axis for input lengths (after up-sampling and two poolings)."""
        return (lengths * _repeat_factor(lengths)) // 4

    def forward(
        self, sim: Tensor, query_lengths: Tensor | None = None, target_lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``sim`` [N, Tq, Tt] with real sizes ``query_lengths``/``target_lengths`` [N] (whole axes
        when omitted) -> (output map [N, Tq', Tt'], its query lengths [N], its target lengths [N])."""
        sim, query_lengths, target_lengths = frame_matrix_batch(
            sim, query_lengths, target_lengths, like=self.conv1.weight
        )
        return self.compare(sim, query_lengths, target_lengths)

    def first_block(self, sim: Tensor, query_lengths: Tensor, target_lengths: Tensor) -> Tensor:
        """The first layer on ``sim`` [N, Tq, Tt] (lengths of at least 4): conv1 over the real
        cells, 2x2 max-pool, then zero outside the halved lengths and ReLU -> [N, 32, Tq/2, Tt/2].

        One step, so that an inference kernel can replace it with a fused loop that never writes
        conv1's full-resolution output (``dns_milvus.similarity`` does on CPU).
        """
        x = _zero_outside(sim.unsqueeze(1), query_lengths, target_lengths)  # the caller's tensor is kept
        # ReLU is monotonic, so pooling first and rectifying the pooled map equals pooling the
        # rectified one, on a quarter of the cells. Intermediates are zeroed and rectified in
        # place (no copies of the largest tensors); autograd needs none of the overwritten values.
        x = F.max_pool2d(self.conv1(x), 2)
        return _rectify_inside_(x, query_lengths // 2, target_lengths // 2)

    def compare(
        self, sim: Tensor, query_lengths: Tensor, target_lengths: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` without input validation, for callers that built the inputs themselves."""
        sim, ql, tl = upsample_short_videos(sim, query_lengths, target_lengths)
        x = self.first_block(sim, ql, tl)
        ql, tl = ql // 2, tl // 2
        x = F.max_pool2d(self.conv2(x), 2)
        ql, tl = ql // 2, tl // 2
        x = F.relu(self.conv3(_rectify_inside_(x, ql, tl)), inplace=True)
        x = _zero_outside_(self.fconv(x), ql, tl)
        return x.squeeze(1), ql, tl


def region_chamfer(scores: Tensor) -> Tensor:
    """Chamfer similarity over regions: ``[..., Tq, Rq, Tt, Rt]`` -> ``[..., Tq, Tt]`` (max over
    target regions, mean over query regions)."""
    return scores.amax(dim=-1).mean(dim=-2)


def frame_chamfer(sim: Tensor, query_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """Chamfer similarity over the frame axes of ``[N, Hq, Ht]``, restricted to each item's real
    block: max over real target frames, mean over real query frames -> [N]."""
    cols = torch.arange(sim.shape[2], device=sim.device)[None, :] < target_lengths[:, None]
    best = sim.masked_fill(~cols[:, None, :], float("-inf")).amax(dim=2)
    rows = torch.arange(sim.shape[1], device=sim.device)[None, :] < query_lengths[:, None]
    return best.masked_fill(~rows, 0.0).sum(dim=1) / query_lengths.to(sim.dtype)


def masked_mean(sim: Tensor, query_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """Mean of each item's real block of ``[N, Hq, Ht]`` (cells outside it must be zero) -> [N]."""
    return sim.sum(dim=(1, 2)) / (query_lengths * target_lengths).to(sim.dtype)
