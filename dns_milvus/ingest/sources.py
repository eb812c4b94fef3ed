"""Where videos come from: files/directories/globs, HDF5 feature files, in-memory arrays.

A source yields ``SourceItem``s lazily; each item's ``load()`` returns region features
[T, R, D] or raises a ``DnSError`` naming the video, so one bad video never stops a batch.
A source that works better on many videos at once (``video_source``: the backbone on the frames
of many short videos together) also gives its items a ``load_many``, which ``ingest`` calls on
the items of a batch instead of their ``load``.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dns_milvus.errors import InvalidInputError

#: File suffixes treated as videos when a directory is scanned.
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".wmv", ".3gp", ".ogv"}
)


@dataclass
class SourceItem:
    video_id: str
    load: Callable[[], Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The video's frame count when the source knows it before loading (HDF5 does): ``ingest``
    #: batches videos of similar length together, so little padding is computed.
    frames: int | None = None
    #: Loads several items of the source together: ``load_many(items, stages)`` returns, in
    #: order, each item's result of ``load`` or the exception that stopped that item alone, and
    #: adds the seconds it spent to ``stages`` by stage name. Items sharing it are loaded
    #: together by ``ingest``; None: one ``load`` at a time.
    load_many: Callable[[list[SourceItem], dict[str, float]], list[Any]] | None = None


def video_files(inputs: Iterable[str | os.PathLike], *, recursive: bool = True) -> list[Path]:
    """Expand files, directories and glob patterns into a sorted, de-duplicated list of video files."""
    found: dict[Path, None] = {}
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            for p in sorted(path.glob(pattern)):
                if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
                    found[p] = None
        elif any(ch in text for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=recursive))
            if not matches:
                raise InvalidInputError(f"glob pattern {text!r} matches no file")
            for p in matches:
                if p.is_file():
                    found[p] = None
        else:
            # A missing file is kept: it fails (and is reported) as that video, not as the whole run.
            found[path] = None
    return list(found)


def file_source(
    paths: Iterable[str | os.PathLike],
    extract: Callable[[Path], Any],
    *,
    id_from: str = "stem",
) -> Iterator[SourceItem]:
    """Video files; ``extract(path)`` decodes and returns region features.

    ``id_from``: ``stem`` (file name without suffix), ``name`` (with suffix) or ``path`` (as given).
    """
    if id_from not in ("stem", "name", "path"):
        raise InvalidInputError(f"id_from must be 'stem', 'name' or 'path', got {id_from!r}")
    for path in video_files(paths):
        vid = {"stem": path.stem, "name": path.name, "path": str(path)}[id_from]
        yield SourceItem(vid, lambda p=path: extract(p), {"source": str(path)})


def video_source(
    paths: Iterable[str | os.PathLike],
    models: Any,
    *,
    id_from: str = "stem",
    max_frames: int | None = None,
) -> Iterator[SourceItem]:
    """Video files indexed with ``models`` (a ``ModelSet`` with a feature extractor), sampled at
    the set's frame rate. ``ingest`` loads them a group at a time (``load_many``): each loading
    thread decodes its group's videos (only what the sampled frames need) and runs the backbone,
    recording the time of each stage; on a GPU on the frames of the whole group together,
    ``chunk_size`` frames a call across videos (``FeatureExtractor.extract_prepared``), on the
    CPU one video at a time. An item's own ``load`` extracts its video alone. ``id_from`` as in
    ``file_source``.
    """
    extractor = models.extractor
    if extractor is None:
        raise InvalidInputError(
            f"model set {models.name!r} has no feature extractor (no backbone in its manifest): "
            "it indexes region features (HDF5, arrays), not video files"
        )
    loader = _VideoLoader(extractor, models.fps, max_frames)
    for item in file_source(paths, loader.extract, id_from=id_from):
        path = Path(item.metadata["source"])
        yield SourceItem(item.video_id, _VideoLoad(loader, path), item.metadata, load_many=loader)


@dataclass(frozen=True)
class _VideoLoader:
    """One ``video_source``'s way to load videos: one alone, or many together (``load_many``)."""

    extractor: Any
    fps: float
    max_frames: int | None

    def extract(self, path: Path) -> Any:
        return self.extractor.extract_video(path, fps=self.fps, max_frames=self.max_frames)

    def __call__(self, items: list[SourceItem], stages: dict[str, float]) -> list[Any]:
        videos = [self.extractor.open_video(item.load.path, self.fps, self.max_frames) for item in items]
        if self.extractor.device.type == "cuda":  # a GPU needs the frames of many videos a call
            return self.extractor.extract_prepared(videos, stages=stages)
        # On the CPU one video a backbone call: batching across videos measured slower there
        # (benchmarks/README.md, bench_video_ingest.py), and each group runs in its own thread.
        return [self.extractor.extract_prepared([video], stages=stages)[0] for video in videos]


@dataclass(frozen=True)
class _VideoLoad:
    """A ``video_source`` item's ``load``: its video's features, extracted alone."""

    loader: _VideoLoader
    path: Path

    def __call__(self) -> Any:
        return self.loader.extract(self.path)


def hdf5_source(path: str | os.PathLike, ids: Iterable[str] | None = None) -> Iterator[SourceItem]:
    """An HDF5 feature file in the DnS release layout: one dataset [T, R, D] per video id
    (ids with ``/`` live in groups, as CC_WEB_VIDEO's do). Shapes are checked by the networks.

    Each item's ``load`` reads its dataset (opening the file for that read), so the ingest
    pipeline reads the next batch while the networks run on this one. Each item carries its
    frame count, read from the dataset's shape when the file is listed.
    """
    import h5py

    from dns_milvus.eval.features import H5Features

    with H5Features(path, regions=None, dim=None) as features:
        wanted = list(ids) if ids is not None else features.ids()
    with h5py.File(path, "r") as file:
        frames = {vid: _frame_count(file, vid) for vid in wanted}
    name = Path(path).name
    for vid in wanted:
        yield SourceItem(
            vid, functools.partial(_read_dataset, path, vid), {"source": f"{name}:{vid}"}, frames[vid]
        )


def _frame_count(file: Any, video_id: str) -> int | None:
    """The first axis of a video's dataset; None where there is none (its load says why)."""
    try:
        shape = getattr(file.get(video_id), "shape", None)
    except (TypeError, ValueError, KeyError):  # an id h5py cannot even look up
        return None
    return int(shape[0]) if shape else None


def _read_dataset(path: str | os.PathLike, video_id: str) -> Any:
    from dns_milvus.eval.features import H5Features

    with H5Features(path, regions=None, dim=None) as features:
        return features[video_id]


def array_source(
    arrays: Mapping[str, Any] | Iterable[tuple[str, Any]],
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> Iterator[SourceItem]:
    """In-memory region features: a mapping or pairs of (video id, array [T, R, D])."""
    items = arrays.items() if isinstance(arrays, Mapping) else arrays
    for vid, arr in items:
        yield SourceItem(vid, lambda a=arr: a, dict((metadata or {}).get(vid, {})))
