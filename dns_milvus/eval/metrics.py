"""Retrieval metrics of the DnS evaluation: AP (the paper's eq. 13), mAP, interpolated PR curves, µAP.

Average precision of one query (eq. 13)::

    AP = (1/n) * sum_{i=1..k} i / r_i

where ``r_i`` is the rank of the i-th relevant video found in the ranking and ``n`` is the number
of relevant videos of the ground truth that lie in the database. A relevant video missing from the
ranking contributes nothing but stays in ``n`` (it is a miss, not an omission).

Conventions shared by every function here:

- **Database restriction**: with ``database`` given, ranked ids outside it are dropped before ranks
  are counted, and ``n`` counts only relevant videos inside it (the FIVR evaluation's rule).
- **Query exclusion**: ``exclude`` (usually the query itself) is dropped from the ranking and from
  ``n``: a query is never its own result.
- **Ignored videos**: ``ignore`` ids are dropped from the ranking and from ``n`` (EVVE's "null" videos).
- **Ties** (score-based entry points): scores descending, equal scores by video id ascending
  (a stable sort on ``(-score, id)``), so results never depend on dict or hash order. The dense
  row functions break ties by column order; callers keep columns sorted by id so both agree.
- **Empty ground truth**: AP is undefined when ``n == 0``; :func:`average_precision` raises
  :class:`UndefinedMetricError` and :func:`mean_average_precision` skips the query and lists it in
  ``MeanAP.skipped`` (as the FIVR evaluation script skips queries with an empty annotation set).
- **Missing queries**: queries of the ground truth without results are left out of the mean and
  listed in ``MeanAP.missing`` (as both the FIVR and the DnS release evaluations do).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from dns_milvus.errors import InvalidInputError
from dns_milvus.eval.errors import UndefinedMetricError

#: ``ap``: eq. 13 (FIVR, CC_WEB_VIDEO, VCDB). ``trapezoid``: EVVE's official measure, the area of
#: trapezoids between the precision just before and just after each relevant hit. ``ap_ties``:
#: scikit-learn's ``average_precision_score`` (the SVD release evaluation): equal scores form one
#: block, see :func:`tie_block_average_precision`; it needs the scores, not only their order.
Measure = Literal["ap", "trapezoid", "ap_ties"]

#: The FIVR evaluation's interpolated PR curve: precision at recall 0, 0.05, ..., 1.
FIVR_RECALL_LEVELS = 21

_RECALL_TOLERANCE = 1e-9


@dataclass(frozen=True)
class MeanAP:
    """mAP over the queries that have results and a non-empty ground truth."""

    value: float
    per_query: Mapping[str, float] = field(default_factory=dict)
    #: Queries whose ground truth has no relevant video in the database (AP undefined).
    skipped: tuple[str, ...] = ()
    #: Queries of the ground truth that have no results.
    missing: tuple[str, ...] = ()

    def __float__(self) -> float:
        return self.value

    @classmethod
    def from_per_query(
        cls, per_query: Mapping[str, float], skipped: Iterable[str] = (), missing: Iterable[str] = ()
    ) -> MeanAP:
        """The mean of ``per_query``; raises :class:`UndefinedMetricError` when no query was evaluated."""
        skipped, missing = tuple(skipped), tuple(missing)
        if not per_query:
            raise UndefinedMetricError(
                f"no query has both results and a relevant video in the database "
                f"({len(missing)} without results, {len(skipped)} with an empty ground truth)"
            )
        return cls(float(np.mean(list(per_query.values()))), dict(per_query), skipped, missing)


def rank_by_score(scores: Mapping[str, float]) -> list[str]:
    """Video ids by score descending, equal scores by id ascending (the deterministic tie rule)."""
    for vid, score in scores.items():
        if not math.isfinite(float(score)):
            raise InvalidInputError(f"score of video {vid!r} is {score}; expected a finite number")
    return sorted(scores, key=lambda vid: (-float(scores[vid]), vid))


def hit_ranks(
    ranked_ids: Iterable[str],
    relevant: Collection[str],
    *,
    exclude: str | None = None,
    database: Collection[str] | None = None,
    ignore: Collection[str] | None = None,
) -> tuple[np.ndarray, int]:
    """1-based ranks of the relevant videos in the restricted ranking, and ``n`` of eq. 13."""
    skip = set(ignore or ())
    if exclude is not None:
        skip.add(exclude)
    universe = None if database is None else _as_set(database)
    counted = set(relevant) - skip
    if universe is not None:
        counted &= universe
    ranks: list[int] = []
    seen: set[str] = set()
    position = 0
    for vid in ranked_ids:
        if vid in seen:
            raise InvalidInputError(
                f"video {vid!r} appears twice in a ranking; expected each video at most once"
            )
        seen.add(vid)
        if vid in skip or (universe is not None and vid not in universe):
            continue
        position += 1
        if vid in counted:
            ranks.append(position)
    return np.asarray(ranks, dtype=np.int64), len(counted)


def score_order(scores: np.ndarray) -> np.ndarray:
    """Columns with a finite score, by score descending, equal scores by column order (stable)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise InvalidInputError(f"expected a 1-D row of scores, got shape {scores.shape}")
    columns = np.flatnonzero(np.isfinite(scores))
    return columns[np.argsort(-scores[columns], kind="stable")]


