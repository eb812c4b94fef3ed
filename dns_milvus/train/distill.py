"""Knowledge distillation of the students from the teacher's similarities (paper 4.3).

Each epoch draws one positive and one negative pair per anchor of the mined pairs; a batch of
``batch_size`` pairs is ``batch_size / 2`` such triplets. Positives and negatives get temporal
augmentation (frame drop, fast forward, slow motion; probability ``p`` each). The students learn
the teacher's similarity with an L1 loss:

- coarse student: teacher similarities rescaled from [-1, 1] to [0, 1] (``s / 2 + 1/2``);
- fine students: the similarity itself, plus the similarity regularisation loss (weight 1e-3);
- binarization student: the projection starts from ITQ, and training uses the erf surrogate.

Iterative distillation: a trained fine student re-scores the pairs and becomes the teacher of the
next round.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dns_milvus.errors import InvalidInputError
from dns_milvus.models import CoarseGrainedStudent, FineGrainedStudent, load_checkpoint
from dns_milvus.train.config import StudentsConfig
from dns_milvus.train.data import FeatureSet, pad_videos, temporal_augment
from dns_milvus.train.itq import fit_itq, load_itq
from dns_milvus.train.losses import distillation_loss
from dns_milvus.train.mining import MinedPairs, rescore_pairs
from dns_milvus.train.trainer import TrainingResult, TrainingTask, fit_stage, resolve_device
from dns_milvus.train.validation import ValidationSet, evaluate_map

#: File stem of each student kind (the release's names without the ``dns_`` prefix).
STUDENT_FILES = {
    "coarse": "cg_student",
    "fine_attention": "fg_att_student",
    "fine_binarization": "fg_bin_student",
}


def build_student(kind: str, dims: int, config: StudentsConfig) -> torch.nn.Module:
    """A fresh student of ``kind`` for ``dims``-d region features, sized by ``config``."""
    if kind == "coarse":
        return CoarseGrainedStudent(
            dims=dims,
            transformer=config.coarse_transformer,
            netvlad=config.coarse_netvlad,
            transformer_heads=config.transformer_heads,
            transformer_feedforward_dims=config.transformer_feedforward_dims,
            transformer_layers=config.transformer_layers,
            netvlad_clusters=config.netvlad_clusters,
            netvlad_outdims=config.netvlad_outdims,
        )
    if kind == "fine_attention":
        return FineGrainedStudent(dims=dims, attention=True)
    if kind == "fine_binarization":
        student = FineGrainedStudent(dims=dims, binarization=True, bits=config.bits or dims)
        student.binarization.sigma = config.binarization_sigma
        return student
    raise InvalidInputError(f"unknown student kind {kind!r}; expected one of {list(STUDENT_FILES)}")


def init_binarization_from_itq(student: FineGrainedStudent, proj: torch.Tensor) -> None:
    """Copy an ITQ projection ``[dims, bits]`` into the binarization layer's ``W``."""
    weight = student.binarization.W
    if tuple(proj.shape) != tuple(weight.shape):
        raise InvalidInputError(
            f"ITQ projection is {list(proj.shape)}; the binarization layer needs "
            f"{list(weight.shape)} ([dims, bits])"
        )
    with torch.no_grad():
        weight.copy_(proj.to(weight))


@dataclass
class TripletBatch:
    videos: list[torch.Tensor]  # anchors, then positives, then negatives
    targets: torch.Tensor  # [2b]: teacher similarities of (anchor, positive) pairs, then (anchor, negative)


