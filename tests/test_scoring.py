"""Score merges: calibrations, the three merge rules, and that search, evaluation and selector
training all rank with the model set's merge."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dns_milvus.engine import LocalReranker, ModelSet, SelectionPolicy
from dns_milvus.engine.rerank import Candidate
from dns_milvus.errors import CheckpointError, InvalidInputError
from dns_milvus.eval.datasets import ColumnIndex
from dns_milvus.eval.tradeoff import PairScores, mixed_row, selection_order
from dns_milvus.scoring import (
    RELEASE_MERGE,
    Calibration,
    ScoreMerge,
    check_segment_input,
    fine_unit,
    fit_merge,
    segment_codes,
    segment_matches,
)
from dns_milvus.similarity.codes import pack_signs
from dns_milvus.store import LocalStore, encode_fine_tensor, fine_key
from dns_milvus.train.calibration import calibration_pairs
from dns_milvus.train.selector import SelectorPairs
from tests.fixtures.engine import random_video


def _isotonic_reference(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The weighted least-squares non-decreasing fit, by the min-max formula (O(n^3), tiny n)."""
    n = len(y)
    fit = np.empty(n)
    for i in range(n):
        fit[i] = max(
            min(np.average(y[a : b + 1], weights=w[a : b + 1]) for b in range(i, n)) for a in range(i + 1)
        )
    return fit


def test_calibration_is_the_isotonic_fit_at_its_knots() -> None:
    rng = np.random.default_rng(0)
    scores = np.sort(rng.uniform(0, 1, 40))
    labels = (rng.uniform(0, 1, 40) < scores).astype(float)
    weights = rng.uniform(0.5, 2.0, 40)
    cal = Calibration.fit(scores, labels, weights, max_knots=1000)
    reference = _isotonic_reference(labels, weights)
    # each knot sits at a block's weighted mean score with the block's fitted value
    for x, y in zip(cal.x, cal.y):
        block = np.isclose(reference, y, atol=1e-5)
        assert block.any()
        assert np.average(scores[block], weights=weights[block]) == pytest.approx(x, abs=1e-6)


def test_calibration_is_strictly_increasing_and_keeps_every_order() -> None:
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.normal(0.3, 0.1, 2000), rng.normal(0.7, 0.1, 100)])
    labels = np.r_[np.zeros(2000), np.ones(100)]
    cal = Calibration.fit(scores, labels)
    probe = np.linspace(-1, 2, 5001)
    assert np.all(np.diff(cal(probe)) > 0)  # never ties scores it did not tie
    assert cal(0.2) < 0.05 < 0.9 < cal(0.95) <= 1.0 + 1e-3
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, 0.2], [0, 0], "both copies and non-copies"),
        ([0.1, np.nan], [0, 1], "finite"),
        ([0.1], [1], "two or more"),
    ],
)
def test_calibration_refuses_what_it_cannot_fit(scores, labels, message) -> None:
    with pytest.raises(InvalidInputError, match=message):
        Calibration.fit(np.asarray(scores), np.asarray(labels))


def test_release_merge_replaces_coarse_with_rescaled_fine() -> None:
    coarse = np.array([0.9, 0.8, 0.7, 0.6])
    fine = np.array([np.nan, fine_unit(-0.6), np.nan, fine_unit(0.8)])
    assert RELEASE_MERGE.merged(coarse, fine).tolist() == pytest.approx([0.9, 0.2, 0.7, 0.9])


def test_reorder_merge_moves_only_the_reranked_among_their_slots() -> None:
    rng = np.random.default_rng(2)
    coarse = rng.uniform(0, 1, 50)
    fine = np.full(50, np.nan)
    chosen = rng.choice(50, size=12, replace=False)
    fine[chosen] = rng.uniform(0, 1, 12)
    merged = ScoreMerge("reorder").merged(coarse, fine)
    untouched = np.setdiff1d(np.arange(50), chosen)
    assert np.array_equal(merged[untouched], coarse[untouched])
    assert sorted(merged[chosen]) == sorted(coarse[chosen])  # the same positions, shared out again
    assert list(chosen[np.argsort(-merged[chosen])]) == list(chosen[np.argsort(-fine[chosen])])
    # re-ranking everything gives the fine ranking itself
    everything = rng.uniform(0, 1, 50)
    full = ScoreMerge("reorder").merged(coarse, everything)
    assert np.array_equal(np.argsort(-full), np.argsort(-everything))