def hit_ranks_from_order(
    order: np.ndarray, relevant: np.ndarray, valid: np.ndarray | None = None
) -> np.ndarray:
    """1-based ranks of the relevant columns in ``order`` once columns not ``valid`` are dropped."""
    if valid is not None:
        order = order[np.asarray(valid, dtype=bool)[order]]
    return np.flatnonzero(np.asarray(relevant, dtype=bool)[order]) + 1


def hit_ranks_from_row(
    scores: np.ndarray, relevant: np.ndarray, valid: np.ndarray | None = None
) -> np.ndarray:
    """Dense form of :func:`hit_ranks` for one query: 1-based ranks of the relevant columns.

    ``scores``: float [N], NaN (or any non-finite value) where the pair was not scored;
    ``relevant``/``valid``: bool [N]. Only valid, scored columns are ranked: score descending,
    ties by column order.
    """
    scores = np.asarray(scores)
    if np.shape(relevant) != scores.shape or (valid is not None and np.shape(valid) != scores.shape):
        raise InvalidInputError(
            f"expected relevant/valid masks shaped like the scores {scores.shape}, got "
            f"{np.shape(relevant)} and {None if valid is None else np.shape(valid)}"
        )
    return hit_ranks_from_order(score_order(scores), relevant, valid)


def ap_from_hit_ranks(ranks: np.ndarray, n_relevant: int, measure: Measure = "ap") -> float:
    """AP from the 1-based ranks of the relevant hits and the number of relevant videos ``n``."""
    if n_relevant <= 0:
        raise UndefinedMetricError(
            "average precision is undefined for a query with no relevant video in the database"
        )
    ranks = np.asarray(ranks, dtype=np.float64)
    if len(ranks) > n_relevant:
        raise InvalidInputError(f"{len(ranks)} relevant hits but only {n_relevant} relevant videos")
    found = np.arange(1, len(ranks) + 1, dtype=np.float64)
    after = found / ranks
    if measure == "ap":
        return float(after.sum() / n_relevant)
    if measure == "trapezoid":
        before = np.ones_like(after)
        later = ranks > 1
        before[later] = (found[later] - 1) / (ranks[later] - 1)
        return float(((before + after) / 2).sum() / n_relevant)
    if measure == "ap_ties":
        raise InvalidInputError("the 'ap_ties' measure needs the scores: use tie_block_average_precision")
    raise InvalidInputError(f"unknown AP measure {measure!r}; expected 'ap', 'trapezoid' or 'ap_ties'")