class DistillationTask(TrainingTask):
    """One student learning the teacher's similarities of mined pairs."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        features: FeatureSet,
        pairs: MinedPairs,
        *,
        batch_size: int,
        device: torch.device,
        reg_weight: float = 1e-3,
        augmentation: bool = True,
        augmentation_p: float = 0.1,
        max_frames: int = 300,
        validation: ValidationSet | None = None,
    ) -> None:
        self.name = name
        self.model = model.to(device)
        self.features = features
        self.pairs = pairs
        self.triplets_per_batch = batch_size // 2
        self.device = device
        self.reg_weight = reg_weight
        self.augmentation = augmentation
        self.augmentation_p = augmentation_p
        self.max_frames = max_frames
        self.validation = validation
        if len(pairs.anchors) == 0:
            raise InvalidInputError(
                f"the mined pairs ({len(pairs)}) give no anchor with both a positive and a negative: "
                "no video had a teacher similarity above the mining threshold; lower mine.threshold"
            )
        self.coarse = isinstance(model, CoarseGrainedStudent)
        # The coarse student learns similarities on [0, 1] (its vectors are compared by a dot product).
        self.targets = pairs.similarity / 2.0 + 0.5 if self.coarse else pairs.similarity

    def release_args(self) -> dict[str, Any]:
        return {"student_type": "coarse-grained" if self.coarse else "fine-grained"}

    def _video(self, index: int, rng: np.random.Generator | None) -> torch.Tensor:
        x = self.features.tensor(self.pairs.ids[index])[: self.max_frames]
        if rng is not None and self.augmentation:
            x = temporal_augment(x, rng, self.augmentation_p, self.max_frames)
        return x

    def batches(self, epoch: int, rng: np.random.Generator) -> Iterator[TripletBatch]:
        triplets = self.pairs.triplets(rng)
        step = self.triplets_per_batch
        for start in range(0, len(triplets), step):
            chunk = triplets[start : start + step]
            anchors = [self._video(a, None) for a, _, _ in chunk]
            positives = [self._video(int(self.pairs.target[p]), rng) for _, p, _ in chunk]
            negatives = [self._video(int(self.pairs.target[n]), rng) for _, _, n in chunk]
            targets = [self.targets[p] for _, p, _ in chunk] + [self.targets[n] for _, _, n in chunk]
            yield TripletBatch(anchors + positives + negatives, torch.tensor(np.array(targets, np.float32)))

    def losses(self, batch: TripletBatch) -> dict[str, torch.Tensor]:
        x, mask = pad_videos(batch.videos, self.device)
        indexed = self.model.index_video(x, mask)
        anchors, positives, negatives = indexed.chunk(3)
        targets = batch.targets.to(self.device)
        if self.coarse:
            student = torch.cat([self.model(anchors, positives), self.model(anchors, negatives)])
            loss = distillation_loss(student, targets)
            return {"loss": loss, "distillation": loss.detach()}
        a_mask, p_mask, n_mask = mask.chunk(3)
        sim_pos, reg_pos = self.model(anchors, positives, a_mask, p_mask)
        sim_neg, reg_neg = self.model(anchors, negatives, a_mask, n_mask)
        distill = distillation_loss(torch.cat([sim_pos, sim_neg]), targets)
        reg = reg_pos + reg_neg
        return {
            "loss": distill + self.reg_weight * reg,
            "distillation": distill.detach(),
            "regularization": reg.detach(),
        }

    def validate(self) -> dict[str, float]:
        if self.validation is None:
            return {}
        return {
            "mAP": evaluate_map(self.model, self.validation, device=self.device, max_frames=self.max_frames)
        }


def train_student(
    kind: str,
    config: StudentsConfig,
    features: FeatureSet,
    pairs: MinedPairs,
    output: Path,
    *,
    validation: ValidationSet | None = None,
    itq: torch.Tensor | None = None,
    **fit_options: Any,
) -> TrainingResult:
    """Distil one student of ``kind`` into ``output/<name>.pth``."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    student = build_student(kind, features.dims, config)
    if kind == "fine_binarization" and itq is not None:
        init_binarization_from_itq(student, itq)
    task = DistillationTask(
        STUDENT_FILES[kind],
        student,
        features,
        pairs,
        batch_size=config.batch_size,
        device=device,
        reg_weight=config.reg_weight,
        augmentation=config.augmentation,
        augmentation_p=config.augmentation_p,
        max_frames=config.max_frames,
        validation=validation,
    )
    return fit_stage(
        task,
        config,
        output=output,
        monitor="mAP" if validation is not None else None,
        lr=config.lr_coarse if kind == "coarse" else config.lr_fine,
        settings={**config.to_dict(), "student": kind},
        **fit_options,
    )


def itq_projection(config: StudentsConfig, features: FeatureSet) -> torch.Tensor:
    """The ITQ projection for the binarization student: from ``config.itq`` or fitted on ``features``."""
    if config.itq is not None:
        return load_itq(config.itq)
    rng = np.random.default_rng(config.seed)
    vectors = features.sample_regions(config.itq_vectors, rng)
    return fit_itq(vectors, config.bits or features.dims, seed=config.seed).proj


def train_students(config: StudentsConfig, **fit_options: Any) -> dict[str, TrainingResult]:
    """The ``students`` stage: every configured student, over ``config.iterations`` rounds.

    Round k > 1 learns from the pairs re-scored by round k-1's ``next_teacher``. Rounds before
    the last write into ``output/iter<k>``; the last round's students are in ``output``.
    """
    features = FeatureSet.open(config.features)
    pairs = MinedPairs.load(config.pairs)
    missing = sorted(set(pairs.ids) - set(features.ids))
    if missing:
        raise InvalidInputError(
            f"{len(missing)} videos of the pairs file have no features (e.g. {missing[:3]})"
        )
    validation = ValidationSet.from_config(config.validation) if config.validation else None
    itq = itq_projection(config, features) if "fine_binarization" in config.students else None
    output = Path(config.output)
    results: dict[str, TrainingResult] = {}
    device = resolve_device(config.device)
    for iteration in range(1, config.iterations + 1):
        round_dir = output if iteration == config.iterations else output / f"iter{iteration}"
        if iteration > 1:
            model = load_checkpoint(results[config.next_teacher].checkpoint, map_location=device)
            pairs = rescore_pairs(
                pairs, model, features, device=device, max_frames=config.max_frames, progress=config.progress
            )
            pairs.save(round_dir / "pairs.h5")
        for kind in config.students:
            results[kind] = train_student(
                kind, config, features, pairs, round_dir, validation=validation, itq=itq, **fit_options
            )
    return results
