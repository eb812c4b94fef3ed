"""The engine end to end over real backends: Milvus Lite and a Milvus server, local and S3 stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dns_milvus.engine import DnSIndex, SelectionPolicy
from dns_milvus.errors import InvalidInputError, NotFoundError
from dns_milvus.store import fine_key
from tests.fixtures.engine import near_copy, random_video


def _fill(index: DnSIndex, n: int = 12, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    videos = {f"v{i:02d}": random_video(rng, int(rng.integers(3, 14))) for i in range(n)}
    index.add_many(list(videos), list(videos.values()), [{"group": i % 3, "name": f"n{i}"} for i in range(n)])
    return videos


def test_scores_equal_direct_network_computation(dns_index: DnSIndex) -> None:
    videos = _fill(dns_index)
    rng = np.random.default_rng(7)
    query = near_copy(rng, videos["v03"])
    resp = dns_index.search(query, top_k=12, candidates=12, policy="all")
    assert len(resp.hits) == 12 and resp.n_reranked == 12

    m = dns_index.models
    with torch.inference_mode():
        q = torch.from_numpy(query)
        q_coarse = m.coarse.index_video(q)
        q_fine = m.fine.index_video(q)
        q_self = m.selector.index_video(q)
        for hit in resp.hits:
            t = torch.from_numpy(videos[hit.video_id])
            coarse = float(q_coarse @ m.coarse.index_video(t))
            fine = float(
                m.fine.calculate_video_similarity(q_fine[None], m.fine.index_video(t)[None]).squeeze()
            )
            z = torch.tensor([[float(q_self), float(m.selector.index_video(t)), coarse]])
            conf = float(m.selector(z).squeeze())
            assert hit.coarse_score == pytest.approx(coarse, abs=1e-5)
            assert hit.fine_score == pytest.approx(fine / 2 + 0.5, abs=1e-5)
            assert hit.selector_confidence == pytest.approx(conf, abs=1e-5)
            assert hit.score == hit.fine_score and hit.stage == "fine"
    scores = [h.score for h in resp.hits]
    assert scores == sorted(scores, reverse=True)
    assert resp.hits[0].video_id == "v03"  # the near copy wins on the fine score


@pytest.mark.parametrize(
    ("policy", "expected"), [("none", 0), ("all", 10), ("25%", 2), ("count:3", 3), ("5%", 0)]
)
def test_policies_select_what_they_promise(dns_index: DnSIndex, policy: str, expected: int) -> None:
    _fill(dns_index, n=11)
    resp = dns_index.search("v00", top_k=10, candidates=10, policy=policy)
    assert resp.n_candidates == 10
    assert resp.n_reranked == expected
    fine_hits = [h for h in resp.hits if h.stage == "fine"]
    assert len(fine_hits) == expected
    if 0 < expected < 10:  # the re-ranked ones are the selector's most confident
        chosen = min(h.selector_confidence for h in fine_hits)
        others = [h.selector_confidence for h in resp.hits if h.stage == "coarse"]
        assert all(chosen >= c for c in others)


def test_threshold_policy(dns_index: DnSIndex) -> None:
    _fill(dns_index)
    full = dns_index.search("v01", top_k=11, candidates=11, policy="none")
    confidences = sorted(h.selector_confidence for h in full.hits)
    threshold = float(np.median(confidences))
    resp = dns_index.search("v01", top_k=11, candidates=11, policy=SelectionPolicy("threshold", threshold))
    assert {h.video_id for h in resp.hits if h.stage == "fine"} == {
        h.video_id for h in full.hits if h.selector_confidence >= threshold
    }


def test_query_by_id_excludes_itself_and_unknown_id_fails(dns_index: DnSIndex) -> None:
    _fill(dns_index)
    resp = dns_index.search("v05", top_k=20, candidates=20)
    assert "v05" not in {h.video_id for h in resp.hits} and len(resp.hits) == 11
    with_self = dns_index.search("v05", top_k=1, candidates=20, policy="all", exclude_self=False)
    assert with_self.hits[0].video_id == "v05"
    with pytest.raises(NotFoundError, match="nope"):
        dns_index.search("nope")


def test_metadata_filter(dns_index: DnSIndex) -> None:
    _fill(dns_index)
    resp = dns_index.search("v00", top_k=20, candidates=20, filter='metadata["group"] == 1')
    assert {h.video_id for h in resp.hits} == {"v01", "v04", "v07", "v10"}


def test_reingest_is_idempotent_and_delete_removes_row_and_object(dns_index: DnSIndex) -> None:
    videos = _fill(dns_index, n=4)
    dns_index.add("v01", videos["v01"])
    assert dns_index.count() == 4
    key = fine_key(dns_index.name, "v01")
    assert dns_index.store.exists(key)
    assert dns_index.delete(["v01", "unknown"]) == 1
    assert dns_index.count() == 3 and not dns_index.store.exists(key)
    assert "v01" not in dns_index.get(["v01"])


@pytest.mark.parametrize("hostile", ["../../etc/passwd", 'a" or video_id != "', "x'); drop", "ünï/cødé\\"])
def test_hostile_ids_round_trip_safely(dns_index: DnSIndex, hostile: str) -> None:
    rng = np.random.default_rng(3)
    dns_index.add(hostile, random_video(rng, 5))
    dns_index.add("other", random_video(rng, 5))
    assert set(dns_index.get([hostile])) == {hostile}
    key = fine_key(dns_index.name, hostile)
    assert ".." not in key and hostile not in key
    assert dns_index.delete([hostile]) == 1
    assert dns_index.count() == 1


def test_bad_inputs_lose_nothing(dns_index: DnSIndex) -> None:
    videos = _fill(dns_index, n=3)
    rng = np.random.default_rng(4)
    with pytest.raises(InvalidInputError, match="bytes"):
        dns_index.add("x" * 10_000, random_video(rng, 4))
    with pytest.raises(InvalidInputError, match="duplicate"):
        dns_index.add_many(["a", "a"], [random_video(rng, 4)] * 2)
    bad = random_video(rng, 4)
    bad[1, 2, 3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        dns_index.add("nan", bad)
    with pytest.raises(InvalidInputError, match=r"\[T, R, 512\]"):
        dns_index.add("wrong", rng.standard_normal((4, 9, 100)).astype(np.float32))
    with pytest.raises(InvalidInputError):
        dns_index.add("empty", np.zeros((0, 9, 512), np.float32))
    assert dns_index.count() == 3
    assert set(dns_index.get(list(videos))) == set(videos)


def test_missing_object_falls_back_to_coarse_with_warning(dns_index: DnSIndex) -> None:
    _fill(dns_index, n=5)
    dns_index.store.delete(fine_key(dns_index.name, "v02"))
    resp = dns_index.search("v00", top_k=4, candidates=4, policy="all")
    hit = next(h for h in resp.hits if h.video_id == "v02")
    assert hit.stage == "coarse-fine-missing" and hit.fine_score is None
    assert hit.score == hit.coarse_score
    assert any("v02" in w for w in resp.warnings)
    assert resp.n_reranked == 3


def test_repair_finds_orphans_and_rows_without_objects(dns_index: DnSIndex) -> None:
    _fill(dns_index, n=4)
    orphan = fine_key(dns_index.name, "ghost")
    dns_index.store.put(orphan, b"left over by a crash")
    dns_index.store.delete(fine_key(dns_index.name, "v03"))
    report = dns_index.repair()
    assert report.orphan_objects == [orphan]
    assert report.rows_missing_object == ["v03"]
    fixed = dns_index.repair(fix=True)
    assert fixed.fixed and not dns_index.store.exists(orphan)
    assert dns_index.repair().orphan_objects == []


def test_exhaustive_search_matches_ann_with_all_candidates(dns_index: DnSIndex) -> None:
    _fill(dns_index)
    ann = dns_index.search("v02", top_k=11, candidates=11, policy="25%")
    full = dns_index.exhaustive_search("v02", top_k=11, policy="25%")
    assert [h.video_id for h in ann.hits] == [h.video_id for h in full.hits]
    assert [h.score for h in ann.hits] == pytest.approx([h.score for h in full.hits], abs=1e-5)


def test_batch_search_equals_single_searches(dns_index: DnSIndex) -> None:
    _fill(dns_index)
    batch = dns_index.search_batch(["v01", "v02"], top_k=5, candidates=11, policy="all")
    for q, resp in zip(["v01", "v02"], batch):
        single = dns_index.search(q, top_k=5, candidates=11, policy="all")
        assert [h.video_id for h in resp.hits] == [h.video_id for h in single.hits]


def test_search_arguments_are_checked(dns_index: DnSIndex) -> None:
    _fill(dns_index, n=2)
    with pytest.raises(InvalidInputError, match="top_k"):
        dns_index.search("v00", top_k=0)
    with pytest.raises(InvalidInputError, match="candidates"):
        dns_index.search("v00", candidates=10**7)
    with pytest.raises(InvalidInputError, match="policy"):
        dns_index.search("v00", policy="bogus")
    with pytest.raises(InvalidInputError, match="query must be"):
        dns_index.search(42)  # type: ignore[arg-type]
