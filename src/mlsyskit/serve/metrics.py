"""Prometheus metrics of one server, on its own ``CollectorRegistry`` (several apps per process
never share or clash). Gauges and the token counter are read from ``EngineService.stats()`` at
scrape time; latencies are observed per finished request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from mlsyskit.engine import RequestOutput
    from mlsyskit.serve.service import EngineService

# Seconds: CPU decode of a small model ranges from tens of ms (TTFT) to minutes (long outputs).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _ServiceCollector(Collector):
    """Scrape-time view of the service: queue, running requests, KV pool, tokens."""

    def __init__(self, service: EngineService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        s = self.service.stats()
        model = [s["model"]]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model"])
            g.add_metric(model, value)
            return g

        yield gauge("mlsyskit_queue_depth", "requests accepted and waiting to run in the engine", s["queue_depth"])
        yield gauge("mlsyskit_requests_running", "requests the engine is running", s["running"])
        yield gauge("mlsyskit_requests_in_flight", "requests accepted and not finished", s["in_flight"])
        yield gauge("mlsyskit_kv_blocks_used", "KV-cache blocks held by requests", s["kv_blocks_used"])
        yield gauge("mlsyskit_kv_blocks_total", "KV-cache blocks in the pool", s["kv_blocks_total"])
        yield from _tier_metrics(s.get("kv_tiers") or {}, model)
        c = CounterMetricFamily("mlsyskit_generated_tokens", "tokens generated (tokens/s is its rate)", labels=["model"])
        c.add_metric(model, s["tokens_generated"])
        yield c
        c = CounterMetricFamily("mlsyskit_requests_finished", "requests that ran to the end (stop or length)", labels=["model"])
        c.add_metric(model, s["requests_finished"])
        yield c
        c = CounterMetricFamily("mlsyskit_requests_aborted", "requests aborted (client gone, shutdown)", labels=["model"])
        c.add_metric(model, s["requests_aborted"])
        yield c
        c = CounterMetricFamily("mlsyskit_engine_steps", "engine steps run", labels=["model"])
        c.add_metric(model, s["engine_steps"])
        yield c


def _tier_metrics(t: dict[str, float], model: list[str]) -> Iterator[Metric]:
    """KV tiers (``--kv-offload``): blocks per tier, bytes moved each way, hit rates, copy time."""
    if not t:
        return
    g = GaugeMetricFamily("mlsyskit_kv_tier_blocks", "KV blocks held per tier (swapped: pinned for a preempted request)", labels=["model", "tier", "kind"])
    g.add_metric([*model, "cpu", "cached"], t["cpu_blocks_cached"])
    g.add_metric([*model, "cpu", "swapped"], t["cpu_blocks_swapped"])
    if "disk_blocks" in t:
        g.add_metric([*model, "disk", "cached"], t["disk_blocks"])
    yield g
    c = CounterMetricFamily("mlsyskit_kv_tier_bytes", "KV bytes copied between the pool and a tier", labels=["model", "direction"])
    for direction, key in (("pool_to_cpu", "bytes_pool_to_cpu"), ("cpu_to_pool", "bytes_cpu_to_pool"),
                           ("pool_to_disk", "bytes_to_disk"), ("disk_to_pool", "bytes_disk_to_pool")):
        if key in t:
            c.add_metric([*model, direction], t[key])
    yield c
    g = GaugeMetricFamily("mlsyskit_kv_tier_hit_rate", "prefix blocks found in a tier / looked up there", labels=["model", "tier"])
    g.add_metric([*model, "cpu"], t["cpu_hit_rate"])
    if "disk_hit_rate" in t:
        g.add_metric([*model, "disk"], t["disk_hit_rate"])
    yield g
    c = CounterMetricFamily("mlsyskit_kv_tier_copy_wait_seconds", "engine time spent waiting on KV copies to and from the tiers", labels=["model"])
    c.add_metric(model, t["copy_wait_s"])
    yield c
    c = CounterMetricFamily("mlsyskit_kv_preemptions_swapped", "preempted requests whose KV was swapped out instead of dropped", labels=["model"])
    c.add_metric(model, t["preemptions_swapped"])
    yield c


class ServerMetrics:
    """The metrics of one app: request counts by route and status, TTFT and latency."""

    def __init__(self, service: EngineService) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ServiceCollector(service))
        self.requests = Counter(
            "mlsyskit_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=self.registry
        )
        self.finished = Counter(
            "mlsyskit_generations", "finished generations by finish reason", ["finish_reason"], registry=self.registry
        )
        self.ttft = Histogram(
            "mlsyskit_time_to_first_token_seconds", "time from acceptance to the first token", buckets=TTFT_BUCKETS, registry=self.registry
        )
        self.latency = Histogram(
            "mlsyskit_e2e_latency_seconds", "time from acceptance to the last token", buckets=LATENCY_BUCKETS, registry=self.registry
        )

    def observe_output(self, out: RequestOutput) -> None:
        """Record one finished generation (its TTFT and end-to-end latency include queueing)."""
        self.finished.labels(out.finish_reason or "unknown").inc()
        if out.finish_reason == "abort":
            return
        if out.ttft is not None:
            self.ttft.observe(max(0.0, out.ttft))
        if out.latency is not None:
            self.latency.observe(max(0.0, out.latency))

    def observe_response(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
