"""Distributed ingestion of video files on a Ray cluster (the ``ray`` extra).

Three Ray Data stages stream the videos through the cluster:

- **decode** (Ray tasks, CPU): a video file -> RGB frames sampled at the model set's fps;
- **extract** (an actor pool): each actor loads the model set once; frames -> region features;
- **index** (an actor pool): each actor loads the model set and opens its own ``DnSIndex``, then
  runs ``pipeline.index_batch`` (the single-process path's step): every video is checked, its
  object written and verified, then the batch's rows are upserted.

When the cluster has GPUs, the extract and index actors each take ``gpus_per_actor`` of one
(half by default: an extract and an index actor share each GPU) and run their networks on it.

What the single-process ``ingest`` guarantees holds here too, through the same functions: the
same ids (``file_source``) and checks, failures reported per video in an ``IngestReport``, resume
(the driver skips ids already indexed whose object verifies, before any work is sent out) and
idempotence (object keys derive from the ids and rows are upserted by id, so a task that Ray runs
again after losing a worker writes the same object and the same row again, never a second one).

Every worker opens the index from plain values (``IndexSpec``): a Milvus server (Milvus Lite is
one process's file), the store URI and a model-set directory that every node can read. The rows
are written by the workers' connections: the driver's resume check reads them at ``Strong``
consistency, and so must any reader that needs them at once (``Session`` reads see one
process's own writes at once, others' after the server's next time tick).
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dns_milvus.engine.index import DnSIndex
from dns_milvus.errors import BackendUnavailableError, DnSError, InvalidInputError
from dns_milvus.ingest.pipeline import (
    LOAD_ERRORS,
    IngestReport,
    index_batch,
    load_failure,
    unindexed,
    valid_items,
)
from dns_milvus.ingest.sources import SourceItem, file_source, video_files

#: Ids checked against Milvus at a time by the resume check.
_RESUME_CHUNK = 256
#: Most Ray Data blocks the input list is split into (one video a block below that): each
#: block is a decode task, so smaller blocks spread decoding over the cluster sooner.
_MAX_BLOCKS = 20_000
#: Runs of a decode task lost with its worker (Ray's own default for tasks).
_DECODE_RETRIES = 3
#: The report's stage names, in pipeline order (seconds summed over every worker).
DISTRIBUTED_STAGES = ("decode", "extract", "networks", "store", "milvus")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexSpec:
    """How a worker opens its own ``DnSIndex``: the constructor's arguments as plain values."""

    uri: str
    models: str
    store: str
    collection: str = "videos"
    token: str | None = None

    @classmethod
    def of(cls, index: DnSIndex) -> IndexSpec:
        """The spec of an open index; refuses what workers cannot open themselves."""
        if index.collection.backend != "server":
            raise InvalidInputError(
                f"distributed ingestion writes from many processes, so it needs a Milvus server "
                f"(http://host:19530), not the Milvus Lite file {index.uri!r}, which one process owns"
            )
        if index.models_dir is None or index.store_uri is None:
            raise InvalidInputError(
                "distributed ingestion needs the index opened with a model-set directory and a store "
                "URI (not ModelSet / ObjectStore instances): each worker opens them itself"
            )
        return cls(str(index.uri), str(index.models_dir), index.store_uri, index.name, index.token)

    def open(self, device: str | None = None) -> DnSIndex:
        return DnSIndex(
            self.uri, models=self.models, store=self.store, collection=self.collection,
            token=self.token, device=device,
        )  # fmt: skip


