"""Evaluation package: metrics against hand-computed values, dataset readers on tiny files in the
public formats (tests/data/eval), the DnS trade-off protocol, and the plots."""

from __future__ import annotations

import json
import pickle
from fractions import Fraction as F
from pathlib import Path

import h5py
import numpy as np
import pytest

from dns_milvus.errors import DnSError, InvalidInputError
from dns_milvus.eval import (
    ColumnIndex,
    DatasetFormatError,
    EvalDataset,
    FeatureFileError,
    FeatureNotFoundError,
    H5Features,
    PairScores,
    Task,
    UndefinedMetricError,
    average_precision,
    average_precision_from_scores,
    dns_tradeoff,
    interpolated_pr_curve,
    mean_average_precision,
    mean_interpolated_pr_curve,
    micro_average_precision,
    micro_average_precision_from_pairs,
    milvus_protocol,
    rank_by_score,
    read_cc_web_video,
    read_cc_web_video_pickle,
    read_evve,
    read_evve_pickle,
    read_fivr,
    read_fivr_pickle,
    read_svd,
    read_vcdb,
    trapezoidal_average_precision,
    write_table,
)
from dns_milvus.eval.plots import plot_map_vs_k, plot_pr_curves, plot_tradeoff
from dns_milvus.eval.tradeoff import rerank_budget

DATA = Path(__file__).parent / "data" / "eval"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def approx(fraction: F) -> object:
    return pytest.approx(float(fraction), abs=1e-12)


# ------------------------------------------------------------------------------------------ AP / mAP


def test_ap_counts_relevant_videos_missing_from_the_ranking_as_misses() -> None:
    # Hits b at rank 2 and d at rank 4; z is relevant, in the database, never retrieved: n = 3.
    ap = average_precision(
        ["a", "b", "c", "d", "e"], {"b", "d", "z"}, database={"a", "b", "c", "d", "e", "z"}
    )
    assert ap == approx((F(1, 2) + F(2, 4)) / 3)


def test_ap_database_restriction_drops_outsiders_from_ranks_and_from_n() -> None:
    # x is not in the database: b moves from rank 3 to rank 2; relevant y outside the database is not counted.
    ap = average_precision(["x", "a", "b"], {"b", "y"}, database={"a", "b"})
    assert ap == approx(F(1, 2))
    assert average_precision(["x", "a", "b"], {"b"}) == approx(F(1, 3))


def test_ap_excludes_the_query_from_its_own_ranking_and_relevant_set() -> None:
    assert average_precision(["q", "a", "b"], {"b"}, exclude="q") == approx(F(1, 2))
    assert average_precision(["q", "a", "b"], {"b"}) == approx(F(1, 3))
    # A query listed in its own ground truth: dropped from n as well, so b alone counts.
    assert average_precision(["q", "a", "b"], {"b", "q"}, exclude="q") == approx(F(1, 2))


def test_ap_ties_are_broken_by_video_id() -> None:
    scores = {"c": 0.9, "b": 0.5, "a": 0.5}
    assert rank_by_score(scores) == ["c", "a", "b"]
    assert average_precision_from_scores(scores, {"b"}) == approx(F(1, 3))  # c, a, b
    assert average_precision_from_scores(scores, {"a"}) == approx(F(1, 2))
    reordered = dict(reversed(list(scores.items())))
    assert average_precision_from_scores(reordered, {"b"}) == average_precision_from_scores(scores, {"b"})


def test_ap_of_an_empty_ground_truth_is_undefined_and_map_skips_the_query() -> None:
    with pytest.raises(UndefinedMetricError, match="no relevant video"):
        average_precision(["a", "b"], set())
    with pytest.raises(UndefinedMetricError):
        average_precision(["a", "b"], {"z"}, database={"a", "b"})  # relevant only outside the database
    result = mean_average_precision(
        {"q1": {"a": 0.9, "b": 0.1}, "q2": {"a": 0.5}}, {"q1": {"b"}, "q2": set(), "q3": {"a"}}
    )
    assert result.value == approx(F(1, 2))
    assert result.skipped == ("q2",)
    assert result.missing == ("q3",)
    with pytest.raises(UndefinedMetricError):
        mean_average_precision({"q": {"a": 1.0}}, {"q": set()})


