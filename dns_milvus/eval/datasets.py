"""Evaluation datasets: readers of the public ground-truth formats, one common ``EvalDataset``.

Every reader takes paths the user gives and returns an :class:`EvalDataset`: queries, database,
and per task the relevant videos of each query, plus the protocol details that differ between
datasets (whether the query is dropped from its own ranking, per-query candidate sets, ignored
videos, the AP measure). :meth:`EvalDataset.evaluate` scores ``{query: {video: similarity}}``.

Formats read (each as published with its dataset):

- **FIVR-200K** (``read_fivr``): ``annotation.json`` ``{query: {"ND": [...], "DS": [...], "CS": [...],
  "IS": [...], "DA": [...]}}`` (other keys are ignored) and the database id list
  ``youtube_ids.txt`` (one id a line). Queries: the annotation's keys. Tasks DSVR = ND+DS,
  CSVR = ND+DS+CS, ISVR = ND+DS+CS+IS, and the audio task DAVR = DA (duplicate audio) when the
  annotation has DA videos in the database. **FIVR-5K** is the same annotation with a 50-query
  list and a 5,000-video database list (``queries_path``). The query is dropped from its own
  ranking but, as in the DnS release, not from its relevant set: a query listed in its own
  ground truth (FIVR-200K's eCrhXArKE24 is, under IS) counts there as a certain miss.
  ``drop_self_relevant=True`` drops it from the relevant set as well.
- **CC_WEB_VIDEO** (``read_cc_web_video``): ``Video_List.txt`` (tab-separated, no header; fields
  serial ID, query/topic ID, source, video file name, ...), ``Seed.txt`` (query/topic ID and the
  seed's serial ID a line) and ``GT/GT_<topic>.rst`` (serial ID and label a line; labels E, S, V,
  M, L positive, X and -1 negative). A video's id is ``<topic>/<file name without suffix>``, the
  key the DnS release uses. Protocols: ``cc_web`` ranks only the videos labelled for the query's
  topic, ``cc_web*`` the whole dataset; ``c_cc_web``/``c_cc_web*`` also drop the videos of the
  cleaned annotation (``excluded_path``: JSON ``{query: [video ids]}``). As in the DnS release,
  the seed query stays in its own ranking (it is labelled E). As in the release, every positive of
  the ground truth counts in ``n``, also the videos without features (``available``) and the
  release pickle's labelled videos its index lacks (``serial:<ID>`` placeholders): they are misses.
- **SVD** (``read_svd``): ``test_groundtruth`` (``query candidate label`` a line, label 1 relevant,
  0 not) and optionally ``unlabeled-data-id`` (one id a line, all irrelevant). A query ranks its
  labelled candidates plus the unlabelled videos, and AP is scikit-learn's (tied similarities form
  one block; a candidate without a score ranks below every scored one), both as in the DnS release.
- **EVVE** (``read_evve``): the ``annots/<event>.dat`` files (``video gt split`` a line; split
  ``query`` or ``database``; gt > 0 positive, 0 null, < 0 negative). Null videos are ignored (dropped
  from ranking and count) and AP is EVVE's trapezoidal measure, both as in EVVE's own evaluation.
- **VCDB** (``read_vcdb``): ``annotation/<topic>.txt`` (``a.flv,b.flv,start_a,end_a,start_b,end_b``
  a line, times ``H:MM:SS``), an optional distractor id list. VCDB publishes copy segments, not a
  retrieval protocol; here every video in a copy pair is a query and the videos sharing an
  annotated copy segment with it are relevant.
- **The DnS release's dataset pickles** (``read_*_pickle``), read with an unpickler that only builds
  dicts, lists, tuples, sets, strings and integers and refuses anything else.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dns_milvus.errors import InvalidInputError
from dns_milvus.eval.errors import DatasetFormatError
from dns_milvus.eval.metrics import (
    MeanAP,
    Measure,
    ap_from_hit_ranks,
    hit_ranks_from_order,
    score_order,
    tie_block_average_precision,
)
from dns_milvus.ids import validate_video_id

PathLike = str | os.PathLike[str]

FIVR_TASKS: dict[str, tuple[str, ...]] = {
    "DSVR": ("ND", "DS"),
    "CSVR": ("ND", "DS", "CS"),
    "ISVR": ("ND", "DS", "CS", "IS"),
    "DAVR": ("DA",),  # duplicate audio: the audio task, where the annotation has it
}
#: The visual labels (near-duplicate, duplicate scene, complementary scene, incident scene).
FIVR_LABELS = ("ND", "DS", "CS", "IS")
#: The audio label (duplicate audio) of the DAVR task.
FIVR_AUDIO_LABELS = ("DA",)
CC_WEB_POSITIVE_LABELS = frozenset("ESVML")
CC_WEB_LABELS = frozenset({"E", "S", "V", "M", "L", "X", "-1"})
#: Placeholder id of a video the release's CC_WEB_VIDEO ground truth names but its index lacks.
CC_WEB_UNINDEXED_PREFIX = "serial:"

_EMPTY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Task:
    """One evaluation protocol of a dataset: what is relevant and what is ranked, per query."""

    name: str
    relevant: Mapping[str, frozenset[str]]
    #: Per-query ids allowed in the ranking; ``None`` means the whole database.
    candidates: Mapping[str, frozenset[str]] | None = None
    #: Ids allowed in every query's ranking on top of ``candidates`` (SVD's unlabelled videos).
    shared_candidates: frozenset[str] = _EMPTY
    #: Per-query ids dropped from the ranking and from the relevant count.
    ignore: Mapping[str, frozenset[str]] = field(default_factory=dict)


class ColumnIndex:
    """Sorted video ids and their column positions: the dense layout of score rows.

    Sorting by id makes the column-order tie rule of the dense metrics the id tie rule.
    """

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids: tuple[str, ...] = tuple(sorted(set(ids)))
        self.position: dict[str, int] = {vid: col for col, vid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, ids: Iterable[str]) -> np.ndarray:
        """Boolean [N]: True at the columns of ``ids`` (ids without a column are skipped)."""
        cols = np.fromiter((self.position.get(v, -1) for v in ids), dtype=np.int64)
        out = np.zeros(len(self.ids), dtype=bool)
        out[cols[cols >= 0]] = True
        return out

    def row(self, scores: Mapping[str, float]) -> np.ndarray:
        """Float [N] with the given scores at their columns, NaN where a video has no score."""
        cols = np.fromiter((self.position.get(v, -1) for v in scores), dtype=np.int64, count=len(scores))
        values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
        kept = cols >= 0
        bad = kept & ~np.isfinite(values)
        if bad.any():
            vid = list(scores)[int(np.flatnonzero(bad)[0])]
            raise InvalidInputError(f"score of video {vid!r} is {scores[vid]}; expected a finite number")
        out = np.full(len(self.ids), np.nan)
        out[cols[kept]] = values[kept]
        return out


@dataclass(frozen=True)
class DenseGroundTruth:
    """One task's ground truth laid out on score columns, for fast repeated mAP (trade-off curves)."""

    task: str
    queries: tuple[str, ...]
    valid: np.ndarray  # bool [Q, N]: columns that may be ranked for each query
    relevant: np.ndarray  # bool [Q, N]
    n_relevant: np.ndarray  # int [Q]: eq. 13's n (relevant videos in the database, with or without columns)
    measure: Measure
    missing: tuple[str, ...] = ()

    def average_precision(
        self, row: int, order: np.ndarray, scores: np.ndarray | None = None
    ) -> float | None:
        """AP of query ``row`` given its column order (:func:`score_order`); None when undefined.

        The ``ap_ties`` measure also wants the score row (ties form blocks); given only the order,
        scored columns count as strictly ordered and unscored valid columns as one last block.
        """
        n = int(self.n_relevant[row])
        if n == 0:
            return None
        if self.measure == "ap_ties":
            if scores is None:  # strictly decreasing along ``order``, NaN elsewhere
                scores = np.full(self.valid.shape[1], np.nan)
                scores[order] = -np.arange(len(order), dtype=np.float64)
            ranked = np.flatnonzero(self.valid[row])
            return tie_block_average_precision(scores[ranked], self.relevant[row][ranked], n)
        ranks = hit_ranks_from_order(order, self.relevant[row], self.valid[row])
        return ap_from_hit_ranks(ranks, n, self.measure)

    def mean_average_precision(self, scores: np.ndarray) -> MeanAP:
        """mAP of a score matrix [Q, N] (NaN = not scored) whose rows follow ``queries``."""
        scores = np.asarray(scores)
        if scores.shape != self.relevant.shape:
            raise InvalidInputError(f"expected scores of shape {self.relevant.shape}, got {scores.shape}")
        per_query: dict[str, float] = {}
        skipped = []
        for row, query in enumerate(self.queries):
            ap = self.average_precision(row, score_order(scores[row]), scores[row])
            if ap is None:
                skipped.append(query)
            else:
                per_query[query] = ap
        return MeanAP.from_per_query(per_query, skipped, self.missing)