def test_calibrated_merge_puts_both_scales_on_one() -> None:
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(500), np.ones(50)]
    coarse_scores = np.r_[rng.normal(0.2, 0.05, 500), rng.normal(0.5, 0.05, 50)]  # copies near 0.5
    fine_scores = np.r_[rng.normal(0.45, 0.05, 500), rng.normal(0.8, 0.05, 50)]  # non-copies near 0.45
    merge = fit_merge(coarse_scores, fine_scores, labels)
    # a non-copy re-ranked to 0.45 no longer jumps over a copy that kept its coarse 0.5
    merged = merge.merged(np.array([0.5, 0.21]), np.array([np.nan, 0.45]))
    assert merged[0] > merged[1]
    assert RELEASE_MERGE.merged(np.array([0.5, 0.21]), np.array([np.nan, 0.55]))[1] > 0.5  # as it was
    # unselected candidates keep their coarse order
    coarse = rng.uniform(0, 1, 100)
    out = merge.merged(coarse, np.full(100, np.nan))
    assert np.array_equal(np.argsort(coarse), np.argsort(out))
    again = ScoreMerge.from_dict(json.loads(json.dumps(merge.to_dict())))
    assert (
        again.merged(coarse, np.full(100, 0.5)).tolist() == merge.merged(coarse, np.full(100, 0.5)).tolist()
    )
    assert merge.disagreement(np.array([0.5]), np.array([0.8]))[0] < 0.5  # a copy either way


def test_bad_merges_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="unknown score merge"):
        ScoreMerge.from_dict("average")
    with pytest.raises(InvalidInputError, match="needs a coarse and a fine calibration"):
        ScoreMerge.from_dict({"kind": "calibrated"})
    with pytest.raises(InvalidInputError, match="strictly increasing"):
        Calibration((0.0, 0.5, 0.4), (0.1, 0.2, 0.3))


