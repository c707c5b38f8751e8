"""Prometheus metrics for `GET /metrics`, on a registry of the server's own (several servers may share a process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..engine.async_engine import Observer

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, running: Callable[[], float], waiting: Callable[[], float], cache_used: Callable[[], float],
                 cache_budget: float) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lfm_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lfm_prompt_tokens", "Prompt tokens of generated requests", registry=r)
        self.generation_tokens = Counter("lfm_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter("lfm_request_finished", "Finished sequences by finish reason (abort: the client left)",
                                ["reason"], registry=r)
        self.ttft = Histogram("lfm_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("lfm_inter_token_latency_seconds", "Time between consecutive tokens of a sequence",
                             buckets=_LATENCY_BUCKETS, registry=r)
        Gauge("lfm_num_requests_running", "Sequences in the running set", registry=r).set_function(running)
        Gauge("lfm_num_requests_waiting", "Sequences waiting for admission", registry=r).set_function(waiting)
        Gauge("lfm_kv_cache_usage_bytes", "Cache bytes reserved by running sequences",
              registry=r).set_function(cache_used)
        Gauge("lfm_kv_cache_budget_bytes", "Cache memory budget", registry=r).set(cache_budget)
        Gauge("lfm_kv_cache_usage_ratio", "Reserved / budget", registry=r).set_function(
            lambda: cache_used() / cache_budget if cache_budget else 0.0)

    def observer(self) -> Observer:
        return Observer(first_token=self.ttft.observe, inter_token=self.itl.observe,
                        prompt_tokens=self.prompt_tokens.inc, generated_tokens=self.generation_tokens.inc,
                        finished=lambda reason: self.finished.labels(reason=reason).inc())

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
