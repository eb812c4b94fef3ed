"""PCA-whitening of region vectors, in the DnS release's file layout.

A whitening file is a torch file of ``{'mean': [C], 'd': [K] eigenvalues, 'V': [C, K] eigenvectors
as columns}`` (the release's ``pca_resnet50_vcdb_1M.pth`` has C = K = 3840). Whitening keeps the
``D`` largest eigenvalues, projects with ``DVt = (diag(1 / sqrt(d + 1e-7)) V^T)^T`` (``[C, D]``)
after subtracting the mean, and L2-normalises the result.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dns_milvus.errors import CheckpointError, InvalidInputError

#: Added to the eigenvalues before the inverse square root, as in the release.
EIGEN_EPS = 1e-7

#: Rows of the input folded into the covariance at a time by ``fit`` (bounds float64 memory).
_FIT_CHUNK = 65_536


class PCAWhitening(nn.Module):
    """``x [..., C] -> L2-normalised whitened projection [..., D]``."""

    mean: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    projection: torch.Tensor

    def __init__(
        self,
        mean: torch.Tensor,
        eigenvalues: torch.Tensor,
        eigenvectors: torch.Tensor,
        n_components: int | None = None,
    ) -> None:
        """Whitening from ``mean [C]``, ``d [K]``, ``V [C, K]``, keeping the largest ``n_components``.

        ``n_components=None`` keeps all of them.
        """
        super().__init__()
        mean, eigenvalues, eigenvectors = _check_layout(mean, eigenvalues, eigenvectors)
        available = eigenvalues.shape[0]
        if n_components is None:
            n_components = available
        if not 1 <= n_components <= available:
            raise InvalidInputError(
                f"n_components must lie in [1, {available}] (the eigenvalues available), got {n_components}"
            )
        order = torch.argsort(eigenvalues, descending=True)[:n_components]
        d = eigenvalues[order]
        V = eigenvectors[:, order]
        self.register_buffer("mean", mean.float())
        self.register_buffer("eigenvalues", d.float())
        self.register_buffer("eigenvectors", V.float())
        # Computed in float64 so that tiny eigenvalues do not lose the projection's precision.
        scale = torch.diag(1.0 / torch.sqrt(d.double() + EIGEN_EPS))
        self.register_buffer("projection", (scale @ V.double().T).T.float())

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def n_components(self) -> int:
        return int(self.projection.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_dim:
            raise InvalidInputError(
                f"PCA-whitening expects vectors [..., {self.input_dim}], got last dimension {x.shape[-1]} "
                f"(shape {tuple(x.shape)})"
            )
        x = x.to(self.projection.dtype)
        return F.normalize((x - self.mean) @ self.projection, p=2, dim=-1)

    # -- files ---------------------------------------------------------------------------------------

    @classmethod
    def from_release_file(cls, path: str | os.PathLike, n_components: int | None = 512) -> PCAWhitening:
        """Load a ``{'mean', 'd', 'V'}`` file (the release's, or ``save``'s), keeping ``n_components``.

        ``n_components=None`` keeps every component the file holds.
        """
        if not os.path.isfile(path):
            raise CheckpointError(f"PCA file {os.fspath(path)!r} does not exist")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for non-checkpoint bytes
            raise CheckpointError(f"cannot read PCA file {os.fspath(path)!r}: {exc}") from exc
        if not isinstance(data, dict) or not {"mean", "d", "V"} <= data.keys():
            keys = sorted(data.keys()) if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(
                f"{os.fspath(path)!r} is not a PCA file: expected keys 'mean', 'd', 'V', got {keys}"
            )
        try:
            return cls(data["mean"], data["d"], data["V"], n_components=n_components)
        except InvalidInputError as exc:
            raise CheckpointError(f"{os.fspath(path)!r}: {exc}") from exc

    def save(self, path: str | os.PathLike) -> None:
        """Write the kept components as ``{'mean': [C], 'd': [D], 'V': [C, D]}`` (descending eigenvalues)."""
        torch.save(
            {"mean": self.mean.clone(), "d": self.eigenvalues.clone(), "V": self.eigenvectors.clone()}, path
        )

    # -- fitting ---------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, vectors: torch.Tensor, n_components: int = 512) -> PCAWhitening:
        """Fit on region vectors ``[N, C]`` by eigendecomposition of their covariance (float64).

        Warns when ``n_components`` exceeds the rank the sample can support (``N - 1``): such
        components have near-zero eigenvalues and whitening would amplify noise along them.
        """
        if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or vectors.shape[0] < 2:
            shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
            raise InvalidInputError(f"PCA fit needs vectors [N, C] with N >= 2, got {shape}")
        if not torch.isfinite(vectors).all():
            raise InvalidInputError("PCA fit vectors contain NaN or Inf")
        n, c = vectors.shape
        if not 1 <= n_components <= c:
            raise InvalidInputError(
                f"n_components must lie in [1, {c}] (the vector size), got {n_components}"
            )
        if n_components > n - 1:
            warnings.warn(
                f"fitting {n_components} PCA components on {n} vectors: "
                f"only {n - 1} can have non-zero variance",
                stacklevel=2,
            )
        mean = torch.zeros(c, dtype=torch.float64)
        for start in range(0, n, _FIT_CHUNK):
            mean += vectors[start : start + _FIT_CHUNK].double().sum(0)
        mean /= n
        if n_components <= n - 1 < c:
            eigenvalues, eigenvectors = _snapshot_eigh(vectors.double() - mean, n_components)
        else:
            covariance = torch.zeros(c, c, dtype=torch.float64)
            for start in range(0, n, _FIT_CHUNK):
                centred = vectors[start : start + _FIT_CHUNK].double() - mean
                covariance += centred.T @ centred
            eigenvalues, eigenvectors = torch.linalg.eigh(covariance / (n - 1))
        # eigh may return tiny negative values for a rank-deficient covariance.
        eigenvalues = eigenvalues.clamp_min(0)
        return cls(mean, eigenvalues, eigenvectors, n_components=n_components)


def _snapshot_eigh(centred: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenpairs of the covariance of ``centred [N, C]`` with N <= C, from the N x N Gram matrix.

    ``X X^T u = l u`` implies ``X^T X (X^T u) = l (X^T u)``: the Gram matrix has the covariance's
    non-zero eigenvalues, and ``X^T u / sqrt(l)`` are its unit eigenvectors. This costs O(N^3)
    instead of O(C^3) when fewer vectors than dimensions are available.
    """
    n = centred.shape[0]
    gram_values, gram_vectors = torch.linalg.eigh(centred @ centred.T)
    top = torch.argsort(gram_values, descending=True)[:n_components]
    values = gram_values[top].clamp_min(torch.finfo(torch.float64).tiny)
    vectors = (centred.T @ gram_vectors[:, top]) / values.sqrt()
    return values / (n - 1), vectors


