"""Input checks shared by every network.

Each check turns a bad tensor into an ``InvalidInputError`` whose message names the expected
shape, and hands back the tensor in the network's dtype and device with the batch axis made
explicit, so the networks themselves only ever see well-formed batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dns_milvus.errors import InvalidInputError


def shape_str(shape: Sequence[int]) -> str:
    """A shape written the way the error messages write it: ``[3, 9, 512]``."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _as_tensor(x: object, what: str, expected: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(
            f"expected {what} {expected} as a tensor or array, got {type(x).__name__}"
        ) from exc


def _to_float(x: Tensor, like: Tensor, what: str, expected: str) -> Tensor:
    if x.is_complex() or x.dtype == torch.bool:
        raise InvalidInputError(f"expected real-valued {what} {expected}, got dtype {x.dtype}")
    x = x.to(device=like.device, dtype=like.dtype)
    # A finite sum proves every value finite (inf and NaN propagate) in one cheap pass; only
    # an overflowing sum needs the element-wise check.
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise InvalidInputError(
            f"{what} {shape_str(x.shape)} contain NaN or Inf values; expected finite {expected}"
        )
    return x


@dataclass
class VideoBatch:
    """A validated batch of videos.

    ``features`` is ``[B, T, R, C]``; ``mask`` ``[B, T]`` (True = real frame) always marks a
    prefix of real frames, whose sizes are ``lengths``. ``batched`` says whether the caller gave a
    batch axis, so that outputs can drop it again for an unbatched input.
    """

    features: Tensor
    mask: Tensor
    lengths: Tensor
    batched: bool

    @property
    def padded(self) -> bool:
        """Whether any video is shorter than the padded frame axis."""
        return bool((self.lengths < self.features.shape[1]).any())

    def unbatch(self, out: Tensor) -> Tensor:
        """Drop the batch axis of a per-video output when the input had none."""
        return out if self.batched else out[0]


def video_batch(
    x: object,
    mask: object | None,
    *,
    dim: int,
    like: Tensor,
    what: str = "region features",
) -> VideoBatch:
    """Validate region features ``[T, R, dim]`` or ``[B, T, R, dim]`` and an optional frame mask.

    The mask is ``[T]`` or ``[B, T]``, bool or 0/1, and must mark a prefix of real frames
    (padding at the end, as every batch here is built) with at least one real frame a video.
    """
    expected = f"[T, R, {dim}] or [B, T, R, {dim}]"
    x = _as_tensor(x, what, expected)
    if x.ndim not in (3, 4) or x.shape[-1] != dim:
        raise InvalidInputError(f"expected {what} {expected}, got {shape_str(x.shape)}")
    batched = x.ndim == 4
    if not batched:
        x = x.unsqueeze(0)
    b, t, r, _ = x.shape
    if b == 0 or t == 0 or r == 0:
        raise InvalidInputError(
            f"expected {what} {expected} with B, T, R >= 1 (at least one frame), got {shape_str(x.shape)}"
        )
    x = _to_float(x, like, what, expected)

    if mask is None:
        lengths = torch.full((b,), t, dtype=torch.long, device=x.device)
        frame_mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
        return VideoBatch(x, frame_mask, lengths, batched)

    mask_expected = f"{shape_str([b, t])}" if batched else f"{shape_str([t])}"
    given_shape = shape_str(x.shape if batched else x.shape[1:])
    m = _as_tensor(mask, "frame mask", mask_expected)
    if tuple(m.shape) != ((b, t) if batched else (t,)):
        raise InvalidInputError(
            f"expected a frame mask {mask_expected} (bool or 0/1) for {what} {given_shape}, "
            f"got {shape_str(m.shape)}"
        )
    m = m.to(x.device)
    if m.dtype != torch.bool:
        if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise InvalidInputError(f"expected a frame mask {mask_expected} of bool or 0/1 values")
        m = m != 0
    if not batched:
        m = m.unsqueeze(0)
    lengths = m.sum(1)
    prefix = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
    if not bool((prefix == m).all()):
        raise InvalidInputError(
            f"expected a frame mask {mask_expected} that marks a prefix of real frames (padding at the end)"
        )
    if not bool((lengths > 0).all()):
        raise InvalidInputError(
            f"expected a frame mask {mask_expected} with at least one real frame a video; "
            f"videos {torch.nonzero(lengths == 0).flatten().tolist()} have none"
        )
    return VideoBatch(x, m, lengths, batched)


def vector_batch(
    x: object, *, dim: int, like: Tensor, what: str = "coarse vectors", batch_axis: str = "B"
) -> tuple[Tensor, bool]:
    """Validate vectors ``[dim]`` or ``[B, dim]`` (B may be 0); returns ``([B, dim], batched)``."""
    expected = f"[{dim}] or [{batch_axis}, {dim}]"
    x = _as_tensor(x, what, expected)
    if x.ndim not in (1, 2) or x.shape[-1] != dim:
        raise InvalidInputError(f"expected {what} {expected}, got {shape_str(x.shape)}")
    batched = x.ndim == 2
    if not batched:
        x = x.unsqueeze(0)
    return _to_float(x, like, what, expected), batched


def _lengths(lengths: object | None, n: int, size: int, axis: str, device: torch.device) -> Tensor:
    if lengths is None:
        return torch.full((n,), size, dtype=torch.long, device=device)
    expected = f"{axis} lengths [{n}] of integers in 1..{size}"
    lengths = _as_tensor(lengths, f"{axis} lengths", f"[{n}]")
    if (
        lengths.shape != (n,)
        or lengths.is_floating_point()
        or lengths.is_complex()
        or lengths.dtype == torch.bool
    ):
        raise InvalidInputError(f"expected {expected}, got {shape_str(lengths.shape)} of {lengths.dtype}")
    lengths = lengths.to(device=device, dtype=torch.long)
    if n and not bool(((lengths >= 1) & (lengths <= size)).all()):
        raise InvalidInputError(f"expected {expected}, got {lengths.tolist()}")
    return lengths


def frame_matrix_batch(
    sim: object, query_lengths: object | None, target_lengths: object | None, *, like: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate frame-to-frame matrices ``[N, Tq, Tt]`` and their real sizes ``[N]`` each.

    Missing lengths mean the whole axis is real.
    """
    expected = "[N, Tq, Tt]"
    sim = _as_tensor(sim, "frame-to-frame similarity matrices", expected)
    if sim.ndim != 3 or sim.shape[1] == 0 or sim.shape[2] == 0:
        raise InvalidInputError(
            f"expected frame-to-frame similarity matrices {expected} with Tq, Tt >= 1, "
            f"got {shape_str(sim.shape)}"
        )
    sim = _to_float(sim, like, "frame-to-frame similarity matrices", expected)
    n, tq, tt = sim.shape
    ql = _lengths(query_lengths, n, tq, "query", sim.device)
    tl = _lengths(target_lengths, n, tt, "target", sim.device)
    return sim, ql, tl


def selector_input(z: object, size: int = 3, *, like: Tensor) -> tuple[Tensor, bool]:
    """Validate selector inputs ``[N, size]`` or ``[size]``: (self-sim query, self-sim target,
    coarse sim), then the segment match when ``size`` is 4."""
    what = "selector inputs (self_sim(query), self_sim(target), coarse_sim" + (
        ", segment_match)" if size == 4 else ")"
    )
    return vector_batch(z, dim=size, like=like, what=what, batch_axis="N")
