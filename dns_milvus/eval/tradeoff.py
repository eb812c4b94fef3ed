"""The DnS accuracy/cost trade-off: mAP against the share of pairs the fine-grained student re-ranks.

Protocol of the DnS release's evaluation (``evaluation_dns.py``), followed here:

- Per query, every database video with features is a candidate; a selection method orders the
  query's candidates and the first ``floor(p/100 * n)`` of them (``n``: the query's candidates,
  the query's own column included when it is in the database) get the fine-grained score, the
  rest keep the coarse score. ``p`` runs over 0, 5, ..., 100 %: the share is per query, not global.
  (The release truncates the float product ``p * n``, one pair short for some n at 35 % and 70 %,
  e.g. n = 180; the budget here is the exact floor. The benchmark database sizes are unaffected.)
- Fine-grained similarities are rescaled to [0, 1] as ``s/2 + 0.5`` and mixed with coarse ones by
  the model set's merge rule (``PairScores.merge``; ``dns_milvus.scoring``), which search uses too:
  the release's rule replaces the coarse score of the re-ranked pairs.
- The mixed scores are evaluated with the dataset's own protocol (the query is then dropped
  from its ranking where the dataset says so).

Selection methods compared (each orders a query's candidates, ties by video id):

- ``selector``: the selector network's confidence, highest first (DnS);
- ``oracle``: the students' disagreement on the merged scale (``ScoreMerge.disagreement``),
  largest first: the best any selector predicting it could do;
- ``coarse_top``: coarse similarity, highest first (re-ranking the coarse top results);
- ``threshold``: ``|coarse - threshold|``, smallest first (the pairs the coarse student is least
  sure about around a decision threshold);
- ``random``: a seeded random order, mAP averaged over ``random_seeds``.

The Milvus protocol (:func:`milvus_protocol`) replaces "every database video" by the top-K of an
ANN search: videos outside the K candidates are not retrieved (they count as misses).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dns_milvus.errors import InvalidInputError
from dns_milvus.eval.datasets import ColumnIndex, DenseGroundTruth, EvalDataset
from dns_milvus.eval.metrics import MeanAP, score_order
from dns_milvus.scoring import RELEASE_MERGE, ScoreMerge, fine_unit, rerank_budget

METHODS = ("selector", "oracle", "coarse_top", "threshold", "random")
DEFAULT_PERCENTAGES = tuple(range(0, 101, 5))


@dataclass(frozen=True)
class PairScores:
    """Coarse, fine (on the [0, 1] scale) and selector scores of the same query-database pairs.

    Matrices are float [Q, N] over ``columns`` (database ids, sorted); NaN marks a pair that was not
    scored (a video without features), which is then no candidate and never ranked.
    """

    queries: tuple[str, ...]
    columns: ColumnIndex
    coarse: np.ndarray
    fine: np.ndarray
    selector: np.ndarray
    merge: ScoreMerge = RELEASE_MERGE

    def __post_init__(self) -> None:
        shape = (len(self.queries), len(self.columns))
        for name in ("coarse", "fine", "selector"):
            if np.shape(getattr(self, name)) != shape:
                raise InvalidInputError(
                    f"{name} scores have shape {np.shape(getattr(self, name))}; expected {shape}"
                )
        scored = np.isfinite(self.coarse)
        if not (
            np.array_equal(scored, np.isfinite(self.fine))
            and np.array_equal(scored, np.isfinite(self.selector))
        ):
            raise InvalidInputError(
                "coarse, fine and selector scores must cover the same query-database pairs"
            )

    @classmethod
    def from_dicts(
        cls,
        coarse: Mapping[str, Mapping[str, float]],
        fine: Mapping[str, Mapping[str, float]],
        selector: Mapping[str, Mapping[str, float]],
        *,
        rescale_fine: bool = True,
        merge: ScoreMerge = RELEASE_MERGE,
    ) -> PairScores:
        """From ``{query: {video: score}}`` dicts over the same pairs; fine scores in [-1, 1] are
        rescaled as ``s/2 + 0.5`` unless ``rescale_fine`` is False (already on [0, 1])."""
        if not (set(coarse) == set(fine) == set(selector)):
            raise InvalidInputError("coarse, fine and selector scores must have the same queries")
        for query in coarse:
            if not (set(coarse[query]) == set(fine[query]) == set(selector[query])):
                odd = sorted(
                    set(coarse[query]) ^ set(fine[query]) | set(coarse[query]) ^ set(selector[query])
                )
                raise InvalidInputError(
                    f"query {query!r}: coarse, fine and selector scores must cover the same videos "
                    f"(e.g. {odd[0]!r} is not in all three)"
                )
        queries = tuple(sorted(coarse))
        columns = ColumnIndex(v for query in queries for v in coarse[query])
        coarse_m = (
            np.stack([columns.row(coarse[q]) for q in queries]) if queries else np.zeros((0, len(columns)))
        )
        fine_m = np.stack([columns.row(fine[q]) for q in queries]) if queries else np.zeros((0, len(columns)))
        selector_m = (
            np.stack([columns.row(selector[q]) for q in queries]) if queries else np.zeros((0, len(columns)))
        )
        if rescale_fine:
            fine_m = fine_unit(fine_m)
        return cls(queries, columns, coarse_m, fine_m, selector_m, merge)


def selection_order(
    method: str,
    candidates: np.ndarray,
    coarse: np.ndarray,
    fine: np.ndarray,
    selector: np.ndarray,
    *,
    threshold: float = 0.5,
    rng: np.random.Generator | None = None,
    merge: ScoreMerge = RELEASE_MERGE,
) -> np.ndarray:
    """``candidates`` (column indices, sorted) in the order ``method`` sends them to the fine student."""
    if method == "random":
        if rng is None:
            raise InvalidInputError("the random method needs a seeded numpy Generator")
        return rng.permutation(candidates)
    if method == "selector":
        priority = -selector[candidates]
    elif method == "oracle":
        priority = -merge.disagreement(coarse[candidates], fine[candidates])
    elif method == "coarse_top":
        priority = -coarse[candidates]
    elif method == "threshold":
        priority = np.abs(coarse[candidates] - threshold)
    else:
        raise InvalidInputError(f"unknown selection method {method!r}; expected one of {METHODS}")
    return candidates[np.argsort(priority, kind="stable")]


def mixed_row(scores: PairScores, row: int, candidates: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """One query's ranking scores when the ``chosen`` candidates get their fine score (NaN: no candidate)."""
    coarse = scores.coarse[row]
    fine = np.full_like(coarse, np.nan)
    fine[chosen] = scores.fine[row, chosen]
    out = np.full_like(coarse, np.nan)
    out[candidates] = scores.merge.merged(coarse[candidates], fine[candidates])
    return out


