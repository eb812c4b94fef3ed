"""Training of the ViSiL teacher with triplets (paper 4.3).

Triplets come from copy groups: the anchor and the positive are two videos of one group, the
negative a video of no common group. Groups are either labelled (VCDB-style copy annotations) or
made self-supervised: a video and transformed copies of it (see :mod:`dns_milvus.train.corpus`).
The loss is the triplet loss (margin 0.5) plus the similarity regularisation loss weighted by r.
Training snippets are windows of at most ``window`` frames, aligned between anchor and positive.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dns_milvus.errors import InvalidInputError
from dns_milvus.models import ViSiLTeacher
from dns_milvus.train.config import TeacherConfig
from dns_milvus.train.data import FeatureSet, load_groups, pad_videos
from dns_milvus.train.losses import triplet_loss
from dns_milvus.train.trainer import TrainingResult, TrainingTask, fit_stage, resolve_device
from dns_milvus.train.validation import ValidationSet, evaluate_map

TEACHER_FILE = "teacher"


@dataclass
class TripletVideos:
    videos: list[torch.Tensor]  # anchors, then positives, then negatives


def _window(x: torch.Tensor, start_fraction: float, window: int) -> torch.Tensor:
    """``window`` consecutive frames starting at ``start_fraction`` of the possible starts."""
    if x.shape[0] <= window:
        return x
    start = round(start_fraction * (x.shape[0] - window))
    return x[start : start + window]


class TeacherTask(TrainingTask):
    """The teacher learning to score group mates above other videos."""

    name = TEACHER_FILE

    def __init__(
        self,
        model: ViSiLTeacher,
        features: FeatureSet,
        groups: Sequence[Sequence[str]],
        *,
        triplets_per_epoch: int,
        batch_size: int,
        device: torch.device,
        margin: float = 0.5,
        reg_weight: float = 0.1,
        window: int = 64,
        validation: ValidationSet | None = None,
        scenes: Mapping[str, str] | None = None,
        hard_negative_rate: float = 0.0,
    ) -> None:
        self.model = model.to(device)
        self.features = features
        self.groups = [list(g) for g in groups]
        self.ids = list(features.ids)
        self.triplets_per_epoch = triplets_per_epoch
        self.batch_size = batch_size
        self.device = device
        self.margin = margin
        self.reg_weight = reg_weight
        self.window = window
        self.validation = validation
        check_groups(self.groups, features)
        self.hard_negative_rate = hard_negative_rate
        # Same-scene videos outside each group: other moments of the anchor's clip.
        by_scene: dict[str, list[str]] = {}
        for vid in self.ids:
            if scenes and vid in scenes:
                by_scene.setdefault(scenes[vid], []).append(vid)
        self.hard_negatives = [
            sorted({v for m in g if scenes and m in scenes for v in by_scene[scenes[m]]} - set(g))
            for g in self.groups
        ]

    def release_args(self) -> dict[str, Any]:
        return {"network": "visil"}

    def _triplet(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = int(rng.integers(len(self.groups)))
        group, hard = self.groups[index], self.hard_negatives[index]
        anchor, positive = rng.choice(len(group), size=2, replace=False)
        members = set(group)
        if hard and rng.random() < self.hard_negative_rate:
            negative = hard[int(rng.integers(len(hard)))]
        else:
            while (negative := self.ids[int(rng.integers(len(self.ids)))]) in members:
                pass
        aligned = float(rng.random())
        return (
            _window(self.features.tensor(group[anchor]), aligned, self.window),
            _window(self.features.tensor(group[positive]), aligned, self.window),
            _window(self.features.tensor(negative), float(rng.random()), self.window),
        )

    def batches(self, epoch: int, rng: np.random.Generator) -> Iterator[TripletVideos]:
        for start in range(0, self.triplets_per_epoch, self.batch_size):
            count = min(self.batch_size, self.triplets_per_epoch - start)
            a, p, n = zip(*(self._triplet(rng) for _ in range(count)), strict=True)
            yield TripletVideos([*a, *p, *n])

    def losses(self, batch: TripletVideos) -> dict[str, torch.Tensor]:
        x, mask = pad_videos(batch.videos, self.device)
        anchors, positives, negatives = self.model.index_video(x, mask).chunk(3)
        a_mask, p_mask, n_mask = mask.chunk(3)
        sim_pos, reg_pos = self.model(anchors, positives, a_mask, p_mask)
        sim_neg, reg_neg = self.model(anchors, negatives, a_mask, n_mask)
        triplet = triplet_loss(sim_pos, sim_neg, self.margin)
        reg = reg_pos + reg_neg
        return {
            "loss": triplet + self.reg_weight * reg,
            "triplet": triplet.detach(),
            "regularization": reg.detach(),
            "margin_ok": (sim_pos - sim_neg > self.margin).float().mean(),
        }

    def validate(self) -> dict[str, float]:
        if self.validation is None:
            return {}
        return {"mAP": evaluate_map(self.model, self.validation, device=self.device)}


def check_groups(groups: Sequence[Sequence[str]], features: FeatureSet) -> None:
    """Groups must have features and leave at least one video outside each group (a negative)."""
    if not groups:
        raise InvalidInputError("teacher training needs at least one copy group of two or more videos")
    known = set(features.ids)
    missing = sorted({v for g in groups for v in g} - known)
    if missing:
        raise InvalidInputError(
            f"{len(missing)} videos of the copy groups have no features in "
            f"{features.source} (e.g. {missing[:3]})"
        )
    if any(len(set(g)) < 2 for g in groups):
        raise InvalidInputError("every copy group needs at least two distinct videos")
    if any(len(set(g)) >= len(known) for g in groups):
        raise InvalidInputError("a copy group holds every video: no negative is left for its triplets")


def train_teacher(
    config: TeacherConfig,
    *,
    features: FeatureSet | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    **fit_options: Any,
) -> TrainingResult:
    """The ``teacher`` stage. ``features``/``groups`` may be given directly (e.g. a copy corpus
    built in memory); otherwise they come from the config (labelled files, or the cached
    self-supervised corpus built from ``config.videos``)."""
    if features is None or groups is None:
        if config.self_supervised:
            from dns_milvus.train.corpus import build_copy_corpus_from_config

            features, groups = build_copy_corpus_from_config(config)
        else:
            features, groups = FeatureSet.open(config.features), load_groups(config.groups)
    scenes = json.loads(Path(config.scenes).read_text()) if config.scenes else None
    device = resolve_device(config.device)
    validation = ValidationSet.from_config(config.validation) if config.validation else None
    torch.manual_seed(config.seed)
    task = TeacherTask(
        ViSiLTeacher(dims=features.dims),
        features,
        groups,
        triplets_per_epoch=config.triplets_per_epoch,
        batch_size=config.batch_size,
        device=device,
        margin=config.margin,
        reg_weight=config.reg_weight,
        window=config.window,
        validation=validation,
        scenes=scenes,
        hard_negative_rate=config.hard_negative_rate,
    )
    monitor = "mAP" if validation is not None else None
    return fit_stage(task, config, output=Path(config.output), monitor=monitor, **fit_options)
