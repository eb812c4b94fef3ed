"""Training data: region-feature sets, padded batches, temporal augmentation, copy groups.

A feature set maps video ids to region features ``[T, R, D]`` (``[T, D]`` frame features are read
as one region a frame). It is read from the DnS HDF5 layout (one dataset per video id), an
``.npz`` archive, or a directory of ``<id>.npy`` files, or built from a dict in memory.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from dns_milvus.errors import InvalidInputError

FEATURE_SUFFIXES = (".h5", ".hdf5", ".npz")


class FeatureSet(Mapping[str, np.ndarray]):
    """Read-only map ``video id -> float32 [T, R, D]`` over a file or a dict."""

    def __init__(
        self,
        videos: Mapping[str, np.ndarray | torch.Tensor],
        *,
        source: str = "memory",
        handle: h5py.File | None = None,
    ) -> None:
        self._videos = videos
        self._handle = handle
        self.source = source
        self.ids: list[str] = sorted(videos.keys())
        if not self.ids:
            raise InvalidInputError(f"feature set {source} holds no videos")
        self.dims = int(self[self.ids[0]].shape[-1])

    @classmethod
    def open(cls, path: str | Path) -> FeatureSet:
        """Open an HDF5 (DnS layout), ``.npz`` or ``.npy``-directory feature file."""
        path = Path(path)
        if path.is_dir():
            files = {p.stem: p for p in sorted(path.glob("*.npy"))}
            if not files:
                raise InvalidInputError(f"feature directory {path} holds no <video id>.npy files")
            return cls(_LazyNpyDir(files), source=str(path))
        if not path.is_file():
            raise InvalidInputError(
                f"feature file {path} does not exist; expected an HDF5 file (one dataset per video id), "
                "an .npz archive or a directory of <id>.npy files"
            )
        if path.suffix.lower() == ".npz":
            return cls(dict(np.load(path, allow_pickle=False)), source=str(path))
        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise InvalidInputError(f"cannot open {path} as an HDF5 feature file: {exc}") from exc
        videos = {k: v for k, v in handle.items() if isinstance(v, h5py.Dataset)}
        return cls(videos, source=str(path), handle=handle)

    @classmethod
    def from_dict(cls, videos: Mapping[str, np.ndarray | torch.Tensor]) -> FeatureSet:
        return cls(dict(videos))

    def __getitem__(self, video_id: str) -> np.ndarray:
        try:
            raw = self._videos[video_id]
        except KeyError:
            raise InvalidInputError(f"video {video_id!r} is not in the feature set {self.source}") from None
        x = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw[()])
        x = x.astype(np.float32, copy=False)
        if x.ndim == 2:
            x = x[:, None, :]
        if x.ndim != 3 or x.shape[0] == 0:
            raise InvalidInputError(
                f"video {video_id!r} in {self.source}: expected region features [T, R, D] with T >= 1, "
                f"got {list(x.shape)}"
            )
        return x

    def tensor(self, video_id: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self[video_id]))

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def check(self, *, min_videos: int = 1, dims: int | None = None) -> None:
        """Fail early if the set is too small or its feature dimension is not ``dims``."""
        if len(self) < min_videos:
            raise InvalidInputError(
                f"feature set {self.source} holds {len(self)} videos; at least {min_videos} are needed"
            )
        if dims is not None and self.dims != dims:
            raise InvalidInputError(
                f"feature set {self.source} has {self.dims}-d features; expected {dims}-d"
            )

    def sample_regions(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``n`` region vectors ``[n, D]`` drawn uniformly over all videos' regions."""
        per_video = max(1, -(-n // len(self)))
        chunks = []
        for vid in self.ids:
            x = self[vid].reshape(-1, self.dims)
            take = min(per_video, x.shape[0])
            chunks.append(x[rng.choice(x.shape[0], size=take, replace=False)])
        out = np.concatenate(chunks)
        if out.shape[0] > n:
            out = out[rng.choice(out.shape[0], size=n, replace=False)]
        return out


class _LazyNpyDir(Mapping[str, np.ndarray]):
    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files

    def __getitem__(self, key: str) -> np.ndarray:
        return np.load(self._files[key], allow_pickle=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def write_features(path: str | Path, videos: Mapping[str, np.ndarray | torch.Tensor]) -> Path:
    """Write region features in the DnS HDF5 layout (one float32 dataset per video id)."""
    path = Path(path)
    # HDF5 reads "/" as a group separator: such an id would be stored under another name.
    nested = [vid for vid in videos if "/" in vid or vid in ("", ".")]
    if nested:
        raise InvalidInputError(f"HDF5 feature files cannot hold ids with '/' or empty ids: {nested[:3]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for vid, x in videos.items():
            arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            f.create_dataset(vid, data=arr.astype(np.float32))
    tmp.replace(path)
    return path


def pad_videos(
    videos: Sequence[torch.Tensor], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad videos ``[T_i, R, D]`` into a batch ``[B, T_max, R, D]`` and a bool frame mask ``[B, T_max]``."""
    lengths = torch.tensor([v.shape[0] for v in videos])
    batch = torch.nn.utils.rnn.pad_sequence(list(videos), batch_first=True)
    mask = torch.arange(batch.shape[1])[None, :] < lengths[:, None]
    return batch.to(device), mask.to(device)


def temporal_augment(
    video: torch.Tensor, rng: np.random.Generator, p: float = 0.1, max_frames: int = 300
) -> torch.Tensor:
    """One of frame drop, fast forward or slow motion, each with probability ``p`` (paper 4.3).

    Videos of 8 frames or fewer are left alone: halving or dropping windows of them would leave
    too little to compare. The result is cut to ``max_frames`` to bound the batch size.
    """
    n = video.shape[0]
    u = rng.random()
    if n > 8:
        if u < p:  # frame drop: remove whole windows of 4..15 frames, each with probability 0.3
            window = int(rng.integers(4, 16))
            n_windows = -(-n // window)
            keep_windows = rng.random(n_windows) > 0.3
            if keep_windows.any():
                keep = np.repeat(keep_windows, window)[:n]
                video = video[torch.from_numpy(keep)]
        elif u < 2 * p:  # fast forward: every other frame
            video = video[::2]
        elif u < 3 * p and n < max_frames // 2:  # slow motion: every frame twice
            video = video.repeat_interleave(2, dim=0)
    return video[:max_frames]


def load_groups(path: str | Path) -> list[list[str]]:
    """Read copy groups: a JSON list of lists of video ids, or a text file with one group a line.

    VCDB-style annotations (pairs of copies) become groups by merging pairs that share a video;
    a JSON object ``{"groups": [...]}`` is accepted too.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(
            f"groups file {path} does not exist; expected JSON [[id, id, ...], ...] "
            "or a text file with one whitespace-separated group a line"
        )
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"groups file {path} is not valid JSON: {exc}") from exc
        if isinstance(data, dict):
            data = data.get("groups")
        if not isinstance(data, list) or not all(
            isinstance(g, list) and all(isinstance(v, str) for v in g) for g in data
        ):
            raise InvalidInputError(f"groups file {path} must hold a list of lists of video-id strings")
        groups = data
    else:
        groups = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return merge_groups(groups)


def merge_groups(groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """Merge groups that share a video; drop singletons; sorted for determinism."""
    edges = [(g[0], v) for g in groups for v in g[1:]]
    return [c for c in connected_components([v for g in groups for v in g], edges) if len(c) > 1]


def connected_components(nodes: Sequence[Hashable], edges: Sequence[tuple[Hashable, Hashable]]) -> list[list]:
    """Connected components of an undirected graph (union-find), each sorted, sorted by first node."""
    parent: dict = {v: v for v in nodes}

    def root(v: Hashable) -> Hashable:
        while parent[v] != v:
            parent[v] = parent[parent[v]]  # path halving keeps the trees shallow
            v = parent[v]
        return v

    for a, b in edges:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    components: dict = {}
    for v in parent:
        components.setdefault(root(v), []).append(v)
    return sorted((sorted(c) for c in components.values()), key=lambda c: c[0])
