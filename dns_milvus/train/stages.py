"""One entry point per training stage: ``run_stage(name, config)``.

Stages and what they write into ``config.output``:

- ``pca``: ``pca.pth`` (``{'mean', 'd', 'V'}``) fitted on raw backbone region vectors;
- ``itq``: ``itq.pth`` (``{'proj': [D, bits]}``) fitted on whitened region vectors;
- ``teacher``: ``teacher.pth`` (ViSiL teacher checkpoint) and ``teacher_summary.json``;
- ``mine``: ``pairs.h5`` (teacher similarities of all pairs, then the mined pairs) and
  ``mine_summary.json``;
- ``students``: ``cg_student.pth`` / ``fg_att_student.pth`` / ``fg_bin_student.pth`` and summaries;
- ``selector``: ``selector.pth`` and ``selector_summary.json``.

The config is validated (and its input files checked) before any work starts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dns_milvus.train.config import (
    ConfigError,
    ITQConfig,
    MiningConfig,
    PCAConfig,
    StageConfig,
    load_config,
)
from dns_milvus.train.data import FeatureSet
from dns_milvus.train.itq import fit_itq, save_itq
from dns_milvus.train.trainer import resolve_device, write_summary

STAGES = ("pca", "itq", "teacher", "mine", "students", "selector")


@dataclass
class StageResult:
    """Files a stage wrote (by role) and its summary (losses, metrics, counts)."""

    stage: str
    outputs: dict[str, Path]
    summary: dict[str, Any] = field(default_factory=dict)


def run_stage(name: str, config: StageConfig | Mapping[str, Any] | str | Path) -> StageResult:
    """Run training stage ``name`` (one of :data:`STAGES`) with ``config``: a config dataclass, a
    mapping of settings, or the path of a JSON/TOML file. Raises ``ConfigError`` before any work
    when the config is invalid or names missing inputs."""
    cfg = load_config(name, config)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = _RUNNERS[name](cfg)
    result.summary.setdefault("seconds", round(time.perf_counter() - started, 2))
    return result


def _run_pca(config: PCAConfig) -> StageResult:
    from dns_milvus.features import FeatureExtractor, PCAWhitening

    rng = np.random.default_rng(config.seed)
    if config.features is not None:
        features = FeatureSet.open(config.features)
        vectors = features.sample_regions(config.max_vectors, rng)
        n_videos = len(features)
    else:
        from dns_milvus.train.corpus import expand_video_paths

        extractor = FeatureExtractor(
            config.backbone,
            weights=config.backbone_weights,
            pca=None,
            device=None if config.device == "auto" else config.device,
        )
        paths = expand_video_paths(config.videos or [])
        per_video = max(1, -(-config.max_vectors // len(paths)))
        chunks = []
        for path in paths:
            x = extractor.extract_video(path, fps=config.fps, max_frames=config.max_frames).numpy()
            x = x.reshape(-1, x.shape[-1])
            chunks.append(x[rng.choice(len(x), size=min(per_video, len(x)), replace=False)])
        vectors = np.concatenate(chunks)[: config.max_vectors]
        n_videos = len(paths)
    if config.dims > vectors.shape[1]:
        raise ConfigError(f"pca.dims: {config.dims} exceeds the {vectors.shape[1]}-d region vectors")
    pca = PCAWhitening.fit(torch.from_numpy(np.ascontiguousarray(vectors)), n_components=config.dims)
    path = Path(config.output) / "pca.pth"
    pca.save(path)
    summary = {
        "vectors": len(vectors),
        "videos": n_videos,
        "input_dim": pca.input_dim,
        "dims": pca.n_components,
        "explained_variance": float(pca.eigenvalues.sum() / np.var(vectors, axis=0).sum()),
    }
    write_summary(Path(config.output) / "pca_summary.json", summary)
    return StageResult("pca", {"pca": path}, summary)


def _run_itq(config: ITQConfig) -> StageResult:
    features = FeatureSet.open(config.features)
    vectors = features.sample_regions(config.max_vectors, np.random.default_rng(config.seed))
    result = fit_itq(vectors, config.bits, n_iter=config.n_iter, seed=config.seed)
    path = save_itq(result.proj, Path(config.output) / "itq.pth")
    summary = {
        "vectors": len(vectors),
        "dims": int(result.proj.shape[0]),
        "bits": int(result.proj.shape[1]),
        "quantisation_error": result.errors,
    }
    write_summary(Path(config.output) / "itq_summary.json", summary)
    return StageResult("itq", {"itq": path}, summary)


def _run_teacher(config: StageConfig) -> StageResult:
    from dns_milvus.train.teacher import train_teacher

    result = train_teacher(config)  # type: ignore[arg-type]
    return StageResult(
        "teacher",
        {"teacher": result.checkpoint, "summary": result.summary},
        {"final": result.final, "best": result.best},
    )


def _run_mine(config: MiningConfig) -> StageResult:
    from dns_milvus.models import load_checkpoint
    from dns_milvus.train.mining import compute_similarities, mine_pairs

    device = resolve_device(config.device)
    teacher = load_checkpoint(
        config.teacher,
        expected=("teacher", "teacher_ensemble", "fg_att_student", "fg_bin_student", "fg_student"),
        map_location=device,
    )
    features = FeatureSet.open(config.features)
    path = Path(config.output) / "pairs.h5"
    sims = compute_similarities(
        teacher,
        features,
        path,
        block_size=config.chunk_size,
        device=device,
        max_frames=config.max_frames,
        progress=config.progress,
        resume=config.resume,
    )
    pairs = mine_pairs(
        sims, features.ids, threshold=config.threshold, negatives_per_kind=config.negatives_per_kind
    )
    pairs.save(path)
    summary = mining_summary(pairs)
    write_summary(Path(config.output) / "mine_summary.json", summary)
    return StageResult("mine", {"pairs": path}, summary)


def mining_summary(pairs: Any) -> dict[str, Any]:
    """Counts of a :class:`MinedPairs`: videos, anchors, positive and negative pairs."""
    return {
        "videos": len(pairs.ids),
        "anchors": len(pairs.anchors),
        "pairs": len(pairs),
        "positives": int(pairs.positive.sum()),
        "negatives": int((~pairs.positive).sum()),
    }


def _run_students(config: StageConfig) -> StageResult:
    from dns_milvus.train.distill import STUDENT_FILES, train_students

    results = train_students(config)  # type: ignore[arg-type]
    outputs = {STUDENT_FILES[kind]: r.checkpoint for kind, r in results.items()}
    return StageResult("students", outputs, {STUDENT_FILES[k]: r.final for k, r in results.items()})


def _run_selector(config: StageConfig) -> StageResult:
    from dns_milvus.train.selector import train_selector

    result = train_selector(config)  # type: ignore[arg-type]
    return StageResult(
        "selector",
        {"selector": result.checkpoint, "summary": result.summary},
        {"final": result.final, "best": result.best},
    )


_RUNNERS = {
    "pca": _run_pca,
    "itq": _run_itq,
    "teacher": _run_teacher,
    "mine": _run_mine,
    "students": _run_students,
    "selector": _run_selector,
}