@dataclass(frozen=True)
class StagePlan:
    """Resources of the stages. ``actors``: the size of each actor pool (extract and index);
    ``cpus_per_actor`` / ``gpus_per_actor``: what each actor reserves (its torch threads: the
    CPUs rounded, at least 1); ``decode_cpus``: what each decode task reserves."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    decode_cpus: float

    @classmethod
    def for_cluster(
        cls,
        resources: Mapping[str, float],
        nodes: int,
        *,
        actors: int | None = None,
        cpus_per_actor: float | None = None,
        gpus_per_actor: float | None = None,
        decode_cpus: float | None = None,
    ) -> StagePlan:
        """Fill what is not given from the cluster: on GPUs, one extract and one index actor
        per GPU (half a GPU each); on CPUs, one of each per node, sharing its CPUs with a
        decode task (0.4, 0.4 and 0.2 of a node's CPUs). Refuses a plan the cluster cannot run
        (actors that never start would stall the stages behind them)."""
        cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
        nodes = max(1, nodes)
        per_node = cpus / nodes
        if gpus_per_actor is None:
            gpus_per_actor = 0.5 if gpus > 0 else 0.0
        if actors is None:
            actors = max(1, math.floor(gpus)) if gpus_per_actor > 0 else nodes
        if cpus_per_actor is None:
            cpus_per_actor = min(1.0, cpus / (2 * actors + 1)) if gpus_per_actor > 0 else 0.4 * per_node
        if decode_cpus is None:
            decode_cpus = min(1.0, cpus_per_actor) if gpus_per_actor > 0 else 0.2 * per_node
        plan = cls(int(actors), float(cpus_per_actor), float(gpus_per_actor), float(decode_cpus))
        plan.check(cpus, gpus)
        return plan

    def check(self, cpus: float, gpus: float) -> None:
        if self.actors < 1:
            raise InvalidInputError(f"actors must be >= 1, got {self.actors}")
        if self.cpus_per_actor <= 0 or self.decode_cpus <= 0 or self.gpus_per_actor < 0:
            raise InvalidInputError(
                "cpus_per_actor and decode_cpus must be > 0 and gpus_per_actor >= 0, got "
                f"{self.cpus_per_actor}, {self.decode_cpus} and {self.gpus_per_actor}"
            )
        need_cpus = 2 * self.actors * self.cpus_per_actor + self.decode_cpus
        need_gpus = 2 * self.actors * self.gpus_per_actor
        if need_cpus > cpus + 1e-9 or need_gpus > gpus + 1e-9:
            raise InvalidInputError(
                f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs, but {self.actors} extract and "
                f"{self.actors} index actors of {self.cpus_per_actor:g} CPU / {self.gpus_per_actor:g} GPU "
                f"each plus a decode task of {self.decode_cpus:g} CPU need {need_cpus:g} CPUs and "
                f"{need_gpus:g} GPUs: give fewer actors or smaller shares"
            )

    @property
    def threads(self) -> int:
        return max(1, round(self.cpus_per_actor))


def ingest_on_ray(
    index: DnSIndex,
    inputs: Iterable[str | os.PathLike],
    *,
    address: str | None = None,
    id_from: str = "stem",
    max_frames: int | None = None,
    batch_size: int = 32,
    skip_existing: bool = True,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    decode_cpus: float | None = None,
    progress: bool = True,
) -> IngestReport:
    """Index video files (files, directories, globs) into ``index`` on a Ray cluster.

    ``address``: the cluster (``host:port`` of its head, or ``auto``); None uses the Ray this
    process is connected to, or starts a local one. The resources of the stages default to
    ``StagePlan.for_cluster``. ``batch_size``: videos an index actor indexes and writes at a
    time. ``report.stage_seconds`` sums each stage's time over all workers.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    if max_frames is not None and max_frames < 1:
        raise InvalidInputError(f"max_frames must be >= 1, got {max_frames}")
    spec = IndexSpec.of(index)
    if index.models.extractor is None:
        raise InvalidInputError(
            f"model set {index.models.name!r} has no feature extractor (no backbone in its manifest): "
            "distributed ingestion indexes video files"
        )
    start = time.perf_counter()
    report = IngestReport()
    pending = _pending(index, inputs, id_from, skip_existing, report)
    stages = dict.fromkeys(DISTRIBUTED_STAGES, 0.0)
    if pending:
        with _connected(address) as ray:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
            plan = StagePlan.for_cluster(
                ray.cluster_resources(), nodes, actors=actors, cpus_per_actor=cpus_per_actor,
                gpus_per_actor=gpus_per_actor, decode_cpus=decode_cpus,
            )  # fmt: skip
            dataset = _stages(
                ray,
                pending,
                spec,
                plan,
                fps=index.models.fps,
                max_frames=max_frames,
                batch_size=batch_size,
                progress=progress,
            )
            _collect(dataset, report, stages)
    report.seconds = time.perf_counter() - start
    report.stage_seconds = stages
    return report


def _pending(
    index: DnSIndex,
    inputs: Iterable[str | os.PathLike],
    id_from: str,
    skip_existing: bool,
    report: IngestReport,
) -> list[SourceItem]:
    """The videos to index: valid, distinct ids, less those already indexed (resume)."""
    items = list(
        valid_items(file_source(video_files(inputs), _loaded_on_workers, id_from=id_from), set(), report)
    )
    if not skip_existing:
        return items
    pending: list[SourceItem] = []
    with _strong_reads(index):  # the rows were written by other processes (an earlier run's workers)
        for start in range(0, len(items), _RESUME_CHUNK):
            pending.extend(unindexed(index, items[start : start + _RESUME_CHUNK], report))
    return pending


@contextmanager
def _strong_reads(index: DnSIndex) -> Iterator[None]:
    """Reads that see every process's writes (``Session`` reads see this process's only)."""
    before = index.collection.consistency
    index.collection.consistency = "Strong"
    try:
        yield
    finally:
        index.collection.consistency = before


def _loaded_on_workers(path: Path) -> Any:
    raise AssertionError(f"{path} is decoded by the cluster's workers, not by the driver")


@contextmanager
def _connected(address: str | None) -> Iterator[Any]:
    """The ``ray`` module, connected to the cluster (and disconnected after, if connected here)."""
    # Ray Data's progress bars replace builtins.print process-wide; the caller's print comes back.
    print_before = builtins.print
    try:
        try:
            import ray
        except ImportError as exc:
            raise InvalidInputError("distributed ingestion needs Ray: pip install 'dns-milvus[ray]'") from exc
        if ray.is_initialized():
            yield ray
            return
        try:
            # Workers' logs stay on their nodes: the report carries each video's failure.
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            raise BackendUnavailableError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc
        try:
            yield ray
        finally:
            ray.shutdown()
    finally:
        builtins.print = print_before


def _stages(
    ray: Any,
    pending: list[SourceItem],
    spec: IndexSpec,
    plan: StagePlan,
    *,
    fps: float,
    max_frames: int | None,
    batch_size: int,
    progress: bool,
) -> Any:
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = progress
    rows = [
        {"video_id": it.video_id, "path": it.metadata["source"], "metadata": json.dumps(it.metadata)}
        for it in pending
    ]
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), _MAX_BLOCKS))
    # Decode tasks spread over the nodes, and run again if their node is lost. Ray Data fuses a
    # map into the next one when their remote arguments agree; ``max_retries`` (a task's, not an
    # actor's) keeps decoding out of the extract actors, where a GPU would wait for each decode.
    dataset = dataset.map(
        _decode, fn_kwargs={"fps": fps, "max_frames": max_frames}, num_cpus=plan.decode_cpus,
        scheduling_strategy="SPREAD", max_retries=_DECODE_RETRIES,
    )  # fmt: skip
    dataset = dataset.map_batches(
        _ExtractFeatures, fn_constructor_kwargs={"models": spec.models, "threads": plan.threads},
        batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor,
    )  # fmt: skip
    return dataset.map_batches(
        _IndexAndWrite, fn_constructor_kwargs={"spec": spec, "threads": plan.threads},
        batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor,
    )  # fmt: skip


