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

Dual learning (``label_weight`` > 0), after DL-DKD (Dong et al., dual learning with dynamic
knowledge distillation): a teacher trained on little data is only moderately good, so besides the
*inheritance* loss (L1 to the teacher, as above) the student gets an *exploration* loss on the
copy groups' labels of the mined pairs: group mates are copies, pulled above ``label_positive``,
other pairs are pushed below ``label_negative`` (see :func:`copy_label_loss`). With
``label_mates`` it also gets pairs of its own, each triplet's anchor with a random group mate,
since the mined pairs hold what the teacher finds alike rather than every copy. The distillation
weight decays from 1 in the first epoch to ``distill_floor`` in the last (linear or cosine) while
the label weight stays: the teacher shapes the similarity scale early, the labels correct its
mistakes late. Per batch: ``w(epoch) * L1 + label_weight * L_label`` (+ the regularisation of
the fine students).

Both branches are one network here, trained with that combined loss, rather than a shared body
with two heads whose similarities are averaged at inference, because the release networks leave
no place to fold a second head into: the coarse vector is L2-normalised after NetVLAD (and the
default recipe has no reduction layer), and a fine similarity goes through the comparator CNN,
Hardtanh and Chamfer pooling, none of them linear in the head. A second head would have to be
dropped at export, taking what the exploration branch learned with it, or the release layout
would change. With shared parameters, DL-DKD's objective (inheritance branch: labels + decaying
distillation; exploration branch: labels) is this combined loss, so the checkpoint is the
unchanged ``{'model', 'args'}`` release layout and training costs no more (one video a triplet
more with ``label_mates``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dns_milvus.errors import InvalidInputError
from dns_milvus.models import CoarseGrainedStudent, FineGrainedStudent, load_checkpoint
from dns_milvus.train.config import StudentsConfig
from dns_milvus.train.data import FeatureSet, load_groups, merge_groups, pad_videos, temporal_augment
from dns_milvus.train.itq import fit_itq, load_itq
from dns_milvus.train.losses import copy_label_loss, distillation_loss
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


#: Settings of dual learning; left out of a pure-distillation run's stored settings, so checkpoints
#: trained before the option existed still resume.
DUAL_SETTINGS = (
    "groups",
    "label_weight",
    "label_positive",
    "label_negative",
    "label_mates",
    "distill_decay",
    "distill_floor",
)


def distill_weight(epoch: int, epochs: int, *, decay: str = "linear", floor: float = 0.05) -> float:
    """Weight of the distillation loss in ``epoch`` (0-based) of ``epochs``: 1 in the first epoch,
    ``floor`` in the last, falling linearly or along a half cosine (slow, fast, slow) between."""
    if decay not in ("linear", "cosine"):
        raise InvalidInputError(f"unknown distillation decay {decay!r}; expected 'linear' or 'cosine'")
    progress = min(max(epoch, 0) / max(epochs - 1, 1), 1.0)
    if decay == "cosine":
        progress = (1.0 - math.cos(math.pi * progress)) / 2.0
    return 1.0 - (1.0 - floor) * progress


def group_index(ids: Sequence[str], groups: Sequence[Sequence[str]]) -> np.ndarray:
    """The copy group of each of ``ids`` (int64, -1 for none); groups sharing a video are merged."""
    group_of = {v: i for i, g in enumerate(merge_groups(groups)) for v in g}
    group = np.array([group_of.get(v, -1) for v in ids], dtype=np.int64)
    if not (group >= 0).any():
        raise InvalidInputError(
            f"the copy groups name none of the {len(ids)} videos of the mined pairs "
            f"(e.g. {list(ids[:3])}); students.groups must label the training videos"
        )
    return group


def copy_labels(pairs: MinedPairs, groups: Sequence[Sequence[str]]) -> np.ndarray:
    """Whether each mined pair is a copy: bool ``[N]``, True where anchor and target share a group.

    Videos of no group are copies of nothing.
    """
    group = group_index(pairs.ids, groups)
    anchor, target = group[pairs.anchor], group[pairs.target]
    return (anchor == target) & (anchor >= 0)


def group_mates(ids: Sequence[str], groups: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """For each of ``ids``, the positions in ``ids`` of its copies (empty for a video of no group)."""
    group = group_index(ids, groups)
    members: dict[int, np.ndarray] = {
        int(g): np.flatnonzero(group == g) for g in np.unique(group[group >= 0])
    }
    empty = np.zeros(0, dtype=np.int64)
    return [members[int(g)][members[int(g)] != i] if g >= 0 else empty for i, g in enumerate(group)]


@dataclass(frozen=True)
class DualLearning:
    """The exploration branch: copy labels of the mined pairs, their weight, the distillation decay,
    and (``mates``) the group mates an anchor is also paired with, one a triplet."""

    copies: np.ndarray  # bool [N]: each mined pair is a copy (same copy group)
    label_weight: float
    negative: float  # non-copies are pushed below this (teacher's scale)
    epochs: int
    decay: str = "linear"
    floor: float = 0.05
    mates: list[np.ndarray] | None = None  # per video of the pairs: positions of its copies
    positive: float = 1.0  # copies are pulled above this (teacher's scale)

    @classmethod
    def from_config(
        cls, config: StudentsConfig, pairs: MinedPairs, groups: Sequence[Sequence[str]]
    ) -> DualLearning:
        return cls(
            copy_labels(pairs, groups),
            config.label_weight,
            config.label_negative,
            config.epochs,
            config.distill_decay,
            config.distill_floor,
            group_mates(pairs.ids, groups) if config.label_mates else None,
            config.label_positive,
        )

    def distill_weight(self, epoch: int) -> float:
        return distill_weight(epoch, self.epochs, decay=self.decay, floor=self.floor)


@dataclass
class TripletBatch:
    videos: list[torch.Tensor]  # b anchors, b positives, b negatives, then the mates of `mate_of`
    targets: torch.Tensor  # [2b]: teacher similarities of (anchor, positive) pairs, then (anchor, negative)
    copies: torch.Tensor | None = None  # [2b] bool, dual learning: the pairs' copy labels
    distill_weight: float = 1.0
    mate_of: list[int] | None = None  # dual learning: the anchors (positions) paired with a group mate


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
        dual: DualLearning | None = None,
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
        if dual is not None and len(dual.copies) != len(pairs):
            raise InvalidInputError(f"{len(dual.copies)} copy labels for {len(pairs)} mined pairs")
        self.dual = dual
        self.coarse = isinstance(model, CoarseGrainedStudent)
        self.targets = self._student_scale(pairs.similarity)

    def _student_scale(self, similarity: Any) -> Any:
        """The teacher's [-1, 1] scale -> the student's: the coarse student learns similarities on
        [0, 1] (its vectors are compared by a dot product)."""
        return similarity / 2.0 + 0.5 if self.coarse else similarity

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
            rows = [p for _, p, _ in chunk] + [n for _, _, n in chunk]
            targets = torch.tensor(np.array(self.targets[rows], np.float32))
            if self.dual is None:
                yield TripletBatch(anchors + positives + negatives, targets)
                continue
            copies = torch.from_numpy(self.dual.copies[rows])
            mate_of: list[int] = []
            mates: list[torch.Tensor] = []
            if self.dual.mates is not None:  # a labelled copy of each anchor, whatever the teacher says
                for i, (a, _, _) in enumerate(chunk):
                    if len(self.dual.mates[a]):
                        mate_of.append(i)
                        mates.append(self._video(int(rng.choice(self.dual.mates[a])), rng))
            weight = self.dual.distill_weight(epoch)
            yield TripletBatch(anchors + positives + negatives + mates, targets, copies, weight, mate_of)

    def _similarities(
        self, query: torch.Tensor, target: torch.Tensor, q_mask: torch.Tensor, t_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The student's similarities of aligned pairs of indexed videos, and (fine students) the
        similarity regularisation of their comparator outputs."""
        if self.coarse:
            return self.model(query, target), None
        return self.model(query, target, q_mask, t_mask)

    def losses(self, batch: TripletBatch) -> dict[str, torch.Tensor]:
        x, mask = pad_videos(batch.videos, self.device)
        indexed = self.model.index_video(x, mask)
        b = len(batch.targets) // 2
        anchors, positives, negatives, mates = (
            indexed[:b],
            indexed[b : 2 * b],
            indexed[2 * b : 3 * b],
            indexed[3 * b :],
        )
        a_mask, p_mask, n_mask, m_mask = mask[:b], mask[b : 2 * b], mask[2 * b : 3 * b], mask[3 * b :]
        sim_pos, reg_pos = self._similarities(anchors, positives, a_mask, p_mask)
        sim_neg, reg_neg = self._similarities(anchors, negatives, a_mask, n_mask)
        student = torch.cat([sim_pos, sim_neg])
        reg = None if reg_pos is None or reg_neg is None else reg_pos + reg_neg
        distill = distillation_loss(student, batch.targets.to(self.device))
        parts = {"distillation": distill.detach()}
        loss = distill
        if batch.copies is not None and self.dual is not None:
            copies = batch.copies.to(self.device)
            if batch.mate_of:  # the exploration branch's own pairs: labelled copies
                mate_of = torch.tensor(batch.mate_of, device=self.device)
                sim_mate, reg_mate = self._similarities(anchors[mate_of], mates, a_mask[mate_of], m_mask)
                student = torch.cat([student, sim_mate])
                copies = torch.cat([copies, torch.ones_like(sim_mate, dtype=torch.bool)])
                reg = None if reg is None or reg_mate is None else reg + reg_mate
            label = copy_label_loss(
                student,
                copies,
                self._student_scale(self.dual.negative),
                self._student_scale(self.dual.positive),
            )
            loss = batch.distill_weight * distill + self.dual.label_weight * label
            parts.update(label=label.detach(), distill_weight=torch.tensor(batch.distill_weight))
        if reg is not None:
            loss = loss + self.reg_weight * reg
            parts["regularization"] = reg.detach()
        return {"loss": loss, **parts}

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
    groups: Sequence[Sequence[str]] | None = None,
    **fit_options: Any,
) -> TrainingResult:
    """Distil one student of ``kind`` into ``output/<name>.pth``; with ``config.dual``, also from
    the copy labels of ``groups`` (default: read from ``config.groups``)."""
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
        dual=_dual_learning(config, pairs, groups),
    )
    settings = config.to_dict()
    if not config.dual:
        settings = {k: v for k, v in settings.items() if k not in DUAL_SETTINGS}
    return fit_stage(
        task,
        config,
        output=output,
        monitor="mAP" if validation is not None else None,
        lr=config.lr_coarse if kind == "coarse" else config.lr_fine,
        settings={**settings, "student": kind},
        **fit_options,
    )


def _dual_learning(
    config: StudentsConfig, pairs: MinedPairs, groups: Sequence[Sequence[str]] | None
) -> DualLearning | None:
    if not config.dual:
        return None
    if groups is None:
        if not config.groups:
            raise InvalidInputError("dual learning (students.label_weight > 0) needs students.groups")
        groups = load_groups(config.groups)
    return DualLearning.from_config(config, pairs, groups)


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
    groups = load_groups(config.groups) if config.dual and config.groups else None
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
                kind,
                config,
                features,
                pairs,
                round_dir,
                validation=validation,
                itq=itq,
                groups=groups,
                **fit_options,
            )
    return results
