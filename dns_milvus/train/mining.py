"""Pair mining for distillation (paper 4.3).

1. The teacher scores every ordered pair of the corpus. The matrix is written to an HDF5 file a
   block of rows at a time with a per-row ``done`` flag, so an interrupted run resumes where it
   stopped.
2. Videos are the nodes of a graph with an edge wherever the (symmetrised) teacher similarity
   exceeds a threshold; its connected components of two or more videos are clusters.
3. Every clustered video is an anchor. Its positives are its cluster mates; its negatives are
   its most similar videos of other clusters and its most similar videos of no cluster
   (``negatives_per_kind`` of each). Each pair keeps the teacher's similarity (anchor as query).

The pairs live in the same file (group ``pairs``) and are read back as :class:`MinedPairs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from dns_milvus.errors import InvalidInputError
from dns_milvus.train.data import FeatureSet, connected_components
from dns_milvus.train.scoring import pair_similarities, similarity_matrix, state_digest

PAIRS_FORMAT = "dns-milvus-pairs/1"


@dataclass
class MinedPairs:
    """Training pairs: ``anchor[i]`` with ``target[i]`` (positions in ``ids``), the teacher's
    similarity of the pair and whether it is a positive."""

    ids: list[str]
    anchor: np.ndarray  # int64 [N]
    target: np.ndarray  # int64 [N]
    similarity: np.ndarray  # float32 [N]
    positive: np.ndarray  # bool [N]

    def __len__(self) -> int:
        return len(self.anchor)

    @property
    def anchors(self) -> np.ndarray:
        """Anchors that have at least one positive and one negative (those a triplet can use)."""
        has_pos = np.zeros(len(self.ids), dtype=bool)
        has_neg = np.zeros(len(self.ids), dtype=bool)
        has_pos[self.anchor[self.positive]] = True
        has_neg[self.anchor[~self.positive]] = True
        return np.flatnonzero(has_pos & has_neg)

    def triplets(self, rng: np.random.Generator) -> list[tuple[int, int, int]]:
        """One ``(positive pair index, negative pair index)`` per usable anchor, drawn by ``rng``;
        returned as (anchor, positive pair, negative pair) in a random order."""
        order = np.argsort(self.anchor, kind="stable")
        starts = np.searchsorted(self.anchor[order], np.arange(len(self.ids) + 1))
        out = []
        for a in self.anchors:
            rows = order[starts[a] : starts[a + 1]]
            pos, neg = rows[self.positive[rows]], rows[~self.positive[rows]]
            out.append((int(a), int(rng.choice(pos)), int(rng.choice(neg))))
        perm = rng.permutation(len(out))
        return [out[i] for i in perm]

    def subset(self, keep: np.ndarray) -> MinedPairs:
        return MinedPairs(
            self.ids, self.anchor[keep], self.target[keep], self.similarity[keep], self.positive[keep]
        )

    def with_similarity(self, similarity: np.ndarray) -> MinedPairs:
        return MinedPairs(self.ids, self.anchor, self.target, similarity.astype(np.float32), self.positive)

    def save(self, path: str | Path, group: str = "pairs") -> Path:
        """Store the pairs in (or replace them in) an HDF5 file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "a") as f:
            if group in f:
                del f[group]
            g = f.create_group(group)
            g.attrs["format"] = PAIRS_FORMAT
            g.create_dataset("ids", data=np.array(self.ids, dtype=h5py.string_dtype()))
            g.create_dataset("anchor", data=self.anchor.astype(np.int64))
            g.create_dataset("target", data=self.target.astype(np.int64))
            g.create_dataset("similarity", data=self.similarity.astype(np.float32))
            g.create_dataset("positive", data=self.positive.astype(bool))
        return path

    @classmethod
    def load(cls, path: str | Path, group: str = "pairs") -> MinedPairs:
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"pairs file {path} does not exist; run the mining stage first")
        try:
            with h5py.File(path, "r") as f:
                if group not in f or f[group].attrs.get("format") != PAIRS_FORMAT:
                    raise InvalidInputError(
                        f"{path} holds no mined pairs (expected the group {group!r} "
                        f"written by the mining stage)"
                    )
                g = f[group]
                return cls(
                    [s.decode() if isinstance(s, bytes) else s for s in g["ids"][()]],
                    g["anchor"][()],
                    g["target"][()],
                    g["similarity"][()],
                    g["positive"][()],
                )
        except OSError as exc:
            raise InvalidInputError(f"cannot read pairs file {path}: {exc}") from exc


