"""`lfm bench`: prefill and decode speed, time to first token and peak memory of one model on this machine.

Prefill is timed as a max_tokens=1 request (time to first token); decode speed is (gen_len - 1) tokens over the time
the full request takes beyond that. Repeated runs report min / median / max, because shared machines are noisy.
Where decode runs through the fused CPU step (lfm/engine/cpu_decode.py), the time of a decode step is split into
the weight GEMVs, attention, the rest of the fused step, and everything outside it (scheduler, sampler, Python), so
a regression shows where it happened.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass

import torch

from .llm import LLM
from .sampling import SamplingParams


@dataclass(slots=True)
class BenchResult:
    prefill_tok_s: list[float]
    decode_tok_s: list[float]
    ttft_s: list[float]
    peak_rss_bytes: int
    split_ms: dict[str, float] | None = None  # per decode step, median repeat: gemv, attention, other, outside


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_bench(llm: LLM, prompt_len: int = 512, gen_len: int = 128, batch: int = 1, repeats: int = 3,
              seed: int = 0) -> BenchResult:
    g = torch.Generator().manual_seed(seed)
    vocab = llm.config.vocab_size
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    fused = llm.engine.runner.fused
    pre, dec, ttft, splits = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompts, first)
        t1 = time.perf_counter()
        if fused is not None:
            fused.reset_timings()
        llm.generate(prompts, full)
        t2 = time.perf_counter()
        ttft.append(t1 - t0)
        pre.append(batch * prompt_len / (t1 - t0))
        decode_s = max((t2 - t1) - (t1 - t0), 1e-9)
        dec.append(batch * (gen_len - 1) / decode_s)
        t = fused.timings() if fused is not None else {"steps": 0}
        if t["steps"] and gen_len > 1:
            n = gen_len - 1
            step = {"gemv": t["gemv_s"] / n, "attention": t["attention_s"] / n, "other": t["other_s"] / n}
            step["outside"] = decode_s / n - sum(step.values())
            splits.append({k: v * 1e3 for k, v in step.items()})
    split = None
    if splits:
        mid = sorted(splits, key=lambda d: sum(d.values()))[len(splits) // 2]
        split = mid
    return BenchResult(pre, dec, ttft, peak_rss_bytes(), split)


def format_table(label: str, r: BenchResult, batch: int) -> str:
    def mmm(xs: list[float], fmt: str = "{:.1f}") -> str:
        return " / ".join(fmt.format(v) for v in (min(xs), statistics.median(xs), max(xs)))

    rows = [
        "| model | batch | prefill tok/s | decode tok/s | time to first token (s) | peak RSS |",
        "|---|---|---|---|---|---|",
        f"| {label} | {batch} | {mmm(r.prefill_tok_s)} | {mmm(r.decode_tok_s)} | {mmm(r.ttft_s, '{:.3f}')} | "
        f"{r.peak_rss_bytes / 2**20:.0f} MiB |",
    ]
    out = "\n".join(rows) + "\n(min / median / max over the repeats)"
    if r.split_ms:
        s = r.split_ms
        out += ("\ndecode step (fused CPU step), ms per token: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items())
                + f" (weights GEMV {100 * s['gemv'] / max(sum(s.values()), 1e-9):.0f}% of the step)")
    else:
        out += "\ndecode step: the general path (the fused CPU step is off, LFM_FUSED_DECODE=0, or does not apply here)"
    return out