def _collect(dataset: Any, report: IngestReport, stages: dict[str, float]) -> None:
    """Run the stages, recording each video's outcome as it comes back."""
    try:
        for row in dataset.iter_rows():
            if row["error"]:
                report.failed[row["video_id"]] = str(row["error"])
            else:
                report.added.append(str(row["video_id"]))
            for stage in DISTRIBUTED_STAGES:
                stages[stage] += float(row[f"{stage}_s"])
    except Exception as exc:
        cause = _dns_cause(exc)
        if cause is not None:  # e.g. Milvus or the store went down: every video would fail
            raise type(cause)(f"distributed ingestion stopped: {cause}") from exc
        if type(exc).__module__.startswith("ray."):  # nodes or actors lost beyond Ray's retries
            raise BackendUnavailableError(
                f"the Ray cluster stopped the run ({type(exc).__name__}: {exc}); {len(report.added)} "
                "videos were indexed: run the same ingest again to index the rest (indexed ones are "
                "skipped)"
            ) from exc
        raise


def _dns_cause(exc: BaseException) -> DnSError | None:
    """The project error that a Ray task raised, found in the chain Ray wraps it in."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DnSError):
            return current
        todo.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
    return None


# -- the stages (run on the workers) ---------------------------------------------------------------

_NO_FRAMES = np.zeros((0, 0, 0, 3), dtype=np.uint8)
_NO_FEATURES = np.zeros((0, 0, 0), dtype=np.float32)


def _decode(row: dict[str, Any], *, fps: float, max_frames: int | None) -> dict[str, Any]:
    """A video file -> its frames, or the reason it cannot be decoded (as the report words it)."""
    from dns_milvus.video.decode import read_frames

    t0 = time.perf_counter()
    try:
        frames, error = read_frames(row["path"], fps=fps, max_frames=max_frames), ""
    except LOAD_ERRORS as exc:
        frames, error = _NO_FRAMES, load_failure(exc)
    return {**row, "frames": frames, "error": error, "decode_s": time.perf_counter() - t0}


def _actor_device() -> str:
    """The GPU Ray gave this actor (it sets CUDA_VISIBLE_DEVICES to it), else the CPU."""
    import ray

    return "cuda" if ray.get_gpu_ids() else "cpu"


class _ExtractFeatures:
    """An extract actor: the model set's feature extractor, loaded once."""

    def __init__(self, models: str, threads: int) -> None:
        import torch

        from dns_milvus.engine.modelset import ModelSet

        torch.set_num_threads(threads)
        self.models = ModelSet.load(models, device=_actor_device())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        features, errors, seconds = [], [], []
        for frames, error in zip(batch["frames"], batch["error"]):
            t0 = time.perf_counter()
            if error:
                features.append(_NO_FEATURES)
            else:
                try:
                    features.append(self.models.extractor(frames).numpy())
                except LOAD_ERRORS as exc:
                    features.append(_NO_FEATURES)
                    error = load_failure(exc)
            errors.append(error)
            seconds.append(time.perf_counter() - t0)
        out = {k: v for k, v in batch.items() if k not in ("frames", "error")}
        return {**out, "features": _objects(features), "error": np.array(errors, dtype=object),
                "extract_s": np.array(seconds)}  # fmt: skip