@dataclass(frozen=True)
class EvalDataset:
    """A retrieval benchmark: queries, database and one :class:`Task` per protocol."""

    name: str
    queries: tuple[str, ...]
    database: tuple[str, ...]
    tasks: Mapping[str, Task]
    #: Drop the query from its own ranking (and from its relevant set, unless ``query_stays_relevant``).
    exclude_query: bool = True
    measure: Measure = "ap"
    #: A query listed in its own ground truth stays in its relevant count though it cannot be
    #: ranked: a certain miss (the FIVR release evaluation).
    query_stays_relevant: bool = False
    #: Relevant videos outside ``available`` (no features) stay in the relevant count as misses (the
    #: CC_WEB_VIDEO release evaluation); otherwise they leave the ground truth (FIVR, SVD, EVVE).
    unavailable_relevant_are_misses: bool = False

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    @cached_property
    def _database_set(self) -> frozenset[str]:
        return frozenset(self.database)

    def task(self, name: str | None = None) -> Task:
        """The named task; the only one when ``name`` is None and there is one."""
        if name is None:
            if len(self.tasks) != 1:
                raise InvalidInputError(f"{self.name} has tasks {self.task_names}; name one")
            return next(iter(self.tasks.values()))
        if name not in self.tasks:
            raise InvalidInputError(f"{self.name} has no task {name!r}; expected one of {self.task_names}")
        return self.tasks[name]

    def relevant(self, query: str, task: str | None = None) -> frozenset[str]:
        """Relevant videos of ``query`` under ``task`` (before any database restriction)."""
        return self.task(task).relevant.get(query, _EMPTY)

    def candidates(self, query: str, task: str | None = None) -> frozenset[str] | None:
        """Ids the query's ranking is restricted to under ``task``; None for the whole database."""
        spec = self.task(task)
        if spec.candidates is None:
            return None
        return spec.candidates.get(query, _EMPTY) | spec.shared_candidates

    def ignored(self, query: str, task: str | None = None) -> frozenset[str]:
        """Ids dropped from the query's ranking and relevant count under ``task``."""
        return self.task(task).ignore.get(query, _EMPTY)

    def ground_truth(
        self,
        task: str,
        queries: Sequence[str],
        columns: ColumnIndex,
        *,
        available: Collection[str] | None = None,
    ) -> DenseGroundTruth:
        """The task's ground truth on ``columns`` for the listed queries (rows in that order).

        ``available`` restricts the database further (e.g. to the videos whose features exist, as
        the DnS release does): only those are ranked, and relevant videos outside it leave the
        ground truth, except where ``unavailable_relevant_are_misses``. Without it, relevant videos
        without a score are misses.
        """
        spec = self.task(task)
        universe = self._database_set if available is None else self._database_set & set(available)
        counted_universe = self._database_set if self.unavailable_relevant_are_misses else universe
        in_universe = columns.mask(universe)
        shared = columns.mask(spec.shared_candidates & universe) if spec.candidates is not None else None
        valid = np.zeros((len(queries), len(columns)), dtype=bool)
        relevant = np.zeros_like(valid)
        n_relevant = np.zeros(len(queries), dtype=np.int64)
        for row, query in enumerate(queries):
            ignored = spec.ignore.get(query, _EMPTY)
            unranked = {*ignored, query} if self.exclude_query else set(ignored)
            uncounted = unranked - {query} if self.query_stays_relevant else unranked
            if spec.candidates is None:
                allowed_mask = in_universe.copy()
                countable = counted_universe
            else:
                allowed_mask = columns.mask(spec.candidates.get(query, _EMPTY) & universe) | shared
                countable = (spec.candidates.get(query, _EMPTY) | spec.shared_candidates) & counted_universe
            counted = {v for v in spec.relevant.get(query, _EMPTY) if v in countable and v not in uncounted}
            allowed_mask[columns.mask(unranked)] = False
            valid[row] = allowed_mask
            relevant[row] = columns.mask(counted)
            n_relevant[row] = len(counted)
        listed = set(queries)
        missing = tuple(q for q in self.queries if q not in listed)
        return DenseGroundTruth(task, tuple(queries), valid, relevant, n_relevant, self.measure, missing)

    def evaluate(
        self,
        similarities: Mapping[str, Mapping[str, float]],
        *,
        tasks: Iterable[str] | None = None,
        available: Collection[str] | None = None,
    ) -> dict[str, MeanAP]:
        """mAP per task of ``{query: {video id: similarity}}``; ids outside the database are dropped."""
        names = list(self.task_names if tasks is None else tasks)
        columns = ColumnIndex(self.database)
        evaluated = [q for q in self.queries if q in similarities]
        truths = {name: self.ground_truth(name, evaluated, columns, available=available) for name in names}
        per_query: dict[str, dict[str, float]] = {name: {} for name in names}
        skipped: dict[str, list[str]] = {name: [] for name in names}
        for row, query in enumerate(evaluated):
            scores = columns.row(similarities[query])
            order = score_order(scores)
            for name, truth in truths.items():
                ap = truth.average_precision(row, order, scores)
                if ap is None:
                    skipped[name].append(query)
                else:
                    per_query[name][query] = ap
        return {
            name: MeanAP.from_per_query(per_query[name], skipped[name], truths[name].missing)
            for name in names
        }


