"""Prometheus metrics of the sidecar, in a registry of its own (served at ``GET /metrics``).

- ``dns_reranker_requests_total{protocol,method,status}``: finished requests by outcome;
- ``dns_reranker_stage_seconds{stage}``: server-side latency of each stage (queue, selector,
  fetch, fine, total) and of whole requests;
- ``dns_reranker_batch_pairs`` / ``dns_reranker_batch_jobs``: size of each fine-grained batch;
- ``dns_reranker_scorer_busy_seconds_total``: time the scoring thread computed; its rate is
  the device's duty cycle (1.0 = never idle);
- ``dns_reranker_cache_*``: the fine-tensor cache (hits, misses, hit ratio, bytes);
- ``dns_reranker_inflight_requests``, ``dns_reranker_queued_pairs``,
  ``dns_reranker_queued_frame_pairs``: current load.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from dns_milvus.sidecar.core import RerankCore

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZE_BUCKETS = tuple(float(2**i) for i in range(0, 17))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dns_reranker_requests", "Finished requests by protocol, method and status.",
            ["protocol", "method", "status"], registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "dns_reranker_stage_seconds", "Server-side latency by stage.", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_pairs = Histogram(
            "dns_reranker_batch_pairs", "Query/target pairs in each fine-grained batch.",
            buckets=_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_jobs = Histogram(
            "dns_reranker_batch_jobs", "Requests' jobs merged into each fine-grained batch.",
            buckets=_SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.scorer_busy = Counter(
            "dns_reranker_scorer_busy_seconds",
            "Seconds the fine-grained scoring thread spent computing.",
            registry=r,
        )
        self.inflight = Gauge("dns_reranker_inflight_requests", "Requests being served.", registry=r)
        self.queued_pairs = Gauge("dns_reranker_queued_pairs", "Pairs admitted to the batcher.", registry=r)
        self.queued_frame_pairs = Gauge(
            "dns_reranker_queued_frame_pairs", "Frame pairs of the work admitted to the batcher.", registry=r
        )

    def bind(self, core: RerankCore) -> None:
        """Read live values (load, cache) from the core at scrape time."""
        self.inflight.set_function(lambda: core.inflight)
        self.queued_pairs.set_function(lambda: core.reranker.batcher.admitted_pairs)
        self.queued_frame_pairs.set_function(lambda: core.reranker.batcher.admitted_frame_pairs)
        self.registry.register(_CacheCollector(core))

    def observe_request(self, protocol: str, method: str, status: str, seconds: float) -> None:
        self.requests.labels(protocol, method, status).inc()
        self.stage_seconds.labels(f"{protocol}_request").observe(seconds)

    def observe_timings(self, timings_ms: Mapping[str, float]) -> None:
        for name, ms in timings_ms.items():
            self.stage_seconds.labels(name.removesuffix("_ms")).observe(ms / 1000.0)

    def observe_batch(self, jobs: int, pairs: int, busy_s: float, waits_s: list[float]) -> None:
        self.batch_jobs.observe(jobs)
        self.batch_pairs.observe(pairs)
        self.scorer_busy.inc(busy_s)
        for wait in waits_s:
            self.stage_seconds.labels("batch_wait").observe(wait)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector(Collector):
    def __init__(self, core: RerankCore) -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        cache = self.core.reranker.cache
        yield CounterMetricFamily("dns_reranker_cache_hits", "Fine-tensor cache hits.", value=cache.hits)
        yield CounterMetricFamily(
            "dns_reranker_cache_misses", "Fine-tensor cache misses.", value=cache.misses
        )
        yield GaugeMetricFamily(
            "dns_reranker_cache_hit_ratio", "Hits / lookups since start.", value=cache.hit_ratio
        )
        yield GaugeMetricFamily(
            "dns_reranker_cache_bytes", "Bytes of decoded tensors cached.", value=cache.nbytes
        )