def compute_similarities(
    model: torch.nn.Module,
    features: FeatureSet,
    path: str | Path,
    *,
    block_size: int = 16,
    device: torch.device | str = "cpu",
    max_frames: int | None = None,
    progress: bool = False,
    resume: bool = True,
) -> np.ndarray:
    """All-pairs similarity matrix of ``features`` by ``model``, stored in ``path`` (resumable).

    The file holds ``ids``, ``similarities`` [N, N] and ``done`` [N]; rows already done are read
    back instead of being computed again. A file made for other videos or by another network is
    refused.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = list(features.ids)
    n = len(ids)
    digest = state_digest(model)
    with h5py.File(path, "a") as f:
        if "similarities" in f and resume:
            stored = [s.decode() if isinstance(s, bytes) else s for s in f["ids"][()]]
            if stored != ids or f.attrs.get("model") != digest:
                raise InvalidInputError(
                    f"{path} holds similarities of other videos or by another network; "
                    "remove it or use another output directory"
                )
        else:
            f.attrs["model"] = digest
            for key in ("ids", "similarities", "done"):
                if key in f:
                    del f[key]
            f.create_dataset("ids", data=np.array(ids, dtype=h5py.string_dtype()))
            f.create_dataset(
                "similarities",
                shape=(n, n),
                dtype=np.float32,
                fillvalue=np.nan,
                chunks=(min(n, 64), min(n, 1024)),
            )
            f.create_dataset("done", shape=(n,), dtype=bool, fillvalue=False)
        done = f["done"][()]
        sims, flags = f["similarities"], f["done"]

        def store(rows: np.ndarray, values: np.ndarray) -> None:
            sorted_rows = np.sort(rows)
            sims[sorted_rows] = values[np.argsort(rows)]
            flags[sorted_rows] = True
            f.flush()

        if not done.all():
            similarity_matrix(
                model,
                features,
                ids,
                block_size=block_size,
                device=device,
                max_frames=max_frames,
                progress=progress,
                rows_done=store,
                skip_rows=done,
            )
        return f["similarities"][()]


def mine_pairs(
    similarities: np.ndarray, ids: Sequence[str], *, threshold: float, negatives_per_kind: int = 50
) -> MinedPairs:
    """The paper's pair mining over a teacher similarity matrix ``[N, N]`` (see the module doc)."""
    sims = np.asarray(similarities, dtype=np.float32)
    n = len(ids)
    if sims.shape != (n, n) or not np.isfinite(sims).all():
        raise InvalidInputError(f"expected a finite similarity matrix [{n}, {n}], got {list(sims.shape)}")
    symmetric = (sims + sims.T) / 2.0
    rows, cols = np.nonzero(np.triu(symmetric > threshold, k=1))
    components = connected_components(list(range(n)), list(zip(rows.tolist(), cols.tolist(), strict=True)))
    cluster = np.full(n, -1, dtype=np.int64)
    for c, members in enumerate(m for m in components if len(m) > 1):
        cluster[members] = c

    anchor, target, positive = [], [], []
    unclustered = np.flatnonzero(cluster < 0)
    for a in np.flatnonzero(cluster >= 0):
        mates = np.flatnonzero((cluster == cluster[a]) & (np.arange(n) != a))
        others = np.flatnonzero((cluster >= 0) & (cluster != cluster[a]))
        negatives = np.concatenate(
            [
                _most_similar(sims[a], others, negatives_per_kind),
                _most_similar(sims[a], unclustered, negatives_per_kind),
            ]
        )
        anchor += [a] * (len(mates) + len(negatives))
        target += mates.tolist() + negatives.tolist()
        positive += [True] * len(mates) + [False] * len(negatives)
    anchor_arr = np.asarray(anchor, dtype=np.int64)
    target_arr = np.asarray(target, dtype=np.int64)
    return MinedPairs(
        list(ids),
        anchor_arr,
        target_arr,
        sims[anchor_arr, target_arr].astype(np.float32) if len(anchor_arr) else np.zeros(0, np.float32),
        np.asarray(positive, dtype=bool),
    )


