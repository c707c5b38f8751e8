#!/usr/bin/env python
"""Greedy tokens of the fused CPU decode step = the general step's, on a real model shape with random weights.

    python benchmarks/fused_decode_check.py [--preset LFM2.5-350M] [--tokens 128] [--formats int4,int8,bf16,...]

For each format, one process-local model (random N(0, 0.02) weights of the preset's shape, seed 0, quantized as
`LLM(quantization=...)` does) generates --tokens greedy tokens from the same prompts twice: with the fused step
(`LFM_FUSED_DECODE=1`) and with every step through `LfmForCausalLM.forward_step` (`LFM_FUSED_DECODE=0`). Prints,
per format, how many leading tokens agree and the largest logit difference over the shared prefix. The tests
(tests/test_fused_decode.py) do the same on tiny models and on the shipped demo model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

FORMATS = {  # name: (dtype, quantization)
    "int4": ("bfloat16", "int4"), "int8": ("bfloat16", "int8"), "bf16": ("bfloat16", None),
    "int4-f32act": ("float32", "int4"), "int8-f32act": ("float32", "int8"),
}


def run(model_fn, dtype: str, quant: str | None, fused: bool, prompts: list[list[int]], n: int):
    from lfm import LLM, SamplingParams

    os.environ["LFM_FUSED_DECODE"] = "1" if fused else "0"
    llm = LLM(model_fn().to(getattr(torch, dtype)), quantization=quant, enable_prefix_caching=False)
    assert (llm.engine.runner.fused is not None) == fused, "the fused step did not (or did) apply"
    logits: list[torch.Tensor] = []
    run_ = llm.engine.runner.run

    def rec(scheduled):
        out = run_(scheduled)
        logits.append(out.logits.clone())
        return out

    llm.engine.runner.run = rec
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return [o.token_ids for o in outs], logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="LFM2.5-350M")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from lfm.model.lfm2 import LfmForCausalLM
    from lfm.model.presets import preset

    cfg = preset(a.preset)

    def model_fn():
        torch.manual_seed(0)
        m = LfmForCausalLM(cfg)
        m.init_weights(0.02, generator=torch.Generator().manual_seed(0))
        return m.eval()

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(16, cfg.vocab_size, (n,), generator=g).tolist() for n in (8, 40)]
    print(f"| {a.preset}, random weights, {a.tokens} greedy tokens x {len(prompts)} prompts | tokens equal | "
          f"largest logit difference (shared prefix) |\n|---|---|---:|")
    ok = True
    for name in a.formats.split(","):
        dtype, quant = FORMATS[name]
        ta, la = run(model_fn, dtype, quant, False, prompts, a.tokens)
        tb, lb = run(model_fn, dtype, quant, True, prompts, a.tokens)
        same = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(ta, tb)]
        diff = max(float((x - y).abs().max()) for x, y in zip(la, lb) if x.shape == y.shape)
        ok &= ta == tb
        print(f"| {name} ({dtype} activations) | {'yes' if ta == tb else 'no: first difference at ' + str(same)} | "
              f"{diff:.3g} |", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