def test_map_takes_rankings_or_score_dicts_and_averages_queries() -> None:
    results = {"q1": ["q1", "a", "b", "c"], "q2": {"c": 0.3, "a": 0.2, "b": 0.1}}
    relevant = {"q1": {"b", "c"}, "q2": {"a", "b"}}
    # q1 (itself dropped): b@2, c@3 -> (1/2 + 2/3)/2; q2: a@2, b@3 -> (1/2 + 2/3)/2.
    result = mean_average_precision(results, relevant)
    assert result.per_query == {"q1": approx(F(7, 12)), "q2": approx(F(7, 12))}
    assert float(result) == approx(F(7, 12))


def test_ap_rejects_duplicates_and_non_finite_scores() -> None:
    with pytest.raises(InvalidInputError, match="twice"):
        average_precision(["a", "b", "a"], {"a"})
    with pytest.raises(InvalidInputError, match="finite"):
        average_precision_from_scores({"a": float("nan")}, {"a"})


def test_trapezoidal_ap_is_evves_measure() -> None:
    # Hits at ranks 2 and 4 of 4, n = 2: ((0/1 + 1/2)/2 + (1/3 + 2/4)/2) / 2.
    ap = trapezoidal_average_precision(["x", "a", "y", "b"], {"a", "b"})
    assert ap == approx(((F(0) + F(1, 2)) / 2 + (F(1, 3) + F(2, 4)) / 2) / 2)
    assert trapezoidal_average_precision(["a", "b"], {"a", "b"}) == approx(F(1))


def test_interpolated_pr_curve_levels_and_all_points() -> None:
    ranked = ["a", "x", "b", "y"]
    relevant = {"a", "b", "c"}  # c is never retrieved
    database = {"a", "b", "c", "x", "y", "z"}
    # Points: (0, 1) [convention], (1/3, 1), (2/3, 2/3), and c after the whole database: (1, 3/6).
    recall, precision = interpolated_pr_curve(ranked, relevant, recall_levels=11, database=database)
    assert np.allclose(recall, np.linspace(0, 1, 11))
    expected = [1, 1, 1, 1, 2 / 3, 2 / 3, 2 / 3, 1 / 2, 1 / 2, 1 / 2, 1 / 2]
    assert np.allclose(precision, expected)
    recall, precision = interpolated_pr_curve(ranked, relevant, recall_levels=None, database=database)
    assert np.allclose(recall, [0, 1 / 3, 2 / 3, 1])
    assert np.allclose(precision, [1, 1, 2 / 3, 1 / 2])
    levels, fivr = interpolated_pr_curve(ranked, relevant, database=database)  # FIVR: 21 levels
    assert (
        len(levels) == 21 and fivr[6] == pytest.approx(1.0) and fivr[7] == pytest.approx(2 / 3)
    )  # 0.30, 0.35


def test_mean_interpolated_pr_curve_averages_queries() -> None:
    results = {"q1": ["a", "b"], "q2": ["b", "a"]}
    levels, precision = mean_interpolated_pr_curve(results, {"q1": {"a"}, "q2": {"a"}}, recall_levels=2)
    # q1: precision 1 at recall 1; q2: a at rank 2 -> 1/2. Level 0 is 1 for both by convention.
    assert np.allclose(levels, [0, 1]) and np.allclose(precision, [1, 3 / 4])