# ----------------------------------------------------------------------------------------------- FIVR


def read_fivr(
    annotation_path: PathLike,
    database_path: PathLike,
    *,
    queries_path: PathLike | None = None,
    name: str = "FIVR-200K",
    drop_self_relevant: bool = False,
) -> EvalDataset:
    """FIVR from its public files; ``queries_path`` (one id a line) selects a subset such as FIVR-5K's.

    ``drop_self_relevant``: a query listed in its own ground truth leaves it (by default it stays,
    a certain miss, as in the DnS release's evaluation).
    """
    annotation_file = Path(annotation_path)
    annotation = _load_json(annotation_file)
    database = _read_id_list(Path(database_path))
    if queries_path is None:
        queries = sorted(annotation) if isinstance(annotation, dict) else []
    else:
        queries = _read_id_list(Path(queries_path))
    return _fivr_dataset(name, annotation, queries, database, annotation_file, drop_self_relevant)


def read_fivr_pickle(
    path: PathLike, version: str = "200k", *, drop_self_relevant: bool = False
) -> EvalDataset:
    """FIVR-200K or FIVR-5K from the DnS release's ``fivr.pickle`` (``annotation`` plus ``200k``/``5k``);
    ``drop_self_relevant`` as for :func:`read_fivr`."""
    path = Path(path)
    data = _load_safe_pickle(path)
    _expect(
        isinstance(data, dict) and "annotation" in data, path, "a dict with 'annotation', '200k' and '5k'"
    )
    _expect(version in data, path, f"a '{version}' entry (versions: 200k, 5k)")
    subset = data[version]
    _expect(
        isinstance(subset, dict) and "queries" in subset and "database" in subset,
        path,
        f"'{version}' to be a dict with 'queries' and 'database'",
    )
    queries = sorted(_ids(subset["queries"], path, f"{version} queries"))
    database = _ids(subset["database"], path, f"{version} database")
    return _fivr_dataset(
        f"FIVR-{version.upper()}", data["annotation"], queries, database, path, drop_self_relevant
    )


