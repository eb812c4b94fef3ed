"""Training of the selector network (paper 4.3).

A pair is labelled 1 ("worth re-ranking") when its ``target`` exceeds ``threshold`` on the model
set's merged scale (``ScoreMerge.selector_target``). ``disagreement`` (the paper's): the fine
student's score would move the pair by more than that (with the release's merge, the coarse
similarity and the fine one rescaled to [0, 1] differ; with a calibrated merge, their calibrated
scores do). ``copy``: the coarse or the fine merged score is above it, a pair either stage would
rank among the copies. Each epoch
samples the same number of pairs of both classes; the selector sees each pair's two videos
(their self-similarities, trained end to end) and the coarse similarity, and learns the label
with binary cross-entropy (Adam, 1e-4).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dns_milvus.errors import InvalidInputError
from dns_milvus.models import SelectorNetwork, load_checkpoint
from dns_milvus.scoring import (
    RELEASE_MERGE,
    ScoreMerge,
    SelectorTarget,
    fine_unit,
    segment_codes,
    segment_matches,
)
from dns_milvus.train.config import SelectorConfig
from dns_milvus.train.data import FeatureSet, pad_videos
from dns_milvus.train.mining import MinedPairs
from dns_milvus.train.scoring import pair_similarities, pairs_by_query, state_digest
from dns_milvus.train.trainer import TrainingResult, TrainingTask, fit_stage, resolve_device

SELECTOR_FILE = "selector"


@dataclass
class SelectorPairs:
    """Pairs ``(query[i], target[i])`` with the coarse and (rescaled) fine similarities."""

    queries: list[str]
    targets: list[str]
    coarse: np.ndarray  # float32 [N]
    fine: np.ndarray  # float32 [N], on [0, 1]
    #: float32 [N]: the selector's segment-match input (dns_milvus.scoring.segment_matches), or
    #: None when the pairs were scored for a release-layout selector
    segment_match: np.ndarray | None = None

    def labels(
        self, threshold: float, merge: ScoreMerge = RELEASE_MERGE, target: SelectorTarget = "disagreement"
    ) -> np.ndarray:
        return (merge.selector_target(self.coarse, self.fine, target) > threshold).astype(np.float32)

    def subset(self, keep: np.ndarray) -> SelectorPairs:
        return SelectorPairs(
            [self.queries[i] for i in keep],
            [self.targets[i] for i in keep],
            self.coarse[keep],
            self.fine[keep],
            None if self.segment_match is None else self.segment_match[keep],
        )

    def __len__(self) -> int:
        return len(self.queries)

    def save(self, path: Path, digest: str = "", segments: int = 0) -> None:
        """Write the pairs; ``segments``: how many segments a video their segment matches read."""
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs["digest"] = digest
            f.attrs["segments"] = segments
            f.create_dataset("queries", data=np.array(self.queries, dtype=h5py.string_dtype()))
            f.create_dataset("targets", data=np.array(self.targets, dtype=h5py.string_dtype()))
            f.create_dataset("coarse", data=self.coarse)
            f.create_dataset("fine", data=self.fine)
            if self.segment_match is not None:
                f.create_dataset("segment_match", data=self.segment_match)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> SelectorPairs:
        """Read the scored pairs the selector stage stores in ``<output>/selector_pairs.h5``."""
        with h5py.File(path, "r") as f:
            return cls(
                [s.decode() for s in f["queries"][()]],
                [s.decode() for s in f["targets"][()]],
                f["coarse"][()],
                f["fine"][()],
                f["segment_match"][()] if "segment_match" in f else None,
            )


def score_selector_pairs(
    pairs: MinedPairs,
    coarse: torch.nn.Module,
    fine: torch.nn.Module,
    features: FeatureSet,
    *,
    device: torch.device | str = "cpu",
    max_frames: int | None = None,
    progress: bool = False,
) -> SelectorPairs:
    """Coarse and fine similarities of every mined pair (the fine ones rescaled to [0, 1])."""
    queries = [pairs.ids[i] for i in pairs.anchor]
    targets = [pairs.ids[i] for i in pairs.target]
    common = {"device": device, "max_frames": max_frames, "progress": progress}
    coarse_sims = pair_similarities(coarse, features, queries, targets, **common)
    fine_sims = fine_unit(pair_similarities(fine, features, queries, targets, **common))
    return SelectorPairs(queries, targets, coarse_sims, fine_sims.astype(np.float32))


@torch.no_grad()
def pair_segment_matches(
    coarse: torch.nn.Module,
    features: FeatureSet,
    queries: list[str],
    targets: list[str],
    segments: int,
    *,
    device: torch.device | str = "cpu",
    max_frames: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """The segment match of each pair ``(queries[i], targets[i])`` as search computes it: the
    query's coarse vector against the target's segment codes (``dns_milvus.scoring``)."""
    vectors: dict[str, np.ndarray] = {}
    codes: dict[str, np.ndarray] = {}
    for video_id in tqdm(sorted(set(queries) | set(targets)), desc="segment codes", disable=not progress):
        x = features.tensor(video_id)[:max_frames].to(device)
        lengths = torch.tensor([x.shape[0]], device=device)
        vectors[video_id] = coarse.index_packed(x, lengths)[0].float().cpu().numpy()
        codes[video_id] = segment_codes(
            coarse.index_segments_packed(x, lengths, segments)[0].float().cpu().numpy()
        )
    out = np.empty(len(queries), dtype=np.float32)
    for q, positions in pairs_by_query(queries).items():
        out[positions] = segment_matches(vectors[q], [codes[targets[i]] for i in positions])
    return out


def cached_selector_pairs(
    path: Path,
    pairs: MinedPairs,
    coarse: torch.nn.Module,
    fine: torch.nn.Module,
    features: FeatureSet,
    segments: int = 0,
    **options: Any,
) -> SelectorPairs:
    """:func:`score_selector_pairs` (with ``segments``, the segment matches too), stored in ``path``
    and read back when the inputs match; pairs already scored gain only the missing matches."""
    digest = state_digest(coarse, fine, pairs.similarity, pairs.anchor, pairs.target)
    scored, stored_segments = None, 0
    if path.is_file():
        with h5py.File(path, "r") as f:
            fresh = f.attrs.get("digest") == digest
            stored_segments = int(f.attrs.get("segments", 0))
        if fresh:
            scored = SelectorPairs.load(path)
    if scored is None:
        scored, stored_segments = score_selector_pairs(pairs, coarse, fine, features, **options), 0
        scored.save(path, digest)
    if segments and stored_segments != segments:
        scored.segment_match = pair_segment_matches(
            coarse, features, scored.queries, scored.targets, segments, **options
        )
        scored.save(path, digest, segments)
    if not segments:
        scored.segment_match = None
    return scored


@dataclass
class SelectorBatch:
    videos: list[torch.Tensor]  # queries, then targets
    coarse: torch.Tensor  # [b]
    labels: torch.Tensor  # [b]
    segment_match: torch.Tensor | None = None  # [b], for a selector with segments


class SelectorTask(TrainingTask):
    """The selector learning which pairs the fine student would change by more than the threshold."""

    name = SELECTOR_FILE

    def __init__(
        self,
        model: SelectorNetwork,
        features: FeatureSet,
        train: SelectorPairs,
        held_out: SelectorPairs | None,
        *,
        threshold: float,
        batch_size: int,
        pairs_per_class: int,
        device: torch.device,
        max_frames: int = 300,
        merge: ScoreMerge = RELEASE_MERGE,
        target: SelectorTarget = "disagreement",
    ) -> None:
        self.model = model.to(device)
        self.features = features
        self.merge = merge
        self.target = target
        self.train_pairs = train
        self.held_out = held_out
        self.threshold = threshold
        self.batch_size = batch_size
        self.pairs_per_class = pairs_per_class
        self.device = device
        self.max_frames = max_frames
        self.labels = train.labels(threshold, merge, target)
        if len(np.unique(self.labels)) < 2:
            present = sorted({int(v) for v in self.labels})
            raise InvalidInputError(
                f"selector training needs pairs of both classes ({target} > {threshold} and not); "
                f"the {len(self.labels)} training pairs have only the labels {present}"
            )

    def _video(self, video_id: str) -> torch.Tensor:
        return self.features.tensor(video_id)[: self.max_frames]

    def balanced_sample(self, rng: np.random.Generator) -> np.ndarray:
        """``pairs_per_class`` pairs of each class (fewer if a class is smaller), shuffled."""
        per_class = min(self.pairs_per_class, *(int((self.labels == c).sum()) for c in (0.0, 1.0)))
        chosen = [
            rng.choice(np.flatnonzero(self.labels == c), size=per_class, replace=False) for c in (0.0, 1.0)
        ]
        return rng.permutation(np.concatenate(chosen))

    def batches(self, epoch: int, rng: np.random.Generator) -> Iterator[SelectorBatch]:
        order = self.balanced_sample(rng)
        pairs = self.train_pairs
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples in training mode
                continue
            videos = [self._video(pairs.queries[i]) for i in idx] + [
                self._video(pairs.targets[i]) for i in idx
            ]
            yield SelectorBatch(
                videos,
                torch.from_numpy(pairs.coarse[idx]),
                torch.from_numpy(self.labels[idx]),
                _rows(pairs.segment_match, idx),
            )

    def confidences(
        self, videos: list[torch.Tensor], coarse: torch.Tensor, segment_match: torch.Tensor | None = None
    ) -> torch.Tensor:
        x, mask = pad_videos(videos, self.device)
        queries, targets = self.model.index_video(x, mask).chunk(2)
        return self.model.pair_confidence(queries, targets, coarse, segment_match)

    def losses(self, batch: SelectorBatch) -> dict[str, torch.Tensor]:
        confidence = self.confidences(batch.videos, batch.coarse, batch.segment_match)
        loss = F.binary_cross_entropy(confidence, batch.labels.to(confidence))
        return {"loss": loss}

    def validate(self) -> dict[str, float]:
        if self.held_out is None or len(self.held_out) == 0:
            return {}
        scores = predict(self, self.held_out)
        labels = self.held_out.labels(self.threshold, self.merge, self.target)
        out = {
            "accuracy": float(((scores > 0.5) == (labels > 0.5)).mean()),
            "positive_rate": float(labels.mean()),
        }
        if 0 < labels.sum() < len(labels):
            out["auc"] = roc_auc(scores, labels)
        return out


@torch.no_grad()
def predict(task: SelectorTask, pairs: SelectorPairs, batch_size: int = 64) -> np.ndarray:
    """Selector confidences of ``pairs`` (model in eval mode)."""
    out = []
    for start in range(0, len(pairs), batch_size):
        stop = min(start + batch_size, len(pairs))
        videos = [task._video(q) for q in pairs.queries[start:stop]] + [
            task._video(t) for t in pairs.targets[start:stop]
        ]
        part = np.arange(start, stop)
        coarse = torch.from_numpy(pairs.coarse[part])
        out.append(task.confidences(videos, coarse, _rows(pairs.segment_match, part)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _rows(values: np.ndarray | None, idx: np.ndarray) -> torch.Tensor | None:
    return None if values is None else torch.from_numpy(values[idx])


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability a positive outscores a negative (ties count 1/2)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(labels) > 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise InvalidInputError("AUC needs both positive and negative labels")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def split_pairs(
    pairs: SelectorPairs, fraction: float, seed: int
) -> tuple[SelectorPairs, SelectorPairs | None]:
    """Hold out ``fraction`` of the pairs (by query, so no query is in both parts)."""
    if fraction <= 0:
        return pairs, None
    queries = sorted(set(pairs.queries))
    rng = np.random.default_rng([seed, 1])
    n_held = max(1, round(fraction * len(queries)))
    held = set(rng.choice(queries, size=min(n_held, len(queries) - 1), replace=False).tolist())
    in_held = np.array([q in held for q in pairs.queries])
    return pairs.subset(np.flatnonzero(~in_held)), pairs.subset(np.flatnonzero(in_held))


def train_selector(config: SelectorConfig, **fit_options: Any) -> TrainingResult:
    """The ``selector`` stage: label the mined pairs with the two students, then train."""
    device = resolve_device(config.device)
    features = FeatureSet.open(config.features)
    pairs = MinedPairs.load(config.pairs)
    coarse = load_checkpoint(config.coarse, expected="cg_student", map_location=device)
    fine = load_checkpoint(
        config.fine, expected=("fg_att_student", "fg_bin_student", "fg_student"), map_location=device
    )
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    scored = cached_selector_pairs(
        output / "selector_pairs.h5",
        pairs,
        coarse,
        fine,
        features,
        device=device,
        max_frames=config.max_frames,
        progress=config.progress,
        segments=config.segments,
    )
    train, held_out = split_pairs(scored, config.val_fraction, config.seed)
    torch.manual_seed(config.seed)
    task = SelectorTask(
        SelectorNetwork(dims=features.dims, hidden_size=config.hidden_size, segments=config.segments),
        features,
        train,
        held_out,
        threshold=config.threshold,
        batch_size=config.batch_size,
        pairs_per_class=config.pairs_per_class,
        device=device,
        max_frames=config.max_frames,
        merge=ScoreMerge.load(config.merge) if config.merge else RELEASE_MERGE,
        target=config.target,  # type: ignore[arg-type]
    )
    monitor = "auc" if held_out is not None else None
    return fit_stage(task, config, output=output, monitor=monitor, **fit_options)
