"""Where a batch-1 decode step's time goes: CPU time per token and PyTorch's op table (the kernels' own time is the
rest), LFM2.5-350M shape with random weights, through the engine (one `LLMEngine.step` = one token).

    python benchmarks/decode_profile.py --quantization int4 --threads 1
    python benchmarks/decode_profile.py --quantization int4 --threads 2 --batch 16   # 16 sequences per step
"""

from __future__ import annotations

import argparse
import time

import torch

from lfm import LLM, SamplingParams
from lfm.model.checkpoint import empty_model
from lfm.model.presets import preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="LFM2.5-350M")
    ap.add_argument("--quantization", choices=["int8", "int4"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=512, help="prompt tokens before the measured steps (512)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together in each step (1)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    m = empty_model(preset(a.preset), torch.bfloat16)
    m.init_weights(0.02, generator=torch.Generator().manual_seed(0))
    m.eval()
    llm = LLM(m, quantization=a.quantization, enable_prefix_caching=False, max_num_seqs=a.batch)
    eng = llm.engine  # one engine step = one decode step of every sequence, sampling included
    for i in range(a.batch):
        eng.add_request(f"p{i}", torch.randint(0, min(1000, m.config.vocab_size), (a.context,)).tolist(),
                        SamplingParams(temperature=0, max_tokens=2 * a.steps + 8, ignore_eos=True))
    while eng.num_waiting or any(s.num_computed_tokens < a.context for s in eng.scheduler.running):
        eng.step()  # the prompts
    for _ in range(3):
        eng.step()
    cpu, wall = [], []
    for _ in range(a.steps):
        t, w = time.process_time(), time.perf_counter()
        eng.step()
        cpu.append(time.process_time() - t)
        wall.append(time.perf_counter() - w)
    step = sorted(cpu)[len(cpu) // 2]
    step_wall = sorted(wall)[len(wall) // 2]
    from torch.profiler import profile

    with profile() as p:
        for _ in range(a.steps):
            eng.step()
    ops = p.key_averages()
    op_cpu = sum(e.self_cpu_time_total for e in ops) / 1e3 / a.steps  # ms per step in ATen ops (kernels excluded)
    calls = sum(e.count for e in ops if e.key.startswith("aten::")) / a.steps
    print(ops.table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"{a.preset} bf16{' ' + a.quantization if a.quantization else ''}, {a.threads} thread(s), context {a.context}, "
          f"{a.batch} sequence(s) per step: decode step {step * 1e3:.1f} ms CPU, {step_wall * 1e3:.1f} ms wall (medians of "
          f"{a.steps}); profiled ATen ops {op_cpu:.1f} ms per step ({calls:.0f} aten calls), the rest (lfm.kernels, "
          f"Python) {step * 1e3 - op_cpu:.1f} ms")


if __name__ == "__main__":
    main()
