"""Cost growth of DnS search from 10k to 1M videos on the Milvus standalone server.

One collection on the embedded Milvus server (PyPI ``milvus``, started by this script) grows
through ``--sizes`` (default 10k, 100k, 1M). At each size: the insert rate, the index build
(``IndexConfig.for_rows(size, backend="server")``, the library's sizing rule, unless
``--index`` says otherwise), the disk and memory (RSS) of the server and of this process,
stage 1 alone at several probe depths with its recall@K against the exact top K, and full
two-stage queries (K = 1000, 5 % re-ranked) with p50/p95 per stage; the exhaustive fine-grained
search's time (extrapolated) as a ratio.

Inputs (deterministic from ``--seed``):

- Coarse vectors: L2-normalised 1024-d vectors with cluster structure, generated in blocks of
  10,000 rows (``ClusteredCorpus``): ``--topics`` topic centres drawn once; a video is its
  topic's centre plus Gaussian noise of relative size ``--spread``, each coordinate scaled by
  k^(-alpha/2) (a power-law spectrum: with alpha = 1 about 34 effective dimensions, where
  isotropic noise would make every point equally far from every other and ANN recall
  meaningless), then turned by a fixed random rotation and L2-normalised. Size N is the first N
  rows of one stream, so each size contains the previous one. Queries are fresh draws from the
  same distribution. The exact top K of each query comes from numpy (every query's scores are
  kept as the rows are generated); at sizes where the index is FLAT, Milvus's FLAT results are
  checked against it.
- Fine-grained objects: ``--pool`` synthetic videos (T in 30-120 frames) go through the
  release-size networks once; ``--objects`` distinct objects are written (object j holds pool
  video j mod pool), and video i's row points at object i mod objects, with that object's frame
  count and self-similarity. Objects are written unbound (no video id in their header), so
  every row that shares one reads and verifies it as its own. This keeps 1M videos within
  ~1 GB of objects instead of ~43 GB; the disk a real 1M-video store needs is reported
  (mean object size x N). Two candidates sharing an object are fetched once and one of them
  is not re-ranked: ``reranked_per_query`` shows how often that happened.
- Fetch: ``--fetch cold`` (default) drops every object's pages from the OS cache before each
  query (``posix_fadvise DONTNEED``), so fetches read the disk as they would when the objects
  of a large collection do not fit in memory; ``warm`` leaves them cached. The engine's own
  tensor cache is off.

Rows are written through ``VideoCollection.upsert`` (what ``DnSIndex.write_prepared`` calls
after writing the objects) into a released collection without an index, so that sealing
segments builds nothing while rows arrive; then the index is built and the collection loaded.

    python benchmarks/bench_scale.py --sizes 10000,100000            # ~15-25 min on 2 cores
    nice -n 10 python benchmarks/bench_scale.py                      # + 1M: ~1 h on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    DEFAULT_FRAMES,
    base_parser,
    collection_name,
    directory_bytes,
    frame_counts,
    gemm_gflops,
    load_model_set,
    milvus_server,
    parse_frames,
    peak_rss_mb,
    print_table,
    random_features,
    ratio,
    scratch_dir,
    settle_disk,
    setup_torch,
    summarize,
    write_report,
)
from bench_query_latency import exhaustive_fine

NAME = "scale"
TARGET_P50_MS = 150.0
TARGET_RECALL = 0.95
STAGES = ("stage1", "selector", "fetch", "fine")
INDEX_BUILD_TIMEOUT_S = 4 * 3600.0
# Server CPU (cores, averaged over the settle window) below which it counts as idle.
SETTLED_SERVER_CORES = 0.2
MB = 2**20


# -- synthetic coarse vectors ----------------------------------------------------------------------


class ClusteredCorpus:
    """A deterministic stream of clustered, L2-normalised coarse vectors (see the module doc).

    Row ``i`` depends only on the seed and on ``i // BLOCK``, so any range can be generated
    again, in any order, without holding the stream in memory.
    """

    BLOCK = 10_000

    def __init__(self, seed: int, dim: int, topics: int, spread: float, alpha: float) -> None:
        self.seed, self.dim, self.spread = seed, dim, spread
        rng = np.random.default_rng([seed, 0])
        self.rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        self.scale = (np.arange(1, dim + 1, dtype=np.float64) ** (-alpha / 2)).astype(np.float32)
        self.centres = rng.standard_normal((topics, dim), dtype=np.float32)

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        topic = rng.integers(0, len(self.centres), n)
        z = self.centres[topic] + self.spread * rng.standard_normal((n, self.dim), dtype=np.float32)
        z *= self.scale
        x = z @ self.rotation.T
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start..stop-1`` float32 [stop - start, dim]."""
        parts = []
        for block in range(start // self.BLOCK, math.ceil(stop / self.BLOCK)):
            first = block * self.BLOCK
            vectors = self._draw(np.random.default_rng([self.seed, 1, block]), self.BLOCK)
            parts.append(vectors[max(start, first) - first : min(stop, first + self.BLOCK) - first])
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def queries(self, n: int) -> np.ndarray:
        """``n`` query vectors from the same distribution (not in the collection)."""
        return self._draw(np.random.default_rng([self.seed, 2]), n)


def exact_top(scores: np.ndarray, k: int) -> list[set[int]]:
    """Row numbers of each query's ``k`` highest scores (the exact, FLAT answer)."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return [set(row.tolist()) for row in top]


def recall(found: Sequence[set[int]], truth: Sequence[set[int]]) -> float:
    return round(float(np.mean([len(f & t) / len(t) for f, t in zip(found, truth)])), 4)


def row_number(video_id: str) -> int:
    return int(video_id.removeprefix("video"))


def video_id(i: int) -> str:
    return f"video{i:07d}"


# -- processes, memory and disk ----------------------------------------------------------------------


def milvus_pid() -> int:
    """The embedded Milvus server: a child process of this one named ``milvus``."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if fields[1] == me and name == "milvus":
            return int(entry.name)
    raise RuntimeError("the embedded Milvus server process was not found among this process's children")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by this process and by the Milvus server between ``start`` and ``stop``,
    summed over laps. On a shared machine wall-clock times swing with the load; CPU time is the
    work itself, which is what a dedicated machine would spend its cores on."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.ours = self.server = 0.0
        self._marks = (0.0, 0.0)

    def start(self) -> None:
        self._marks = (time.process_time(), cpu_seconds(self.server_pid))

    def stop(self) -> None:
        self.ours += time.process_time() - self._marks[0]
        self.server += cpu_seconds(self.server_pid) - self._marks[1]

    def per(self, n: int, scale: float = 1000.0) -> dict[str, float]:
        """Mean CPU per item (ms by default): ours, the server's, and both."""
        n = max(1, n)
        return {
            "ours": round(self.ours * scale / n, 2),
            "milvus": round(self.server * scale / n, 2),
            "both": round((self.ours + self.server) * scale / n, 2),
        }


def rss_mb(pid: int | str = "self") -> dict[str, float]:
    """Resident memory now and its peak (``VmHWM``, since start or the last ``reset_peak``), MiB."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    values = {
        line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))
    }
    return {"rss_mb": round(values["VmRSS"] / 1024, 1), "peak_mb": round(values["VmHWM"] / 1024, 1)}


def reset_peak(pid: int) -> None:
    """Start a new peak-RSS window for ``pid`` (Linux: writing 5 to clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):  # not permitted: the peak then counts from the process start
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def disk_mb(root: Path, skip: Sequence[str] = ("bin", "lib")) -> dict[str, float]:
    """Bytes under ``root`` in MiB: the total, then each directory two levels down that holds at
    least 1 MiB (``data/rdb_data``: the message log, ``data/data``: segments and indexes, ...).
    ``skip`` leaves out the server's own program files."""
    out: dict[str, float] = {"total": 0.0}
    for child in sorted(root.iterdir()) if root.exists() else []:
        if child.name in skip:
            continue
        size = directory_bytes(child) if child.is_dir() else child.stat().st_size
        out["total"] += size / MB
        for grandchild in sorted(child.iterdir()) if child.is_dir() else []:
            sub = directory_bytes(grandchild) if grandchild.is_dir() else grandchild.stat().st_size
            if sub >= MB:
                out[f"{child.name}/{grandchild.name}"] = round(sub / MB, 1)
    out["total"] = round(out["total"], 1)
    return out


# -- filling -------------------------------------------------------------------------------------------


class ObjectPool:
    """``count`` shared fine-tensor objects, written as the collection grows."""

    def __init__(self, index: Any, records: Sequence[Any], count: int) -> None:
        from dns_milvus.store.base import fine_key

        self.index, self.records, self.count = index, records, count
        self.keys = [fine_key(index.name, f"shared{j:06d}") for j in range(count)]
        self.written = 0
        self.bytes = 0

    def record_of(self, j: int) -> Any:
        return self.records[j % len(self.records)]

    def ensure(self, n: int) -> dict[str, float]:
        """Write objects up to ``n`` (unbound, verified after writing as the engine does)."""
        from dns_milvus.store import encode_fine_tensor, put_verified

        want, started = min(n, self.count), time.perf_counter()
        added = want - self.written
        for j in range(self.written, want):
            record = self.record_of(j)
            blob = encode_fine_tensor(record.fine, record.payload_kind)
            put_verified(self.index.store, self.keys[j], blob)
            self.bytes += len(blob)
        self.written = max(self.written, want)
        seconds = time.perf_counter() - started
        return {"objects_added": added, "objects_per_s": round(added / seconds, 1) if added else None}

    def paths(self) -> list[Path]:
        root = Path(self.index.store.root)
        return [root.joinpath(*key.split("/")) for key in self.keys[: self.written]]

    def evict(self) -> None:
        """Drop the objects' pages from the OS cache, so the next reads go to the disk."""
        for path in self.paths():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def mean_object_bytes(self) -> float:
        return self.bytes / max(1, self.written)


def fill(
    index: Any, corpus: ClusteredCorpus, objects: ObjectPool, have: int, want: int, queries: np.ndarray,
    chunk: int,
) -> tuple[dict[str, Any], np.ndarray]:  # fmt: skip
    """Grow the collection from ``have`` to ``want`` rows; returns the rates and the new rows' scores
    against ``queries`` [Q, want - have] (the exact answer's raw material)."""
    from dns_milvus.milvus import VideoRow

    written = objects.ensure(want)
    client, name = index.client, index.collection.name
    # No index while rows arrive: a sealed segment of an indexed collection is built at once.
    client.release_collection(name)
    for index_name in client.list_indexes(name, field_name="coarse"):
        client.drop_index(name, index_name)
    scores, generate_s, upsert_s = [], 0.0, 0.0
    server = milvus_pid()
    cpu_started, server_cpu, wall_started = time.process_time(), cpu_seconds(server), time.perf_counter()
    starts = list(range(have, want, chunk))
    generate_cpu_s = 0.0

    def generate(start: int) -> tuple[np.ndarray, float]:
        began = time.thread_time()
        vectors = corpus.rows(start, min(want, start + chunk))
        return vectors, time.thread_time() - began

    # The next chunk is generated while this one is upserted (the upsert mostly waits on the server).
    with ThreadPoolExecutor(max_workers=1) as ahead:
        pending = ahead.submit(generate, have)
        for n, start in enumerate(starts):
            t0 = time.perf_counter()
            vectors, thread_cpu = pending.result()
            generate_cpu_s += thread_cpu
            if n + 1 < len(starts):
                pending = ahead.submit(generate, starts[n + 1])
            scores.append(queries @ vectors.T)
            rows = []
            for i, vector in enumerate(vectors, start):
                record = objects.record_of(i % objects.count)
                rows.append(VideoRow(video_id(i), vector, record.self_sim, objects.keys[i % objects.count],
                                     record.n_frames, record.payload_kind,
                                     segments=record.segments))  # fmt: skip
            t1 = time.perf_counter()
            index.collection.upsert(rows)
            generate_s += t1 - t0
            upsert_s += time.perf_counter() - t1
    cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - wall_started
    started = time.perf_counter()
    index.collection.flush()
    flush_s = time.perf_counter() - started
    server_cpu = cpu_seconds(server) - server_cpu
    added = want - have
    report = {
        **written,
        "rows_added": added,
        "rows_per_s": round(added / (upsert_s + flush_s), 1),
        "rows_per_s_wall": round(added / (wall_s + flush_s), 1),
        "upsert_s": round(upsert_s, 1),
        "flush_s": round(flush_s, 2),
        "generate_wait_s": round(generate_s, 1),
        # CPU per row: this process's (checking and packing rows for gRPC; generating the vectors
        # apart) and the server's.
        "cpu_ms_per_row": {
            "ours": round(1000 * (cpu_s - generate_cpu_s) / added, 3),
            "generate": round(1000 * generate_cpu_s / added, 3),
            "milvus": round(1000 * server_cpu / added, 3),
        },
        "sync_s": round(settle_disk(), 2),
    }
    return report, np.concatenate(scores, axis=1)


# -- index build ---------------------------------------------------------------------------------------


def build(index: Any, config: Any) -> dict[str, Any]:
    """Build ``config`` on the (released, index-less) collection, wait until every row is indexed,
    then load it and reopen the collection with that index. Returns build and load seconds."""
    from dns_milvus.milvus import VideoCollection

    client, name = index.client, index.collection.name
    client.release_collection(name)
    for index_name in client.list_indexes(name, field_name="coarse"):
        client.drop_index(name, index_name)
    params = client.prepare_index_params()
    params.add_index(
        field_name="coarse", index_type=config.kind, metric_type="IP", params=config.index_params()
    )
    server = milvus_pid()
    server_cpu = cpu_seconds(server)
    started = time.perf_counter()
    client.create_index(name, params)
    index_name = client.list_indexes(name, field_name="coarse")[0]
    deadline = time.monotonic() + INDEX_BUILD_TIMEOUT_S
    while True:
        info = client.describe_index(name, index_name)
        # Not pending_index_rows: while compaction merges the sealed segments (for tens of
        # minutes after a large insert) it stays near the collection's size although every
        # live segment is indexed.
        indexed = int(info.get("indexed_rows", 0)) >= int(info.get("total_rows", 0))
        if indexed and info.get("state") in (None, "Finished"):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"index {config.kind} not built within {INDEX_BUILD_TIMEOUT_S:g} s: {info}")
        time.sleep(0.5)
    build_s = time.perf_counter() - started
    build_cpu_s = cpu_seconds(server) - server_cpu
    started = time.perf_counter()
    # open() checks the built index against ``config`` and loads the collection.
    index.collection = VideoCollection.open(client, name, index=config)
    load_s = time.perf_counter() - started
    segments = sorted((int(s.num_rows) for s in client.list_loaded_segments(name)), reverse=True)
    return {
        "build_s": round(build_s, 1),
        "build_cpu_s": round(build_cpu_s, 1),
        "load_s": round(load_s, 1),
        "segments": len(segments),
        "segment_rows_max_min": [segments[0], segments[-1]] if segments else [],
    }