class _IndexAndWrite:
    """An index actor: the networks and its own connection to Milvus and the store."""

    def __init__(self, spec: IndexSpec, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.index = spec.open(device=_actor_device())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        report = IngestReport()
        stages = dict.fromkeys(("networks", "store", "milvus"), 0.0)
        ids = [str(v) for v in batch["video_id"]]
        loaded = []
        for vid, metadata, features, error in zip(ids, batch["metadata"], batch["features"], batch["error"]):
            if error:
                report.failed[vid] = str(error)
            else:
                loaded.append((SourceItem(vid, _given(features), json.loads(metadata)), features))
        index_batch(self.index, loaded, report, stages)  # raises if Milvus or the store is down
        errors = [report.failed.get(vid, "") for vid in ids]
        missing = [vid for vid in ids if vid not in report.failed and vid not in set(report.added)]
        for vid in missing:  # every video leaves with an outcome
            errors[ids.index(vid)] = "not indexed (no outcome reported)"
        share = {stage: seconds / max(1, len(ids)) for stage, seconds in stages.items()}
        return {
            "video_id": np.array(ids, dtype=object),
            "error": np.array(errors, dtype=object),
            "decode_s": batch["decode_s"],
            "extract_s": batch["extract_s"],
            **{f"{stage}_s": np.full(len(ids), seconds) for stage, seconds in share.items()},
        }


def _given(value: Any) -> Any:
    return lambda: value


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of arrays of different shapes (one per video)."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column
