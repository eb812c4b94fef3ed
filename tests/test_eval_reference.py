"""The dataset evaluations equal the DnS release's own evaluators.

Each reference below re-implements, line for line, the protocol of the DnS release's
``datasets/__init__.py`` (``CC_WEB_VIDEO.calculate_mAP``, ``FIVR.calculate_mAP`` with its
``audio`` variant, ``SVD.evaluate`` with scikit-learn's ``average_precision_score``, written out
here from its definition). The ground truth is written in each dataset's published format and
read by the project's readers; the similarities are seeded random numbers.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from dns_milvus.eval import (
    ColumnIndex,
    read_cc_web_video,
    read_cc_web_video_pickle,
    read_fivr,
    read_fivr_pickle,
    read_svd,
    tie_block_average_precision,
)
from dns_milvus.eval.metrics import score_order

# ------------------------------------------------------------------------------------ references


def release_cc_web_map(
    dataset: Mapping, similarities: Mapping[str, Mapping[str, float]], all_videos: bool, clean: bool
) -> float:
    """``CC_WEB_VIDEO.calculate_mAP`` of the release, on its pickle layout."""
    database, queries = dataset["index"], dataset["queries"]
    total = 0.0
    for query_set, labels in enumerate(dataset["ground_truth"]):
        query_id = queries[query_set]
        i, ri, s = 0.0, 0.0, 0.0
        if query_id in similarities:
            res = similarities[query_id]
            for video_id in sorted(res.keys(), key=lambda x: res[x], reverse=True):
                if video_id not in database:
                    continue
                video = database[video_id]
                excluded = dataset["excluded"][query_set]
                if (all_videos or video in labels) and (not clean or video not in excluded):
                    ri += 1
                    if video in labels and labels[video] in "ESLMV":
                        i += 1.0
                        s += i / ri
            excluded = dataset["excluded"][query_set]
            positives = np.sum(
                [1.0 for k, v in labels.items() if v in "ESLMV" and (not clean or k not in excluded)]
            )
            total += s / positives
    return total / len(set(queries).intersection(similarities.keys()))


def release_fivr_map(
    annotation: Mapping,
    queries: Sequence[str],
    database: Sequence[str],
    similarities: Mapping[str, Mapping[str, float]],
    labels: Sequence[str],
    all_db: set[str] | None = None,
) -> float:
    """``FIVR.evaluate`` of the release (``audio=True`` for ``labels=['DA']``)."""
    all_db = set(database) if all_db is None else set(database).intersection(all_db)
    aps = []
    for query, res in similarities.items():
        if query not in queries:
            continue
        gt_sets = annotation[query]
        query_gt = {video for label in labels if label in gt_sets for video in gt_sets[label]}
        query_gt = query_gt.intersection(all_db)
        i, ri, s = 0.0, 0, 0.0
        for video in sorted(res.keys(), key=lambda x: res[x], reverse=True):
            if video != query and video in all_db:
                ri += 1
                if video in query_gt:
                    i += 1.0
                    s += i / ri
        aps.append(s / len(query_gt))
    return float(np.mean(aps))


def sklearn_average_precision(y_true: Sequence[int], y_score: Sequence[float]) -> float:
    """scikit-learn's ``average_precision_score``: sum over the distinct thresholds, highest first,
    of (recall gained) x (precision of everything scored at or above the threshold)."""
    positives = sum(y_true)
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted(set(y_score), reverse=True):
        kept = [label for label, score in zip(y_true, y_score, strict=True) if score >= threshold]
        recall = sum(kept) / positives
        ap += (recall - previous_recall) * sum(kept) / len(kept)
        previous_recall = recall
    return ap


def release_svd_map(
    ground_truth: Mapping[str, Mapping[str, int]],
    unlabeled: Sequence[str],
    similarities: Mapping[str, Mapping[str, float]],
    all_db: set[str],
) -> float:
    """``SVD.evaluate`` of the release."""
    aps = []
    for query, targets in ground_truth.items():
        y_true, y_score = [], []
        for target, label in targets.items():
            if target in all_db:
                y_true.append(label)
                y_score.append(similarities[query][target])
        for target in unlabeled:
            if target in all_db:
                y_true.append(0)
                y_score.append(similarities[query][target])
        aps.append(sklearn_average_precision(y_true, y_score))
    return float(np.mean(aps))


# ------------------------------------------------------------------------------------ CC_WEB_VIDEO


def write_cc_web(root: Path, rng: np.random.Generator, topics: int = 4, per_topic: int = 9) -> dict:
    """CC_WEB_VIDEO's files (Video_List.txt, Seed.txt, GT/GT_<topic>.rst, a cleaned-set JSON) and
    the release's pickle layout of the same annotation."""
    (root / "GT").mkdir(parents=True)
    video_list, seeds, index, ground_truth, excluded, excluded_ids = [], [], {}, [], [], {}
    serial = 0
    for topic in range(1, topics + 1):
        labels = {}
        for k in range(per_topic):
            serial += 1
            name = f"{topic}_{k}_Y"
            video_list.append(f"{serial}\t{topic}\tYouTube\t{name}.flv\t0:30\t320x240")
            index[f"{topic}/{name}"] = serial
            labels[serial] = "E" if k == 0 else str(rng.choice(["E", "S", "V", "M", "L", "X", "-1"]))
        labels[serial - per_topic + 2] = "S"  # every topic has a positive besides its seed
        seed = serial - per_topic + 1
        seeds.append(f"{topic}\t{seed}")
        (root / "GT" / f"GT_{topic}.rst").write_text("".join(f"{s}\t{lb}\n" for s, lb in labels.items()))
        ground_truth.append(labels)
        dropped = {s for s in labels if s != seed and rng.random() < 0.2}
        excluded.append(dropped)
        query = f"{topic}/{topic}_0_Y"
        excluded_ids[query] = sorted(v for v, s in index.items() if s in dropped)
    (root / "Video_List.txt").write_text("\n".join(video_list) + "\n")
    (root / "Seed.txt").write_text("\n".join(seeds) + "\n")
    (root / "excluded.json").write_text(json.dumps(excluded_ids))
    queries = [f"{t}/{t}_0_Y" for t in range(1, topics + 1)]
    return {"index": index, "queries": queries, "ground_truth": ground_truth, "excluded": excluded}