def dns_tradeoff(
    scores: PairScores,
    dataset: EvalDataset,
    *,
    percentages: Iterable[float] = DEFAULT_PERCENTAGES,
    methods: Sequence[str] = METHODS,
    tasks: Iterable[str] | None = None,
    threshold: float = 0.5,
    random_seeds: Sequence[int] = (0, 1, 2),
    available: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """mAP per (method, percentage, task) under the release's protocol (see the module notes).

    Rows: ``method``, ``percentage``, ``task``, ``mAP``, ``reranked_pairs`` (pairs scored by the fine
    student over all queries; averaged over seeds for ``random``), ``queries`` (evaluated).
    """
    candidates = [np.flatnonzero(np.isfinite(scores.coarse[row])) for row in range(len(scores.queries))]
    return _curve(
        scores,
        dataset,
        candidates,
        budgets=[(p, [rerank_budget(p, len(c)) for c in candidates]) for p in _checked(percentages)],
        methods=methods,
        tasks=tasks,
        threshold=threshold,
        random_seeds=random_seeds,
        available=available,
    )


def milvus_protocol(
    scores: PairScores,
    dataset: EvalDataset,
    candidate_lists: Mapping[str, Sequence[str]],
    *,
    ks: Iterable[int],
    percentage: float = 100.0,
    methods: Sequence[str] = ("selector",),
    tasks: Iterable[str] | None = None,
    threshold: float = 0.5,
    random_seeds: Sequence[int] = (0, 1, 2),
) -> list[dict[str, Any]]:
    """mAP against K when only an ANN search's top-K candidates reach the selector.

    ``candidate_lists``: per query, the ANN results best first (database ids with scores in
    ``scores``). For each K the first K candidates are ranked: ``percentage`` % of them (picked by
    each method) get the fine score, the rest keep the coarse one; every other video is a miss.
    Rows: ``method``, ``k``, ``percentage``, ``task``, ``mAP``, ``reranked_pairs``, ``queries``.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InvalidInputError(f"ks must be positive integers, got {ks}")
    position = scores.columns.position
    ann_lists = []
    for row, query in enumerate(scores.queries):
        ids = list(candidate_lists.get(query, ()))
        unknown = [v for v in ids if v not in position or not np.isfinite(scores.coarse[row, position[v]])]
        if unknown:
            raise InvalidInputError(
                f"query {query!r}: candidate {unknown[0]!r} has no coarse/fine/selector score"
            )
        if len(set(ids)) != len(ids):
            raise InvalidInputError(f"query {query!r}: the candidate list repeats a video")
        ann_lists.append(np.asarray([position[v] for v in ids], dtype=np.int64))
    rows: list[dict[str, Any]] = []
    for k in ks:
        top_k = [np.sort(cols[:k]) for cols in ann_lists]
        budgets = [(percentage, [rerank_budget(percentage, len(c)) for c in top_k])]
        for row in _curve(
            scores,
            dataset,
            top_k,
            budgets=budgets,
            methods=methods,
            tasks=tasks,
            threshold=threshold,
            random_seeds=random_seeds,
            available=None,
        ):
            rows.append({"k": k, **row})
    return rows


def write_table(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows as ``.json`` (a list of objects) or ``.csv`` (header from the first row's keys)."""
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(list(rows), indent=1) + "\n", encoding="utf-8")
    elif path.suffix == ".csv":
        fieldnames = list(rows[0]) if rows else []
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise InvalidInputError(f"cannot write a table to {path.name}; expected a .json or .csv path")
    return path