def test_micro_ap_ranks_all_pairs_jointly() -> None:
    predictions = {("q1", "a"): 0.9, ("q2", "b"): 0.8, ("q1", "c"): 0.7, ("q2", "d"): 0.6}
    truth = {("q1", "a"), ("q1", "c"), ("q2", "d"), ("q3", "e")}  # (q3, e) never predicted
    # Precision at the hits: 1/1, 2/3, 3/4; four ground-truth pairs.
    expected = (F(1) + F(2, 3) + F(3, 4)) / 4
    assert micro_average_precision_from_pairs(predictions, truth) == approx(expected)
    assert micro_average_precision([0.9, 0.8, 0.7], [True, False, True]) == approx((F(1) + F(2, 3)) / 2)


def test_micro_ap_puts_negatives_first_within_ties() -> None:
    assert micro_average_precision([0.5, 0.5], [True, False]) == approx(F(1, 2))
    with pytest.raises(InvalidInputError):
        micro_average_precision([0.5], [True], num_positives=0)
    with pytest.raises(UndefinedMetricError):
        micro_average_precision([0.5], [False])


# --------------------------------------------------------------------------------------- datasets


def fivr_similarities() -> dict[str, dict[str, float]]:
    return {
        # x is not in the database, b has no score, q1 scores itself.
        "q1": {"q1": 1.0, "x": 0.95, "a": 0.9, "f": 0.8, "c": 0.7, "d": 0.6, "e": 0.5, "g": 0.4},
        "q2": {"q2": 0.9, "f": 0.5, "b": 0.2},
        "q3": {"g": 0.9, "a": 0.1},
    }


def test_fivr_reader_tasks_and_hand_computed_map() -> None:
    dataset = read_fivr(DATA / "fivr" / "annotation.json", DATA / "fivr" / "youtube_ids.txt")
    assert dataset.queries == ("q1", "q2", "q3") and dataset.task_names == ("DSVR", "CSVR", "ISVR")
    assert dataset.relevant("q1", "DSVR") == {"a", "b", "c"}
    assert dataset.relevant("q1", "ISVR") == {"a", "b", "c", "d", "e"}
    results = dataset.evaluate(fivr_similarities())
    # q1 ranking without q1 and x: a f c d e g (b missing). DSVR: (1/1 + 2/3)/3. q2: b@2 of f b -> 1/2.
    assert results["DSVR"].per_query == {"q1": approx(F(5, 9)), "q2": approx(F(1, 2))}
    assert results["DSVR"].skipped == ("q3",)  # no ND/DS video
    assert results["DSVR"].value == approx(F(19, 36))
    # CSVR q1: (1 + 2/3 + 3/4)/4; q3: a@2 -> 1/2.
    assert results["CSVR"].value == approx((F(29, 48) + F(1, 2) + F(1, 2)) / 3)
    # ISVR q1: (1 + 2/3 + 3/4 + 4/5)/5; q2 lists itself under IS: it stays relevant (never ranked, a
    # certain miss, as in the DnS release), so b@2 of 2 relevant -> 1/4.
    assert results["ISVR"].value == approx((F(193, 300) + F(1, 4) + F(1, 2)) / 3)


def test_fivr_subset_queries_and_available_restriction() -> None:
    dataset = read_fivr(
        DATA / "fivr" / "annotation.json",
        DATA / "fivr" / "youtube_ids.txt",
        queries_path=DATA / "fivr" / "queries_subset.txt",
        name="FIVR-5K",
    )
    assert dataset.name == "FIVR-5K" and dataset.queries == ("q1", "q2")
    # Restricting to videos with features (b, e have none) drops b from n: q1 DSVR a@1 c@3 -> (1 + 2/3)/2.
    results = dataset.evaluate(
        fivr_similarities(), tasks=["DSVR"], available={"q1", "q2", "a", "c", "d", "f", "g"}
    )
    assert results["DSVR"].per_query["q1"] == approx(F(5, 6))
    assert results["DSVR"].skipped == ("q2",)


