"""Synthetic model sets and corpora: freshly initialised (seeded) networks and random videos.

For the sidecar's tests, its load benchmark and a self-test of a deployed stack: they exercise
every code path of stage 2 (selector, fetch, fine-grained student) without trained weights.
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
    directory: str | Path, *, name: str = "synthetic", dims: int = 64, bits: int = 64, seed: int = 0
) -> Path:
    """Save a small model set (binarization student) of seeded random networks; returns its directory.

    ``dims`` is the region-feature dimension, ``bits`` the fine-grained code length (a multiple of 8).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        coarse = CoarseGrainedStudent(
            dims=dims,
            transformer_heads=4,
            transformer_feedforward_dims=2 * dims,
            netvlad_clusters=8,
            netvlad_outdims=2 * dims,
        )
        save_checkpoint(coarse, directory / "cg_student.pth")
        fine = FineGrainedStudent(dims=dims, binarization=True, bits=bits)
        save_checkpoint(fine, directory / "fg_student.pth")
        save_checkpoint(SelectorNetwork(dims=dims), directory / "selector.pth")
    finally:
        torch.random.set_rng_state(generator_state)
    manifest = {
        "name": name,
        "coarse": "cg_student.pth",
        "fine": "fg_student.pth",
        "selector": "selector.pth",
    }
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
    models: ModelSet, store: ObjectStore, collection: str, n: int, *, seed: int = 0, prefix: str = "v"
) -> dict[str, VideoRecord]:
    """Index ``n`` random videos and store their fine tensors under the keys ingest would use."""
    records = models.index_features(random_features(n, dims=models.feature_dim, seed=seed))
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
        )
        for vid, rec in corpus.items()
        if vid != query.video_id
    ]
