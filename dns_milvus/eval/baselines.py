"""Retrieval baselines that learn nothing, computed on a benchmark's own frames and features.

They say how hard a benchmark is before any trained network is looked at: a copy detector that
does not beat them has learnt nothing useful.

- :func:`mean_vector_scores`: the untrained average of frame vectors: region features averaged
  over regions and frames, L2-normalised, compared by cosine;
- :func:`region_chamfer_scores`: an untrained frame-level Chamfer similarity: frame-to-frame
  similarity is the mean over query regions of the best region cosine in the target frame
  (the fine students' region Chamfer, without any network), then Chamfer over frames (mean over
  query frames of the best target frame);
- :func:`thumbnail_chamfer_scores`: every frame downsampled to a 16x16 grey thumbnail, made
  zero-mean and unit-norm (:func:`thumbnails`), Chamfer over frames;
- :func:`network_scores`: any fine-grained similarity network (e.g. the ViSiL teacher) on every
  pair, for comparison on the same footing.

Every function returns a float [Q, N] matrix whose rows follow ``queries`` and whose columns are
``columns`` (:class:`dns_milvus.eval.datasets.ColumnIndex`, database ids sorted); a pair whose
query or database video has no features stays NaN, as in :func:`dns_milvus.eval.run.score_dataset`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from dns_milvus.errors import InvalidInputError
from dns_milvus.eval.datasets import ColumnIndex
from dns_milvus.models.layers import frame_chamfer, region_chamfer
from dns_milvus.models.pairwise import FineSimilarityNetwork
from dns_milvus.video.frames import check_frames
from dns_milvus.video.transforms import resize

#: Side of the thumbnail baseline's frames.
THUMBNAIL_SIZE = 16
#: Database videos compared with the queries at once (bounds the padded target tensors).
DEFAULT_CHUNK = 64

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: Per-video arrays by id: region features [T, R, D], thumbnails [T, S] (anything with ``in``/``[]``).
ArraySource = Mapping[str, np.ndarray]


def mean_vector(features: np.ndarray) -> np.ndarray:
    """Region features [T, R, D] -> their mean over regions and frames, L2-normalised [D]."""
    x = _checked(features, 3, "region features").mean(axis=(0, 1), dtype=np.float64)
    return (x / max(np.linalg.norm(x), 1e-12)).astype(np.float32)


def mean_vector_scores(features: ArraySource, queries: Sequence[str], columns: ColumnIndex) -> np.ndarray:
    """Cosine of the mean frame vectors (:func:`mean_vector`) of every query-database pair."""
    ids = [v for v in columns.ids if v in features]
    out = _empty(queries, columns)
    if not ids:
        return out
    database = np.stack([mean_vector(features[v]) for v in ids])
    cols = np.asarray([columns.position[v] for v in ids])
    for row, query in enumerate(queries):
        if query in features:
            out[row, cols] = database @ mean_vector(features[query])
    return out


def region_chamfer_scores(
    features: ArraySource, queries: Sequence[str], columns: ColumnIndex, *, chunk: int = DEFAULT_CHUNK
) -> np.ndarray:
    """Untrained frame-level Chamfer over region cosines (see the module notes) of every pair."""

    def frame_sim(query: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        tq, r, d = query.shape
        n, tt, rt, _ = targets.shape
        scores = query.reshape(-1, d) @ targets.reshape(-1, d).T
        # [Tq, R, n*Tt, Rt] -> [Tq, n*Tt]: best target region, averaged over query regions
        return region_chamfer(scores.view(tq, r, n * tt, rt)).view(tq, n, tt).transpose(0, 1)

    return _chamfer_scores(features, queries, columns, _unit_regions, frame_sim, chunk)


def thumbnails(frames: np.ndarray, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """RGB frames ``uint8 [T, H, W, 3]`` -> grey ``size x size`` thumbnails, zero-mean and unit-norm,
    flattened: float32 [T, size * size]. A uniform frame gives a zero vector (it matches nothing)."""
    small = resize(check_frames(frames), size, size).astype(np.float32) @ _LUMA
    x = small.reshape(len(small), -1)
    x -= x.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 1e-6)


def thumbnail_chamfer_scores(
    thumbs: ArraySource, queries: Sequence[str], columns: ColumnIndex, *, chunk: int = DEFAULT_CHUNK
) -> np.ndarray:
    """Chamfer over frames of thumbnail cosines (:func:`thumbnails`) of every pair."""

    def frame_sim(query: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, tt, s = targets.shape
        return (query @ targets.reshape(-1, s).T).view(-1, n, tt).transpose(0, 1)

    return _chamfer_scores(thumbs, queries, columns, lambda x: _checked(x, 2, "thumbnails"), frame_sim, chunk)


@torch.inference_mode()
def network_scores(
    network: FineSimilarityNetwork,
    features: ArraySource,
    queries: Sequence[str],
    columns: ColumnIndex,
    *,
    chunk: int = DEFAULT_CHUNK,
) -> np.ndarray:
    """A fine-grained similarity network's score (in [-1, 1]) of every pair, from region features.

    Every video is indexed once (``network.index_video``); database videos are compared in padded
    chunks of ``chunk`` with a frame mask, which leaves each pair's similarity unchanged.
    """
    device = next(network.parameters()).device

    def index(x: np.ndarray) -> torch.Tensor:
        return network.index_video(torch.from_numpy(_checked(x, 3, "region features")).to(device))

    out = _empty(queries, columns)
    ids = [v for v in columns.ids if v in features]
    indexed_queries = {q: index(features[q]) for q in queries if q in features}
    for start in range(0, len(ids), chunk):
        block = ids[start : start + chunk]
        targets, mask = _padded([index(features[v]) for v in block])
        cols = np.asarray([columns.position[v] for v in block])
        for row, query in enumerate(queries):
            if query in indexed_queries:
                sim = network.calculate_video_similarity(indexed_queries[query], targets, target_mask=mask)
                out[row, cols] = sim.float().cpu().numpy()
    return out


# -- helpers -------------------------------------------------------------------------------------


@torch.inference_mode()
def _chamfer_scores(
    source: ArraySource,
    queries: Sequence[str],
    columns: ColumnIndex,
    prepare: Callable[[np.ndarray], np.ndarray],
    frame_sim: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk: int,
) -> np.ndarray:
    """Chamfer over frames (max over target frames, mean over query frames) of ``frame_sim``'s
    [n, Tq, Tt] frame-to-frame similarities, database videos padded in chunks."""
    if chunk < 1:
        raise InvalidInputError(f"chunk must be >= 1, got {chunk}")
    out = _empty(queries, columns)
    ids = [v for v in columns.ids if v in source]
    prepared = {q: torch.from_numpy(prepare(source[q])) for q in queries if q in source}
    for start in range(0, len(ids), chunk):
        block = ids[start : start + chunk]
        targets, mask = _padded([torch.from_numpy(prepare(source[v])) for v in block])
        lengths = mask.sum(dim=1)
        cols = np.asarray([columns.position[v] for v in block])
        for row, query in enumerate(queries):
            if query not in prepared:
                continue
            q = prepared[query]
            sim = frame_sim(q, targets)  # [n, Tq, Tt]; padded target frames are masked by frame_chamfer
            query_lengths = torch.full((len(block),), len(q), dtype=lengths.dtype)
            out[row, cols] = frame_chamfer(sim, query_lengths, lengths).double().numpy()
    return out


def _padded(videos: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos [T_i, ...] -> zero-padded [n, T_max, ...] and the frame mask [n, T_max]."""
    longest = max(len(v) for v in videos)
    out = videos[0].new_zeros((len(videos), longest, *videos[0].shape[1:]))
    mask = torch.zeros((len(videos), longest), dtype=torch.bool, device=videos[0].device)
    for i, video in enumerate(videos):
        out[i, : len(video)] = video
        mask[i, : len(video)] = True
    return out, mask


def _unit_regions(features: np.ndarray) -> np.ndarray:
    """Region vectors scaled to unit length, so their dot products are cosines."""
    x = _checked(features, 3, "region features")
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 1e-12)


def _checked(x: np.ndarray, ndim: int, what: str) -> np.ndarray:
    array = np.asarray(x, dtype=np.float32)
    if array.ndim != ndim or array.shape[0] == 0:
        shape = "[T, R, D]" if ndim == 3 else "[T, S]"
        raise InvalidInputError(f"{what} must be a float array {shape} with T >= 1, got {array.shape}")
    return array


def _empty(queries: Sequence[str], columns: ColumnIndex) -> np.ndarray:
    return np.full((len(queries), len(columns)), np.nan)