def test_fivr_pickle_layout_matches_public_files(tmp_path: Path) -> None:
    annotation = json.loads((DATA / "fivr" / "annotation.json").read_text())
    database = set((DATA / "fivr" / "youtube_ids.txt").read_text().split())
    layout = {"annotation": annotation, "200k": {"queries": ["q1", "q2", "q3"], "database": database}}
    layout["5k"] = {"queries": ["q1", "q2"], "database": database}
    path = tmp_path / "fivr.pickle"
    path.write_bytes(pickle.dumps(layout, protocol=4))
    from_pickle = read_fivr_pickle(path, "200k").evaluate(fivr_similarities())
    public = read_fivr(DATA / "fivr" / "annotation.json", DATA / "fivr" / "youtube_ids.txt").evaluate(
        fivr_similarities()
    )
    assert {k: v.value for k, v in from_pickle.items()} == {k: v.value for k, v in public.items()}
    assert read_fivr_pickle(path, "5k").name == "FIVR-5K"
    with pytest.raises(DatasetFormatError, match="'1m' entry"):
        read_fivr_pickle(path, "1m")


def cc_web_similarities() -> dict[str, dict[str, float]]:
    return {
        "1/1_1_Y": {
            "1/1_1_Y": 1.0,
            "2/2_1_Y": 0.9,
            "1/1_3_G": 0.8,
            "1/1_2_Y": 0.5,
            "2/2_3_Y": 0.2,
            "2/2_2_V": 0.1,
        },
        "2/2_2_V": {"2/2_2_V": 1.0, "1/1_1_Y": 0.7, "2/2_3_Y": 0.6, "2/2_1_Y": 0.3},
    }


def test_cc_web_video_reader_and_its_four_protocols() -> None:
    dataset = read_cc_web_video(DATA / "cc_web", excluded_path=DATA / "cc_web" / "excluded.json")
    assert dataset.queries == ("1/1_1_Y", "2/2_2_V")
    assert dataset.relevant("1/1_1_Y", "cc_web") == {"1/1_1_Y", "1/1_2_Y"}  # E and S; X and -1 are not
    assert dataset.candidates("1/1_1_Y", "cc_web") == {"1/1_1_Y", "1/1_2_Y", "1/1_3_G", "1/1_4_Y"}
    results = {k: v.value for k, v in dataset.evaluate(cc_web_similarities()).items()}
    # Query 1 (itself included, labelled E). cc_web ranks its topic's labelled videos: 1_1_Y 1_3_G 1_2_Y
    # -> (1 + 2/3)/2. cc_web*: 1_1_Y 2_1_Y 1_3_G 1_2_Y ... -> (1 + 2/4)/2. Cleaned (1_3_G dropped):
    # (1 + 2/2)/2 and (1 + 2/3)/2. Query 2 mirrors these numbers with 2_3_Y in 1_3_G's role.
    assert results == {
        "cc_web": approx(F(5, 6)),
        "cc_web*": approx(F(3, 4)),
        "c_cc_web": approx(F(1)),
        "c_cc_web*": approx(F(5, 6)),
    }
    assert read_cc_web_video(DATA / "cc_web").task_names == ("cc_web", "cc_web*")


def test_cc_web_video_pickle_layout_matches_public_files(tmp_path: Path) -> None:
    layout = {
        "index": {"1/1_1_Y": 1, "1/1_2_Y": 2, "1/1_3_G": 3, "2/2_1_Y": 5, "2/2_2_V": 6, "2/2_3_Y": 7},
        "queries": ["1/1_1_Y", "2/2_2_V"],
        "ground_truth": [{1: "E", 2: "S", 3: "X", 4: "X"}, {5: "V", 6: "E", 7: "X"}],
        "excluded": [{3}, {7}],
    }
    path = tmp_path / "cc_web_video.pickle"
    path.write_bytes(pickle.dumps(layout, protocol=3))  # protocol 3 stores sets through builtins.set
    dataset = read_cc_web_video_pickle(path)
    assert "serial:4" in dataset.database  # labelled but not indexed: kept so the release's count holds
    public = read_cc_web_video(DATA / "cc_web", excluded_path=DATA / "cc_web" / "excluded.json")
    ours = {k: v.value for k, v in dataset.evaluate(cc_web_similarities()).items()}
    assert ours == {k: v.value for k, v in public.evaluate(cc_web_similarities()).items()}


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def test_pickle_reader_refuses_anything_but_plain_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = tmp_path / "hostile.pickle"
    hostile.write_bytes(pickle.dumps({"index": _Payload()}))
    with pytest.raises(DatasetFormatError, match=r"refused to load builtins\.print"):
        read_cc_web_video_pickle(hostile)
    assert "never run" not in capsys.readouterr().out
    floats = tmp_path / "floats.pickle"
    floats.write_bytes(pickle.dumps({"annotation": {}, "200k": {"queries": [0.5], "database": []}}))
    with pytest.raises(DatasetFormatError, match="holds a float"):
        read_fivr_pickle(floats)
    garbage = tmp_path / "garbage.pickle"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(DatasetFormatError, match=r"garbage\.pickle"):
        read_evve_pickle(garbage)


