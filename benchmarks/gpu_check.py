#!/usr/bin/env python
"""The GPU engine against the CPU reference on the real shapes (LFM2.5-350M, LFM2-8B-A1B): random bf16 weights, a
batch of prompts served as on a server (mixed prefill chunks and decodes, CUDA graphs for decode steps, Triton
kernels, grouped experts), then every sampled row's logits compared with the plain model's full forward on the CPU
in float32 over the same (bf16) weights and tokens. Not a unit test: the tests run tiny shapes; this is the check
that the kernels and graphs hold at the shapes users serve.

    python benchmarks/gpu_check.py [--models 350M,8B-A1B] [--eager] [--smoke]

Per model it prints: rows compared, the largest |logit difference| / max |reference logit| over rows (bf16 weights
and activations on the GPU vs float32 math on the CPU: ~1e-2 is bf16's own rounding), the greedy pick agreement
(the GPU's argmax = the reference's; near-ties may part), and PASS when relative error <= 5e-2 and agreement >= 95%.
--smoke: tiny shapes on CPU (checks the script only). Exit status 1 when a model fails, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

NAMES = {"350M": "LFM2.5-350M", "1.2B": "LFM2.5-1.2B", "8B-A1B": "LFM2-8B-A1B", "tiny": "tiny", "tiny-moe": "tiny-moe"}


def record(llm) -> list[tuple[list[int], torch.Tensor]]:
    """(tokens the row conditions on, its logits on the CPU) for every row the engine samples from."""
    out: list[tuple[list[int], torch.Tensor]] = []
    run = llm.engine.runner.run

    def wrapped(scheduled):
        res = run(scheduled)
        for i, r in res.sample_row.items():
            s = scheduled[i]
            out.append((list(s.seq.token_ids[:s.seq.num_computed_tokens + s.num_tokens]), res.logits[r].float().cpu()))
        return res

    llm.engine.runner.run = wrapped
    return out


def check(name: str, device: str, eager: bool, prompt_lens: list[int], gen: int) -> bool:
    from lfm import LLM, SamplingParams
    from lfm.model.checkpoint import empty_model
    from lfm.model.presets import preset

    cfg = preset(name)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = empty_model(cfg, torch.bfloat16, device)
    model.init_weights(std=0.02)
    with torch.no_grad():  # norms off 1 and a non-zero selection bias: every weight matters
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
        for n, b in model.named_buffers():
            if n.endswith("expert_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in prompt_lens]
    llm = LLM(model, max_num_seqs=len(prompts), max_num_batched_tokens=512, kv_cache_memory=2 << 30,
              enforce_eager=eager)
    graphs = llm.engine.runner.graphs
    rows = record(llm)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True))
    if device == "cuda":
        torch.cuda.synchronize()
    served = time.perf_counter() - t0
    del llm
    gc.collect()
    ref = model.to("cpu", torch.float32).eval()  # the same bf16 weights, float32 math
    if device == "cuda":
        torch.cuda.empty_cache()
    worst, agree = 0.0, 0
    full: list[tuple[list[int], torch.Tensor]] = []  # one causal forward per request covers all of its rows
    with torch.inference_mode():
        for tokens, logits in sorted(rows, key=lambda r: -len(r[0])):
            hit = next((lg for t, lg in full if t[:len(tokens)] == tokens), None)
            if hit is None:
                hit = ref(torch.tensor([tokens]))[0]
                full.append((tokens, hit))
            want = hit[len(tokens) - 1]
            worst = max(worst, ((logits - want).abs().max() / want.abs().max()).item())
            agree += int(logits.argmax() == want.argmax())
    rate = agree / max(1, len(rows))
    ok = bool(rows) and worst <= 5e-2 and rate >= 0.95
    steps = "eager" if graphs is None else f"{len(graphs.graphs)} CUDA graphs" if graphs.graphs else "static, eager"
    ref_s = time.perf_counter() - t0 - served
    print(f"| {name} | {steps} | {len(rows)} | {worst:.2e} | {100 * rate:.1f}% | {served:.0f} s + reference "
          f"{ref_s:.0f} s | {'PASS' if ok else 'FAIL'} |", flush=True)
    del model, ref
    gc.collect()
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="350M,8B-A1B", help="comma-separated: 350M, 1.2B, 8B-A1B (tiny, tiny-moe)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (enforce_eager)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks this script, not the GPU path")
    a = p.parse_args()
    if a.smoke:
        device, models, lens, gen = "cpu", ["tiny", "tiny-moe"], [5, 40, 17], 6
    elif not torch.cuda.is_available():
        print("error: no CUDA device (this checks the GPU engine; --smoke runs the script on CPU)", file=sys.stderr)
        return 2
    else:
        device, models, lens, gen = "cuda", [NAMES[m.strip()] for m in a.models.split(",")], [700, 37, 300, 5, 129], 24
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| model | decode steps | rows | max rel. logit error | greedy agreement | time | result |")
    print("|---|---|---:|---:|---:|---|---|")
    results = [check(m, device, a.eager, lens, gen) for m in models]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