def _fivr_dataset(
    name: str,
    annotation: Any,
    queries: Sequence[str],
    database: Sequence[str],
    source: Path,
    drop_self_relevant: bool,
) -> EvalDataset:
    _expect(isinstance(annotation, dict), source, "an object mapping each query id to its labels")
    labelled: dict[str, dict[str, frozenset[str]]] = {}
    for query, labels in annotation.items():
        names = ", ".join((*FIVR_LABELS, *FIVR_AUDIO_LABELS))
        _expect(isinstance(labels, dict), source, f"query {query!r} to map labels ({names}) to id lists")
        per_label = {}
        for label in (*FIVR_LABELS, *FIVR_AUDIO_LABELS):
            ids = labels.get(label, [])
            _expect(
                isinstance(ids, list) and all(isinstance(v, str) for v in ids),
                source,
                f"label {label} of query {query!r} to be a list of video id strings",
            )
            per_label[label] = frozenset(ids)
        labelled[query] = per_label
    for query in queries:
        _expect(query in labelled, source, f"an annotation for query {query!r}")
    tasks = {
        task: Task(task, {q: frozenset().union(*(labelled[q][lb] for lb in labels)) for q in queries})
        for task, labels in FIVR_TASKS.items()
    }
    if not any(tasks["DAVR"].relevant[q] & set(database) for q in queries):
        del tasks["DAVR"]  # an annotation without audio labels (or none in this database)
    return EvalDataset(
        name, tuple(queries), tuple(database), tasks,
        exclude_query=True, query_stays_relevant=not drop_self_relevant,
    )  # fmt: skip