def test_svd_reader_ranks_labelled_candidates_and_unlabelled_videos() -> None:
    dataset = read_svd(DATA / "svd" / "test_groundtruth", DATA / "svd" / "unlabeled-data-id")
    assert dataset.queries == ("q1.mp4", "q2.mp4")
    assert set(dataset.database) == {"c1.mp4", "c2.mp4", "c3.mp4", "c4.mp4", "u1.mp4", "u2.mp4"}
    similarities = {
        # c4 is labelled for q2 only, so q1 does not rank it (and vice versa for c3).
        "q1.mp4": {"c4.mp4": 0.99, "c1.mp4": 0.9, "u1.mp4": 0.8, "c3.mp4": 0.7, "c2.mp4": 0.6, "u2.mp4": 0.5},
        "q2.mp4": {"c3.mp4": 0.95, "u1.mp4": 0.9, "c4.mp4": 0.8, "c1.mp4": 0.7, "u2.mp4": 0.1},
    }
    result = dataset.evaluate(similarities)["mAP"]
    # q1: c1@1, c3@3 -> (1 + 2/3)/2; q2: c4@2 -> 1/2.
    assert result.per_query == {"q1.mp4": approx(F(5, 6)), "q2.mp4": approx(F(1, 2))}
    assert result.value == approx(F(2, 3))


def test_evve_reader_ignores_nulls_and_uses_trapezoidal_ap(tmp_path: Path) -> None:
    dataset = read_evve(DATA / "evve" / "annots")
    assert dataset.queries == ("qa1", "qa2", "qb1") and dataset.measure == "trapezoid"
    assert dataset.ignored("qa1") == {"da3"}
    similarities = {
        "qa1": {"da3": 0.95, "dx1": 0.9, "da1": 0.8, "db1": 0.7, "da2": 0.6},  # da3 is null: dropped
        "qa2": {"da1": 0.9, "da2": 0.8},
        "qb1": {"db2": 0.9, "da1": 0.5, "db1": 0.1},
    }
    result = dataset.evaluate(similarities)["mAP"]
    # qa1: hits at 2 and 4 -> ((0 + 1/2)/2 + (1/3 + 2/4)/2)/2 = 1/3; qa2: 1; qb1: (0/2 + 1/3)/2 = 1/6.
    assert result.per_query == {"qa1": approx(F(1, 3)), "qa2": approx(F(1)), "qb1": approx(F(1, 6))}
    assert result.value == approx(F(1, 2))
    layout = {
        "annotation": {
            "event_a": ({"qa1", "qa2"}, {"da1", "da2"}, {"da3"}),
            "event_b": ({"qb1"}, {"db1"}, set()),
        },
        "database": ["da1", "da2", "da3", "dx1", "db1", "db2"],
        "queries": ["qa1", "qa2", "qb1"],
    }
    path = tmp_path / "evve.pickle"
    path.write_bytes(pickle.dumps(layout, protocol=2))
    assert read_evve_pickle(path).evaluate(similarities)["mAP"].value == result.value


