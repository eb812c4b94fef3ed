"""Bulk ingestion: features -> coarse vector, self-similarity, fine tensor -> object -> row.

Batched (bounded memory: at most two batches of features at a time, since the next batch is
loaded by ``read_ahead`` threads while the networks run on this one),
resumable (a re-run skips ids already indexed whose object is there and verifies, so it also
re-indexes rows whose object was lost or damaged since), idempotent (re-ingesting an id is an
upsert). A failing video is reported and skipped; the rest of its batch goes on: each video's
features, network outputs and metadata are checked before anything of the batch is written,
so a refused video leaves no object behind.

Items whose source loads many at once (``SourceItem.load_many``: ``video_source``, whose loading
threads decode a group of videos and run the backbone on them, on a GPU on all their frames
together) are loaded in ``read_ahead`` groups a batch, one group a thread; the others one at a time.

Where the time goes (``IngestReport.stage_seconds``, wall-clock seconds of the indexing thread,
which add up to ``seconds``): ``load`` (waiting for the loading threads), ``resume`` (which ids
are indexed already), ``backbone`` (CNN and region pooling) and ``pca`` (when loads run in line),
``networks`` (the DnS students and the selector, with the checks of their inputs), ``store``
(encoding and writing the objects), ``milvus`` (the rows) and ``other``. The loading threads'
own time, most of it hidden behind the indexing thread's work, is ``load_stage_seconds``
(``decode``, ``backbone``, ``pca`` for video files; ``load`` for the rest). With ``read_ahead=0``
loads run in line, nothing overlaps, and ``stage_seconds`` is the whole exclusive split
(``load`` then holds the reading and decoding).
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
    #: Seconds the loading threads spent by stage (reading or decoding, backbone, PCA),
    #: overlapped with the indexing thread or waited for.
    load_stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def load_busy_seconds(self) -> float:
        """The loading threads' seconds, all stages together."""
        return sum(self.load_stage_seconds.values())

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
            "load_stage_seconds": {k: round(v, 3) for k, v in self.load_stage_seconds.items()},
        }

    def stage_line(self) -> str:
        """The stage split as one line: ``load 1.2 s (12%), backbone ...``."""
        total = self.seconds or 1.0
        parts = [
            f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in self.stage_seconds.items() if v >= 0.05
        ]
        busy = ", ".join(f"{k} {v:.1f} s" for k, v in self.load_stage_seconds.items() if v >= 0.05)
        return "time by stage: " + (", ".join(parts) or "-") + (f"; loading threads: {busy}" if busy else "")

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
    sort_window: int = 8,
) -> IngestReport:
    """Index every item of a source into ``index``; see the module docstring for the guarantees
    and for what ``report.stage_seconds`` holds.

    ``read_ahead``: threads that load (decode, read) the next batch while this one is indexed;
    0 loads each batch in line, so that the stages' times do not overlap (a profile of the
    pipeline's parts). ``sort_window``: items whose source knows their frame count
    (``SourceItem.frames``, as HDF5 files do) are ordered by it within windows of that many
    batches, so that each batch holds videos of similar length (less padding computed);
    1 keeps the source's order.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    if read_ahead < 0:
        raise InvalidInputError(f"read_ahead must be >= 0, got {read_ahead}")
    if sort_window < 1:
        raise InvalidInputError(f"sort_window must be >= 1, got {sort_window}")
    report = IngestReport()
    stages = dict.fromkeys(STAGES, 0.0)
    seen: set[str] = set()
    start = time.perf_counter()
    bar = tqdm(total=total, unit="video", desc="ingest", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=max(1, read_ahead)) as pool:
        loads = _Loads(pool if read_ahead else None, groups=max(1, read_ahead))
        # The next batch loads (decodes, reads) in the pool while this one goes through the
        # networks: at most two batches are in memory at a time.
        loading: list[tuple[SourceItem, Future]] | None = None
        ordered = _length_sorted(valid_items(items, seen, report), batch_size * sort_window)
        for batch in _batches(ordered, batch_size):
            if skip_existing:
                t0 = time.perf_counter()
                batch = unindexed(index, batch, report)
                stages["resume"] += time.perf_counter() - t0
            submitted = loads.submit(batch)
            if loading is not None:
                _index_loaded(index, loading, report, stages, bar)
            loading = submitted
        if loading is not None:
            _index_loaded(index, loading, report, stages, bar)
    bar.close()
    report.seconds = time.perf_counter() - start
    for stage, seconds in loads.inline_stage_seconds.items():  # loads in line: their own split
        stages["backbone" if stage == "backbone" else "pca" if stage == "pca" else "load"] += seconds
    stages["other"] = max(0.0, report.seconds - sum(stages.values()))
    report.stage_seconds = stages
    report.load_stage_seconds = loads.stage_seconds
    return report


class _Loads:
    """Runs a batch's loads in the thread pool (in line without one): items sharing a
    ``load_many`` in ``groups`` groups, one task each, the others one task an item; adds up
    the tasks' seconds by stage."""

    def __init__(self, pool: ThreadPoolExecutor | None, groups: int) -> None:
        self.pool = pool
        self.groups = groups
        self.stage_seconds: dict[str, float] = {}
        self.inline_stage_seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def submit(self, batch: list[SourceItem]) -> list[tuple[SourceItem, Future]]:
        futures = {id(item): Future() for item in batch}
        together: dict[Any, list[SourceItem]] = {}
        tasks: list[list[SourceItem]] = []
        for item in batch:
            if item.load_many is None:
                tasks.append([item])
            else:
                together.setdefault(item.load_many, []).append(item)
        for items in together.values():
            size = -(-len(items) // self.groups)  # ceil: at most ``groups`` tasks
            tasks += [items[start : start + size] for start in range(0, len(items), size)]
        for task in tasks:
            if self.pool is None:
                self._settle(task, futures, self._run(task, self.inline_stage_seconds))
            else:
                done = self.pool.submit(self._run, task, self.stage_seconds)
                done.add_done_callback(
                    lambda f, task=task: self._settle(task, futures, f.exception() or f.result())
                )
        return [(item, futures[id(item)]) for item in batch]

    def _run(self, task: list[SourceItem], into: dict[str, float]) -> list[Any] | BaseException:
        """The task's results (an exception for an item that failed alone), or the exception
        that failed the whole task."""
        stages: dict[str, float] = {}
        started = time.perf_counter()
        try:
            if task[0].load_many is not None:
                results = list(task[0].load_many(task, stages))
                if len(results) != len(task):  # a broken source: stop rather than guess
                    raise TypeError(f"load_many gave {len(results)} results for {len(task)} items")
            else:
                try:
                    results = [task[0].load()]
                except LOAD_ERRORS as exc:
                    results = [exc]
        except BaseException as exc:  # not an item's own failure: stops the run where it is collected
            return exc
        finally:
            elapsed = time.perf_counter() - started
            stages["load"] = stages.get("load", 0.0) + max(0.0, elapsed - sum(stages.values()))
            with self._lock:
                for stage, seconds in stages.items():
                    into[stage] = into.get(stage, 0.0) + seconds
        return results

    @staticmethod
    def _settle(
        task: list[SourceItem], futures: dict[int, Future], results: list[Any] | BaseException
    ) -> None:
        for number, item in enumerate(task):
            outcome = results if isinstance(results, BaseException) else results[number]
            if isinstance(outcome, BaseException):
                futures[id(item)].set_exception(outcome)
            else:
                futures[id(item)].set_result(outcome)


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


def _length_sorted(items: Iterator[SourceItem], window: int) -> Iterator[SourceItem]:
    """``items`` in windows of ``window``, each ordered by frame count when every item of it
    has one (a stable sort; otherwise the window keeps its order)."""
    for chunk in _batches(items, window):
        if all(item.frames is not None for item in chunk):
            chunk.sort(key=lambda item: item.frames)
        yield from chunk


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


def index_batch(
    index: DnSIndex, loaded: list[tuple[SourceItem, Any]], report: IngestReport, stages: dict[str, float]
) -> None:
    """Index a batch of loaded videos (item, features) and store them (objects, then rows),
    recording each video in ``report`` and the time spent in ``stages``."""
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