# --------------------------------------------------------------------------------------- CC_WEB_VIDEO


def read_cc_web_video(root: PathLike, *, excluded_path: PathLike | None = None) -> EvalDataset:
    """CC_WEB_VIDEO from its public files under ``root`` (``Video_List.txt``, ``Seed.txt``, ``GT/``)."""
    root = Path(root)
    video_list = root / "Video_List.txt"
    serial_to_id: dict[int, str] = {}
    for line_no, fields in _lines(video_list, sep="\t"):
        if len(fields) < 4:
            raise _format_error(
                video_list, line_no, "at least 4 tab-separated fields: ID, QueryID, Source, VideoName"
            )
        serial = _int_field(fields[0], video_list, line_no, "serial ID")
        topic = _int_field(fields[1], video_list, line_no, "query ID")
        stem = Path(fields[3].strip()).stem
        if not stem:
            raise _format_error(video_list, line_no, "a video file name in the 4th field")
        if serial in serial_to_id:
            raise _format_error(video_list, line_no, f"serial ID {serial} listed once")
        serial_to_id[serial] = _valid_id(f"{topic}/{stem}", video_list, line_no)
    seed_file = root / "Seed.txt"
    seeds: list[tuple[int, str]] = []
    for line_no, fields in _lines(seed_file):
        if len(fields) < 2:
            raise _format_error(seed_file, line_no, "a query ID and the seed video's serial ID")
        topic = _int_field(fields[0], seed_file, line_no, "query ID")
        serial = _int_field(fields[1], seed_file, line_no, "seed serial ID")
        if serial not in serial_to_id:
            raise _format_error(seed_file, line_no, f"a serial ID listed in {video_list.name} (got {serial})")
        seeds.append((topic, serial_to_id[serial]))
    labels_per_query: list[dict[str, str]] = []
    for topic, _ in seeds:
        gt_file = root / "GT" / f"GT_{topic}.rst"
        labels: dict[str, str] = {}
        for line_no, fields in _lines(gt_file):
            if len(fields) < 2:
                raise _format_error(gt_file, line_no, "a serial ID and a label (E, S, V, M, L, X or -1)")
            serial = _int_field(fields[0], gt_file, line_no, "serial ID")
            label = fields[1].upper()
            if label not in CC_WEB_LABELS:
                raise _format_error(
                    gt_file, line_no, f"a label among E, S, V, M, L, X, -1 (got {fields[1]!r})"
                )
            if serial not in serial_to_id:
                raise _format_error(
                    gt_file, line_no, f"a serial ID listed in {video_list.name} (got {serial})"
                )
            labels[serial_to_id[serial]] = label
        labels_per_query.append(labels)
    queries = [query for _, query in seeds]
    database = sorted(serial_to_id.values())
    excluded = None
    if excluded_path is not None:
        excluded = _read_excluded(Path(excluded_path), queries, set(database))
    return _cc_web_dataset(queries, database, labels_per_query, excluded)


