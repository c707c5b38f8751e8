#!/usr/bin/env python
"""The engine's host time per decode step at serving concurrency, with the model's forward taken out.

On a GPU the forward of a CUDA-graph decode step is one replay that the host launches and does not wait for, so the
step time at high concurrency is bounded below by the Python work around it: scheduling every sequence, filling the
static buffers, sampling, stop rules, the per-request deltas. This measures that work on any machine: the engine runs
a tiny model through the CUDA-graph path's static buffers (eager) with the forward replaced by a ready logits tensor
(what a replay hands back), S sequences decoding together, and reports milliseconds per step by phase (median of
--steps steps, after the prefills).

    python benchmarks/host_overhead.py [--concurrency 256,1024] [--steps 60]

At 1,024 sequences, 10 ms of host work per step caps a GPU at ~100,000 output tok/s however fast the replay is, and
adds directly to the step when the two do not overlap (this engine does not overlap them yet). Last, the host time to
lay out one prefill step of 16 prompts x 512 tokens (ModelRunner.prepare), which a GPU waits for likewise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("LFM_KERNELS", "0")
os.environ["LFM_FUSED_DECODE"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def measure(S: int, steps: int) -> dict[str, float]:
    from lfm import LLM, SamplingParams
    from lfm.engine.sampler import Sampler
    from lfm.model.checkpoint import empty_model
    from lfm.model.presets import preset

    cfg = preset("tiny")
    model = empty_model(cfg, torch.bfloat16, "cpu")
    model.init_weights()
    llm = LLM(model, max_num_seqs=S, max_num_batched_tokens=8192, kv_cache_memory=1 << 30)
    eng = llm.engine
    eng.runner.enable_decode_graphs(S, eng.max_model_len, capture=False)
    graphs = eng.runner.graphs
    sp = SamplingParams(temperature=0, max_tokens=steps + 50, ignore_eos=True)
    for i in range(S):
        eng.add_request(str(i), list(range(5, 69)), sp)
    while any(s.num_output_tokens == 0 for s in eng.seqs.values()):
        eng.step()
    ready = torch.randn(graphs.sizes[-1], cfg.vocab_size).to(torch.bfloat16)
    graphs._forward = lambda b: ready[:b]  # a replay: the logits are simply there
    spent = {"schedule": [], "runner": [], "sampler": []}
    timers: dict[str, float] = {}

    def timed(obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                timers[key] = timers.get(key, 0.0) + time.perf_counter() - t0

        setattr(obj, name, wrapper)

    timed(eng.scheduler, "schedule", "schedule")
    timed(eng.runner, "run", "runner")

    class TimedSampler(Sampler):
        def __call__(self, *args, **kw):
            t0 = time.perf_counter()
            try:
                return super().__call__(*args, **kw)
            finally:
                timers["sampler"] = time.perf_counter() - t0

    eng.sampler.__class__ = TimedSampler
    totals = []
    for _ in range(steps):
        timers.clear()
        t0 = time.perf_counter()
        eng.step()
        totals.append(time.perf_counter() - t0)
        for k in spent:
            spent[k].append(timers.get(k, 0.0))
    out = {k: 1e3 * statistics.median(v) for k, v in spent.items()}
    out["step"] = 1e3 * statistics.median(totals)
    out["rest"] = out["step"] - sum(out[k] for k in spent)
    return out


def prefill_prepare_ms(prompts: int = 16, length: int = 512, repeats: int = 30) -> float:
    """Host time to lay out one prefill step (ModelRunner.prepare: ids, positions, KV slots, conv rows) of `prompts`
    fresh prompts of `length` tokens, median ms: work done before the GPU sees a prefill step."""
    from lfm import LLM, SamplingParams
    from lfm.model.checkpoint import empty_model
    from lfm.model.presets import preset

    model = empty_model(preset("tiny"), torch.bfloat16, "cpu")
    model.init_weights()
    eng = LLM(model, max_num_seqs=prompts, max_num_batched_tokens=prompts * length, kv_cache_memory=1 << 30).engine
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for i in range(prompts):
        eng.add_request(str(i), [5 + (i * 31 + j) % 200 for j in range(length)], sp)
    scheduled = eng.scheduler.schedule()
    assert sum(it.num_tokens for it in scheduled) == prompts * length
    times = []
    for _ in range(repeats):  # prepare only reads the scheduled sequences (and clears their one-time conv restore)
        t0 = time.perf_counter()
        eng.runner.prepare(list(scheduled))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="256,1024", help="sequences decoding together (comma-separated)")
    p.add_argument("--steps", type=int, default=60, help="timed decode steps per concurrency")
    a = p.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"host time per decode step (ms, median of {a.steps}), torch {torch.__version__}, load {load:.2f}")
    print("| sequences | step | scheduler | runner (static buffers) | sampler | the rest (deltas, stop rules) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for S in (int(x) for x in a.concurrency.split(",")):
        r = measure(S, a.steps)
        print(f"| {S} | {r['step']:.2f} | {r['schedule']:.2f} | {r['runner']:.2f} | {r['sampler']:.2f} | "
              f"{r['rest']:.2f} |", flush=True)
    print(f"\nprefill step layout (ModelRunner.prepare), 16 prompts x 512 tokens: {prefill_prepare_ms():.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
