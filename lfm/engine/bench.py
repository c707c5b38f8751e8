"""`lfm bench`: prefill and decode speed, time to first token and peak memory of one model on this machine.

Prefill is timed as a max_tokens=1 request (time to first token); decode speed is (gen_len - 1) tokens over the time
the full request takes beyond that. Repeated runs report min / median / max, because shared machines are noisy.
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
    pre, dec, ttft = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompts, first)
        t1 = time.perf_counter()
        llm.generate(prompts, full)
        t2 = time.perf_counter()
        ttft.append(t1 - t0)
        pre.append(batch * prompt_len / (t1 - t0))
        dec.append(batch * (gen_len - 1) / max((t2 - t1) - (t1 - t0), 1e-9))
    return BenchResult(pre, dec, ttft, peak_rss_bytes())


def format_table(label: str, r: BenchResult, batch: int) -> str:
    def mmm(xs: list[float], fmt: str = "{:.1f}") -> str:
        return " / ".join(fmt.format(v) for v in (min(xs), statistics.median(xs), max(xs)))

    rows = [
        "| model | batch | prefill tok/s | decode tok/s | time to first token (s) | peak RSS |",
        "|---|---|---|---|---|---|",
        f"| {label} | {batch} | {mmm(r.prefill_tok_s)} | {mmm(r.decode_tok_s)} | {mmm(r.ttft_s, '{:.3f}')} | "
        f"{r.peak_rss_bytes / 2**20:.0f} MiB |",
    ]
    return "\n".join(rows) + "\n(min / median / max over the repeats)"