def _curve(
    scores: PairScores,
    dataset: EvalDataset,
    candidates: Sequence[np.ndarray],
    *,
    budgets: Sequence[tuple[float, Sequence[int]]],
    methods: Sequence[str],
    tasks: Iterable[str] | None,
    threshold: float,
    random_seeds: Sequence[int],
    available: Collection[str] | None,
) -> list[dict[str, Any]]:
    """Mix coarse and fine scores per query for each method and budget; mAP per task."""
    task_names = list(dataset.task_names if tasks is None else tasks)
    truths = {
        name: dataset.ground_truth(name, scores.queries, scores.columns, available=available)
        for name in task_names
    }
    rows: list[dict[str, Any]] = []
    for method in methods:
        seeds: Sequence[int | None] = list(random_seeds) if method == "random" else [None]
        if not seeds:
            raise InvalidInputError("the random method needs at least one seed")
        per_run = [
            _run(
                scores,
                truths,
                candidates,
                budgets,
                method,
                threshold,
                None if s is None else np.random.default_rng(s),
            )
            for s in seeds
        ]
        for b, (percentage, counts) in enumerate(budgets):
            for name in task_names:
                results = [run[b][name] for run in per_run]
                rows.append(
                    {
                        "method": method,
                        "percentage": percentage,
                        "task": name,
                        "mAP": float(np.mean([r.value for r in results])),
                        "reranked_pairs": int(sum(counts)),
                        "queries": len(results[0].per_query),
                    }
                )
    return rows


def _run(
    scores: PairScores,
    truths: Mapping[str, DenseGroundTruth],
    candidates: Sequence[np.ndarray],
    budgets: Sequence[tuple[float, Sequence[int]]],
    method: str,
    threshold: float,
    rng: np.random.Generator | None,
) -> list[dict[str, MeanAP]]:
    per_query: list[dict[str, dict[str, float]]] = [{name: {} for name in truths} for _ in budgets]
    skipped: list[dict[str, list[str]]] = [{name: [] for name in truths} for _ in budgets]
    for row, query in enumerate(scores.queries):
        coarse, fine = scores.coarse[row], scores.fine[row]
        order = selection_order(
            method, candidates[row], coarse, fine, scores.selector[row], threshold=threshold, rng=rng,
            merge=scores.merge,
        )  # fmt: skip
        for b, (_, counts) in enumerate(budgets):
            ranking = score_order(mixed_row(scores, row, candidates[row], order[: counts[row]]))
            for name, truth in truths.items():
                ap = truth.average_precision(row, ranking)
                if ap is None:
                    skipped[b][name].append(query)
                else:
                    per_query[b][name][query] = ap
    return [
        {
            name: MeanAP.from_per_query(per_query[b][name], skipped[b][name], truths[name].missing)
            for name in truths
        }
        for b in range(len(budgets))
    ]


def _checked(percentages: Iterable[float]) -> list[float]:
    values = list(percentages)
    if not values:
        raise InvalidInputError("at least one percentage is needed")
    for p in values:
        rerank_budget(p, 0)  # validates the range
    return values
