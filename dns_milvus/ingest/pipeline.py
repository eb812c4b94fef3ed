"""Bulk ingestion: features -> coarse vector, self-similarity, fine tensor -> object -> row.

Batched (bounded memory: at most two batches of features at a time, since the next batch is
loaded by ``read_ahead`` threads while the networks run on this one),
resumable (a re-run skips ids already indexed whose object is there and verifies, so it also
re-indexes rows whose object was lost or damaged since), idempotent (re-ingesting an id is an
upsert). A failing video is reported and skipped; the rest of its batch goes on: each video's
features, network outputs and metadata are checked before anything of the batch is written,
so a refused video leaves no object behind.

Video files from ``video_source`` are decoded and preprocessed by the loading threads; the
backbone then runs on the frames of a whole batch together (``FeatureExtractor.extract_prepared``),
so that short videos still make full backbone batches.

Where the time goes (``IngestReport.stage_seconds``, wall-clock seconds of the indexing thread,
which add up to ``seconds``): ``load`` (waiting for the loading threads: HDF5 reads, decoding;
with ``read_ahead=0`` every load runs in line and ``load`` is all of it), ``resume`` (which ids
are indexed already), ``backbone`` (CNN and region pooling), ``pca``, ``networks`` (the DnS
students and the selector, with the checks of their inputs), ``store`` (encoding and writing the
objects), ``milvus`` (the rows) and ``other``. ``load_busy_seconds`` is the loading threads'
own time, most of it hidden behind the stages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from dns_milvus.engine.index import DnSIndex
from dns_milvus.errors import BackendUnavailableError, DnSError, InvalidInputError
from dns_milvus.ids import validate_video_id
from dns_milvus.ingest.sources import SourceItem

#: The stages of ``IngestReport.stage_seconds``, in pipeline order (``other``: the remainder).
STAGES = ("load", "resume", "backbone", "pca", "networks", "store", "milvus", "other")


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    #: Already indexed ids whose object was missing or did not verify, and why: indexed again.
    damaged: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: Seconds of the indexing thread by stage (``STAGES``); they add up to ``seconds``.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: Seconds the loading threads spent loading (reading, decoding), overlapped or not.
    load_busy_seconds: float = 0.0

    @property
    def videos_per_second(self) -> float:
        return len(self.added) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": len(self.added),
            "skipped": len(self.skipped),
            "failed": self.failed,
            "damaged": self.damaged,
            "seconds": round(self.seconds, 3),
            "videos_per_second": round(self.videos_per_second, 2),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "load_busy_seconds": round(self.load_busy_seconds, 3),
        }

    def stage_line(self) -> str:
        """The stage split as one line: ``load 1.2 s (12%), backbone ...``."""
        total = self.seconds or 1.0
        parts = [
            f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in self.stage_seconds.items() if v >= 0.05
        ]
        busy = f"; loading threads busy {self.load_busy_seconds:.1f} s" if self.load_busy_seconds else ""
        return "time by stage: " + (", ".join(parts) or "-") + busy

    def summary(self) -> str:
        lines = [
            f"ingested {len(self.added)} videos, skipped {len(self.skipped)} already indexed, "
            f"{len(self.failed)} failed, in {self.seconds:.1f} s ({self.videos_per_second:.1f} videos/s)"
        ]
        if self.stage_seconds:
            lines.append(self.stage_line())
        if self.damaged:
            lines.append(f"re-indexed {len(self.damaged)} videos whose stored object was missing or damaged")
        for vid, reason in list(self.failed.items())[:50]:
            lines.append(f"  FAILED {vid}: {reason}")
        if len(self.failed) > 50:
            lines.append(f"  ... and {len(self.failed) - 50} more failures")
        return "\n".join(lines)


def ingest(
    index: DnSIndex,
    items: Iterable[SourceItem],
    *,
    batch_size: int = 32,
    skip_existing: bool = True,
    progress: bool = True,
    total: int | None = None,
    read_ahead: int = 2,
) -> IngestReport:
    """Index every item of a source into ``index``; see the module docstring for the guarantees
    and for what ``report.stage_seconds`` holds.

    ``read_ahead``: threads that load (decode, read) the next batch while this one is indexed;
    0 loads each batch in line, so that the stages' times do not overlap (a profile of the
    pipeline's parts).
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    if read_ahead < 0:
        raise InvalidInputError(f"read_ahead must be >= 0, got {read_ahead}")
    report = IngestReport()
    stages = dict.fromkeys(STAGES, 0.0)
    loads = _TimedLoads()
    seen: set[str] = set()
    start = time.perf_counter()
    bar = tqdm(total=total, unit="video", desc="ingest", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=max(1, read_ahead)) as pool:
        # The next batch loads (decodes, reads) in the pool while this one goes through the
        # networks: at most two batches are in memory at a time.
        loading: list[tuple[SourceItem, Future]] | None = None
        for batch in _batches(valid_items(items, seen, report), batch_size):
            if skip_existing:
                t0 = time.perf_counter()
                batch = unindexed(index, batch, report)
                stages["resume"] += time.perf_counter() - t0
            submitted = [(it, loads.submit(pool if read_ahead else None, it)) for it in batch]
            if loading is not None:
                _index_loaded(index, loading, report, stages, bar)
            loading = submitted
        if loading is not None:
            _index_loaded(index, loading, report, stages, bar)
    bar.close()
    report.seconds = time.perf_counter() - start
    stages["load"] += loads.inline_seconds
    stages["other"] = max(0.0, report.seconds - sum(stages.values()))
    report.stage_seconds = stages
    report.load_busy_seconds = loads.busy_seconds
    return report


