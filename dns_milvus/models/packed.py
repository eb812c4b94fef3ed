"""Packed batches: videos of different lengths concatenated along the frame axis.

A packed batch is region features ``[N, R, D]`` (N = the sum of the lengths) with the videos'
lengths ``[B]``. Per-region and per-frame layers (attention, projections, the transformer's
linear layers and norms, binarization) run on it with no padding at all; only the steps that
mix the frames of one video (self-attention, NetVLAD's sums, frame-to-frame matrices and the
video comparator) see a padded view, and they are a small part of the work. ``index_packed``
of each network gives the same result as its ``index_video`` on a padded batch, to float
rounding: the networks are batch-invariant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dns_milvus.errors import InvalidInputError
from dns_milvus.models._validate import _as_tensor, _to_float, shape_str


def packed_batch(
    x: object, lengths: object, *, dim: int, like: Tensor, what: str = "region features"
) -> tuple[Tensor, Tensor]:
    """Validate packed region features ``[N, R, dim]`` and lengths ``[B]`` (integers >= 1 summing
    to N); returns them in the network's dtype and device (lengths as int64)."""
    expected = f"[N, R, {dim}] (videos concatenated along frames)"
    x = _as_tensor(x, what, expected)
    if x.ndim != 3 or x.shape[-1] != dim or x.shape[0] == 0 or x.shape[1] == 0:
        raise InvalidInputError(f"expected packed {what} {expected} with N, R >= 1, got {shape_str(x.shape)}")
    x = _to_float(x, like, what, expected)
    n = _as_tensor(lengths, "video lengths", "[B]")
    if n.ndim != 1 or n.numel() == 0 or n.is_floating_point() or n.is_complex() or n.dtype == torch.bool:
        raise InvalidInputError(
            f"expected video lengths [B] of integers >= 1, got {shape_str(n.shape)} of {n.dtype}"
        )
    n = n.to(device=x.device, dtype=torch.long)
    if not bool((n >= 1).all()) or int(n.sum()) != x.shape[0]:
        raise InvalidInputError(
            f"expected video lengths >= 1 summing to the {x.shape[0]} packed frames, got {n.tolist()}"
        )
    return x, n


def pad_packed(x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, ...]`` packed -> (``[B, T_max, ...]`` zero-padded, frame mask ``[B, T_max]``)."""
    padded = nn.utils.rnn.pad_sequence(list(torch.split(x, lengths.tolist())), batch_first=True)
    mask = torch.arange(padded.shape[1], device=x.device)[None, :] < lengths[:, None]
    return padded, mask


def segment_frames(lengths: Tensor, segments: int) -> tuple[Tensor, Tensor]:
    """Each video of a packed batch cut into ``segments`` consecutive, near-equal parts of its
    frames: (packed frame indices of every segment, in video then segment order; their lengths
    ``[B * segments]``). Segment ``a`` of a T-frame video holds frames ``[a*T//S, (a+1)*T//S)``;
    a video shorter than ``segments`` repeats frames, so every segment holds at least one."""
    if segments < 1:
        raise InvalidInputError(f"segments must be >= 1, got {segments}")
    starts = torch.cumsum(lengths, 0) - lengths
    index, sizes = [], []
    for first, n in zip(starts.tolist(), lengths.tolist()):
        for a in range(segments):
            lo = a * n // segments
            hi = max((a + 1) * n // segments, lo + 1)
            index.append(torch.arange(first + lo, first + hi))
            sizes.append(hi - lo)
    return torch.cat(index).to(lengths.device), torch.tensor(sizes, device=lengths.device)


def length_groups(lengths: Tensor, size: int) -> list[Tensor]:
    """Indices of the videos sorted by length, cut into groups of ``size``: a group padded to its
    own longest video wastes little on the quadratic frame-to-frame steps."""
    order = torch.argsort(lengths, stable=True)
    return list(torch.split(order, size))


def encoder_layer(layer: nn.TransformerEncoderLayer, x: Tensor, lengths: Tensor) -> Tensor:
    """One ``nn.TransformerEncoderLayer`` (inference: no dropout) over packed frame vectors
    ``[N, D]``, each video attending to its own frames only (pre- or post-norm as configured)."""
    if layer.norm_first:
        x = x + _self_attention(layer.self_attn, layer.norm1(x), lengths)
        return x + _feed_forward(layer, layer.norm2(x))
    x = layer.norm1(x + _self_attention(layer.self_attn, x, lengths))
    return layer.norm2(x + _feed_forward(layer, x))


def supports_encoder_layer(layer: nn.Module) -> bool:
    """Whether :func:`encoder_layer` computes exactly what ``layer`` does in eval mode."""
    if not isinstance(layer, nn.TransformerEncoderLayer):
        return False
    attn = layer.self_attn
    return bool(
        attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
    )


def _feed_forward(layer: nn.TransformerEncoderLayer, x: Tensor) -> Tensor:
    return layer.linear2(layer.activation(layer.linear1(x)))


def _self_attention(attn: nn.MultiheadAttention, x: Tensor, lengths: Tensor) -> Tensor:
    """Multi-head self-attention of packed ``[N, D]``: the projections run packed, the attention
    itself on a padded ``[B, heads, T_max, D / heads]`` view with padded keys masked out."""
    qkv, mask = pad_packed(F.linear(x, attn.in_proj_weight, attn.in_proj_bias), lengths)
    b, t, _ = qkv.shape
    heads = attn.num_heads
    q, k, v = qkv.view(b, t, 3, heads, attn.embed_dim // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, attn.embed_dim)[mask])
