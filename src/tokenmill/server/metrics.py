"""Prometheus metrics: one registry per app, engine gauges read at scrape time."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from tokenmill.outputs import EngineStats, RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TOKEN_TIME_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)


class Metrics:
    """What /metrics reports: requests, tokens, latencies, and what the engine holds now."""

    def __init__(self, stats: Callable[[], EngineStats], waiting: Callable[[], int]):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tokenmill_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "Prompt tokens of finished completions", registry=r)
        self.generation_tokens = Counter("tokenmill_generation_tokens", "Tokens generated for finished completions", registry=r)
        self.ttft = Histogram("tokenmill_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(
            "tokenmill_time_per_output_token_seconds", "Mean time per token after the first, per request", buckets=TOKEN_TIME_BUCKETS, registry=r
        )
        self.queue_time = Histogram("tokenmill_queue_time_seconds", "Arrival at the engine to first scheduled", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tokenmill_e2e_request_latency_seconds", "Arrival to last byte of a completion", buckets=LATENCY_BUCKETS, registry=r)
        Gauge("tokenmill_requests_running", "Requests with a sequence in the running batch", registry=r).set_function(lambda: stats().running_requests)
        Gauge("tokenmill_requests_waiting", "Requests queued, preempted or waiting to be taken in", registry=r).set_function(waiting)
        Gauge("tokenmill_kv_cache_usage_ratio", "Share of KV blocks held by sequences (cached blocks nobody holds are free)", registry=r).set_function(
            lambda: stats().kv_usage
        )
        r.register(_EngineCounters(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCounters:
    """Counters the engine keeps itself, exported as they are at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self._stats = stats

    def describe(self):
        return []

    def collect(self):
        s = self._stats()
        yield CounterMetricFamily("tokenmill_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", value=s.prefix_hit_tokens)
        yield CounterMetricFamily("tokenmill_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache", value=s.prefix_queried_tokens)
        yield CounterMetricFamily("tokenmill_preemptions", "Sequences that gave back their KV blocks to be recomputed", value=s.preemptions)


class RequestTimer:
    """One completion's timings and token counts, into /metrics and its request's log line."""

    def __init__(self, metrics: Metrics, state, arrived: float, choices: int):
        self.metrics, self.state, self.arrived, self.choices = metrics, state, arrived, choices
        self.first_token: float | None = None

    async def watch(self, outputs: AsyncGenerator[RequestOutput, None]) -> AsyncGenerator[RequestOutput, None]:
        """Pass outputs through, noting queue time, the first token and the finish."""
        async with aclosing(outputs):
            async for output in outputs:
                now = time.monotonic()
                if output.queue_time is not None:
                    self.metrics.queue_time.observe(output.queue_time)
                if self.first_token is None and output.completion_tokens:
                    self.first_token = now
                    self.state.ttft = now - self.arrived
                    self.metrics.ttft.observe(now - self.arrived)
                if output.finished:
                    self._finished(output, now)
                yield output

    def _finished(self, output: RequestOutput, now: float) -> None:
        if output.error:
            return
        self.state.usage = (output.prompt_tokens, output.completion_tokens)
        m = self.metrics
        m.prompt_tokens.inc(output.prompt_tokens)
        m.generation_tokens.inc(output.completion_tokens)
        m.e2e.observe(now - self.arrived)
        per_choice = output.completion_tokens / max(1, self.choices)
        if self.first_token is not None and per_choice > 1:
            m.tpot.observe((now - self.first_token) / (per_choice - 1))