def test_vcdb_reader_relates_videos_sharing_a_copied_segment() -> None:
    dataset = read_vcdb(DATA / "vcdb" / "annotation", distractors_path=DATA / "vcdb" / "distractors.txt")
    assert dataset.queries == ("a1", "a2", "a3", "b1", "b2")
    assert dataset.relevant("a1") == {"a2", "a3"} and dataset.relevant("b1") == {"b2"}  # self copy skipped
    assert {"z1", "z2"} <= set(dataset.database)
    result = dataset.evaluate({"a2": {"z1": 0.9, "a1": 0.8, "b1": 0.1}})["mAP"]
    assert result.value == approx(F(1, 2)) and len(result.missing) == 4


@pytest.mark.parametrize(
    ("relative", "content", "reader", "message"),
    [
        ("annotation.json", "{not json", "fivr", r"annotation.json: line 1: expected JSON"),
        ("annotation.json", '{"q1": {"ND": "a"}}', "fivr", "label ND of query 'q1' to be a list"),
        ("youtube_ids.txt", "a\nb\na\n", "fivr", r"youtube_ids.txt: line 3: expected each id once"),
        ("GT/GT_1.rst", "1 E\n2 Q\n", "cc_web", r"GT_1.rst: line 2: expected a label among"),
        ("Seed.txt", "1\t99\n", "cc_web", r"Seed.txt: line 1: expected a serial ID listed"),
        ("test_groundtruth", "q1 c1 2\n", "svd", r"test_groundtruth: line 1: expected a label of 0 or 1"),
        ("annots/event_a.dat", "qa1 1 queries\n", "evve", r"event_a.dat: line 1: expected 'video gt split'"),
        ("annotation/topic_a.txt", "a1.flv,a2.flv,1s,2s,3s,4s\n", "vcdb", r"topic_a.txt: line 1: expected"),
    ],
)
def test_malformed_files_raise_dataset_format_errors_naming_file_and_problem(
    tmp_path: Path, relative: str, content: str, reader: str, message: str
) -> None:
    import shutil

    root = tmp_path / reader
    shutil.copytree(DATA / reader, root)
    (root / relative).write_text(content)
    read = {
        "fivr": lambda: read_fivr(root / "annotation.json", root / "youtube_ids.txt"),
        "cc_web": lambda: read_cc_web_video(root),
        "svd": lambda: read_svd(root / "test_groundtruth"),
        "evve": lambda: read_evve(root / "annots"),
        "vcdb": lambda: read_vcdb(root / "annotation"),
    }[reader]
    with pytest.raises(DatasetFormatError, match=message) as caught:
        read()
    assert isinstance(caught.value, DnSError)


def test_missing_dataset_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match=r"Video_List.txt: file not found"):
        read_cc_web_video(tmp_path)
    with pytest.raises(DatasetFormatError, match="annotation directory not found"):
        read_evve(tmp_path / "annots")


def test_dense_evaluation_agrees_with_the_reference_ap_under_many_ties() -> None:
    rng = np.random.default_rng(7)
    database = [f"v{i:02d}" for i in range(40)]
    queries = ["v00", "v01", "v02", "v03"]
    relevant = {q: frozenset(rng.choice(database, size=6, replace=False).tolist()) for q in queries}
    dataset = EvalDataset("toy", tuple(queries), tuple(database), {"t": Task("t", relevant)})
    # One decimal: plenty of equal scores, so the id tie rule decides many ranks.
    similarities = {q: {v: round(float(rng.random()), 1) for v in database[:-3]} for q in queries}
    dense = dataset.evaluate(similarities)["t"]
    reference = mean_average_precision(similarities, relevant, database=database)
    assert dense.per_query == pytest.approx(reference.per_query, abs=1e-12)
    columns = ColumnIndex(database)
    matrix = np.stack([columns.row(similarities[q]) for q in queries])
    from_matrix = dataset.ground_truth("t", queries, columns).mean_average_precision(matrix)
    assert from_matrix.value == pytest.approx(reference.value, abs=1e-12)


