"""Multi-block region pooling: the DnS release's region vectors from a backbone's block outputs.

For each block output ``[N, C_i, H_i, W_i]``:

1. max-pool with kernel ``k_i`` and stride ``ceil(k_i / 2)`` (half-overlapping regions),
2. L2-normalise over channels,

then every block is brought to the last block's grid by adaptive max-pooling and
L2-normalised again; the blocks are concatenated over channels and each region vector is
L2-normalised. Output: ``[N, R, sum(C_i)]`` with ``R = grid_h * grid_w`` in row-major order
(9 regions for the release's ResNet-50 kernels 28/14/6/3 at 224x224 input).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dns_milvus.errors import InvalidInputError


def region_pool(feature_maps: Sequence[torch.Tensor], kernels: Sequence[int]) -> torch.Tensor:
    """Pool block outputs ``[N, C_i, H_i, W_i]`` into L2-normalised region vectors ``[N, R, sum(C_i)]``.

    A kernel larger than its map (inputs smaller than the backbone's default size) is reduced
    to the map's size instead of failing.
    """
    if len(feature_maps) == 0 or len(feature_maps) != len(kernels):
        raise InvalidInputError(
            f"region_pool needs one kernel per feature map, got {len(feature_maps)} maps and "
            f"{len(kernels)} kernels"
        )
    pooled = []
    for index, (fmap, kernel) in enumerate(zip(feature_maps, kernels, strict=True)):
        if fmap.ndim != 4 or fmap.shape[0] != feature_maps[0].shape[0]:
            raise InvalidInputError(
                f"feature map {index} must be [N, C, H, W] with the batch size of map 0, "
                f"got {tuple(fmap.shape)}"
            )
        size = (min(kernel, fmap.shape[2]), min(kernel, fmap.shape[3]))
        stride = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
        pooled.append(F.normalize(F.max_pool2d(fmap, size, stride), p=2, dim=1))
    grid = pooled[-1].shape[2:]
    regions = torch.cat([F.normalize(F.adaptive_max_pool2d(p, grid), p=2, dim=1) for p in pooled], dim=1)
    regions = regions.flatten(2).transpose(1, 2)  # [N, R, C], regions in row-major grid order
    return F.normalize(regions, p=2, dim=-1)


class RegionPooling(nn.Module):
    """``region_pool`` with fixed per-block kernels, as a module."""

    def __init__(self, kernels: Sequence[int]) -> None:
        super().__init__()
        if not kernels or any(int(k) < 1 for k in kernels):
            raise InvalidInputError(f"region pooling kernels must be positive integers, got {list(kernels)}")
        self.kernels = tuple(int(k) for k in kernels)

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return region_pool(feature_maps, self.kernels)

    def extra_repr(self) -> str:
        return f"kernels={self.kernels}"