def random_scores(rng: np.random.Generator, videos: Sequence[str]) -> dict[str, float]:
    return {v: float(s) for v, s in zip(videos, rng.random(len(videos)), strict=True)}


#: Our task names and the release's (all_videos, clean) arguments.
PROTOCOLS = {
    "cc_web": (False, False), "cc_web*": (True, False), "c_cc_web": (False, True), "c_cc_web*": (True, True),
}  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cc_web_video_counts_every_positive_as_the_release_does(tmp_path: Path, seed: int) -> None:
    """Positives without features (the pipeline's ``available``) stay in the count: misses."""
    rng = np.random.default_rng(seed)
    layout = write_cc_web(tmp_path, rng)
    videos = sorted(layout["index"])
    available = {v for v in videos if v in layout["queries"] or rng.random() < 0.7}
    similarities = {q: random_scores(rng, sorted(available)) for q in layout["queries"]}
    dataset = read_cc_web_video(tmp_path, excluded_path=tmp_path / "excluded.json")
    ours = dataset.evaluate(similarities, available=available)
    for task, (all_videos, clean) in PROTOCOLS.items():
        expected = release_cc_web_map(layout, similarities, all_videos, clean)
        assert ours[task].value == pytest.approx(expected, abs=1e-12), task


def test_cc_web_video_pickle_counts_positives_its_index_lacks(tmp_path: Path) -> None:
    """The release's pickle labels a video its index lacks (serial 2005 in the real file): the
    release still counts it as a positive, so it is a certain miss; with ``available`` too."""
    rng = np.random.default_rng(5)
    layout = write_cc_web(tmp_path, rng)
    lost = next(v for v, s in layout["index"].items() if layout["ground_truth"][1].get(s) == "S")
    lost_serial = layout["index"].pop(lost)
    path = tmp_path / "cc_web_video.pickle"
    path.write_bytes(pickle.dumps(layout, protocol=4))
    dataset = read_cc_web_video_pickle(path)
    assert f"serial:{lost_serial}" in dataset.database
    indexed = sorted(layout["index"])
    similarities = {q: random_scores(rng, indexed) for q in layout["queries"]}
    for available in (None, set(indexed)):
        ours = dataset.evaluate(similarities, available=available)
        for task, (all_videos, clean) in PROTOCOLS.items():
            expected = release_cc_web_map(layout, similarities, all_videos, clean)
            assert ours[task].value == pytest.approx(expected, abs=1e-12), (task, available is None)