# --------------------------------------------------------------------------------------- features


def test_h5_features_reads_release_layout_and_reports_bad_entries(tmp_path: Path) -> None:
    path = tmp_path / "features.hdf5"
    good = np.random.default_rng(0).standard_normal((3, 9, 512)).astype(np.float16)
    with h5py.File(path, "w") as handle:
        handle["v1"] = good
        handle["1/1_1_Y"] = good[:2]
        handle["wrong_shape"] = np.zeros((3, 4, 512), dtype=np.float32)
        handle["not_finite"] = np.full((1, 9, 512), np.nan, dtype=np.float32)
    with H5Features(path) as features:
        assert features.ids() == ["1/1_1_Y", "not_finite", "v1", "wrong_shape"]
        assert "1/1_1_Y" in features and "missing" not in features
        loaded = features["v1"]
        assert loaded.dtype == np.float32 and np.array_equal(loaded, good.astype(np.float32))
        assert features["1/1_1_Y"].shape == (2, 9, 512)
        with pytest.raises(FeatureNotFoundError, match="'missing'"):
            features["missing"]
        with pytest.raises(FeatureFileError, match=r"shape \[3, 4, 512\]; expected \[T >= 1, 9, 512\]"):
            features["wrong_shape"]
        with pytest.raises(FeatureFileError, match="NaN"):
            features["not_finite"]
    not_hdf5 = tmp_path / "plain.txt"
    not_hdf5.write_text("x")
    with pytest.raises(FeatureFileError, match="not a readable HDF5 file"):
        H5Features(not_hdf5)


# --------------------------------------------------------------------------------------- trade-off


def toy_tradeoff() -> tuple[EvalDataset, dict, dict, dict]:
    """Two queries over eight videos: the coarse student ranks the relevant videos low, the fine
    student (raw scores in [-1, 1]) ranks them high, the selector is only partly right."""
    database = ("a", "b", "c", "d", "e", "f", "g", "h")
    relevant = {"q1": frozenset({"a", "b"}), "q2": frozenset({"c"})}
    dataset = EvalDataset("toy", ("q1", "q2"), database, {"t": Task("t", relevant)})
    coarse, fine, selector = {}, {}, {}
    for q, rel in relevant.items():
        coarse[q] = {v: (0.3 if v in rel else 0.4 + 0.05 * i) for i, v in enumerate(database)}
        fine[q] = {v: (0.8 if v in rel else -0.6 + 0.1 * i) for i, v in enumerate(database)}
        selector[q] = {
            v: float(s) for v, s in zip(database, (0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4), strict=True)
        }
    return dataset, coarse, fine, selector


def test_tradeoff_endpoints_are_the_coarse_and_the_rescaled_fine_map(tmp_path: Path) -> None:
    dataset, coarse, fine, selector = toy_tradeoff()
    rows = dns_tradeoff(PairScores.from_dicts(coarse, fine, selector), dataset, random_seeds=(0, 1, 2))
    coarse_map = dataset.evaluate(coarse)["t"].value
    fine_map = dataset.evaluate({q: {v: s / 2 + 0.5 for v, s in d.items()} for q, d in fine.items()})[
        "t"
    ].value
    assert coarse_map < 0.5 < fine_map == pytest.approx(1.0)
    for row in rows:
        if row["percentage"] == 0:
            assert row["mAP"] == pytest.approx(coarse_map) and row["reranked_pairs"] == 0
        if row["percentage"] == 100:
            assert row["mAP"] == pytest.approx(fine_map) and row["reranked_pairs"] == 16
    by_method = {
        m: {r["percentage"]: r["mAP"] for r in rows if r["method"] == m} for m in ("oracle", "random")
    }
    assert all(by_method["oracle"][p] >= by_method["random"][p] for p in by_method["oracle"])
    assert by_method["oracle"][25] > by_method["random"][25]
    json_path = write_table(rows, tmp_path / "tradeoff.json")
    assert json.loads(json_path.read_text()) == rows
    csv_text = write_table(rows, tmp_path / "tradeoff.csv").read_text().splitlines()
    assert (
        csv_text[0] == "method,percentage,task,mAP,reranked_pairs,queries" and len(csv_text) == len(rows) + 1
    )


