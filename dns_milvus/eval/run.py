"""Scoring an evaluation dataset with a model set: every network on every query-database pair.

:func:`score_dataset` produces what the trade-off curves (:mod:`dns_milvus.eval.tradeoff`) and the
cost columns of the paper's Table 10 need, the way the DnS release's ``evaluation_dns.py`` measures
them:

- every query and every database video is indexed once (coarse vector, self-similarity, fine
  tensor in its stored form: packed bits for the binarization student, float16 for attention);
- per query, the coarse similarity to every database video (the coarse student's dot product), the
  selector's confidence for every pair (its MLP on ``[self_q, self_t, coarse]``), and the fine
  similarity of every pair (the batched kernels of :mod:`dns_milvus.similarity` over the stored
  forms, rescaled to [0, 1] as ``s/2 + 0.5``), each network timed per query;
- storage per database video: coarse vector, self-similarity and fine tensor bytes as stored, and
  the fine tensor under the release's accounting (elements x 4 bytes for floats, elements / 8 for
  bits); KB are bytes / 1024, as in the release.

The database is processed in chunks, so memory holds the queries' indexed forms and one chunk's,
never the whole database. Videos without features are unavailable: their pairs stay NaN (no
candidate, never ranked) and they are listed in the report. DnS's cost at p % re-ranked is the
release's: coarse + selector time + (share of pairs re-ranked) x fine time, per query.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dns_milvus.engine.modelset import PAYLOAD_PACKED, ModelSet, VideoRecord
from dns_milvus.errors import InvalidInputError
from dns_milvus.eval.datasets import ColumnIndex, DenseGroundTruth, EvalDataset
from dns_milvus.eval.errors import FeatureNotFoundError, UndefinedMetricError
from dns_milvus.eval.features import H5Features
from dns_milvus.eval.metrics import interpolated_pr_curve, score_order
from dns_milvus.eval.tradeoff import (
    DEFAULT_PERCENTAGES,
    METHODS,
    PairScores,
    dns_tradeoff,
    mixed_row,
    rerank_budget,
    selection_order,
    write_table,
)
from dns_milvus.scoring import fine_unit, segment_matches
from dns_milvus.similarity import fine_similarity_float, fine_similarity_packed

if TYPE_CHECKING:
    from dns_milvus.engine.index import DnSIndex, Query

#: Videos indexed by one ``ModelSet.index_features`` call (one padded batch).
DEFAULT_BATCH_SIZE = 32
#: Database videos whose indexed forms are held at once (~30 MB of packed codes at 100 frames).
DEFAULT_CHUNK_SIZE = 512
#: Percentages re-ranked that the cost table reports for DnS (the paper's 5 % and 30 % rows, and 10 %).
COST_PERCENTAGES = (5, 10, 30)
#: Bytes of the self-similarity scalar (a float32 Milvus field).
SELF_SIM_BYTES = 4

FeatureSource = H5Features | Mapping[str, "np.ndarray | torch.Tensor"]


@dataclass(frozen=True)
class CostReport:
    """What scoring a dataset cost: storage per database video and time per query, per network."""

    model_set: str
    model_tag: str
    device: str
    payload_kind: str
    #: Queries scored (with features), in the row order of the scores.
    queries: tuple[str, ...]
    missing_queries: tuple[str, ...]
    database_videos: int
    missing_database: tuple[str, ...]
    mean_frames: float
    coarse_bytes: float
    self_sim_bytes: float
    #: Fine tensor bytes as stored (packed bits, or float16).
    fine_bytes: float
    #: Fine tensor bytes under the release's accounting (elements x 4 for floats, / 8 for bits).
    fine_bytes_release: float
    videos_indexed: int
    #: Seconds in the three networks' indexing (features in memory -> stored forms), all videos.
    index_seconds: float
    #: Seconds reading features (HDF5 I/O), all videos.
    load_seconds: float
    #: Per query (same order as ``queries``): seconds of coarse similarities, selector, fine student.
    coarse_seconds: tuple[float, ...]
    selector_seconds: tuple[float, ...]
    fine_seconds: tuple[float, ...]

    @property
    def pairs(self) -> int:
        return len(self.queries) * self.database_videos

    def seconds_per_query(self, statistic: str = "mean") -> dict[str, float]:
        """Seconds a query spends in each network against the whole database: the ``mean`` over
        queries (the release's figure) or the ``median`` (steadier on a machine shared with
        other work, where a busy core stretches a few queries' millisecond-long calls)."""
        if statistic not in ("mean", "median"):
            raise InvalidInputError(f"statistic must be 'mean' or 'median', got {statistic!r}")
        reduce = np.mean if statistic == "mean" else np.median
        return {
            name: float(reduce(values)) if values else math.nan
            for name, values in (
                ("coarse", self.coarse_seconds),
                ("selector", self.selector_seconds),
                ("fine", self.fine_seconds),
            )
        }

    def dns_seconds_per_query(self, reranked_share: float) -> float:
        """The release's DnS time: coarse + selector for every pair + the share of fine work."""
        per_query = self.seconds_per_query()
        return per_query["coarse"] + per_query["selector"] + reranked_share * per_query["fine"]

    def kb_per_video(self) -> dict[str, float]:
        """Storage per database video in KB (bytes / 1024): each network's part and DnS's total."""
        return {
            "coarse": self.coarse_bytes / 1024,
            "self_sim": self.self_sim_bytes / 1024,
            "fine": self.fine_bytes / 1024,
            "fine_release_accounting": self.fine_bytes_release / 1024,
            "dns": (self.coarse_bytes + self.self_sim_bytes + self.fine_bytes) / 1024,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "pairs": self.pairs,
            "kb_per_video": self.kb_per_video(),
            "seconds_per_query": self.seconds_per_query(),
            "seconds_per_query_median": self.seconds_per_query("median"),
            "index_seconds_per_video": self.index_seconds / max(self.videos_indexed, 1),
        }


def score_dataset(
    models: ModelSet,
    features: FeatureSource,
    dataset: EvalDataset,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
) -> tuple[PairScores, CostReport]:
    """Coarse, fine (on [0, 1]) and selector scores of every query-database pair, and their cost.

    ``features``: an :class:`H5Features` file or a ``{video id: [T, R, D]}`` mapping. Rows of the
    scores are the queries with features (dataset order), columns the database ids (sorted); a
    query that is also in the database gets its own pair scored too (the protocol drops it).
    """
    if batch_size < 1 or chunk_size < 1:
        raise InvalidInputError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    source = _describe(features)
    queries = [q for q in dataset.queries if q in features]
    missing_queries = tuple(q for q in dataset.queries if q not in features)
    if not queries:
        raise FeatureNotFoundError(
            f"{source} has features for none of the {len(dataset.queries)} queries of {dataset.name} "
            f"(e.g. {list(dataset.queries[:3])}); expected one [T, R, D] entry per video id"
        )
    columns = ColumnIndex(dataset.database)
    available = [v for v in columns.ids if v in features]
    missing_database = tuple(v for v in columns.ids if v not in features)
    if not available:
        raise FeatureNotFoundError(
            f"{source} has features for none of the {len(columns)} database videos of {dataset.name}"
        )
    clock = _Clock(models.device)
    meter = _IndexMeter(models, features, batch_size, clock)

    query_records = meter.index(queries)
    device = models.device
    shape = (len(queries), len(columns))
    coarse_m, fine_m, selector_m = (np.full(shape, np.nan) for _ in range(3))
    seconds = np.zeros((3, len(queries)))  # coarse, selector, fine
    storage = np.zeros(5)  # frames, coarse, self-sim, fine as stored, fine release accounting

    bar = tqdm(total=len(available), desc="database", unit="video", disable=not progress, leave=False)
    for start in range(0, len(available), chunk_size):
        chunk_ids = available[start : start + chunk_size]
        records = meter.index(chunk_ids, reuse=query_records)
        chunk = [records[v] for v in chunk_ids]
        storage += np.sum([_storage(r) for r in chunk], axis=0)
        cols = np.asarray([columns.position[v] for v in chunk_ids])
        targets = _Targets.of(chunk, device)
        if start == 0:  # untimed warm-up: first calls pay one-off kernel set-up, not per-query work
            _score_query(models, query_records[queries[0]], targets, clock)
        for row, query in enumerate(queries):
            coarse, selector, fine, laps = _score_query(models, query_records[query], targets, clock)
            seconds[:, row] += laps
            coarse_m[row, cols] = coarse
            selector_m[row, cols] = selector
            fine_m[row, cols] = fine_unit(fine)
        bar.update(len(chunk_ids))
    bar.close()

    scores = PairScores(tuple(queries), columns, coarse_m, fine_m, selector_m, models.merge)
    frames, coarse_b, self_b, fine_b, fine_release_b = storage / len(available)
    report = CostReport(
        model_set=models.name,
        model_tag=models.tag,
        device=str(device),
        payload_kind=models.payload_kind,
        queries=tuple(queries),
        missing_queries=missing_queries,
        database_videos=len(available),
        missing_database=missing_database,
        mean_frames=float(frames),
        coarse_bytes=float(coarse_b),
        self_sim_bytes=float(self_b),
        fine_bytes=float(fine_b),
        fine_bytes_release=float(fine_release_b),
        videos_indexed=meter.videos,
        index_seconds=meter.index_seconds,
        load_seconds=meter.load_seconds,
        coarse_seconds=tuple(seconds[0].tolist()),
        selector_seconds=tuple(seconds[1].tolist()),
        fine_seconds=tuple(seconds[2].tolist()),
    )
    return scores, report


def milvus_candidates(
    index: DnSIndex,
    queries: Mapping[str, Query],
    ks: Iterable[int],
    *,
    exclude_self: bool = True,
    batch_size: int = 64,
) -> dict[str, list[str]]:
    """Per query, the ids of the ``max(ks)`` nearest coarse vectors in the index, best first.

    The candidate lists of :func:`dns_milvus.eval.tradeoff.milvus_protocol`. ``queries`` maps each
    query id to anything :meth:`DnSIndex.encode_query` takes (features, a video file, an indexed id,
    a record). With ``exclude_self`` a hit with the query's own id is dropped (one more is fetched).
    """
    from dns_milvus.engine.index import MAX_CANDIDATES_K

    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > MAX_CANDIDATES_K - int(exclude_self):
        raise InvalidInputError(f"ks must be integers in 1..{MAX_CANDIDATES_K - int(exclude_self)}, got {ks}")
    limit = ks[-1] + int(exclude_self)
    ids = list(queries)
    out: dict[str, list[str]] = {}
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        vectors = np.stack([index.encode_query(queries[q]).coarse for q in batch])
        for query, hits in zip(batch, index.collection.search(vectors, limit, output_fields=()), strict=True):
            ranked = [h.video_id for h in hits if not (exclude_self and h.video_id == query)]
            out[query] = ranked[: ks[-1]]
    return out


# -- reports shared by the CLI and the copy benchmark --------------------------------------------


def mixed_scores(
    scores: PairScores, percentage: float, *, method: str = "selector", threshold: float = 0.5, seed: int = 0
) -> np.ndarray:
    """The [Q, N] ranking scores DnS gives at ``percentage`` % re-ranked by ``method`` (each query's
    selected pairs merged with the model set's rule), as in :func:`dns_tradeoff`."""
    rng = np.random.default_rng(seed)
    mixed = np.array(scores.coarse, copy=True)
    for row in range(len(scores.queries)):
        candidates = np.flatnonzero(np.isfinite(scores.coarse[row]))
        order = selection_order(
            method, candidates, scores.coarse[row], scores.fine[row], scores.selector[row],
            threshold=threshold, rng=rng, merge=scores.merge,
        )  # fmt: skip
        chosen = order[: rerank_budget(percentage, len(candidates))]
        mixed[row] = mixed_row(scores, row, candidates, chosen)
    return mixed


def mean_pr_curve(
    truth: DenseGroundTruth, columns: ColumnIndex, matrix: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The FIVR evaluation's interpolated PR curve (21 recall levels) of a score matrix, averaged
    over the queries of ``truth`` with a relevant video."""
    curves = []
    levels = np.linspace(0.0, 1.0, 21)
    for row in range(len(truth.queries)):
        if truth.n_relevant[row] == 0:
            continue
        order = score_order(matrix[row])
        ranked = [columns.ids[c] for c in order[truth.valid[row][order]]]
        relevant = {columns.ids[c] for c in np.flatnonzero(truth.relevant[row])}
        database = {columns.ids[c] for c in np.flatnonzero(truth.valid[row])} | relevant
        levels, precision = interpolated_pr_curve(ranked, relevant, database=database)
        curves.append(precision)
    if not curves:
        raise UndefinedMetricError("no query has a relevant video in the database")
    return levels, np.mean(curves, axis=0)


def cost_table(
    cost: CostReport,
    rows: Sequence[Mapping[str, Any]],
    task: str,
    *,
    percentages: Sequence[float] = COST_PERCENTAGES,
    method: str = "selector",
) -> list[dict[str, Any]]:
    """Table 10's form: mAP, KB per video and seconds per query of the coarse student, the fine
    student and DnS at each percentage re-ranked, from :func:`dns_tradeoff` rows of ``task``."""
    by_p = {float(r["percentage"]): r for r in rows if r["task"] == task and r["method"] == method}
    needed = sorted({0.0, 100.0, *map(float, percentages)} - set(by_p))
    if needed:
        raise InvalidInputError(f"trade-off rows of {method}/{task} lack the percentages {needed}")
    total_pairs = max(int(by_p[100.0]["reranked_pairs"]), 1)
    kb = cost.kb_per_video()
    per_query = cost.seconds_per_query()
    fine_name = "binarization" if cost.payload_kind == PAYLOAD_PACKED else "attention"
    table = [
        {"run": "coarse student", "percentage": 0.0, "mAP": by_p[0.0]["mAP"],
         "kb_per_video": kb["coarse"], "s_per_query": per_query["coarse"]},
        {"run": f"fine {fine_name} student", "percentage": 100.0, "mAP": by_p[100.0]["mAP"],
         "kb_per_video": kb["fine"], "s_per_query": per_query["fine"]},
    ]  # fmt: skip
    for p in percentages:
        row = by_p[float(p)]
        table.append(
            {
                "run": f"DnS, {fine_name}, {p:g}% re-ranked",
                "percentage": float(p),
                "mAP": row["mAP"],
                "kb_per_video": kb["dns"],
                "s_per_query": cost.dns_seconds_per_query(row["reranked_pairs"] / total_pairs),
            }
        )
    return table


def write_evaluation(
    scores: PairScores,
    cost: CostReport,
    dataset: EvalDataset,
    out_dir: str | Path,
    *,
    percentages: Iterable[float] = DEFAULT_PERCENTAGES,
    methods: Sequence[str] = METHODS,
    tasks: Sequence[str] | None = None,
    plot_tasks: Sequence[str] | None = None,
    count_missing: bool = False,
) -> dict[str, Any]:
    """Trade-off curves and cost of scored pairs, written to ``out_dir``; returns the summary.

    Files: ``tradeoff.json``/``.csv`` (mAP per method, percentage and task), ``cost.json`` (the
    :class:`CostReport` and its Table-10 rows per task), ``tradeoff.png`` and ``pr.png`` (PR curves
    of the coarse student, DnS at 5/10/30 % and the fine student) for the first task, and
    ``tradeoff_<task>.png``, ``pr_<task>.png`` for the other ``plot_tasks`` (default: every task).
    ``count_missing``: relevant videos without features count as misses (default: they leave the
    ground truth, as in the DnS release's evaluation).
    """
    from dns_milvus.eval.plots import plot_pr_curves, plot_tradeoff

    task_names = list(dataset.task_names if tasks is None else tasks)
    for name in task_names:
        dataset.task(name)  # validates the name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {float(p) for p in percentages} | {0.0, 100.0} | {float(p) for p in COST_PERCENTAGES}
    available = None if count_missing else set(scores.columns.ids) - set(cost.missing_database)
    rows = dns_tradeoff(
        scores, dataset, percentages=sorted(wanted), methods=methods, tasks=task_names, available=available
    )
    write_table(rows, out / "tradeoff.json")
    write_table(rows, out / "tradeoff.csv")
    tables = {name: cost_table(cost, rows, name) if "selector" in methods else [] for name in task_names}
    (out / "cost.json").write_text(
        _json({"cost": cost.to_dict(), "tables": tables, "count_missing_as_misses": count_missing}),
        encoding="utf-8",
    )
    runs = {"coarse": 0.0, **{f"DnS {p:g}%": float(p) for p in COST_PERCENTAGES}, "fine": 100.0}
    matrices = {label: mixed_scores(scores, p) for label, p in runs.items()}
    plots = []
    for i, name in enumerate(task_names):
        if plot_tasks is not None and name not in plot_tasks:
            continue
        suffix = "" if i == 0 else f"_{_file_safe(name)}"
        title = f"{dataset.name} {name}: {cost.model_set}"
        plots.append(plot_tradeoff(rows, out / f"tradeoff{suffix}.png", task=name, title=title))
        truth = dataset.ground_truth(name, scores.queries, scores.columns, available=available)
        curves = {label: mean_pr_curve(truth, scores.columns, m) for label, m in matrices.items()}
        plots.append(plot_pr_curves(curves, out / f"pr{suffix}.png", title=title))
    return {
        "dataset": dataset.name,
        "tasks": task_names,
        "rows": rows,
        "tables": tables,
        "cost": cost.to_dict(),
        "files": sorted(
            str(p) for p in [out / "tradeoff.json", out / "tradeoff.csv", out / "cost.json", *plots]
        ),
    }


# -- helpers -------------------------------------------------------------------------------------


class _Clock:
    """Lap timer; on CUDA it waits for queued kernels so each lap is that network's own time."""

    def __init__(self, device: torch.device) -> None:
        self._sync = torch.cuda.synchronize if device.type == "cuda" else None
        self._last = 0.0

    def start(self) -> None:
        if self._sync is not None:
            self._sync()
        self._last = time.perf_counter()

    def stop(self) -> float:
        """Seconds since the last start or stop; starts the next lap."""
        if self._sync is not None:
            self._sync()
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


class _IndexMeter:
    """Reads features and indexes videos in batches, timing I/O and the networks apart."""

    def __init__(self, models: ModelSet, features: FeatureSource, batch_size: int, clock: _Clock) -> None:
        self.models, self.features, self.batch_size, self.clock = models, features, batch_size, clock
        self.videos = 0
        self.index_seconds = 0.0
        self.load_seconds = 0.0

    def index(
        self, ids: Sequence[str], reuse: Mapping[str, VideoRecord] | None = None
    ) -> dict[str, VideoRecord]:
        records = {v: reuse[v] for v in ids if reuse is not None and v in reuse}
        todo = [v for v in ids if v not in records]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            self.clock.start()
            arrays = [self._load(v) for v in batch]
            self.load_seconds += self.clock.stop()
            indexed = self.models.index_features(arrays)
            self.index_seconds += self.clock.stop()
            for vid, record in zip(batch, indexed, strict=True):
                record.video_id = vid
                records[vid] = record
            self.videos += len(batch)
        return records

    def _load(self, video_id: str) -> np.ndarray | torch.Tensor:
        x = self.features[video_id]
        if np.shape(x)[-1:] != (self.models.feature_dim,) or len(np.shape(x)) != 3:
            raise InvalidInputError(
                f"features of {video_id!r} have shape {list(np.shape(x))}; the model set expects "
                f"[T, R, {self.models.feature_dim}]"
            )
        return x


@dataclass(frozen=True)
class _Targets:
    """A database chunk's indexed forms, on the networks' device once for all queries."""

    coarse: torch.Tensor  # [n, dim]
    self_sim: torch.Tensor  # [n]
    fine: list[torch.Tensor]  # stored forms
    segments: list[np.ndarray] | None  # segment codes, for a selector that reads them

    @classmethod
    def of(cls, records: Sequence[VideoRecord], device: torch.device) -> _Targets:
        segments = [r.segments for r in records]
        return cls(
            torch.from_numpy(np.stack([r.coarse for r in records])).to(device),
            torch.tensor([r.self_sim for r in records], dtype=torch.float32, device=device),
            [_fine_tensor(r, device) for r in records],
            None if any(s is None for s in segments) else segments,  # type: ignore[misc]
        )


@torch.inference_mode()
def _score_query(
    models: ModelSet, query: VideoRecord, targets: _Targets, clock: _Clock
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Coarse, selector and raw fine scores of one query against a chunk, and each network's seconds."""
    device = models.device
    q_coarse = torch.from_numpy(query.coarse).to(device)
    q_fine = _fine_tensor(query, device)
    fine_kernel = fine_similarity_packed if query.payload_kind == PAYLOAD_PACKED else fine_similarity_float
    laps = np.zeros(3)
    clock.start()
    coarse = models.coarse.calculate_video_similarity(q_coarse, targets.coarse)
    laps[0] = clock.stop()
    match = None
    if models.selector_segments and targets.segments is not None:
        match = torch.from_numpy(segment_matches(query.coarse, targets.segments)).to(device)
    selector = models.selector.pair_confidence(query.self_sim, targets.self_sim, coarse, match)
    laps[1] = clock.stop()
    fine = fine_kernel(models.fine, q_fine, targets.fine, device=device)
    laps[2] = clock.stop()
    coarse_np, selector_np, fine_np = (x.double().cpu().numpy() for x in (coarse, selector, fine))
    return coarse_np, selector_np, fine_np, laps


def _fine_tensor(record: VideoRecord, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.require(record.fine, requirements=["C", "W"])).to(device)


def _storage(record: VideoRecord) -> tuple[float, float, float, float, float]:
    """Frames and bytes of one video: coarse, the selector's (self-sim and any segment codes), fine
    as stored, fine by the release's count."""
    fine = record.fine
    release = fine.nbytes if record.payload_kind == PAYLOAD_PACKED else fine.size * 4
    selector = SELF_SIM_BYTES + (record.segments.nbytes if record.segments is not None else 0)
    return (record.n_frames, record.coarse.nbytes, selector, fine.nbytes, release)


def _describe(features: FeatureSource) -> str:
    return str(features.path) if isinstance(features, H5Features) else "the feature mapping"


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name.replace("*", "-star"))


def _json(payload: Any) -> str:
    import json

    return json.dumps(payload, indent=1, default=_json_default) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
