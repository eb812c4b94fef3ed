"""Synthetic model sets and corpora: freshly initialised (seeded) networks and random videos.

For the tests, the benchmarks and a self-test of a deployed stack: they exercise every code
path (indexing, selector, fetch, fine-grained student) without trained weights.
Scores from untrained networks are meaningless; only their agreement between paths matters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dns_milvus.engine.modelset import ModelSet, VideoRecord
from dns_milvus.engine.rerank import Candidate
from dns_milvus.models import CoarseGrainedStudent, FineGrainedStudent, SelectorNetwork, save_checkpoint
from dns_milvus.store import ObjectStore, encode_fine_tensor, fine_key


def write_model_set(
    directory: str | Path,
    *,
    name: str = "synthetic",
    seed: int = 0,
    dims: int = 64,
    bits: int = 64,
    fine: str = "bin",
    netvlad_clusters: int = 8,
    coarse_dim: int | None = None,
    selector_segments: int = 0,
) -> Path:
    """Save a model set of seeded, freshly initialised networks; returns its directory.

    ``dims`` is the region-feature dimension, ``fine`` the fine-grained student (``"bin"``:
    binarization with ``bits``-bit codes, a multiple of 8; ``"att"``: attention, float16 storage),
    ``netvlad_clusters`` and ``coarse_dim`` (default ``2 * dims``) size the coarse student's head.
    The defaults are small and fast; ``dims=512, bits=512, netvlad_clusters=64, coarse_dim=1024``
    are the DnS release's sizes. ``selector_segments`` > 0 gives the selector its segment-match
    input over that many segments a video. The caller's torch random state is left as it was.
    """
    if fine not in ("bin", "att"):
        raise ValueError(f"fine must be 'bin' or 'att', got {fine!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fine_name = f"fg_{fine}_student.pth"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        coarse = CoarseGrainedStudent(
            dims=dims,
            transformer_heads=max(1, min(8, dims // 16)),
            transformer_feedforward_dims=4 * dims,  # the release's ratio (512 -> 2048)
            netvlad_clusters=netvlad_clusters,
            netvlad_outdims=coarse_dim or 2 * dims,
        )
        save_checkpoint(coarse.eval(), directory / "cg_student.pth")
        student = FineGrainedStudent(
            dims=dims, binarization=fine == "bin", attention=fine == "att", bits=bits
        )
        save_checkpoint(student.eval(), directory / fine_name)
        save_checkpoint(
            SelectorNetwork(dims=dims, segments=selector_segments).eval(), directory / "selector.pth"
        )
    finally:
        torch.random.set_rng_state(generator_state)
    manifest = {"name": name, "coarse": "cg_student.pth", "fine": fine_name, "selector": "selector.pth"}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def random_features(n: int, *, dims: int, seed: int, frames: tuple[int, int] = (3, 12)) -> list[np.ndarray]:
    """``n`` videos of region features [T, 9, dims] with T drawn from ``frames`` (inclusive)."""
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((int(rng.integers(frames[0], frames[1] + 1)), 9, dims)).astype(np.float32)
        for _ in range(n)
    ]


def write_corpus(
    models: ModelSet,
    store: ObjectStore,
    collection: str,
    n: int,
    *,
    seed: int = 0,
    prefix: str = "v",
    frames: tuple[int, int] = (3, 12),
) -> dict[str, VideoRecord]:
    """Index ``n`` random videos (T drawn from ``frames``, inclusive) and store their fine
    tensors under the keys ingest would use."""
    features = random_features(n, dims=models.feature_dim, seed=seed, frames=frames)
    records = models.index_features(features)
    out = {}
    for i, record in enumerate(records):
        record.video_id = f"{prefix}{i}"
        store.put(fine_key(collection, record.video_id), encode_fine_tensor(record.fine, record.payload_kind))
        out[record.video_id] = record
    return out


def candidates_for(query: VideoRecord, corpus: dict[str, VideoRecord], collection: str) -> list[Candidate]:
    """Every corpus video but the query as a stage-1 candidate, with its exact coarse score."""
    return [
        Candidate(
            video_id=vid,
            coarse_score=float(np.dot(query.coarse, rec.coarse)),
            self_sim=rec.self_sim,
            fine_key=fine_key(collection, vid),
            n_frames=rec.n_frames,
            payload_kind=rec.payload_kind,
            segments=rec.segments,
        )
        for vid, rec in corpus.items()
        if vid != query.video_id
    ]
