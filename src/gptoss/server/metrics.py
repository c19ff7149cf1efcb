"""Prometheus metrics, on a registry of the app's own (several apps can live in one process)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptoss.inference import AsyncEngine, Runner

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gptoss_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.duration = Histogram(
            "gptoss_http_request_duration_seconds",
            "Time to the end of the response",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gptoss_time_to_first_token_seconds",
            "Time from request to first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "gptoss_decode_batch_size",
            "Sequences decoded together, per step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.prompt_tokens = Counter("gptoss_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter(
            "gptoss_completion_tokens", "Tokens generated for clients", registry=r
        )
        self.harmony_repairs = Counter(
            "gptoss_harmony_repairs", "Malformed harmony output repaired by the parser", ["kind"], registry=r
        )
        self.format_violations = Counter(
            "gptoss_response_format_violations",
            "Answers that do not satisfy the requested JSON format",
            registry=r,
        )
        stats = engine.stats
        Gauge("gptoss_sequences_running", "Sequences in the decode batch", registry=r).set_function(
            lambda: stats.running
        )
        Gauge("gptoss_sequences_waiting", "Sequences queued for prefill", registry=r).set_function(
            lambda: stats.waiting
        )
        Gauge("gptoss_batch_capacity", "Sequences that can decode together", registry=r).set_function(
            lambda: engine.runner.max_batch
        )
        r.register(_PrefixCacheCollector(engine.runner))
        r.register(_SpeculationCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PrefixCacheCollector:
    """The prefix cache's own counters, read at scrape time (none without a prefix cache)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def collect(self) -> Iterator[Metric]:
        cache = getattr(self.runner, "prefix_cache", None)
        if cache is None:
            return
        stats = cache.stats
        yield CounterMetricFamily(
            "gptoss_prefix_cache_hits", "Prompts that began from a cached prefix", stats.hits
        )
        yield CounterMetricFamily("gptoss_prefix_cache_misses", "Prompts with no cached prefix", stats.misses)
        yield CounterMetricFamily(
            "gptoss_prefix_cache_hit_tokens", "Prompt tokens restored instead of prefilled", stats.hit_tokens
        )
        yield CounterMetricFamily(
            "gptoss_prefix_cache_evictions", "Cached prefixes dropped for the memory budget", stats.evictions
        )
        yield GaugeMetricFamily("gptoss_prefix_cache_bytes", "Memory the prefix cache holds", cache.nbytes)
        yield GaugeMetricFamily(
            "gptoss_prefix_cache_budget_bytes", "Memory the prefix cache may hold", cache.budget_bytes
        )
        yield GaugeMetricFamily(
            "gptoss_prefix_cache_entries", "Points a prompt can resume from", cache.entries
        )


class _SpeculationCollector:
    """Speculative decoding's counters, read at scrape time (none when it is off)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        speculation = self.engine.engine.speculation
        if speculation is None:
            return
        stats = speculation.stats
        yield CounterMetricFamily(
            "gptoss_speculative_verify_passes",
            "Forward passes that verified proposed tokens",
            stats.verify_passes,
        )
        yield CounterMetricFamily(
            "gptoss_speculative_decode_passes",
            "One-token passes of lone streams (nothing worth verifying)",
            stats.decode_passes,
        )
        yield CounterMetricFamily(
            "gptoss_speculative_proposed_tokens", "Proposed tokens verified", stats.proposed
        )
        yield CounterMetricFamily(
            "gptoss_speculative_accepted_tokens", "Proposed tokens the model agreed with", stats.accepted
        )
        yield CounterMetricFamily(
            "gptoss_speculative_emitted_tokens", "Tokens produced by verify passes", stats.emitted
        )
        yield GaugeMetricFamily(
            "gptoss_speculative_acceptance", "Accepted / proposed tokens so far", stats.acceptance
        )
        yield GaugeMetricFamily(
            "gptoss_speculative_tokens_per_forward",
            "Tokens per forward pass of lone streams (1 without speculation)",
            stats.tokens_per_forward,
        )


class MetricsMiddleware:
    """Counts every request by route template (not raw path, which would explode the labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.duration.labels(route).observe(time.perf_counter() - start)