class _TimedLoads:
    """Runs items' loads in a thread pool (or in line without one), adding up their time."""

    def __init__(self) -> None:
        self.busy_seconds = 0.0
        self.inline_seconds = 0.0
        self._lock = threading.Lock()

    def submit(self, pool: ThreadPoolExecutor | None, item: SourceItem) -> Future:
        if pool is not None:
            return pool.submit(self._load, item)
        future: Future = Future()
        started = time.perf_counter()
        try:
            future.set_result(self._load(item))
        except BaseException as exc:  # re-raised by ``result()``, where thread loads raise theirs
            future.set_exception(exc)
        self.inline_seconds += time.perf_counter() - started
        return future

    def _load(self, item: SourceItem) -> Any:
        started = time.perf_counter()
        try:
            return item.load()
        finally:
            with self._lock:
                self.busy_seconds += time.perf_counter() - started


def valid_items(items: Iterable[SourceItem], seen: set[str], report: IngestReport) -> Iterator[SourceItem]:
    """The items whose id is valid and not ``seen`` before; the others go to ``report.failed``."""
    for item in items:
        try:
            validate_video_id(item.video_id)
        except InvalidInputError as exc:
            report.failed[str(item.video_id)[:80]] = str(exc)
            continue
        if item.video_id in seen:
            report.failed[item.video_id] = "duplicate video id in this ingest run (first occurrence kept)"
            continue
        seen.add(item.video_id)
        yield item


def unindexed(index: DnSIndex, batch: list[SourceItem], report: IngestReport) -> list[SourceItem]:
    """The items of ``batch`` to index: those without a row, and those whose row's object is
    missing or does not verify (a row alone does not make a video searchable)."""
    rows = index.collection.get([it.video_id for it in batch])
    damaged = index.verify_objects({vid: (row.fine_key, row.n_frames) for vid, row in rows.items()})
    report.damaged.update(damaged)
    report.skipped.extend(vid for vid in rows if vid not in damaged)
    return [it for it in batch if it.video_id not in rows or it.video_id in damaged]


#: What loading one video (decoding, reading, extracting) may raise for that video alone:
#: decoders raise the built-in ones on damaged input. Anything else stops the run.
LOAD_ERRORS = (DnSError, OSError, ValueError, RuntimeError)


def load_failure(exc: BaseException) -> str:
    """How the report words a video's ``LOAD_ERRORS`` failure."""
    return str(exc) if isinstance(exc, DnSError) else f"{type(exc).__name__}: {exc}"


