"""Validation during training: mAP of a network on a labelled query/database set."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dns_milvus.eval.metrics import mean_average_precision
from dns_milvus.train.config import ConfigError, ValidationConfig
from dns_milvus.train.data import FeatureSet
from dns_milvus.train.scoring import similarity_matrix


@dataclass
class ValidationSet:
    """Queries with their relevant videos, and the database they are searched in."""

    features: FeatureSet
    relevant: dict[str, set[str]]
    database: list[str]

    @classmethod
    def from_config(cls, config: ValidationConfig) -> ValidationSet:
        features = FeatureSet.open(config.features)
        relevant = parse_ground_truth(Path(config.ground_truth), config.labels)
        database = list(config.database) if config.database is not None else list(features.ids)
        missing = sorted((set(relevant) | set(database)) - set(features.ids))
        if missing:
            raise ConfigError(
                f"validation: {len(missing)} videos of the ground truth/database have no "
                f"features in {config.features} (e.g. {missing[:3]})"
            )
        return cls(features, relevant, database)

    @classmethod
    def from_groups(cls, features: FeatureSet, groups: Collection[Collection[str]]) -> ValidationSet:
        """Every member of a copy group is a query whose relevant videos are its group mates."""
        relevant = {v: set(g) - {v} for g in groups for v in g}
        return cls(features, relevant, list(features.ids))


def parse_ground_truth(path: Path, labels: Collection[str]) -> dict[str, set[str]]:
    """``{query: [relevant ids]}`` or the FIVR form ``{query: {label: [ids]}}`` -> ``{query: set}``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"validation ground truth {path} cannot be read as JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"validation ground truth {path}: expected an object {{query id: [relevant ids]}}")
    relevant: dict[str, set[str]] = {}
    for query, value in data.items():
        if isinstance(value, Mapping):
            relevant[query] = {v for label in labels for v in value.get(label, [])}
        elif isinstance(value, list):
            relevant[query] = set(value)
        else:
            raise ConfigError(
                f"validation ground truth {path}: query {query!r} maps to "
                f"{type(value).__name__}; expected a list of ids or {{label: [ids]}}"
            )
    return relevant


@torch.no_grad()
def evaluate_map(
    model: torch.nn.Module,
    validation: ValidationSet,
    *,
    device: torch.device | str = "cpu",
    block_size: int = 16,
    max_frames: int | None = None,
) -> float:
    """mAP of ``model``'s similarities: every query ranks the database (itself excluded)."""
    queries = sorted(validation.relevant)
    sims = similarity_matrix(
        model,
        validation.features,
        queries,
        validation.database,
        block_size=block_size,
        device=device,
        max_frames=max_frames,
    )
    results = {
        q: dict(zip(validation.database, map(float, row), strict=True))
        for q, row in zip(queries, sims, strict=True)
    }
    return mean_average_precision(results, validation.relevant, database=validation.database).value
