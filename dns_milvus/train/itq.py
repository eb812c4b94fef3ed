"""Iterative quantisation (ITQ, Gong & Lazebnik): the initial projection of the binarization layer.

The binarization student encodes a region vector ``x`` as ``sign(normalize(x) @ W)``. ITQ picks
``W = V R``: ``V`` the principal directions of the (L2-normalised) region vectors, ``R`` an
orthogonal rotation that minimises the quantisation error ``||sign(X V R) - X V R||``, found by
alternating the sign assignment (R fixed) with an orthogonal Procrustes solve (codes fixed).

The result is stored in the release's ITQ file layout ``{'proj': [D, bits]}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dns_milvus.errors import CheckpointError, InvalidInputError


@dataclass
class ITQResult:
    """The learned projection and the quantisation error after each iteration (non-increasing)."""

    proj: torch.Tensor  # float32 [D, bits]
    errors: list[float]


def fit_itq(
    vectors: np.ndarray | torch.Tensor, bits: int | None = None, *, n_iter: int = 50, seed: int = 0
) -> ITQResult:
    """Learn an ITQ projection ``[D, bits]`` from region vectors ``[N, D]``.

    Vectors are L2-normalised first, as the binarization layer does. The layer has no bias, so
    the principal directions come from the uncentred second-moment matrix: the rotation then
    minimises the error of exactly the codes the layer will produce.
    """
    x = torch.as_tensor(np.asarray(vectors) if not isinstance(vectors, torch.Tensor) else vectors)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise InvalidInputError(f"ITQ expects region vectors [N >= 2, D], got {list(x.shape)}")
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        raise InvalidInputError("ITQ input vectors contain NaN or Inf")
    dims = x.shape[1]
    bits = dims if bits is None else int(bits)
    if not 1 <= bits <= dims:
        raise InvalidInputError(f"ITQ bits must be in 1..{dims} (the vector dimension), got {bits}")
    if n_iter < 0:
        raise InvalidInputError(f"ITQ n_iter must be >= 0, got {n_iter}")

    x = torch.nn.functional.normalize(x, dim=1)
    second_moment = x.T @ x / x.shape[0]
    eigvals, eigvecs = torch.linalg.eigh(second_moment)
    principal = eigvecs[:, torch.argsort(eigvals, descending=True)[:bits]]  # [D, bits]
    projected = x @ principal  # [N, bits]

    gen = torch.Generator().manual_seed(int(seed))
    rotation, _ = torch.linalg.qr(torch.randn(bits, bits, generator=gen, dtype=torch.float64))
    errors: list[float] = []
    for _ in range(n_iter):
        rotated = projected @ rotation
        codes = torch.where(rotated >= 0, 1.0, -1.0).to(torch.float64)
        # Orthogonal Procrustes: the rotation closest to mapping the projected data onto the codes.
        u, _, vh = torch.linalg.svd(projected.T @ codes)
        rotation = u @ vh
        errors.append(_quantisation_error(projected @ rotation))
    return ITQResult(proj=(principal @ rotation).to(torch.float32), errors=errors)


def _quantisation_error(rotated: torch.Tensor) -> float:
    codes = torch.where(rotated >= 0, 1.0, -1.0).to(rotated.dtype)
    return float(((codes - rotated) ** 2).sum(dim=1).mean())


def save_itq(proj: torch.Tensor, path: str | Path) -> Path:
    """Write ``proj`` in the release ITQ layout ``{'proj': [D, bits]}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"proj": proj.detach().cpu().to(torch.float32).contiguous()}, path)
    return path


def load_itq(path: str | Path) -> torch.Tensor:
    """Read an ITQ file (``{'proj': [D, bits]}``) and return the projection as float32."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ITQ file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise CheckpointError(f"cannot read ITQ file {path}: {exc}") from exc
    proj = data.get("proj") if isinstance(data, dict) else None
    if not isinstance(proj, torch.Tensor) or proj.ndim != 2:
        raise CheckpointError(f"{path} is not an ITQ file: expected a dict with 'proj' [D, bits]")
    return proj.to(torch.float32)