def settle(index: Any, config: Any, quiet_s: float) -> dict[str, Any]:
    """Let the server finish reorganising the collection before queries are timed.

    After a large insert, Milvus merges the ~25k-row sealed segments into larger ones for tens
    of minutes and indexes every merged segment again, on the same cores the queries need.
    This asks for a compaction at once (instead of on the server's timer), then waits until it
    has completed, every live row is indexed and the segment layout has not changed for
    ``quiet_s`` seconds with the server using at most ``SETTLED_SERVER_CORES`` over that window
    (measured at 1M rows: the layout held for 120 s while the server went on merging at 1-3
    CPU-s a query). Returns the wait, the server's CPU over it, and the final layout."""
    from dns_milvus.milvus import VideoCollection

    client, name = index.client, index.collection.name
    server = milvus_pid()
    server_cpu, started = cpu_seconds(server), time.perf_counter()
    job = client.compact(name)
    index_name = client.list_indexes(name, field_name="coarse")[0]
    layout: list[tuple[int, int]] = []
    stable_since = time.monotonic()
    cpu_samples: deque[tuple[float, float]] = deque()
    deadline = time.monotonic() + INDEX_BUILD_TIMEOUT_S
    while True:
        now_layout = sorted(
            (int(s.segment_id), int(s.num_rows)) for s in client.list_persistent_segments(name)
        )
        if now_layout != layout:
            layout, stable_since = now_layout, time.monotonic()
        info = client.describe_index(name, index_name)
        indexed = int(info.get("indexed_rows", 0)) >= int(info.get("total_rows", 0))
        done = client.get_compaction_state(job) == "Completed"
        now = time.monotonic()
        cpu_samples.append((now, cpu_seconds(server)))
        while now - cpu_samples[0][0] > quiet_s and len(cpu_samples) > 2:
            cpu_samples.popleft()
        window_s = now - cpu_samples[0][0]
        busy_cores = (cpu_samples[-1][1] - cpu_samples[0][1]) / window_s if window_s > 0 else math.inf
        quiet = now - stable_since >= quiet_s and busy_cores <= SETTLED_SERVER_CORES
        if done and indexed and quiet:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the collection did not settle within {INDEX_BUILD_TIMEOUT_S:g} s")
        time.sleep(5)
    index.collection = VideoCollection.open(client, name, index=config)
    loaded = sorted((int(s.num_rows) for s in client.list_loaded_segments(name)), reverse=True)
    return {
        "settle_s": round(time.perf_counter() - started, 1),
        "settle_cpu_s": round(cpu_seconds(server) - server_cpu, 1),
        "segments": len(loaded),
        "segment_rows_max_min": [loaded[0], loaded[-1]] if loaded else [],
    }