def test_tradeoff_follows_the_release_protocol_per_query() -> None:
    dataset, coarse, fine, selector = toy_tradeoff()
    rows = dns_tradeoff(
        PairScores.from_dicts(coarse, fine, selector), dataset, percentages=[50], methods=["selector"]
    )
    # By hand: each query has 8 candidates; floor(0.5 * 8) = 4 with the highest selector confidence
    # (a, c, e, g) take the rescaled fine score, the rest keep the coarse score.
    expected = []
    for q in ("q1", "q2"):
        mixed = {v: (fine[q][v] / 2 + 0.5 if v in "aceg" else coarse[q][v]) for v in coarse[q]}
        expected.append(average_precision_from_scores(mixed, dataset.relevant(q, "t")))
    assert rows == [
        {
            "method": "selector",
            "percentage": 50,
            "task": "t",
            "mAP": pytest.approx(float(np.mean(expected))),
            "reranked_pairs": 8,
            "queries": 2,
        }
    ]
    assert rerank_budget(35, 20) == 7 and rerank_budget(5, 19) == 0
    with pytest.raises(InvalidInputError):
        dns_tradeoff(PairScores.from_dicts(coarse, fine, selector), dataset, percentages=[120])


def test_pair_scores_must_cover_the_same_pairs() -> None:
    _, coarse, fine, selector = toy_tradeoff()
    del fine["q1"]["h"]
    with pytest.raises(InvalidInputError, match="'h' is not in all three"):
        PairScores.from_dicts(coarse, fine, selector)


def test_milvus_protocol_map_against_k() -> None:
    dataset, coarse, fine, selector = toy_tradeoff()
    scores = PairScores.from_dicts(coarse, fine, selector)
    # ANN (coarse) order, best first: h g f e d c b a; relevant videos come last.
    ann = {q: sorted(coarse[q], key=lambda v: -coarse[q][v]) for q in coarse}
    rows = milvus_protocol(scores, dataset, ann, ks=[1, 7, 8], percentage=100)
    by_k = {r["k"]: r["mAP"] for r in rows}
    # K = 8 with everything re-ranked: the fine mAP (1.0). K = 7: q1 retrieves a (ranked first by the
    # fine student) but not b -> (1/1)/2; q2's c is the 8th candidate -> 0. K = 1: nothing relevant.
    assert by_k == {1: approx(F(0)), 7: approx(F(1, 4)), 8: approx(F(1))}
    with pytest.raises(InvalidInputError, match="no coarse/fine/selector score"):
        milvus_protocol(scores, dataset, {"q1": ["zz"]}, ks=[1])


# ------------------------------------------------------------------------------------------ plots


def test_plots_render_png_files(tmp_path: Path) -> None:
    dataset, coarse, fine, selector = toy_tradeoff()
    scores = PairScores.from_dicts(coarse, fine, selector)
    tradeoff_png = plot_tradeoff(dns_tradeoff(scores, dataset, random_seeds=(0,)), tmp_path / "tradeoff.png")
    ann = {q: sorted(coarse[q], key=lambda v: -coarse[q][v]) for q in coarse}
    k_png = plot_map_vs_k(milvus_protocol(scores, dataset, ann, ks=[2, 4, 8]), tmp_path / "k.png")
    curve = mean_interpolated_pr_curve(coarse, {q: dataset.relevant(q) for q in dataset.queries})
    pr_png = plot_pr_curves({"coarse": curve}, tmp_path / "pr.png", title="PR")
    for png in (tradeoff_png, k_png, pr_png):
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    with pytest.raises(InvalidInputError, match="PNG"):
        plot_pr_curves({"coarse": curve}, tmp_path / "pr.jpg")