def _batches(items: Iterator[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    batch: list[SourceItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _index_loaded(
    index: DnSIndex,
    futures: list[tuple[SourceItem, Future]],
    report: IngestReport,
    stages: dict[str, float],
    bar: tqdm,
) -> None:
    index_batch(index, _collect(futures, report, stages), report, stages)
    bar.update(len(futures))
    bar.set_postfix(ok=len(report.added), failed=len(report.failed), refresh=False)


def _collect(
    futures: list[tuple[SourceItem, Future]], report: IngestReport, stages: dict[str, float]
) -> list[tuple[SourceItem, Any]]:
    """Wait for a batch's loads; ``load`` counts only the time spent waiting for them."""
    t0 = time.perf_counter()
    loaded = []
    for item, fut in futures:
        try:
            loaded.append((item, fut.result()))
        except LOAD_ERRORS as exc:
            report.failed[item.video_id] = load_failure(exc)
    stages["load"] += time.perf_counter() - t0
    return loaded


def _add(stages: dict[str, float], stage: str, seconds: float) -> None:
    stages[stage] = stages.get(stage, 0.0) + seconds


def extract_prepared(
    index: DnSIndex, loaded: list[tuple[SourceItem, Any]], report: IngestReport, stages: dict[str, float]
) -> list[tuple[SourceItem, Any]]:
    """Loaded videos with region features: those loaded as ``PreparedVideo`` (``video_source``)
    go through the backbone together; a video whose decoding fails is reported and dropped.
    Decoding the rest of long videos here counts as ``load``."""
    from dns_milvus.features.extractor import PreparedVideo  # HDF5 ingestion never needs it

    prepared = [payload for _, payload in loaded if isinstance(payload, PreparedVideo)]
    if not prepared:
        return loaded
    timed: dict[str, float] = {}
    results = iter(index.models.extractor.extract_prepared(prepared, stages=timed))
    for stage, seconds in timed.items():
        _add(stages, "load" if stage == "decode" else stage, seconds)
    out = []
    for item, payload in loaded:
        features = next(results) if isinstance(payload, PreparedVideo) else payload
        if isinstance(features, BaseException):  # what stopped that video's decoding
            report.failed[item.video_id] = load_failure(features)
        else:
            out.append((item, features))
    return out


def index_batch(
    index: DnSIndex, loaded: list[tuple[SourceItem, Any]], report: IngestReport, stages: dict[str, float]
) -> None:
    """Index a batch of loaded videos (item, features or ``PreparedVideo``) and store them
    (objects, then rows), recording each video in ``report`` and the time spent in ``stages``."""
    loaded = extract_prepared(index, loaded, report, stages)
    t0 = time.perf_counter()
    checked = []
    for item, features in loaded:  # one bad video must not fail the batch's networks
        try:
            checked.append((item, index.models.check_features(features)))
        except InvalidInputError as exc:
            report.failed[item.video_id] = str(exc)
    if not checked:
        return
    try:
        records = index.models.index_features([features for _, features in checked])
    except InvalidInputError:
        # Videos of different region counts (a model set that accepts any): one at a time.
        records = []
        kept = []
        for item, features in checked:
            try:
                records.append(index.models.index_features([features])[0])
                kept.append((item, features))
            except InvalidInputError as exc:
                report.failed[item.video_id] = str(exc)
        checked = kept
    _add(stages, "networks", time.perf_counter() - t0)
    for (item, _), rec in zip(checked, records):
        rec.video_id = item.video_id
    t0 = time.perf_counter()
    prepared, refused = index.prepare_writes(records, [item.metadata for item, _ in checked])
    _add(stages, "store", time.perf_counter() - t0)
    report.failed.update(refused)
    if not prepared:
        return
    try:
        timings = index.write_prepared(prepared)
    except BackendUnavailableError:
        raise  # a server that is down fails every video: stop with the cause
    except DnSError as exc:
        for write in prepared:
            report.failed[write.row.video_id] = f"write failed: {exc}"
        return
    _add(stages, "store", timings["store_ms"] / 1000.0)
    _add(stages, "milvus", timings["milvus_ms"] / 1000.0)
    report.added.extend(write.row.video_id for write in prepared)