def _most_similar(row: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    if len(candidates) <= k:
        return candidates[np.argsort(-row[candidates], kind="stable")]
    top = np.argpartition(-row[candidates], k - 1)[:k]
    top = top[np.argsort(-row[candidates][top], kind="stable")]
    return candidates[top]


def rescore_pairs(
    pairs: MinedPairs,
    model: torch.nn.Module,
    features: FeatureSet,
    *,
    device: torch.device | str = "cpu",
    block_size: int = 16,
    max_frames: int | None = None,
    progress: bool = False,
) -> MinedPairs:
    """The same pairs with similarities from another network (iterative distillation)."""
    queries = [pairs.ids[i] for i in pairs.anchor]
    targets = [pairs.ids[i] for i in pairs.target]
    sims = pair_similarities(
        model,
        features,
        queries,
        targets,
        device=device,
        block_size=block_size,
        max_frames=max_frames,
        progress=progress,
    )
    return pairs.with_similarity(sims)


def labelled_pairs(
    pairs: MinedPairs,
    similarities: np.ndarray,
    groups: Sequence[Sequence[str]],
    scenes: dict[str, str],
    *,
    hard_negatives: int = 10,
    seed: int = 0,
) -> MinedPairs:
    """Distillation pairs whose positives are labelled copies: every ordered pair of group mates,
    and as negatives the mined ones plus up to ``hard_negatives`` videos of each anchor's scene
    outside its group (another moment of the same clip), drawn with ``seed``. Every pair keeps
    the teacher's similarity from ``similarities`` (the mining matrix, rows and columns in
    ``pairs.ids`` order).

    The teacher's clusters at a low mining threshold chain through unrelated videos, so most mined
    positives are not copies; the fine student learns the teacher's scores better from the copies
    the corpus knows (docs/training.md).
    """
    n = len(pairs.ids)
    sims = np.asarray(similarities, dtype=np.float32)
    if sims.shape != (n, n):
        raise InvalidInputError(f"expected the mining similarity matrix [{n}, {n}], got {list(sims.shape)}")
    position = {v: i for i, v in enumerate(pairs.ids)}
    group_of = {v: g for g, members in enumerate(groups) for v in members if v in position}
    by_scene: dict[str, list[str]] = {}
    for v in pairs.ids:
        if v in scenes:
            by_scene.setdefault(scenes[v], []).append(v)
    rng = np.random.default_rng(seed)
    anchor: list[int] = []
    target: list[int] = []
    positive: list[bool] = []
    for v, g in group_of.items():
        mates = [position[w] for w in groups[g] if w != v and w in position]
        other_moments = [u for u in by_scene.get(scenes.get(v, ""), []) if group_of.get(u, -1) != g]
        hard = [position[u] for u in rng.permutation(other_moments)[:hard_negatives]] if other_moments else []
        anchor += [position[v]] * (len(mates) + len(hard))
        target += mates + hard
        positive += [True] * len(mates) + [False] * len(hard)
    negatives = ~pairs.positive
    anchor_arr = np.concatenate([pairs.anchor[negatives], np.asarray(anchor, dtype=np.int64)])
    target_arr = np.concatenate([pairs.target[negatives], np.asarray(target, dtype=np.int64)])
    return MinedPairs(
        pairs.ids,
        anchor_arr,
        target_arr,
        sims[anchor_arr, target_arr].astype(np.float32),
        np.concatenate([np.zeros(int(negatives.sum()), dtype=bool), np.asarray(positive, dtype=bool)]),
    )
