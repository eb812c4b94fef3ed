"""Self-supervised copy corpora: source videos, transformed copies of them, and their features.

Each source video and ``copies_per_video`` copies made with ``dns_milvus.video.random_copy`` form
a copy group: the teacher learns to score group mates above other videos without any labels.
The features of a corpus are cached in an HDF5 file with the settings that made them, so a
second run with the same settings reads them back instead of decoding and extracting again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from dns_milvus.errors import InvalidInputError
from dns_milvus.train.config import TeacherConfig
from dns_milvus.train.data import FeatureSet, write_features
from dns_milvus.video import random_copy, read_frames

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")

#: Separates a source id from the copy number in copy ids: ``<source>#copy<k>``.
COPY_SEPARATOR = "#copy"


def expand_video_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Video files named directly or found (non-recursively) in the given directories, sorted."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found += sorted(p for p in entry.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        elif entry.is_file():
            found.append(entry)
        else:
            raise InvalidInputError(f"{entry} is neither a video file nor a directory")
    if not found:
        raise InvalidInputError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) in {[str(p) for p in paths]}")
    return found


def copy_id(source: str, k: int) -> str:
    return f"{source}{COPY_SEPARATOR}{k}"


def source_of(video_id: str) -> str:
    """The source id of a copy id (an original's id is its own source)."""
    return video_id.split(COPY_SEPARATOR, 1)[0]


def make_copies(
    sources: Mapping[str, np.ndarray],
    *,
    copies_per_video: int,
    transform_ops: int,
    rng: np.random.Generator,
    ops: Sequence[str] | None = None,
) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """Frames of every source and of its copies, and the copy groups (source + copies), in order."""
    videos: dict[str, np.ndarray] = {}
    groups: list[list[str]] = []
    for source in sorted(sources):
        frames = sources[source]
        videos[source] = frames
        group = [source]
        for k in range(copies_per_video):
            copy, _ = random_copy(frames, rng, n_ops=transform_ops, ops=ops)
            videos[copy_id(source, k)] = copy
            group.append(copy_id(source, k))
        groups.append(group)
    return videos, groups


def extract_all(
    extractor: torch.nn.Module, videos: Mapping[str, np.ndarray], *, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Region features of every frame array (``extractor(frames) -> [T, R, D]``)."""
    return {
        vid: extractor(frames)
        for vid, frames in tqdm(
            videos.items(), desc="features", unit="video", disable=not progress, leave=False
        )
    }


def settings_digest(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_corpus(
    path: Path, features: Mapping[str, torch.Tensor | np.ndarray], groups: list[list[str]], digest: str
) -> None:
    write_features(path, features)
    with h5py.File(path, "a") as f:
        f.attrs["groups"] = json.dumps(groups)
        f.attrs["settings"] = digest


def read_corpus(path: Path, digest: str) -> tuple[FeatureSet, list[list[str]]] | None:
    """The cached corpus in ``path`` if it was made with the settings ``digest``, else None."""
    if not path.is_file():
        return None
    with h5py.File(path, "r") as f:
        if f.attrs.get("settings") != digest or "groups" not in f.attrs:
            return None
        groups = json.loads(f.attrs["groups"])
    return FeatureSet.open(path), groups


def build_copy_corpus_from_config(config: TeacherConfig) -> tuple[FeatureSet, list[list[str]]]:
    """The self-supervised corpus of a teacher config: every video of ``config.videos`` is a source.

    Cached in ``<output>/copy_corpus.h5``.
    """
    from dns_milvus.features import FeatureExtractor

    paths = expand_video_paths(config.videos or [])
    settings = {
        "videos": [str(p.resolve()) for p in paths],
        "fps": config.fps,
        "max_frames": config.max_frames,
        "copies": config.copies_per_video,
        "ops": config.transform_ops,
        "seed": config.seed,
        "pca": config.pca,
        "backbone": config.backbone,
        "weights": config.backbone_weights,
    }
    digest = settings_digest(settings)
    cache = Path(config.output) / "copy_corpus.h5"
    cached = read_corpus(cache, digest)
    if cached is not None:
        return cached
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise InvalidInputError(
            f"teacher.videos: file names must be unique without their suffix, got {stems}"
        )
    sources = {p.stem: read_frames(p, fps=config.fps, max_frames=config.max_frames) for p in paths}
    if len(sources) < 2:
        raise InvalidInputError(
            "self-supervised teacher training needs at least two source videos "
            "(the negatives of one are the others)"
        )
    videos, groups = make_copies(
        sources,
        copies_per_video=config.copies_per_video,
        transform_ops=config.transform_ops,
        rng=np.random.default_rng(config.seed),
    )
    extractor = FeatureExtractor(
        config.backbone,
        weights=config.backbone_weights,
        pca=config.pca,
        device=config.device if config.device != "auto" else None,
    )
    features = extract_all(extractor, videos, progress=config.progress)
    write_corpus(cache, features, groups, digest)
    result = read_corpus(cache, digest)
    assert result is not None
    return result