def test_model_set_reads_its_merge_from_the_manifest(model_set_dir: Path, tmp_path: Path) -> None:
    assert ModelSet.load(model_set_dir).merge == RELEASE_MERGE  # no entry: the release's rule
    copy = tmp_path / "set"
    shutil.copytree(model_set_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    merge = ScoreMerge("calibrated", Calibration((0.0, 1.0), (0.1, 0.9)), Calibration((0.0, 1.0), (0.0, 1.0)))
    (copy / "manifest.json").write_text(json.dumps({**manifest, "merge": merge.to_dict()}))
    assert ModelSet.load(copy).merge == merge
    (copy / "manifest.json").write_text(json.dumps({**manifest, "merge": {"kind": "calibrated"}}))
    with pytest.raises(CheckpointError, match="merge"):
        ModelSet.load(copy)


def test_search_ranks_with_the_model_sets_merge(model_set: ModelSet, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    store = LocalStore(tmp_path)
    query = model_set.index_features([random_video(rng, 10)])[0]
    cands = []
    for i, record in enumerate(model_set.index_features([random_video(rng, 8) for _ in range(20)])):
        key = fine_key("merge", f"v{i:02d}")
        store.put(key, encode_fine_tensor(record.fine, record.payload_kind))
        cands.append(Candidate(f"v{i:02d}", float(rng.uniform(0.1, 0.9)), record.self_sim, key))
    reorder = dataclasses.replace(model_set, merge=ScoreMerge("reorder"))
    policy = SelectionPolicy.parse("count:6")
    result = LocalReranker(reorder, store).rerank(query, cands, policy, len(cands))
    by_id = {c.video_id: c.coarse_score for c in cands}
    fine = [h for h in result.hits if h.fine_score is not None]
    assert len(fine) == 6
    # the re-ranked hits hold exactly the coarse scores they had between them, in fine order
    assert sorted(h.score for h in fine) == pytest.approx(sorted(by_id[h.video_id] for h in fine))
    assert [h.video_id for h in sorted(fine, key=lambda h: -h.score)] == [
        h.video_id for h in sorted(fine, key=lambda h: -h.fine_score)
    ]
    assert all(h.score == by_id[h.video_id] for h in result.hits if h.fine_score is None)


def test_evaluation_mixes_and_the_oracle_orders_with_the_same_merge() -> None:
    coarse = np.array([[0.9, 0.8, 0.2, np.nan]])
    fine = np.array([[0.1, 0.3, 0.95, np.nan]])
    columns = ColumnIndex(["a", "b", "c", "d"])
    for merge in (RELEASE_MERGE, ScoreMerge("reorder")):
        scores = PairScores(("q",), columns, coarse, fine, coarse.copy(), merge)
        candidates = np.array([0, 1, 2])
        chosen = np.array([1, 2])
        expected = merge.merged(coarse[0, :3], np.array([np.nan, 0.3, 0.95]))
        assert mixed_row(scores, 0, candidates, chosen)[:3].tolist() == expected.tolist()
        order = selection_order("oracle", candidates, coarse[0], fine[0], coarse[0], merge=merge)
        assert order[0] == 0  # |0.9 - 0.1| is the largest disagreement on the release's scale


def test_selector_labels_follow_the_merge() -> None:
    pairs = SelectorPairs(["q"] * 3, ["a", "b", "c"], np.array([0.2, 0.5, 0.5]), np.array([0.45, 0.8, 0.5]))
    assert pairs.labels(0.1).tolist() == [1.0, 1.0, 0.0]
    flat = ScoreMerge(
        "calibrated", Calibration((0.0, 1.0), (0.0, 1.0)), Calibration((0.0, 0.5, 1.0), (0.0, 0.2, 1.0))
    )
    assert flat.disagreement(np.array([0.2]), np.array([0.45]))[0] == pytest.approx(0.02, abs=1e-3)
    assert pairs.labels(0.1, flat).tolist() == [0.0, 1.0, 1.0]


def test_copy_target_labels_pairs_either_stage_ranks_among_the_copies() -> None:
    # coarse / fine (on [0, 1]): both low but far apart, a fine-only copy, a coarse-only copy, both high
    coarse, fine = np.array([0.05, 0.1, 0.7, 0.8]), np.array([0.45, 0.9, 0.2, 0.85])
    pairs = SelectorPairs(["q"] * 4, list("abcd"), coarse, fine)
    assert pairs.labels(0.3, RELEASE_MERGE, "copy").tolist() == [1.0, 1.0, 1.0, 1.0]
    assert pairs.labels(0.5, RELEASE_MERGE, "copy").tolist() == [0.0, 1.0, 1.0, 1.0]
    assert pairs.labels(0.3, RELEASE_MERGE, "disagreement").tolist() == [1.0, 1.0, 1.0, 0.0]
    # calibrated: each stage's score on its own calibrated scale, the higher one decides
    fine_low = Calibration((0.0, 0.5, 1.0), (0.0, 0.05, 1.0))  # a fine 0.45 is not a copy
    merge = ScoreMerge("calibrated", Calibration((0.0, 1.0), (0.0, 1.0)), fine_low)
    target = merge.selector_target(coarse, fine, "copy")
    np.testing.assert_allclose(target, np.maximum(coarse, fine_low(fine)))
    assert pairs.labels(0.3, merge, "copy").tolist() == [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(InvalidInputError, match="unknown selector target 'rank'"):
        merge.selector_target(coarse, fine, "rank")  # type: ignore[arg-type]


def test_calibration_pairs_weigh_random_negatives_for_what_they_stand_for() -> None:
    groups = [["a", "a#copy0"], ["b", "b#copy0", "b#part0"], ["c"], ["d"], ["e"]]
    scenes = {
        "a": "s1",
        "a#copy0": "s1",
        "b": "s1",
        "b#copy0": "s1",
        "b#part0": "s1",
        "c": "s2",
        "d": "s3",
        "e": "s4",
    }
    pairs = calibration_pairs(groups, scenes, negatives_per_video=2, seed=0)
    positives = {(q, t) for q, t, y in zip(pairs.queries, pairs.targets, pairs.labels) if y == 1}
    assert ("b", "b#part0") in positives and ("b#part0", "b") in positives and len(positives) == 2 + 6
    hard = {
        (q, t)
        for q, t, y, w in zip(pairs.queries, pairs.targets, pairs.labels, pairs.weights)
        if y == 0 and w == 1
    }
    assert ("a", "b") in hard and ("b#part0", "a#copy0") in hard  # the same scene, another group
    random_a = [
        w for q, y, w in zip(pairs.queries, pairs.labels, pairs.weights) if q == "a" and y == 0 and w != 1
    ]
    assert random_a == [1.5, 1.5]  # 3 other-scene videos stood for by 2 draws


# -- the selector's segment match -----------------------------------------------------------------


def _float_segment_match(query: np.ndarray, vectors: np.ndarray) -> float:
    """The definition: the best segment's <q, sign(v_s)> / sqrt(D), in float64."""
    signs = np.where(vectors > 0, 1.0, -1.0)
    return float((signs @ query.astype(np.float64)).max() / np.sqrt(query.size))


def test_segment_matches_equal_the_float_definition_across_chunks_and_mixed_segments() -> None:
    rng = np.random.default_rng(11)
    dim = 64
    query = rng.standard_normal(dim).astype(np.float32)
    query /= np.linalg.norm(query)
    # 8 targets of 3 segments (two whole chunks of one S: the stacked path), then mixed S
    counts = [3] * 8 + [1, 5, 3, 2, 7, 1, 4, 6, 2, 3, 5]
    vectors = [rng.standard_normal((s, dim)).astype(np.float32) for s in counts]
    vectors[3][1] = query  # a segment equal to the query: the best match, ||q||_1 / sqrt(D)
    codes = [segment_codes(v) for v in vectors]
    expected = np.array([_float_segment_match(query, v) for v in vectors])
    for chunk in (4, 3, 1, 4096):
        got = segment_matches(query, codes, chunk=chunk)
        assert got.dtype == np.float32 and got.shape == (len(counts),)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert got[3] == pytest.approx(np.abs(query).sum() / np.sqrt(dim), abs=1e-5)
    assert np.all(np.abs(got) <= 1 + 1e-6)  # a unit query: within [-1, 1]
    empty = segment_matches(query, [])
    assert empty.dtype == np.float32 and empty.shape == (0,)


def test_segment_codes_are_the_packed_signs_of_the_vectors() -> None:
    rng = np.random.default_rng(12)
    vectors = rng.standard_normal((3, 4, 40)).astype(np.float32)
    vectors[0, 0, :5] = 0.0  # zero is not positive: a 0 bit, as pack_signs(v > 0) has it
    codes = segment_codes(vectors)
    assert codes.dtype == np.uint8 and codes.shape == (3, 4, 5)
    np.testing.assert_array_equal(codes, pack_signs(vectors > 0))
    for bad in (np.zeros((4, 12)), np.zeros(16), np.zeros((4, 0))):
        with pytest.raises(InvalidInputError, match="multiple of 8"):
            segment_codes(bad)


@pytest.mark.parametrize(
    ("codes", "shown"),
    [
        ([np.zeros((2, 8), np.int8)], r"0: .* got \[2, 8\]"),  # not uint8
        ([np.zeros((2, 8), np.float32)], r"0: .* got \[2, 8\]"),
        ([np.zeros((2, 8), np.uint8), np.zeros((2, 4), np.uint8)], r"1: .* got \[2, 4\]"),  # width
        ([np.zeros((0, 8), np.uint8)], r"0: .* got \[0, 8\]"),  # no segment
        ([np.zeros(8, np.uint8)], r"0: .* got \[8\]"),  # one segment's code, not [S, D/8]
        ([[[0] * 8]], "0: .* got list"),  # not an array
        ([np.zeros((2, 8), np.uint8), None], "1: .* got NoneType"),
    ],
)
def test_segment_matches_refuse_malformed_codes(codes: list, shown: str) -> None:
    query = np.ones(64, np.float32) / 8
    with pytest.raises(InvalidInputError, match=r"^target " + shown) as err:
        segment_matches(query, codes)
    assert r"expected segment codes uint8 [S, 8]" in str(err.value)


def test_segment_matches_refuse_a_query_not_of_whole_bytes() -> None:
    codes = [np.zeros((2, 2), np.uint8)]
    for query in (np.ones(12, np.float32), np.ones(0, np.float32)):
        with pytest.raises(InvalidInputError, match="multiple of 8"):
            segment_matches(query, codes)


def test_segment_input_is_required_exactly_when_the_selector_reads_segments() -> None:
    check_segment_input(0, False)
    check_segment_input(4, True)
    with pytest.raises(InvalidInputError, match="segment matches of 4 segments; pass them"):
        check_segment_input(4, False)
    with pytest.raises(InvalidInputError, match="reads no segment match"):
        check_segment_input(0, True)
