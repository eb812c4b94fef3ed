"""Fitting a model set's score merge: calibrations that put both students on one scale.

Labelled pairs come from the copy groups (group mates are copies: label 1) and from videos of
other groups (label 0), hard negatives from the same scene included. Random negatives stand for
all the pairs they were drawn from (weighted by the sampling ratio), so the fitted calibrations
estimate how likely a pair with a given score is a copy among all pairs, as a search meets them.
Both students are calibrated on the same pairs (``dns_milvus.scoring.fit_merge``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dns_milvus.errors import InvalidInputError
from dns_milvus.scoring import MergeKind, ScoreMerge, fine_unit, fit_merge
from dns_milvus.train.data import FeatureSet
from dns_milvus.train.scoring import pair_similarities


@dataclass
class LabelledPairs:
    queries: list[str]
    targets: list[str]
    labels: np.ndarray  # 1: a copy
    weights: np.ndarray  # how many pairs of all each one stands for


def calibration_pairs(
    groups: Sequence[Sequence[str]],
    scenes: Mapping[str, str] | None,
    *,
    negatives_per_video: int,
    seed: int,
) -> LabelledPairs:
    """Every ordered pair of group mates, and per video ``negatives_per_video`` random videos of other
    groups plus every same-scene video of another group (hard negatives)."""
    rng = np.random.default_rng([seed, 11])
    ids = sorted({v for g in groups for v in g})
    group_of = {v: i for i, g in enumerate(groups) for v in g}
    if len(set(group_of.values())) < 2:
        raise InvalidInputError("calibration needs two or more copy groups")
    by_scene: dict[str, list[str]] = {}
    for v in ids:
        if scenes and v in scenes:
            by_scene.setdefault(scenes[v], []).append(v)
    queries: list[str] = []
    targets: list[str] = []
    labels: list[float] = []
    weights: list[float] = []
    for v in ids:
        mates = [u for u in groups[group_of[v]] if u != v]
        queries += [v] * len(mates)
        targets += mates
        labels += [1.0] * len(mates)
        weights += [1.0] * len(mates)
        scene = scenes.get(v) if scenes else None
        hard = [u for u in by_scene.get(scene, []) if group_of[u] != group_of[v]] if scene else []
        excluded = set(hard)
        others = [u for u in ids if group_of[u] != group_of[v] and u not in excluded]
        drawn = rng.choice(len(others), size=min(negatives_per_video, len(others)), replace=False)
        picked = [others[i] for i in sorted(drawn.tolist())]
        queries += [v] * (len(hard) + len(picked))
        targets += hard + picked
        labels += [0.0] * (len(hard) + len(picked))
        weights += [1.0] * len(hard) + [len(others) / max(1, len(picked))] * len(picked)
    return LabelledPairs(queries, targets, np.asarray(labels), np.asarray(weights))


def fit_score_merge(
    coarse: torch.nn.Module,
    fine: torch.nn.Module,
    features: FeatureSet,
    groups: Sequence[Sequence[str]],
    scenes: Mapping[str, str] | None = None,
    *,
    kind: MergeKind = "calibrated",
    negatives_per_video: int = 30,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> ScoreMerge:
    """Both students' calibrations fitted on labelled pairs of ``groups`` (see the module notes)."""
    pairs = calibration_pairs(groups, scenes, negatives_per_video=negatives_per_video, seed=seed)
    common = {"device": device, "progress": progress}
    coarse_sims = pair_similarities(coarse, features, pairs.queries, pairs.targets, **common)
    fine_sims = fine_unit(pair_similarities(fine, features, pairs.queries, pairs.targets, **common))
    details = {
        "pairs": len(pairs.labels),
        "copies": int(pairs.labels.sum()),
        "videos": len({*pairs.queries, *pairs.targets}),
    }
    return fit_merge(coarse_sims, fine_sims, pairs.labels, pairs.weights, kind=kind, details=details)