def probe_settings(
    config: Any, size: int, candidates: int, fractions: Sequence[float]
) -> list[dict[str, int]]:
    """Search-parameter overrides to sweep: IVF lists probed as fractions of nlist, HNSW's ef as
    multiples of K; the engine's own choice first (an empty override)."""
    engine = config.search_params(candidates, size)["params"]
    sweep: list[dict[str, int]] = [{}]
    if config.kind == "IVF_FLAT":
        values = {max(1, min(config.nlist, round(f * config.nlist))) for f in fractions}
        sweep += [{"nprobe": v} for v in sorted(values) if v != engine["nprobe"]]
    elif config.kind == "HNSW":
        sweep += [{"ef": candidates * m} for m in (2, 4)]
    return sweep


# -- measuring -------------------------------------------------------------------------------------------


def stage1_sweep(
    index: Any, query_vectors: np.ndarray, truth: Sequence[set[int]], settings: Sequence[dict[str, int]],
    candidates: int, size: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Stage 1 alone (the engine's hit fields) at each search setting: p50/p95 ms, CPU ms per
    query and recall@K."""
    out = []
    for override in settings:
        found, times = [], []
        cpu = CpuMeter(milvus_pid())
        for vector in query_vectors:
            cpu.start()
            started = time.perf_counter()
            hits = index.collection.search(vector[None], candidates, search_params=override or None)[0]
            times.append((time.perf_counter() - started) * 1000)
            cpu.stop()
            found.append({row_number(h.video_id) for h in hits})
        params = {**index.collection.info.index.search_params(candidates, size)["params"], **override}
        out.append({
            "params": params,
            "engine_default": not override,
            "recall": recall(found, truth),
            "recall_min": round(min(len(f & t) / len(t) for f, t in zip(found, truth)), 3),
            "ms": summarize(times),
            "cpu_ms": cpu.per(len(query_vectors)),
        })  # fmt: skip
    return out


def measure_queries(
    index: Any, models: Any, features: Sequence[np.ndarray], query_vectors: np.ndarray,
    objects: ObjectPool, args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """Full two-stage queries: each query video's features go through the networks (``encode``,
    timed), its coarse vector is replaced by the clustered query vector (same shape), and
    ``DnSIndex.search`` runs on that record. The first ``--warmup`` are not counted."""
    from dns_milvus.engine import VideoRecord

    samples: dict[str, list[float]] = {k: [] for k in ("encode", *STAGES, "total", "total_without_encode")}
    reranked, candidates_seen = [], set()
    cpu = CpuMeter(milvus_pid())
    for i, (feats, vector) in enumerate(zip(features, query_vectors)):
        if args.fetch == "cold":
            objects.evict()
        if i == args.warmup:
            cpu = CpuMeter(cpu.server_pid)  # count the timed queries only
        cpu.start()
        started = time.perf_counter()
        encoded = models.index_features([feats])[0]
        encode_ms = (time.perf_counter() - started) * 1000
        record = VideoRecord(vector, encoded.self_sim, encoded.fine, encoded.payload_kind)
        response = index.search(record, top_k=10, candidates=args.candidates, policy=args.policy)
        total = (time.perf_counter() - started) * 1000
        cpu.stop()
        if response.warnings:
            raise RuntimeError(f"search warned: {response.warnings[:3]}")
        if i < args.warmup:
            continue
        samples["encode"].append(encode_ms)
        for stage in STAGES:
            samples[stage].append(response.timings_ms[f"{stage}_ms"])
        samples["total"].append(total)
        samples["total_without_encode"].append(total - encode_ms)
        reranked.append(response.n_reranked)
        candidates_seen.add(response.n_candidates)
    result: dict[str, Any] = {k: summarize(v) for k, v in samples.items()}
    result["reranked_per_query"] = {"min": min(reranked), "median": float(np.median(reranked))}
    result["candidates_per_query"] = sorted(candidates_seen)
    result["cpu_ms_per_query"] = cpu.per(len(reranked))
    return result


def measure_size(
    index: Any, config: Any, size: int, models: Any, query_vectors: np.ndarray, warmup: int,
    truth: Sequence[set[int]], features: Sequence[np.ndarray], objects: ObjectPool, args: argparse.Namespace,
    full: bool,
) -> dict[str, Any]:  # fmt: skip
    """Build ``config`` at ``size`` rows and measure it: build, memory, the stage-1 sweep on the
    timed queries (``query_vectors[warmup:]``, whose exact answers are ``truth``) and, when
    ``full``, two-stage queries."""
    server = milvus_pid()
    reset_peak(server)
    built = build(index, config)
    settled = settle(index, config, args.settle_s) if args.settle_s > 0 else None
    memory_after_load = rss_mb(server)
    gemm_before = gemm_gflops()
    settings = probe_settings(config, size, args.candidates, args.probe_fractions)
    sweep = stage1_sweep(index, query_vectors[warmup:], truth, settings, args.candidates, size)
    queries = measure_queries(index, models, features, query_vectors, objects, args) if full else None
    result = {
        "rows": size,
        "index": config.kind,
        "build_params": config.build_params(),
        "search_params": config.search_params(args.candidates, size)["params"],
        **built,
        "settle": settled,
        "recall_at_k": sweep[0]["recall"],
        "stage1_sweep": sweep,
        "latency_ms": queries,
        "milvus_memory_mb": {
            "after_load": memory_after_load["rss_mb"],
            "peak_during_build_and_queries": rss_mb(server)["peak_mb"],
            "now": rss_mb(server)["rss_mb"],
        },
        "gemm_gflops_before_after": [round(gemm_before, 1), round(gemm_gflops(), 1)],
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    line = (f"[{size} {config.kind} {result['build_params']}] build {built['build_s']} s, load "
            f"{built['load_s']} s, {built['segments']} segments, recall@{args.candidates} "
            f"{sweep[0]['recall']}, stage 1 p50 {sweep[0]['ms']['p50']:.0f} ms")  # fmt: skip
    if settled:
        line += f", settled in {settled['settle_s']} s to {settled['segments']} segments"
    if queries:
        line += f", total p50 {queries['total']['p50']:.0f} ms"
    print(line, flush=True)
    return result


# -- main ------------------------------------------------------------------------------------------------


def index_configs(size: int, args: argparse.Namespace) -> list[tuple[Any, bool]]:
    """(config, run full queries?) for ``size``: alternatives first (stage 1 only), then the main
    index, so the collection ends on the main one."""
    from dns_milvus.milvus import IndexConfig

    main = IndexConfig.for_rows(size, backend="server") if args.index is None else IndexConfig(args.index)
    configs: list[tuple[Any, bool]] = []
    if "HNSW" in args.compare and main.kind != "HNSW" and size <= args.hnsw_max_rows:
        configs.append((IndexConfig("HNSW"), False))
    if "FLAT" in args.compare and main.kind != "FLAT" and size <= args.flat_max_rows:
        configs.append((IndexConfig("FLAT"), False))
    configs.append((main, True))
    return configs


def run(args: argparse.Namespace, work: Path, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    from dns_milvus.engine import DnSIndex
    from dns_milvus.engine.cache import ByteLRUCache

    rng = np.random.default_rng(args.seed)
    models = load_model_set(work / "models", seed=args.seed)
    started = time.perf_counter()
    pool = []
    for n in frame_counts(rng, args.pool, args.frames):
        pool.extend(models.index_features([random_features(rng, int(n))]))
    print(
        f"pool: {len(pool)} videos through the networks in {time.perf_counter() - started:.1f} s", flush=True
    )
    n_queries = args.warmup + args.queries
    features = [random_features(rng, args.query_frames) for _ in range(n_queries)]
    corpus = ClusteredCorpus(args.seed, models.coarse_dim, args.topics, args.spread, args.alpha)
    query_vectors = corpus.queries(n_queries)
    exhaustive = exhaustive_fine(models, models.index_features([features[0]])[0], pool,
                                 args.exhaustive_sample, args.threads)  # fmt: skip
    print(f"exhaustive fine student: {exhaustive['pairs_per_s']} pairs/s", flush=True)

    sizes: list[dict[str, Any]] = []
    objects_dir = work / "objects"
    with milvus_server(work / "milvus") as uri:
        index = DnSIndex(uri, models=models, store=f"file://{objects_dir}?fsync=false",
                         collection=collection_name("scale"))  # fmt: skip
        index.local_reranker.cache = ByteLRUCache(0)  # every fetch reads the store
        objects = ObjectPool(index, pool, args.objects)
        all_scores = np.zeros((n_queries, 0), np.float32)
        have = 0
        try:
            for size in sorted(args.sizes):
                gemm = gemm_gflops()
                filled, scores = fill(index, corpus, objects, have, size, query_vectors, args.chunk)
                all_scores, have = np.concatenate([all_scores, scores], axis=1), size
                print(f"[{size}] filled: {filled}", flush=True)
                truth = exact_top(all_scores[args.warmup :], args.candidates)
                results = [
                    measure_size(index, config, size, models, query_vectors, args.warmup, truth, features,
                                 objects, args, full)
                    for config, full in index_configs(size, args)
                ]  # fmt: skip
                main = results[-1]
                milvus_dir, ours = work / "milvus", rss_mb()
                sizes.append({
                    "rows": size,
                    "fill": filled,
                    "gemm_gflops_before_fill": round(gemm, 1),
                    "main": main,
                    "alternatives": results[:-1],
                    "disk_mb": {
                        "milvus": disk_mb(milvus_dir),
                        "objects_written": round(directory_bytes(objects_dir) / MB, 1),
                        "objects_if_distinct": round(objects.mean_object_bytes() * size / MB, 1),
                    },
                    "our_memory_mb": ours,
                    "exhaustive_fine_s": round(exhaustive["ms_per_pair"] * size / 1000, 2),
                })  # fmt: skip
                if main["latency_ms"]:
                    sizes[-1]["exhaustive_over_dns_p50"] = ratio(
                        exhaustive["ms_per_pair"] * size, main["latency_ms"]["total"]["p50"], 1
                    )
                save({"pool_videos": len(pool), "exhaustive_fine": exhaustive, "sizes": sizes})
        finally:
            index.collection.drop()
            index.close()
    return {"pool_videos": len(pool), "exhaustive_fine": exhaustive, "sizes": sizes}


def print_summary(body: dict[str, Any], args: argparse.Namespace) -> None:
    def cell(stats: dict[str, float]) -> str:
        return f"{stats['p50']:.0f}/{stats['p95']:.0f}"

    print(f"\nper size (p50/p95 ms; K = {args.candidates}, {args.policy} re-ranked, fetch {args.fetch}):")
    table = []
    for s in body["sizes"]:
        m, lat = s["main"], s["main"]["latency_ms"]
        table.append([
            s["rows"], f"{m['index']} {m['build_params'] or ''} {m['search_params'] or ''}".strip(),
            *(cell(lat[k]) for k in ("encode", *STAGES, "total", "total_without_encode")),
            lat.get("cpu_ms_per_query", {}).get("ours"), lat.get("cpu_ms_per_query", {}).get("milvus"),
            m["recall_at_k"], s["exhaustive_fine_s"], f"{s.get('exhaustive_over_dns_p50')}x",
            s["main"]["load_average_1m"], "/".join(f"{v:.0f}" for v in m["gemm_gflops_before_after"]),
        ])  # fmt: skip
    print_table(["rows", "index", "encode", *STAGES, "total", "w/o encode", "CPU ms ours",
                 "CPU ms milvus", f"recall@{args.candidates}", "exhaustive s", "ratio", "load",
                 "GEMM GF/s"], table)  # fmt: skip

    print("\ncosts per size (insert through VideoCollection.upsert; CPU = this process + the server):")
    table = []
    for s in body["sizes"]:
        m, fill_ = s["main"], s["fill"]
        cpu_row = fill_.get("cpu_ms_per_row", {})
        table.append([
            s["rows"], fill_["rows_per_s"], cpu_row.get("ours"), cpu_row.get("milvus"), m["build_s"],
            m.get("build_cpu_s"), m["load_s"], m["segments"], s["disk_mb"]["milvus"]["total"],
            s["disk_mb"]["objects_written"], s["disk_mb"]["objects_if_distinct"],
            m.get("settle", {}).get("settle_s"), m.get("settle", {}).get("settle_cpu_s"),
            m["milvus_memory_mb"]["after_load"], m["milvus_memory_mb"]["peak_during_build_and_queries"],
            s["our_memory_mb"]["rss_mb"],
        ])  # fmt: skip
    print_table(["rows", "rows/s", "CPU ms/row ours", "CPU ms/row milvus", "build s", "build CPU s",
                 "load s", "segments", "milvus disk MB", "objects MB", "objects 1/video MB",
                 "settle s", "settle CPU s", "milvus RSS MB", "milvus peak MB", "our RSS MB"],
                table)  # fmt: skip

    print("\nstage 1 alone by index and search setting (recall@K against the exact top K):")
    rows = []
    for s in body["sizes"]:
        for r in [*s["alternatives"], s["main"]]:
            for point in r["stage1_sweep"]:
                rows.append([s["rows"], r["index"], r["build_s"], r.get("build_cpu_s"),
                             r["milvus_memory_mb"]["after_load"],
                             point["params"], point["recall"], point["recall_min"], point["ms"]["p50"],
                             point.get("cpu_ms", {}).get("milvus"),
                             "engine" if point["engine_default"] else ""])  # fmt: skip
    print_table(["rows", "index", "build s", "build CPU s", "milvus RSS MB", "params",
                 "recall", "min", "p50 ms", "CPU ms milvus", ""], rows)  # fmt: skip
    if body.get("projections", {}).get("hnsw"):
        print(f"\nHNSW projected: {body['projections']['hnsw']}")

    last = body["sizes"][-1]
    p50 = last["main"]["latency_ms"]["total"]["p50"]
    print(
        f"\nat {last['rows']} rows: p50 total {p50:.0f} ms (target <= {TARGET_P50_MS:.0f}: "
        f"{'met' if p50 <= TARGET_P50_MS else 'NOT met'} at load average {last['main']['load_average_1m']}), "
        f"recall@{args.candidates} {last['main']['recall_at_k']} (target >= {TARGET_RECALL}: "
        f"{'met' if last['main']['recall_at_k'] >= TARGET_RECALL else 'NOT met'})"
    )


def projections(body: dict[str, Any]) -> dict[str, Any]:
    """Power-law fits t = a N^b of the HNSW builds measured at two or more sizes, carried to the
    largest size run (HNSW's build is too slow on 2 cores to run at 1M)."""
    points = [(s["rows"], a["build_s"], a["milvus_memory_mb"]["after_load"])
              for s in body["sizes"] for a in s["alternatives"] if a["index"] == "HNSW"]  # fmt: skip
    largest = max(s["rows"] for s in body["sizes"])
    if len(points) < 2 or max(p[0] for p in points) >= largest:
        return {}
    rows, build, memory = (np.array(v, dtype=np.float64) for v in zip(*points))
    exponent, log_a = np.polyfit(np.log(rows), np.log(build), 1)
    slope, intercept = np.polyfit(rows, memory, 1)  # memory grows linearly with the rows
    return {
        "hnsw": {
            "measured_rows": rows.astype(int).tolist(),
            "build_exponent": round(float(exponent), 2),
            "rows": largest,
            "build_s": round(float(np.exp(log_a) * largest**exponent), 0),
            "milvus_memory_mb": round(float(intercept + slope * largest), 0),
        }
    }


def merge_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One report with the sizes of several runs (of the same options), by size; where two runs
    measured a size, the later report's is kept, with the other index kinds either measured
    there. Each size records the command that measured it."""
    by_rows: dict[int, dict[str, Any]] = {}
    for report in reports:
        for size in report["sizes"]:
            earlier = by_rows.get(size["rows"], {}).get("alternatives", [])
            others = {a["index"]: a for a in [*earlier, *size["alternatives"]]}
            others.pop(size["main"]["index"], None)
            by_rows[size["rows"]] = {
                **size,
                "alternatives": list(others.values()),
                "command": report["command"],
            }
    merged = {**reports[-1], "sizes": [by_rows[rows] for rows in sorted(by_rows)]}
    add_derived(merged)
    return merged


def add_derived(body: dict[str, Any]) -> None:
    """The HNSW projection and the range of load averages the sizes were measured at."""
    body["projections"] = projections(body)
    loads = [s["main"]["load_average_1m"] for s in body["sizes"]]
    body["load_average"] = f"{min(loads):.0f}-{max(loads):.0f}" if loads else None


def plot(body: dict[str, Any], path: Path) -> None:
    """Cost against collection size, log-log: latency per stage, build and insert time, memory and disk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    sizes = body["sizes"]
    rows = np.array([s["rows"] for s in sizes])
    fig, grid = plt.subplots(2, 2, figsize=(12, 9))
    axes = grid.ravel()
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    sparse = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else "")
    ax = axes[0]
    for key in (*STAGES, "total", "total_without_encode"):
        values = [s["main"]["latency_ms"][key]["p50"] for s in sizes]
        style = "-" if key.startswith("total") else "--"
        ax.plot(rows, values, style, marker="o", label=key.replace("_", " "))
    ax.axhline(TARGET_P50_MS, color="grey", lw=0.8, ls=":", label=f"target {TARGET_P50_MS:.0f} ms")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="videos",
        ylabel="p50 ms a query",
        title="query latency (K = 1000, 5 %)",
    )
    ax.legend(fontsize=7)

    ax = axes[1]
    ax.plot(rows, [s["main"]["build_s"] for s in sizes], marker="o", label="index build (engine's choice)")
    ax.plot(rows, [s["rows"] / s["fill"]["rows_per_s"] for s in sizes], marker="o",
            label="insert all rows at the measured rate")  # fmt: skip
    hnsw = [(s["rows"], a["build_s"]) for s in sizes for a in s["alternatives"] if a["index"] == "HNSW"]
    if hnsw:
        ax.plot(*zip(*hnsw), marker="s", label="HNSW build (M 16, efC 200)")
    projected = body.get("projections", {}).get("hnsw")
    if projected:
        last = max(hnsw)
        ax.plot([last[0], projected["rows"]], [last[1], projected["build_s"]], ls=":", color="C2",
                label=f"HNSW projected (N^{projected['build_exponent']})")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="videos", ylabel="seconds", title="build and insert time")
    ax.legend(fontsize=7)

    ax = axes[2]
    gib = 1024.0
    ax.plot(rows, [s["main"]["milvus_memory_mb"]["after_load"] / gib for s in sizes], marker="o",
            label="Milvus server RSS (loaded)")  # fmt: skip
    ax.plot(rows, [s["our_memory_mb"]["rss_mb"] / gib for s in sizes], marker="o", label="our process RSS")
    ax.plot(rows, [s["disk_mb"]["milvus"]["total"] / gib for s in sizes], marker="o", label="Milvus disk")
    ax.plot(rows, [s["disk_mb"]["objects_if_distinct"] / gib for s in sizes], marker="o", ls="--",
            label="objects, one per video")  # fmt: skip
    hnsw_memory = [(s["rows"], a["milvus_memory_mb"]["after_load"] / gib)
                   for s in sizes for a in s["alternatives"] if a["index"] == "HNSW"]  # fmt: skip
    if hnsw_memory:
        ax.plot(*zip(*hnsw_memory), marker="s", label="Milvus RSS with HNSW")
    ax.set(xscale="log", yscale="log", xlabel="videos", ylabel="GiB", title="memory and disk")
    ax.legend(fontsize=7)

    ax = axes[3]
    cpu = [s["main"]["latency_ms"].get("cpu_ms_per_query") for s in sizes]
    if all(cpu):
        ax.plot(rows, [c["milvus"] for c in cpu], marker="o", label="Milvus server (stage 1)")
        ax.plot(
            rows, [c["ours"] for c in cpu], marker="o", label="our process (encode, selector, fetch, fine)"
        )
        ax.plot(rows, [c["both"] for c in cpu], marker="o", label="both")
    for a in axes:
        a.yaxis.set_major_formatter(plain)
        a.yaxis.set_minor_formatter(sparse)
    recalls = ", ".join(f"{s['rows']:,}: {s['main']['recall_at_k']:.3f}" for s in sizes)
    ax.set(xscale="log", yscale="log", xlabel="videos", ylabel="CPU ms a query",
           title=f"CPU time a query (load-independent); recall@1000 {recalls}")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.suptitle(f"DnS on the Milvus server, 2 CPU cores (load average {body.get('load_average', '?')})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="collection sizes, ascending")
    parser.add_argument("--index", default=None, choices=("FLAT", "IVF_FLAT", "HNSW"),
                        help="main index (default: IndexConfig.for_rows for each size)")  # fmt: skip
    parser.add_argument(
        "--compare", default="HNSW", help="other index kinds measured (stage 1 only): HNSW, FLAT"
    )
    parser.add_argument("--hnsw-max-rows", type=int, default=100_000, help="skip HNSW above this many rows")
    parser.add_argument("--flat-max-rows", type=int, default=100_000, help="skip FLAT above this many rows")
    parser.add_argument("--probe-fractions", default="0.05,0.075,0.1,0.15,0.2",
                        help="IVF lists probed in the stage-1 sweep, as fractions of nlist")  # fmt: skip
    parser.add_argument("--queries", type=int, default=30, help="timed queries per size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed queries before them")
    parser.add_argument("--query-frames", type=int, default=60, help="frames of each query video")
    parser.add_argument("--candidates", type=int, default=1000, help="stage-1 candidates K")
    parser.add_argument("--policy", default="5%", help="selection policy of stage 2")
    parser.add_argument("--fetch", choices=("cold", "warm"), default="cold", help="OS cache state of objects")
    parser.add_argument("--pool", type=int, default=100, help="distinct videos run through the networks")
    parser.add_argument("--objects", type=int, default=20_000, help="distinct objects the rows share")
    parser.add_argument(
        "--frames", type=parse_frames, default=DEFAULT_FRAMES, help="frame-count range of the pool"
    )
    parser.add_argument("--topics", type=int, default=10_000, help="topic centres of the coarse vectors")
    parser.add_argument(
        "--spread", type=float, default=0.5, help="within-topic noise relative to the centres"
    )
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the coarse spectrum")
    parser.add_argument("--chunk", type=int, default=10_000, help="rows generated and upserted at a time")
    parser.add_argument(
        "--exhaustive-sample", type=int, default=500, help="targets the exhaustive time is measured on"
    )
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the Milvus data and objects in --workdir"
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=120.0,
        help="before timing queries, wait for compaction and its re-indexing to finish and the "
        "segment layout to hold this long (0: measure right after the build)",
    )
    parser.add_argument("--plot", type=Path, default=None, help="draw cost against size here (PNG)")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        help="summarise and plot reports instead of running (their sizes merged; a later report's wins)",
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        report = merge_reports([json.loads(path.read_text()) for path in args.from_json])
        print_summary(report, argparse.Namespace(**report["options"]))
        if args.plot is not None:
            plot(report, args.plot)
        return 0
    if args.quick:
        args.sizes, args.queries, args.warmup, args.pool, args.objects = "3000,30000", 5, 1, 8, 2000
        args.exhaustive_sample, args.hnsw_max_rows, args.topics, args.settle_s = 48, 3000, 300, 10.0
    args.sizes = sorted({int(v) for v in args.sizes.split(",") if v.strip()})
    args.compare = sorted({k.strip().upper() for k in args.compare.split(",") if k.strip()})
    args.probe_fractions = [float(v) for v in args.probe_fractions.split(",") if v.strip()]
    setup_torch(args.threads)
    # A terminated run still drops its collection, stops the server and removes its scratch data.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    method = {
        "coarse": (f"ClusteredCorpus: {args.topics} topics, spread {args.spread}, spectrum "
                   f"k^-{args.alpha}/2, random rotation, L2-normalised; exact top K by numpy"),
        "objects": (f"{args.objects} shared unbound objects of {args.pool} network outputs; "
                    "row i -> object i mod objects"),
        "fetch": args.fetch,
        "rows": "VideoCollection.upsert into a released collection without an index, then flush",
        "exhaustive": "fine student over a sample of tensors in memory, extrapolated linearly to N",
    }  # fmt: skip

    def save(body: dict[str, Any]) -> None:
        """Write the report so far (after every size: a failure at 1M keeps the smaller sizes)."""
        add_derived(body)
        write_report(args.out, NAME, args, {"method": method, "targets": {"p50_ms": TARGET_P50_MS,
                     "recall_at_k": TARGET_RECALL}, **body, "peak_rss_mb": peak_rss_mb()})  # fmt: skip

    with scratch_dir(args.workdir, "dns-bench-scale-") as work:
        try:
            body = run(args, work, save)
        finally:
            if args.workdir is not None and not args.keep_data:
                for name in ("milvus", "objects"):
                    shutil.rmtree(work / name, ignore_errors=True)
    add_derived(body)
    print_summary(body, args)
    if args.plot is not None:
        plot(body, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