def tie_block_average_precision(
    scores: np.ndarray, relevant: np.ndarray, n_relevant: int | None = None
) -> float:
    """AP as scikit-learn's ``average_precision_score`` computes it (the SVD release evaluation).

    ``scores`` float [M] and ``relevant`` bool [M] over every video the query ranks. Videos are
    taken by score descending in blocks of equal score; each block adds its recall gain times the
    precision at its end: ``AP = sum_k (R_k - R_{k-1}) * P_k``. Inside a block the order does not
    matter, unlike eq. 13 with a tie rule. Videos without a finite score (not scored) form one
    last block, below every scored video. ``n_relevant`` (default: the relevant videos given)
    may be larger, for relevant videos that cannot be ranked at all: they are misses.
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if scores.ndim != 1 or relevant.shape != scores.shape:
        raise InvalidInputError(
            f"expected 1-D scores and relevant flags of equal length, got {scores.shape} and {relevant.shape}"
        )
    n = int(relevant.sum()) if n_relevant is None else int(n_relevant)
    if n <= 0:
        raise UndefinedMetricError(
            "average precision is undefined for a query with no relevant video in the database"
        )
    if n < relevant.sum():
        raise InvalidInputError(f"{int(relevant.sum())} relevant videos given but n_relevant={n}")
    if len(scores) == 0:
        return 0.0
    scores = np.where(np.isfinite(scores), scores, -np.inf)
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    block_ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])
    true_positives = np.cumsum(relevant[order])[block_ends]
    precision = true_positives / (block_ends + 1)
    gained = np.diff(true_positives, prepend=0)
    return float((gained * precision).sum() / n)


def average_precision(
    ranked_ids: Sequence[str],
    relevant: Collection[str],
    *,
    exclude: str | None = None,
    database: Collection[str] | None = None,
    ignore: Collection[str] | None = None,
) -> float:
    """AP of eq. 13 for a ranking (best first); see the module notes for the restriction rules."""
    ranks, n = hit_ranks(ranked_ids, relevant, exclude=exclude, database=database, ignore=ignore)
    return ap_from_hit_ranks(ranks, n, "ap")


def average_precision_from_scores(
    scores: Mapping[str, float],
    relevant: Collection[str],
    *,
    exclude: str | None = None,
    database: Collection[str] | None = None,
    ignore: Collection[str] | None = None,
) -> float:
    """AP of eq. 13 for a ``{video id: similarity}`` dict, ranked with the deterministic tie rule."""
    return average_precision(
        rank_by_score(scores), relevant, exclude=exclude, database=database, ignore=ignore
    )


def trapezoidal_average_precision(
    ranked_ids: Sequence[str],
    relevant: Collection[str],
    *,
    exclude: str | None = None,
    database: Collection[str] | None = None,
    ignore: Collection[str] | None = None,
) -> float:
    """EVVE's AP: per relevant hit, the mean of the precision just before and just after it, over ``n``."""
    ranks, n = hit_ranks(ranked_ids, relevant, exclude=exclude, database=database, ignore=ignore)
    return ap_from_hit_ranks(ranks, n, "trapezoid")


def mean_average_precision(
    results: Mapping[str, Mapping[str, float] | Sequence[str]],
    relevant: Mapping[str, Collection[str]],
    *,
    database: Collection[str] | None = None,
    exclude_query: bool = True,
    ignore: Mapping[str, Collection[str]] | None = None,
    measure: Measure = "ap",
) -> MeanAP:
    """mAP over the queries of ``relevant``; each result is a score dict or a ranked id list."""
    universe = None if database is None else _as_set(database)
    per_query: dict[str, float] = {}
    skipped: list[str] = []
    missing: list[str] = []
    for query in sorted(relevant):
        if query not in results:
            missing.append(query)
            continue
        ranks, n = hit_ranks(
            _ranking(results[query]),
            relevant[query],
            exclude=query if exclude_query else None,
            database=universe,
            ignore=(ignore or {}).get(query),
        )
        if n == 0:
            skipped.append(query)
            continue
        per_query[query] = ap_from_hit_ranks(ranks, n, measure)
    return MeanAP.from_per_query(per_query, skipped, missing)


