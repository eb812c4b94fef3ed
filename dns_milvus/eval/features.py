"""Random access to HDF5 region features in the DnS release layout: one dataset [T, R, D] per video id.

Ids with a ``/`` (CC_WEB_VIDEO's ``<topic>/<name>``) live in HDF5 groups, as in the release's files;
they are read and listed by their full path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dns_milvus.eval.errors import FeatureFileError, FeatureNotFoundError
from dns_milvus.ids import validate_video_id


class H5Features:
    """Lazily reads one video's features at a time; datasets are checked when read.

    ``regions``/``dim``: the expected R and D (9 and 512 for the DnS release); None accepts any.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, regions: int | None = 9, dim: int | None = 512
    ) -> None:
        import h5py

        self.path = Path(path)
        self.regions = regions
        self.dim = dim
        if not self.path.is_file():
            raise FeatureFileError(f"{self.path}: HDF5 feature file not found")
        try:
            self._file: Any = h5py.File(self.path, "r")
        except OSError as exc:
            raise FeatureFileError(f"{self.path}: not a readable HDF5 file ({exc})") from None
        self._dataset_type = h5py.Dataset

    def __enter__(self) -> H5Features:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __contains__(self, video_id: object) -> bool:
        return isinstance(video_id, str) and isinstance(self._file.get(video_id), self._dataset_type)

    def ids(self) -> list[str]:
        """Every video id in the file (dataset paths, groups descended), sorted."""
        found: list[str] = []

        def visit(name: str, node: Any) -> None:
            if isinstance(node, self._dataset_type):
                found.append(name)

        self._file.visititems(visit)
        return sorted(found)

    def __len__(self) -> int:
        return len(self.ids())

    def __getitem__(self, video_id: str) -> np.ndarray:
        """float32 [T, R, D] features of ``video_id``."""
        validate_video_id(video_id)
        node = self._file.get(video_id)
        if not isinstance(node, self._dataset_type):
            raise FeatureNotFoundError(f"{self.path}: no features for video {video_id!r}")
        shape = node.shape
        expected = f"[T >= 1, {self.regions or 'R'}, {self.dim or 'D'}]"
        if (
            len(shape) != 3
            or shape[0] == 0
            or (self.regions is not None and shape[1] != self.regions)
            or (self.dim is not None and shape[2] != self.dim)
        ):
            raise FeatureFileError(
                f"{self.path}: features of {video_id!r} have shape {list(shape)}; expected {expected}"
            )
        if not np.issubdtype(node.dtype, np.number):
            raise FeatureFileError(
                f"{self.path}: features of {video_id!r} are {node.dtype}; expected numbers"
            )
        features = np.asarray(node[()], dtype=np.float32)
        if not np.all(np.isfinite(features)):
            raise FeatureFileError(f"{self.path}: features of {video_id!r} hold NaN or Inf values")
        return features