def _check_layout(
    mean: torch.Tensor, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not all(isinstance(t, torch.Tensor) for t in (mean, eigenvalues, eigenvectors)):
        raise InvalidInputError("PCA mean, d and V must be tensors")
    if mean.ndim == 2 and mean.shape[0] == 1:  # a row-vector mean [1, C]
        mean = mean[0]
    if mean.ndim != 1 or eigenvalues.ndim != 1 or eigenvectors.ndim != 2:
        raise InvalidInputError(
            f"PCA layout must be mean [C], d [K], V [C, K]; got mean {tuple(mean.shape)}, "
            f"d {tuple(eigenvalues.shape)}, V {tuple(eigenvectors.shape)}"
        )
    c, k = eigenvectors.shape
    if mean.shape[0] != c or eigenvalues.shape[0] != k:
        raise InvalidInputError(
            f"PCA layout mismatch: mean [{mean.shape[0]}], d [{eigenvalues.shape[0]}], V [{c}, {k}]; "
            "expected mean [C], d [K], V [C, K]"
        )
    if not (
        torch.isfinite(mean).all()
        and torch.isfinite(eigenvalues).all()
        and torch.isfinite(eigenvectors).all()
    ):
        raise InvalidInputError("PCA mean, d or V contain NaN or Inf")
    return mean, eigenvalues, eigenvectors
