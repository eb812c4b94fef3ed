"""Similarities of many videos with a trained network: all pairs in blocks, or listed pairs.

Every network here follows the models' contract: ``index_video(x, mask)`` gives a video vector
(coarse student) or an indexed region tensor (fine students, teacher), and
``calculate_video_similarity`` compares indexed queries with indexed targets. Videos are indexed a
block at a time, sorted by length so that little padding is computed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dns_milvus.errors import InvalidInputError
from dns_milvus.train.data import FeatureSet, pad_videos


@torch.no_grad()
def index_block(
    model: torch.nn.Module, videos: Sequence[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index a block of videos ``[T_i, R, D]`` as one padded batch: (indexed, frame mask)."""
    batch, mask = pad_videos(videos, device)
    return model.index_video(batch, mask), mask


def compare_blocks(
    model: torch.nn.Module,
    query: tuple[torch.Tensor, torch.Tensor],
    target: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Similarity ``[Bq, Bt]`` of indexed query and target blocks (from :func:`index_block`)."""
    (q, q_mask), (t, t_mask) = query, target
    if q.ndim == 2:  # video vectors: the mask was consumed by indexing
        return model.calculate_video_similarity(q, t)
    return model.calculate_video_similarity(q, t, q_mask, t_mask)


def _loader(features: FeatureSet, max_frames: int | None) -> Callable[[str], torch.Tensor]:
    def load(video_id: str) -> torch.Tensor:
        x = features.tensor(video_id)
        return x[:max_frames] if max_frames else x

    return load


def _length_blocks(features: FeatureSet, ids: Sequence[str], size: int) -> list[np.ndarray]:
    """Positions of ``ids`` in blocks of ``size``, sorted by video length."""
    lengths = np.array([features[v].shape[0] for v in ids]) if len(ids) else np.zeros(0, dtype=int)
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def similarity_matrix(
    model: torch.nn.Module,
    features: FeatureSet,
    query_ids: Sequence[str],
    target_ids: Sequence[str] | None = None,
    *,
    block_size: int = 16,
    device: torch.device | str = "cpu",
    max_frames: int | None = None,
    progress: bool = False,
    rows_done: Callable[[np.ndarray, np.ndarray], None] | None = None,
    skip_rows: np.ndarray | None = None,
) -> np.ndarray:
    """Similarities ``[len(query_ids), len(target_ids)]`` (targets default to the queries).

    Work goes a block of query rows at a time; ``rows_done(row_positions, values)`` is called after
    each block (for incremental storage) and rows flagged in ``skip_rows`` are not computed (their
    entries are NaN), which is how an interrupted mining run resumes.
    """
    device = torch.device(device)
    target_ids = list(query_ids) if target_ids is None else list(target_ids)
    load = _loader(features, max_frames)
    out = np.full((len(query_ids), len(target_ids)), np.nan, dtype=np.float32)
    target_blocks = _length_blocks(features, target_ids, block_size)
    vector_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    query_blocks = _length_blocks(features, query_ids, block_size)
    if skip_rows is not None:
        query_blocks = [b[~skip_rows[b]] for b in query_blocks]
        query_blocks = [b for b in query_blocks if len(b)]
    for rows in tqdm(query_blocks, desc="similarities", unit="block", disable=not progress, leave=False):
        q = index_block(model, [load(query_ids[i]) for i in rows], device)
        if q[0].ndim == 2 and vector_cache is None:  # vectors are small: index the targets once
            vector_cache = [
                index_block(model, [load(target_ids[j]) for j in cols], device) for cols in target_blocks
            ]
        for k, cols in enumerate(target_blocks):
            t = (
                vector_cache[k]
                if vector_cache is not None
                else index_block(model, [load(target_ids[j]) for j in cols], device)
            )
            out[np.ix_(rows, cols)] = compare_blocks(model, q, t).float().cpu().numpy()
        if rows_done is not None:
            rows_done(rows, out[rows])
    return out


def pairs_by_query(queries: Sequence[str]) -> dict[str, list[int]]:
    """Positions of the listed pairs grouped by their query (first appearance order): each query
    is then indexed once for all its pairs."""
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault(q, []).append(i)
    return groups


@torch.no_grad()
def pair_similarities(
    model: torch.nn.Module,
    features: FeatureSet,
    queries: Sequence[str],
    targets: Sequence[str],
    *,
    block_size: int = 16,
    device: torch.device | str = "cpu",
    max_frames: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Similarity of each listed pair ``(queries[i], targets[i])`` -> float32 ``[N]``.

    Pairs are grouped by query, so each query is indexed once and compared with its targets in
    blocks.
    """
    device = torch.device(device)
    if len(queries) != len(targets):
        raise InvalidInputError(
            f"expected as many targets as queries (one pair each), got {len(targets)} and {len(queries)}"
        )
    load = _loader(features, max_frames)
    out = np.empty(len(queries), dtype=np.float32)
    groups = pairs_by_query(queries)
    for q_id, positions in tqdm(
        groups.items(), desc="pair similarities", unit="query", disable=not progress, leave=False
    ):
        q = index_block(model, [load(q_id)], device)
        for start in range(0, len(positions), block_size):
            chunk = positions[start : start + block_size]
            t = index_block(model, [load(targets[i]) for i in chunk], device)
            out[chunk] = compare_blocks(model, q, t)[0].float().cpu().numpy()
    return out


def state_digest(*items: torch.nn.Module | np.ndarray) -> str:
    """Short content hash of networks' weights and arrays: cached results name what made them."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, torch.nn.Module):
            for key, value in sorted(item.state_dict().items()):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(np.ascontiguousarray(item).tobytes())
    return h.hexdigest()[:16]