def read_cc_web_video_pickle(path: PathLike) -> EvalDataset:
    """CC_WEB_VIDEO from the DnS release's ``cc_web_video.pickle`` (all four protocols)."""
    path = Path(path)
    data = _load_safe_pickle(path)
    keys = ("index", "queries", "ground_truth", "excluded")
    _expect(isinstance(data, dict) and all(k in data for k in keys), path, f"a dict with keys {keys}")
    index = data["index"]
    _expect(
        isinstance(index, dict) and all(isinstance(k, str) and isinstance(v, int) for k, v in index.items()),
        path,
        "'index' to map video ids to integer serial IDs",
    )
    queries = _ids(data["queries"], path, "queries")
    ground_truth, excluded = data["ground_truth"], data["excluded"]
    _expect(
        isinstance(ground_truth, list)
        and isinstance(excluded, list)
        and len(ground_truth) == len(queries) == len(excluded),
        path,
        "'ground_truth' and 'excluded' to be lists with one entry per query",
    )
    serial_to_id = {serial: vid for vid, serial in index.items()}

    def video_of(serial: Any) -> str:
        _expect(isinstance(serial, int), path, f"integer serial IDs in the ground truth (got {serial!r})")
        # Serials the index lacks stay as placeholders: the release still counts them as relevant.
        return serial_to_id.get(serial, f"{CC_WEB_UNINDEXED_PREFIX}{serial}")

    labels_per_query = []
    for labels in ground_truth:
        _expect(isinstance(labels, dict), path, "each ground-truth entry to map serial IDs to labels")
        labels_per_query.append({video_of(s): str(label).upper() for s, label in labels.items()})
    excluded_per_query = []
    for serials in excluded:
        _expect(
            isinstance(serials, (set, frozenset, list)),
            path,
            "each 'excluded' entry to be a set of serial IDs",
        )
        excluded_per_query.append(frozenset(video_of(s) for s in serials))
    placeholders = {v for labels in labels_per_query for v in labels if v not in index}
    placeholders |= {v for ex in excluded_per_query for v in ex if v not in index}
    _expect(not placeholders & set(index), path, f"no video id starting with {CC_WEB_UNINDEXED_PREFIX!r}")
    database = sorted(set(index) | placeholders)
    return _cc_web_dataset(
        queries, database, labels_per_query, dict(zip(queries, excluded_per_query, strict=True))
    )


def _cc_web_dataset(
    queries: Sequence[str],
    database: Sequence[str],
    labels_per_query: Sequence[Mapping[str, str]],
    excluded: Mapping[str, frozenset[str]] | None,
) -> EvalDataset:
    relevant = {
        q: frozenset(v for v, lb in labels.items() if lb in CC_WEB_POSITIVE_LABELS)
        for q, labels in zip(queries, labels_per_query, strict=True)
    }
    labelled = {q: frozenset(labels) for q, labels in zip(queries, labels_per_query, strict=True)}
    tasks = {
        "cc_web": Task("cc_web", relevant, candidates=labelled),
        "cc_web*": Task("cc_web*", relevant),
    }
    if excluded is not None:
        tasks["c_cc_web"] = Task("c_cc_web", relevant, candidates=labelled, ignore=excluded)
        tasks["c_cc_web*"] = Task("c_cc_web*", relevant, ignore=excluded)
    return EvalDataset(
        "CC_WEB_VIDEO", tuple(queries), tuple(database), tasks, exclude_query=False,
        unavailable_relevant_are_misses=True,
    )  # fmt: skip


def _read_excluded(path: Path, queries: Sequence[str], database: set[str]) -> dict[str, frozenset[str]]:
    data = _load_json(path)
    _expect(isinstance(data, dict), path, "an object mapping query ids to lists of excluded video ids")
    out = {}
    for query in queries:
        ids = data.get(query, [])
        _expect(
            isinstance(ids, list) and all(isinstance(v, str) and v in database for v in ids),
            path,
            f"query {query!r} to map to a list of database video ids",
        )
        out[query] = frozenset(ids)
    unknown = set(data) - set(queries)
    _expect(not unknown, path, f"only query ids as keys (unknown: {sorted(unknown)[:3]})")
    return out


# ------------------------------------------------------------------------------------------------ SVD