# ------------------------------------------------------------------------------------------- FIVR

FIVR_RELEASE_TASKS = {
    "DSVR": ["ND", "DS"], "CSVR": ["ND", "DS", "CS"], "ISVR": ["ND", "DS", "CS", "IS"], "DAVR": ["DA"],
}  # fmt: skip


def write_fivr(root: Path, rng: np.random.Generator) -> tuple[dict, list[str], list[str]]:
    """annotation.json (ND, DS, CS, IS, DA per query) and youtube_ids.txt; the first query lists
    itself under IS, as FIVR-200K's eCrhXArKE24 does."""
    queries = [f"query{i:02d}" for i in range(6)]
    others = [f"video{i:03d}" for i in range(60)]
    database = queries + others
    annotation = {}
    for k, query in enumerate(queries):
        chosen = rng.permutation(others)[:25].tolist()
        labels = {
            "ND": chosen[:3], "DS": chosen[3:7], "CS": chosen[7:12], "IS": chosen[12:18], "DA": chosen[18:21],
        }  # fmt: skip
        if k == 0:
            labels["IS"].append(query)
        annotation[query] = labels
    (root / "annotation.json").write_text(json.dumps(annotation))
    (root / "youtube_ids.txt").write_text("\n".join(database) + "\n")
    return annotation, queries, database


