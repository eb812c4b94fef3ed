"""Multi-block region pooling: the DnS release's region vectors from a backbone's block outputs.

For each block output ``[N, C_i, H_i, W_i]``:

1. max-pool with kernel ``k_i`` and stride ``ceil(k_i / 2)`` (half-overlapping regions),
2. L2-normalise over channels,

then every block is brought to a common grid by adaptive max-pooling and L2-normalised again;
the blocks are concatenated over channels and each region vector is L2-normalised. Output:
``[N, R, sum(C_i)]`` with the regions in row-major grid order.

The release hard-codes ResNet-50's kernels 28/14/6/3 for its 56/28/14/7-pixel blocks at 224x224
input. Those are exactly the largest kernels whose windows still give a 3x3 grid
(``region_kernel``), so by default the kernels are derived from each block's size with that
rule: the release's numbers at 224 for ResNet-50 (and EfficientNet-Lite0, whose blocks have the
same sizes), and a 3x3 grid, i.e. 9 regions, for any backbone and input size. Where no kernel
gives exactly 3 windows (a 10-pixel side gives 4 or 2) or the block is smaller than the grid,
the adaptive max-pooling step takes it to 3x3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dns_milvus.errors import InvalidInputError

#: Regions per side: 3x3 = 9 regions a frame, as in the release.
DEFAULT_GRID = 3


def region_kernel(size: int, grid: int = DEFAULT_GRID) -> int:
    """The largest max-pool kernel ``k`` (stride ``ceil(k/2)``) giving at least ``grid`` windows on ``size``.

    Gives the release's ResNet-50 kernels at 224 input: 56 -> 28, 28 -> 14, 14 -> 6, 7 -> 3.
    Returns 1 when ``size < grid``.
    """
    for kernel in range(size, 1, -1):
        if (size - kernel) // math.ceil(kernel / 2) + 1 >= grid:
            return kernel
    return 1


def region_pool(
    feature_maps: Sequence[torch.Tensor], kernels: Sequence[int] | None = None, grid: int = DEFAULT_GRID
) -> torch.Tensor:
    """Pool block outputs ``[N, C_i, H_i, W_i]`` into L2-normalised region vectors ``[N, R, sum(C_i)]``.

    ``kernels=None`` (default) derives each block's kernel with ``region_kernel`` and returns
    ``grid x grid`` regions. Explicit ``kernels`` reproduce the release literally: fixed kernels
    (reduced to the map's size when larger), every block resized to the last block's grid.
    """
    if not feature_maps or (kernels is not None and len(feature_maps) != len(kernels)):
        raise InvalidInputError(
            f"region_pool needs one kernel per feature map, got {len(feature_maps)} maps and "
            f"{len(kernels) if kernels is not None else 'derived'} kernels"
        )
    pooled = []
    for index, fmap in enumerate(feature_maps):
        if fmap.ndim != 4 or fmap.shape[0] != feature_maps[0].shape[0]:
            raise InvalidInputError(
                f"feature map {index} must be [N, C, H, W] with the batch size of map 0, "
                f"got {tuple(fmap.shape)}"
            )
        height, width = fmap.shape[2:]
        if kernels is None:
            size = (region_kernel(height, grid), region_kernel(width, grid))
        else:
            size = (min(kernels[index], height), min(kernels[index], width))
        stride = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
        pooled.append(F.normalize(F.max_pool2d(fmap, size, stride), p=2, dim=1))
    target = (grid, grid) if kernels is None else tuple(pooled[-1].shape[2:])
    regions = torch.cat([F.normalize(F.adaptive_max_pool2d(p, target), p=2, dim=1) for p in pooled], dim=1)
    regions = regions.flatten(2).transpose(1, 2)  # [N, R, C], regions in row-major grid order
    return F.normalize(regions, p=2, dim=-1)


class RegionPooling(nn.Module):
    """``region_pool`` as a module: derived kernels and a ``grid x grid`` output, or fixed ``kernels``."""

    def __init__(self, kernels: Sequence[int] | None = None, grid: int = DEFAULT_GRID) -> None:
        super().__init__()
        if kernels is not None and (not kernels or any(int(k) < 1 for k in kernels)):
            raise InvalidInputError(f"region pooling kernels must be positive integers, got {list(kernels)}")
        if grid < 1:
            raise InvalidInputError(f"region grid must be at least 1x1, got {grid}")
        self.kernels = tuple(int(k) for k in kernels) if kernels is not None else None
        self.grid = grid

    def forward(self, feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        return region_pool(feature_maps, self.kernels, self.grid)

    def extra_repr(self) -> str:
        return f"kernels={self.kernels or 'derived'}, grid={self.grid}"