def read_svd(groundtruth_path: PathLike, unlabeled_path: PathLike | None = None) -> EvalDataset:
    """SVD from ``test_groundtruth`` and (optionally) ``unlabeled-data-id``."""
    gt_file = Path(groundtruth_path)
    labelled: dict[str, dict[str, int]] = {}
    for line_no, fields in _lines(gt_file):
        if len(fields) < 3:
            raise _format_error(gt_file, line_no, "'query candidate label' separated by spaces")
        query = _valid_id(fields[0], gt_file, line_no)
        candidate = _valid_id(fields[1], gt_file, line_no)
        label = _int_field(fields[-1], gt_file, line_no, "label")
        if label not in (0, 1):
            raise _format_error(gt_file, line_no, f"a label of 0 or 1 (got {label})")
        labelled.setdefault(query, {})[candidate] = label
    unlabeled = frozenset(_read_id_list(Path(unlabeled_path))) if unlabeled_path is not None else _EMPTY
    queries = sorted(labelled)
    database = sorted(set(unlabeled).union(*labelled.values()))
    task = Task(
        "mAP",
        {q: frozenset(c for c, lb in labelled[q].items() if lb == 1) for q in queries},
        candidates={q: frozenset(labelled[q]) for q in queries},
        shared_candidates=unlabeled,
    )
    return EvalDataset(
        "SVD", tuple(queries), tuple(database), {"mAP": task}, exclude_query=True, measure="ap_ties"
    )


# ----------------------------------------------------------------------------------------------- EVVE


def read_evve(annots_dir: PathLike) -> EvalDataset:
    """EVVE from its ``annots/`` directory of ``<event>.dat`` files."""
    annots_dir = Path(annots_dir)
    if not annots_dir.is_dir():
        raise DatasetFormatError(f"{annots_dir}: EVVE annotation directory not found")
    files = sorted(annots_dir.glob("*.dat"))
    if not files:
        raise DatasetFormatError(f"{annots_dir}: no <event>.dat annotation files")
    events: dict[str, tuple[set[str], set[str], set[str]]] = {}
    database: set[str] = set()
    for dat in files:
        queries, positives, nulls = set(), set(), set()
        for line_no, fields in _lines(dat):
            if len(fields) != 3 or fields[2] not in ("query", "database"):
                raise _format_error(dat, line_no, "'video gt split' with split 'query' or 'database'")
            video = _valid_id(fields[0], dat, line_no)
            gt = _int_field(fields[1], dat, line_no, "gt label")
            if fields[2] == "query":
                queries.add(video)
                continue
            database.add(video)
            if gt > 0:
                positives.add(video)
            elif gt == 0:
                nulls.add(video)
        events[dat.name.split(".")[0]] = (queries, positives, nulls)
    return _evve_dataset(events, database, annots_dir)


def read_evve_pickle(path: PathLike) -> EvalDataset:
    """EVVE from the DnS release's ``evve.pickle`` (``annotation``: event -> (queries, positives, nulls))."""
    path = Path(path)
    data = _load_safe_pickle(path)
    _expect(
        isinstance(data, dict) and all(k in data for k in ("annotation", "database")),
        path,
        "a dict with 'annotation', 'database' and 'queries'",
    )
    events = {}
    _expect(isinstance(data["annotation"], dict), path, "'annotation' to map event names to tuples")
    for event, entry in data["annotation"].items():
        _expect(
            isinstance(entry, (tuple, list)) and len(entry) == 3,
            path,
            f"event {event!r} to hold (queries, positives, nulls)",
        )
        events[str(event)] = tuple(set(_ids(part, path, f"event {event!r}")) for part in entry)
    return _evve_dataset(events, set(_ids(data["database"], path, "database")), path)


def _evve_dataset(
    events: Mapping[str, tuple[set[str], set[str], set[str]]], database: set[str], source: Path
) -> EvalDataset:
    relevant: dict[str, frozenset[str]] = {}
    ignore: dict[str, frozenset[str]] = {}
    for event, (queries, positives, nulls) in events.items():
        for query in queries:
            _expect(query not in relevant, source, f"query {query!r} in one event only (again in {event!r})")
            relevant[query] = frozenset(positives)
            ignore[query] = frozenset(nulls)
    task = Task("mAP", relevant, ignore=ignore)
    return EvalDataset(
        "EVVE",
        tuple(sorted(relevant)),
        tuple(sorted(database)),
        {"mAP": task},
        exclude_query=True,
        measure="trapezoid",
    )


# ----------------------------------------------------------------------------------------------- VCDB

_VCDB_TIME = re.compile(r"^\d+:\d{1,2}:\d{1,2}$")


