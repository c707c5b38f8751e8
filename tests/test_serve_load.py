"""Load behaviour: 32 concurrent streams with random client disconnects, a bounded waiting queue (429), and
/metrics that agree with what happened."""

from __future__ import annotations

import random
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from openai import OpenAI

from lfm.serve import ServeConfig, ServerState, ServerThread

MODEL = "tiny"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices on a shared 2-core machine: one intra-op thread is several times faster."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ([0-9.eE+\-]+|NaN)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_idle(state: ServerState, url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["lfm_num_requests_running"] == 0 and m["lfm_num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"still busy: {m}"
        time.sleep(0.05)


def test_32_concurrent_streams_with_disconnects_free_every_slot(checkpoints):
    cfg = ServeConfig(model=str(checkpoints["dense"]), served_model_name=MODEL, dtype="float32", max_num_seqs=8,
                      threads=1)
    state = ServerState(cfg)
    with ServerThread(state) as s:
        client = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        before = metrics(s.url)
        rng = random.Random(0)
        plans = [rng.choice([None, 1, 2, 4]) for _ in range(32)]  # None = read to the end, k = leave after k chunks

        def one(i: int) -> tuple[int, str | None]:  # (chunks read, or completion tokens at the end; finish)
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"story number {i}"}], max_tokens=24,
                temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            n, reason = 0, None
            for chunk in stream:
                n += 1
                if chunk.choices and chunk.choices[0].finish_reason:
                    reason = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    n = chunk.usage.completion_tokens
                if plans[i] is not None and n >= plans[i]:
                    stream.close()  # the client goes away mid-generation
                    break
            return n, reason

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, range(32)))
        for plan, (n, reason) in zip(plans, results):
            if plan is None:
                assert reason == "length" and n == 24
        after = wait_idle(state, s.url)
        eng = state.llm.engine
        assert eng.block_manager.num_used_blocks == 0 and not eng.scheduler.running and not eng.scheduler.waiting
        assert len(eng.block_manager.free_slots) == eng.block_manager.num_slots and not eng.seqs
        assert not state.engine._streams and after["lfm_kv_cache_blocks_used"] == 0
        key = 'lfm_requests_total{endpoint="/v1/chat/completions",status="200"}'
        assert after[key] - before.get(key, 0) == 32
        finished = sum(1 for p in plans if p is None)
        assert after["lfm_generation_tokens_total"] - before.get("lfm_generation_tokens_total", 0) >= 24 * finished
        ttft = after["lfm_time_to_first_token_seconds_count"] - before.get("lfm_time_to_first_token_seconds_count", 0)
        assert finished <= ttft <= 32
        ended = {r: after.get(f'lfm_request_finished_total{{reason="{r}"}}', 0) for r in ("length", "abort")}
        assert ended["length"] >= finished and ended["length"] + ended["abort"] == 32  # a late leaver may finish
        # the server still answers normally afterwards
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens <= 3


def test_full_waiting_queue_answers_429_and_recovers(checkpoints):
    cfg = ServeConfig(model=str(checkpoints["dense"]), served_model_name=MODEL, dtype="float32", max_num_seqs=1,
                      max_waiting=1, threads=1)
    state = ServerState(cfg)
    with ServerThread(state) as s:
        client = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        kw = dict(model=MODEL, max_tokens=900, temperature=0, stream=True, extra_body={"ignore_eos": True})
        a = client.completions.create(prompt="first", **kw)
        next(iter(a))  # running
        b = client.completions.create(prompt="second", **kw)  # waits for the only slot
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(prompt="third", **kw)
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
        a.close()
        b.close()
        m = wait_idle(state, s.url)
        assert m['lfm_requests_total{endpoint="/v1/completions",status="429"}'] == 1
        assert m['lfm_request_finished_total{reason="abort"}'] == 2  # both left early, neither ran its 900 tokens
        assert m["lfm_generation_tokens_total"] < 900
        # a non-streaming client that gives up is noticed too: its sequence stops at once
        impatient = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=MODEL, prompt="slow", max_tokens=900, temperature=0,
                                         extra_body={"ignore_eos": True})
        m = wait_idle(state, s.url)
        assert m['lfm_request_finished_total{reason="abort"}'] == 3 and m["lfm_generation_tokens_total"] < 1800
        assert state.llm.engine.block_manager.num_used_blocks == 0
        r = client.completions.create(model=MODEL, prompt="fourth", max_tokens=2)
        assert r.choices[0].finish_reason in ("stop", "length")


def test_shared_prefix_is_served_from_the_prefix_cache_and_metrics_say_so(checkpoints):
    """Two completions sharing a 40-token prompt prefix: the second reuses its full blocks (the same tokens come
    back as with prefix caching off), and /metrics reports the hit rate and the blocks."""
    outs = {}
    for caching in (True, False):
        cfg = ServeConfig(model=str(checkpoints["dense"]), served_model_name=MODEL, dtype="float32", threads=1,
                          block_size=8, enable_prefix_caching=caching)
        state = ServerState(cfg)
        with ServerThread(state) as s:
            client = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            shared = [1] + list(range(20, 59))
            texts = [client.completions.create(model=MODEL, prompt=shared + tail, max_tokens=6, temperature=0,
                                               logprobs=0, extra_body={"ignore_eos": True}).choices[0]
                     for tail in ([70, 71, 72], [80, 81])]
            outs[caching] = [(c.text, c.logprobs.tokens) for c in texts]
            m = wait_idle(state, s.url)
            assert m["lfm_kv_cache_blocks_used"] == 0 and m["lfm_kv_cache_block_size"] == 8
            assert m["lfm_kv_cache_blocks_free"] == m["lfm_kv_cache_blocks_total"]
            if caching:  # the second prompt (42 tokens) finds the first's 5 full blocks: 40 of 85 looked-up tokens
                assert m["lfm_prefix_cache_hit_rate"] == pytest.approx(40 / 85)
            else:
                assert m["lfm_prefix_cache_hit_rate"] == 0
    assert outs[True] == outs[False]
