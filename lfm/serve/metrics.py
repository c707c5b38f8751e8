"""Prometheus metrics for `GET /metrics`, on a registry of the server's own (several servers may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..engine.async_engine import Observer
from ..engine.llm_engine import LLMEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: LLMEngine) -> None:
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
        bm = engine.block_manager
        gauges = [
            ("lfm_num_requests_running", "Sequences in the running set", lambda: engine.num_running),
            ("lfm_num_requests_waiting", "Sequences waiting for admission (or preempted)", lambda: engine.num_waiting),
            ("lfm_kv_cache_blocks_used", "KV blocks held by running sequences", lambda: bm.num_used_blocks),
            ("lfm_kv_cache_blocks_free", "KV blocks free (including cached prefixes no sequence uses)",
             lambda: bm.num_free_blocks),
            ("lfm_kv_cache_usage_ratio", "Used / all KV blocks", lambda: bm.num_used_blocks / bm.num_blocks),
            ("lfm_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up",
             lambda: bm.hit_rate),
            ("lfm_num_preemptions", "Sequences preempted (recomputed later) since start",
             lambda: engine.scheduler.num_preemptions),
        ]
        for name, doc, fn in gauges:
            Gauge(name, doc, registry=r).set_function(fn)
        Gauge("lfm_kv_cache_blocks_total", "KV blocks in the pool", registry=r).set(bm.num_blocks)
        Gauge("lfm_kv_cache_block_size", "Tokens per KV block", registry=r).set(bm.block_size)

    def observer(self) -> Observer:
        return Observer(first_token=self.ttft.observe, inter_token=self.itl.observe,
                        prompt_tokens=self.prompt_tokens.inc, generated_tokens=self.generation_tokens.inc,
                        finished=lambda reason: self.finished.labels(reason=reason).inc())

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