def read_vcdb(annotation_dir: PathLike, *, distractors_path: PathLike | None = None) -> EvalDataset:
    """VCDB's core set from ``annotation/<topic>.txt``; ``distractors_path`` adds background videos."""
    annotation_dir = Path(annotation_dir)
    if not annotation_dir.is_dir():
        raise DatasetFormatError(f"{annotation_dir}: VCDB annotation directory not found")
    files = sorted(annotation_dir.glob("*.txt"))
    if not files:
        raise DatasetFormatError(f"{annotation_dir}: no <topic>.txt annotation files")
    partners: dict[str, set[str]] = {}
    core: set[str] = set()
    for txt in files:
        for line_no, fields in _lines(txt, sep=","):
            if len(fields) != 6 or not all(_VCDB_TIME.match(t.strip()) for t in fields[2:]):
                raise _format_error(
                    txt, line_no, "'video_a,video_b,start_a,end_a,start_b,end_b' with H:MM:SS times"
                )
            a = _valid_id(Path(fields[0].strip()).stem, txt, line_no)
            b = _valid_id(Path(fields[1].strip()).stem, txt, line_no)
            core.update((a, b))
            if a != b:
                partners.setdefault(a, set()).add(b)
                partners.setdefault(b, set()).add(a)
    distractors = set(_read_id_list(Path(distractors_path))) if distractors_path is not None else set()
    relevant = {q: frozenset(p) for q, p in sorted(partners.items())}
    task = Task("mAP", relevant)
    return EvalDataset("VCDB", tuple(relevant), tuple(sorted(core | distractors)), {"mAP": task})


# ------------------------------------------------------------------------------------- file helpers


class _PlainUnpickler(pickle.Unpickler):
    """Builds only builtin containers, strings and numbers: no class, function or module is resolved."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset")}
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return set if name == "set" else frozenset
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent reference")


def _load_safe_pickle(path: Path) -> Any:
    data = _read_bytes(path)
    try:
        obj = _PlainUnpickler(io.BytesIO(data)).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as exc:
        raise DatasetFormatError(
            f"{path}: not a dataset pickle of plain dicts, lists, sets, strings and integers ({exc})"
        ) from None
    _check_plain(obj, path)
    return obj


def _check_plain(obj: Any, path: Path) -> None:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif not isinstance(item, (str, int)):
            raise DatasetFormatError(
                f"{path}: holds a {type(item).__name__}; a dataset pickle may hold only dicts, lists, "
                "tuples, sets, strings and integers"
            )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetFormatError(f"{path}: file not found") from None
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot be read ({exc.strerror})") from None


def _read_text(path: Path) -> str:
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: expected UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path}: line {exc.lineno}: expected JSON ({exc.msg})") from None


def _lines(path: Path, sep: str | None = None) -> Iterator[tuple[int, list[str]]]:
    """Non-blank lines as (1-based line number, fields)."""
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            yield line_no, [f.strip() for f in line.strip().split(sep)]


def _read_id_list(path: Path) -> list[str]:
    ids: list[str] = []
    seen: set[str] = set()
    for line_no, fields in _lines(path):
        if len(fields) != 1:
            raise _format_error(path, line_no, "one video id a line")
        vid = _valid_id(fields[0], path, line_no)
        if vid in seen:
            raise _format_error(path, line_no, f"each id once ({vid!r} is listed again)")
        seen.add(vid)
        ids.append(vid)
    return ids


def _ids(value: Any, path: Path, what: str) -> list[str]:
    _expect(
        isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value),
        path,
        f"{what} to be a collection of video id strings",
    )
    return list(value)


def _valid_id(text: str, path: Path, line_no: int) -> str:
    try:
        return validate_video_id(text)
    except InvalidInputError as exc:
        raise _format_error(path, line_no, f"a valid video id ({exc})") from None


def _int_field(text: str, path: Path, line_no: int, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _format_error(path, line_no, f"an integer {what} (got {text!r})") from None


def _format_error(path: Path, line_no: int, expected: str) -> DatasetFormatError:
    return DatasetFormatError(f"{path}: line {line_no}: expected {expected}")


def _expect(condition: bool, path: Path, expected: str) -> None:
    if not condition:
        raise DatasetFormatError(f"{path}: expected {expected}")