def interpolated_pr_curve(
    ranked_ids: Sequence[str],
    relevant: Collection[str],
    *,
    recall_levels: int | None = FIVR_RECALL_LEVELS,
    exclude: str | None = None,
    database: Collection[str] | None = None,
    ignore: Collection[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Interpolated precision-recall curve of one query: ``(recall, precision)`` arrays.

    Interpolated precision at recall r is the highest precision reached at any recall >= r.
    ``recall_levels=21`` gives the FIVR evaluation's curve (recall 0, 0.05, ..., 1), 11 the classic
    11-point curve, ``None`` the all-point curve (one point per distinct recall reached). As in the
    FIVR evaluation (scikit-learn's convention), the curve includes the point (recall 0,
    precision 1), and relevant videos missing from the ranking are placed after every ranked
    database video, so recall 1 is reached at precision n / (number of database videos).
    """
    skip = set(ignore or ())
    if exclude is not None:
        skip.add(exclude)
    ranks, n = hit_ranks(ranked_ids, relevant, exclude=exclude, database=database, ignore=ignore)
    if n == 0:
        raise UndefinedMetricError(
            "a PR curve is undefined for a query with no relevant video in the database"
        )
    found = np.arange(1, len(ranks) + 1, dtype=np.float64)
    recalls = [0.0, *(found / n)]
    precisions = [1.0, *(found / ranks)]
    if len(ranks) < n:
        if database is not None:
            total = len(_as_set(database) - skip)
        else:
            ranked = [vid for vid in ranked_ids if vid not in skip]
            total = len(ranked) + (n - len(ranks))
        recalls.append(1.0)
        precisions.append(n / total)
    recall_arr = np.asarray(recalls)
    precision_arr = np.asarray(precisions)
    # Highest precision at any recall >= r: a running maximum from the high-recall end.
    order = np.argsort(recall_arr, kind="stable")
    recall_arr, precision_arr = recall_arr[order], precision_arr[order]
    envelope = np.maximum.accumulate(precision_arr[::-1])[::-1]
    if recall_levels is None:
        distinct = np.r_[recall_arr[1:] != recall_arr[:-1], True]
        return recall_arr[distinct], envelope[distinct]
    if recall_levels < 2:
        raise InvalidInputError(f"recall_levels must be >= 2 or None, got {recall_levels}")
    levels = np.linspace(0.0, 1.0, recall_levels)
    first_reaching = np.searchsorted(recall_arr, levels - _RECALL_TOLERANCE, side="left")
    return levels, envelope[first_reaching]


def mean_interpolated_pr_curve(
    results: Mapping[str, Mapping[str, float] | Sequence[str]],
    relevant: Mapping[str, Collection[str]],
    *,
    recall_levels: int = FIVR_RECALL_LEVELS,
    database: Collection[str] | None = None,
    exclude_query: bool = True,
    ignore: Mapping[str, Collection[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The FIVR evaluation's PR curve: per-query interpolated curves averaged over the queries.

    Queries without results or with an empty ground truth are left out, as in :func:`mean_average_precision`.
    """
    universe = None if database is None else _as_set(database)
    curves = []
    levels = np.linspace(0.0, 1.0, recall_levels)
    for query in sorted(relevant):
        if query not in results:
            continue
        try:
            levels, precision = interpolated_pr_curve(
                _ranking(results[query]),
                relevant[query],
                recall_levels=recall_levels,
                exclude=query if exclude_query else None,
                database=universe,
                ignore=(ignore or {}).get(query),
            )
        except UndefinedMetricError:
            continue
        curves.append(precision)
    if not curves:
        raise UndefinedMetricError("no query has both results and a relevant video in the database")
    return levels, np.mean(curves, axis=0)


def micro_average_precision(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    *,
    num_positives: int | None = None,
) -> float:
    """µAP: the predictions of all queries ranked jointly, AP over the one global list.

    ``µAP = sum_k (R_k - R_{k-1}) * P_k`` over the list sorted by score descending (the ISC 2021 /
    DISC21 definition). ``num_positives`` is the number of ground-truth pairs; it defaults to the
    number of positive predictions, and ground-truth pairs never predicted count as misses. Ties:
    negatives before positives, the worst case, so equal scores cannot inflate the metric.
    """
    scores_arr = np.asarray(scores, dtype=np.float64)
    labels_arr = np.asarray(labels, dtype=bool)
    if scores_arr.ndim != 1 or labels_arr.shape != scores_arr.shape:
        raise InvalidInputError(
            f"expected 1-D scores and labels of equal length, got {scores_arr.shape} and {labels_arr.shape}"
        )
    if not np.all(np.isfinite(scores_arr)):
        raise InvalidInputError("µAP expects finite scores")
    found = int(labels_arr.sum())
    total = found if num_positives is None else int(num_positives)
    if total < found:
        raise InvalidInputError(f"num_positives={total} is less than the {found} positive predictions")
    if total == 0:
        raise UndefinedMetricError("µAP is undefined without ground-truth pairs")
    order = np.lexsort((labels_arr, -scores_arr))
    sorted_labels = labels_arr[order]
    precision = np.cumsum(sorted_labels) / np.arange(1, len(order) + 1)
    return float(precision[sorted_labels].sum() / total)


def micro_average_precision_from_pairs(
    predictions: Mapping[tuple[str, str], float],
    ground_truth: Collection[tuple[str, str]],
) -> float:
    """µAP of ``{(query, database video): score}`` against the set of true (query, database video) pairs."""
    truth = set(ground_truth)
    pairs = list(predictions)
    return micro_average_precision(
        [predictions[p] for p in pairs], [p in truth for p in pairs], num_positives=len(truth)
    )


def _ranking(result: Mapping[str, float] | Sequence[str]) -> Sequence[str]:
    return rank_by_score(result) if isinstance(result, Mapping) else result


def _as_set(ids: Collection[str]) -> set[str] | frozenset[str]:
    return ids if isinstance(ids, (set, frozenset)) else set(ids)