@pytest.mark.parametrize("seed", [0, 1])
def test_fivr_tasks_and_the_audio_task_equal_the_release(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    annotation, queries, database = write_fivr(tmp_path, rng)
    dataset = read_fivr(tmp_path / "annotation.json", tmp_path / "youtube_ids.txt")
    assert dataset.task_names == ("DSVR", "CSVR", "ISVR", "DAVR")
    assert queries[0] in dataset.relevant(queries[0], "ISVR")
    # every query scores every database video, itself included (the release skips it when ranking)
    similarities = {q: random_scores(rng, database) for q in queries}
    available = {v for v in database if v in queries or rng.random() < 0.9}
    for all_db in (None, available):
        ours = dataset.evaluate(similarities, available=all_db)
        for task, labels in FIVR_RELEASE_TASKS.items():
            expected = release_fivr_map(annotation, queries, database, similarities, labels, all_db)
            assert ours[task].value == pytest.approx(expected, abs=1e-12), (task, all_db is None)
    # The release keeps the self-listed query relevant: a certain miss that costs query00 ISVR AP.
    dropped = read_fivr(tmp_path / "annotation.json", tmp_path / "youtube_ids.txt", drop_self_relevant=True)
    kept_ap = dataset.evaluate(similarities)["ISVR"].per_query[queries[0]]
    assert dropped.evaluate(similarities)["ISVR"].per_query[queries[0]] > kept_ap


def test_fivr_pickle_has_the_audio_task_and_keeps_the_self_listed_query(tmp_path: Path) -> None:
    annotation, queries, database = write_fivr(tmp_path, np.random.default_rng(3))
    layout = {"annotation": annotation, "200k": {"queries": queries, "database": database}}
    layout["5k"] = layout["200k"]
    (tmp_path / "fivr.pickle").write_bytes(pickle.dumps(layout, protocol=4))
    dataset = read_fivr_pickle(tmp_path / "fivr.pickle")
    assert "DAVR" in dataset.task_names and dataset.query_stays_relevant
    similarities = {q: random_scores(np.random.default_rng(4), database) for q in queries}
    for task, labels in FIVR_RELEASE_TASKS.items():
        expected = release_fivr_map(annotation, queries, database, similarities, labels)
        assert dataset.evaluate(similarities)[task].value == pytest.approx(expected, abs=1e-12)


# -------------------------------------------------------------------------------------------- SVD


def write_svd(root: Path, rng: np.random.Generator) -> tuple[dict[str, dict[str, int]], list[str]]:
    """test_groundtruth (``query candidate label``) and unlabeled-data-id."""
    ground_truth: dict[str, dict[str, int]] = {}
    candidates = [f"c{i:03d}.mp4" for i in range(40)]
    for q in range(5):
        picked = rng.permutation(candidates)[:12].tolist()
        ground_truth[f"q{q}.mp4"] = {c: int(k < 4 or rng.random() < 0.2) for k, c in enumerate(picked)}
    unlabeled = [f"u{i:03d}.mp4" for i in range(30)]
    lines = [f"{q} {c} {label}" for q, targets in ground_truth.items() for c, label in targets.items()]
    (root / "test_groundtruth").write_text("\n".join(lines) + "\n")
    (root / "unlabeled-data-id").write_text("\n".join(unlabeled) + "\n")
    return ground_truth, unlabeled


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_svd_scores_ties_as_one_block_like_scikit_learn(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ground_truth, unlabeled = write_svd(tmp_path, rng)
    dataset = read_svd(tmp_path / "test_groundtruth", tmp_path / "unlabeled-data-id")
    database = list(dataset.database)
    # One decimal: many equal similarities, relevant and not, inside one query's ranking.
    similarities = {q: {v: round(float(rng.random()), 1) for v in database} for q in ground_truth}
    available = {v for v in database if rng.random() < 0.85}
    for all_db in (set(database), available):
        ours = dataset.evaluate(similarities, available=all_db)["mAP"]
        expected = release_svd_map(ground_truth, unlabeled, similarities, all_db)
        assert ours.value == pytest.approx(expected, abs=1e-12)


def test_svd_ranks_unscored_candidates_below_every_scored_one_as_one_block(tmp_path: Path) -> None:
    """Results that leave candidates out (a top-K search): those rank last, tied, as if the release
    had been given a similarity below every other for them."""
    rng = np.random.default_rng(7)
    ground_truth, unlabeled = write_svd(tmp_path, rng)
    dataset = read_svd(tmp_path / "test_groundtruth", tmp_path / "unlabeled-data-id")
    database = list(dataset.database)
    partial = {
        q: {v: float(s) for v, s in zip(database, rng.random(len(database)), strict=True) if s > 0.4}
        for q in ground_truth
    }
    completed = {q: {v: partial[q].get(v, -1.0) for v in database} for q in ground_truth}
    expected = release_svd_map(ground_truth, unlabeled, completed, set(database))
    assert dataset.evaluate(partial)["mAP"].value == pytest.approx(expected, abs=1e-12)
    # The dense path the trade-off curves use, given only each row's order (no ties here), agrees.
    columns = ColumnIndex(database)
    truth = dataset.ground_truth("mAP", list(ground_truth), columns)
    rows = [columns.row(partial[q]) for q in ground_truth]
    dense = np.mean([truth.average_precision(r, score_order(row)) for r, row in enumerate(rows)])
    assert dense == pytest.approx(expected, abs=1e-12)


def test_tie_block_ap_equals_scikit_learns_definition() -> None:
    rng = np.random.default_rng(11)
    for _ in range(50):
        m = int(rng.integers(1, 30))
        scores = np.round(rng.random(m), 1)
        labels = rng.random(m) < 0.4
        if not labels.any():
            labels[0] = True
        expected = sklearn_average_precision(labels.astype(int).tolist(), scores.tolist())
        assert tie_block_average_precision(scores, labels) == pytest.approx(expected, abs=1e-12)
    # unscored videos (NaN) form one last block; relevant videos that cannot be ranked are misses
    unscored = tie_block_average_precision(np.array([0.9, np.nan, np.nan]), np.array([False, True, False]))
    assert unscored == pytest.approx(1 / 3)  # its block ends at 1 relevant in 3
    assert tie_block_average_precision(np.array([0.9]), np.array([True]), n_relevant=2) == 0.5
