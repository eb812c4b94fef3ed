"""The merged ranking of stage 2: order by final score, ties broken by video id, only the
top_k hits returned, whichever way stage 2 ends (re-ranked locally or coarse-only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dns_milvus.engine import LocalReranker, ModelSet, SelectionPolicy
from dns_milvus.engine.rerank import STAGE_COARSE, STAGE_FINE, Candidate, coarse_only
from dns_milvus.store import LocalStore, encode_fine_tensor, fine_key
from tests.fixtures.engine import random_video


def _candidates(scores: list[float], ids: list[str]) -> list[Candidate]:
    return [Candidate(v, s, 0.5, f"missing/{v}") for v, s in zip(ids, scores)]


def _full_sort(scores: list[float], ids: list[str], top_k: int) -> list[str]:
    return [v for _, v in sorted(zip((-s for s in scores), ids))][:top_k]


def test_coarse_only_breaks_ties_at_the_cut_by_id() -> None:
    cands = _candidates([0.5, 0.9, 0.5, 0.5, 0.7], ["e", "a", "c", "b", "d"])
    result = coarse_only(cands, 3, "stage 2 down")
    assert [h.video_id for h in result.hits] == ["a", "d", "b"]
    assert [h.score for h in result.hits] == [0.9, 0.7, 0.5]
    assert result.degraded and result.warnings == ["stage 2 down"] and result.n_candidates == 5


@pytest.mark.parametrize("top_k", [1, 2, 7, 50, 200])
def test_coarse_only_equals_a_full_sort_with_many_ties(top_k: int) -> None:
    rng = np.random.default_rng(top_k)
    scores = rng.choice([0.1, 0.2, 0.3, 0.4], size=120).tolist()  # heavy ties everywhere
    ids = [f"v{i:03d}" for i in rng.permutation(120)]
    hits = coarse_only(_candidates(scores, ids), top_k, "x").hits
    assert [h.video_id for h in hits] == _full_sort(scores, ids, top_k)
    assert len(hits) == min(top_k, 120)


def test_local_rerank_returns_top_k_in_merged_order(model_set: ModelSet, tmp_path: Path) -> None:
    """Fine scores replace the coarse scores of the re-ranked candidates; the merged list is
    the full sort of the final scores, cut at top_k."""
    rng = np.random.default_rng(3)
    store = LocalStore(tmp_path)
    query = model_set.index_features([random_video(rng, 12)])[0]
    videos = [random_video(rng, int(n)) for n in rng.integers(4, 20, size=30)]
    records = model_set.index_features(videos)
    cands = []
    for i, record in enumerate(records):
        vid = f"video-{i:02d}"
        key = fine_key("merge", vid)
        store.put(key, encode_fine_tensor(record.fine, record.payload_kind))
        cands.append(Candidate(vid, float(rng.uniform(0.2, 0.4)), record.self_sim, key))
    reranker = LocalReranker(model_set, store)
    full = reranker.rerank(query, cands, SelectionPolicy.parse("all"), len(cands))
    top = reranker.rerank(query, cands, SelectionPolicy.parse("all"), 5)
    assert all(h.stage == STAGE_FINE for h in full.hits)
    expected = _full_sort([h.score for h in full.hits], [h.video_id for h in full.hits], 5)
    assert [h.video_id for h in top.hits] == expected
    assert [h.video_id for h in top.hits] == [h.video_id for h in full.hits[:5]]
    assert top.n_candidates == 30 and top.n_reranked == 30

    none = reranker.rerank(query, cands, SelectionPolicy.parse("none"), 4)
    assert all(h.stage == STAGE_COARSE and h.fine_score is None for h in none.hits)
    coarse = [c.coarse_score for c in cands]
    assert [h.video_id for h in none.hits] == _full_sort(coarse, [c.video_id for c in cands], 4)
