"""Prometheus metrics of the Serve ingress: latency as the client sees it, and the router's live state."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from router.step import RouterStats

PREFIX = "mistral_cluster"


class _RouterCollector:
    """Reads the router snapshot taken for this scrape (running, waiting, cache slots, tokens, expert load)."""

    def __init__(self) -> None:
        self.stats: RouterStats | None = None
        self.ready = False

    def collect(self):
        yield GaugeMetricFamily(
            f"{PREFIX}_ready", "1 when every shard is loaded and the router answers", value=1.0 if self.ready else 0.0
        )
        if self.stats is None:
            return
        s, health = self.stats.engine, self.stats.health
        yield GaugeMetricFamily(f"{PREFIX}_requests_running", "sequences in the running batch", value=s.running)
        yield GaugeMetricFamily(f"{PREFIX}_requests_waiting", "sequences waiting for a cache slot", value=s.waiting)
        yield GaugeMetricFamily(
            f"{PREFIX}_kv_cache_slots_in_use", "KV cache slots held by sequences", value=s.slots_in_use
        )
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_slots_total", "KV cache slots", value=s.slots_total)
        yield CounterMetricFamily(f"{PREFIX}_prompt_tokens", "prompt tokens accepted", value=s.tokens_in)
        yield CounterMetricFamily(f"{PREFIX}_generation_tokens", "tokens generated", value=s.tokens_out)
        yield CounterMetricFamily(f"{PREFIX}_steps", "engine steps run", value=s.steps)
        yield CounterMetricFamily(f"{PREFIX}_failed_steps", "engine steps that failed", value=s.failed_steps)
        kinds = {  # kind: decode (one token a sequence), mixed, prefill (prompt tokens only)
            "steps": "engine steps by kind",
            "tokens": "new tokens the steps of each kind carried",
            "seconds": "busy wall time ended by steps of each kind (the kinds add up to the busy time)",
        }
        for attr, doc in kinds.items():
            family = CounterMetricFamily(f"{PREFIX}_engine_step_{attr}", doc, labels=["kind"])
            for k in s.step_kinds:
                family.add_metric([k.kind], getattr(k, attr))
            yield family
        yield CounterMetricFamily(
            f"{PREFIX}_aborted_requests", "requests ended early (client gone, stop string)", value=s.aborted
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_shards_healthy",
            "1 when every shard answers, 0 while recovering",
            value=1.0 if health.healthy else 0.0,
        )
        yield CounterMetricFamily(f"{PREFIX}_shard_failures", "shard failures detected", value=health.shard_failures)
        yield CounterMetricFamily(f"{PREFIX}_recoveries", "recoveries completed", value=health.recoveries)
        if health.last_recovery_seconds is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_last_recovery_seconds", "how long the last recovery took", value=health.last_recovery_seconds
            )
        load = CounterMetricFamily(
            f"{PREFIX}_expert_tokens", "tokens routed to each expert", labels=["layer", "expert"]
        )
        for layer, row in enumerate(self.stats.expert_load):
            for expert, n in enumerate(row):
                load.add_metric([str(layer), str(expert)], n)
        yield load


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "time to first token", buckets=buckets, registry=self.registry
        )
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "time per output token after the first",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=self.registry,
        )
        self.requests = Counter(f"{PREFIX}_requests", "requests admitted", ["kind"], registry=self.registry)
        self.rejections = Counter(f"{PREFIX}_rejected_requests", "requests refused", ["status"], registry=self.registry)
        self.router = _RouterCollector()
        self.registry.register(self.router)

    def started(self, req) -> None:
        self.requests.labels(req.kind).inc()

    def rejected(self, status: int) -> None:
        self.rejections.labels(str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, n_tokens: int, seconds_after_first: float) -> None:
        if n_tokens > 1:
            self.tpot.observe(seconds_after_first / (n_tokens - 1))

    def render(self, router_stats: RouterStats | None, ready: bool) -> tuple[bytes, str]:
        self.router.stats = router_stats
        self.router.ready = ready and router_stats is not None and router_stats.health.healthy
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
