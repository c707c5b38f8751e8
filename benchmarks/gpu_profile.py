#!/usr/bin/env python
"""Where a GPU decode step's time goes (issue "GPU runner"): the profile that says why a throughput target is missed.

Per shape (random bf16 weights, as benchmarks/gpu_throughput.py): an engine with C sequences of P-token prompts,
prefilled, then
1. as served (CUDA graphs): --steps decode steps timed one by one: wall ms per step (median), of which the graph
   replay takes (CUDA events around each replay: the model's forward on the GPU), the rest being host work, the
   logits copy and the sampler;
2. eager, under torch.profiler: the same steps with every kernel named, summed per family (decode attention,
   KV store, short conv, norms, RoPE, dense GEMMs, grouped expert GEMMs, copies, the rest) in ms per step;
3. the bandwidth roofline of a decode step: the bytes it must read (every non-expert weight once, the experts the
   step's tokens pick: E * (1 - (1 - k/E)^C) of them for uniform routing, which random weights give; each
   sequence's K / V) at the GPU's peak bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s), and how close the replay is.

    python benchmarks/gpu_profile.py                  # 350M at C=256 (P=512) and 8B-A1B at C=32 (P=8192), ~1 min
    python benchmarks/gpu_profile.py --shapes 350M:1024:512 --steps 30
    python benchmarks/gpu_profile.py --smoke          # CPU, tiny shapes: checks the script, figures mean nothing

A row that fails is reported and the others still run. Not yet run on a GPU: written and smoke-tested on CPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_throughput as gt  # noqa: E402  (sets LFM_KERNELS=0 and the repository on sys.path)
import torch  # noqa: E402

FAMILIES = [  # (family, substrings of a kernel's name, lower case): the first match names it
    ("decode attention", ("_decode_split", "_decode_merge")),
    ("KV store", ("_store_kv",)),
    ("short conv", ("_short_conv",)),
    ("RMSNorm (+ residual)", ("_rmsnorm",)),
    ("QK-norm + RoPE", ("_rope_qknorm",)),
    ("expert GEMMs (grouped)", ("_grouped_gemm", "grouped", "ptrarray", "group")),
    ("dense GEMMs", ("gemm", "nvjet", "xmma", "cutlass", "gemv", "matmul", "sm90_", "sm80_")),
    ("copies / fills", ("memcpy", "memset", "copy", "fill")),
]
PEAK_BW = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}


def family(name: str) -> str:
    n = name.lower()
    return next((f for f, keys in FAMILIES if any(k in n for k in keys)), "other (elementwise, sampler, reductions)")


def roofline_bytes(model, conc: int, ctx: int) -> tuple[float, float, float]:
    """(weight bytes, expert bytes, KV bytes) a decode step of `conc` sequences at context `ctx` must read."""
    c = model.config
    dense = experts = 0
    for n, p in model.named_parameters():
        if ".experts." in n:
            experts += p.numel() * p.element_size()
        elif "embed_tokens" not in n or c.tie_word_embeddings:  # tied: read whole once, as the LM head
            dense += p.numel() * p.element_size()
    if c.is_moe:  # expected share of experts that C tokens' top-k picks touch, routing uniform
        experts *= 1 - (1 - c.num_experts_per_tok / c.num_experts) ** conc
    attn = sum(t == "full_attention" for t in c.layer_types)
    kv = conc * ctx * attn * 2 * c.num_key_value_heads * c.head_size * model.dtype.itemsize
    return dense, experts, kv


class _TimedReplay:
    """Stands in for a captured CUDAGraph in DecodeGraphs.graphs: CUDA events around each replay."""

    def __init__(self, graph, times: list) -> None:
        self.graph, self.times = graph, times

    def replay(self) -> None:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        self.graph.replay()
        b.record()
        self.times.append((a, b))


def kernel_ms(trace: Path, cats: tuple[str, ...] = ("kernel", "gpu_memcpy", "gpu_memset")) -> dict[str, float]:
    """Device time per kernel name (ms) from a chrome trace: the format every torch version writes. (--smoke passes
    cpu_op: nested CPU ops, counted twice and more, so only the report's shape is checked.)"""
    out: dict[str, float] = {}
    for e in json.loads(trace.read_text()).get("traceEvents", []):
        if e.get("cat") in cats and "dur" in e:
            out[e["name"]] = out.get(e["name"], 0.0) + e["dur"] / 1e3
    return out


def profile_shape(name: str, conc: int, plen: int, a: argparse.Namespace, device: str, dtype: torch.dtype) -> str:
    from lfm import SamplingParams
    from lfm.model.checkpoint import empty_model
    from lfm.model.presets import preset

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = empty_model(preset(name), dtype, device)
    model.init_weights(std=0.02)
    if device == "cuda":
        model.fuse_projections()
    model.eval()
    steps = a.steps
    ns = argparse.Namespace(no_prefix_caching=False, kv_cache_memory=None, max_batched_tokens=8192, eager=False)
    llm, note = gt.build_llm(model, conc, plen, 4 * steps + 16, ns, device)
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=4 * steps + 8, ignore_eos=True)
    for i, p in enumerate(gt.random_prompts(conc, plen, model.config.vocab_size, 11)):
        eng.add_request(f"p{i}", p, sp)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running + list(eng.scheduler.waiting)):
        eng.step()  # the prefill (mixed steps, eager)
    for _ in range(3):
        eng.step()
    prep = time.perf_counter() - t0
    lines = [f"## {name}: C={conc}, prompts of {plen} tokens"
             + (f" ({note})" if note else ""), ""]

    # 1. as served
    graphs = eng.runner.graphs
    times: list = []
    if graphs is not None and graphs.graphs:
        graphs.graphs = {b: _TimedReplay(g, times) for b, g in graphs.graphs.items()}
    wall = []
    for _ in range(steps):
        gt.sync(device)
        t = time.perf_counter()
        eng.step()
        gt.sync(device)
        wall.append((time.perf_counter() - t) * 1e3)
    step_ms = statistics.median(wall)
    replay_ms = statistics.median(s.elapsed_time(e) for s, e in times) if times else None
    mode = "CUDA graphs" if times else "eager: no graphs (a CPU run, or none captured)"
    lines.append(f"- decode step as served, {mode}: {step_ms:.2f} ms (median of {steps}) = "
                 f"{conc / step_ms * 1e3:,.0f} output tok/s while every sequence decodes")
    if replay_ms is not None:
        lines.append(f"  - graph replay (the forward on the GPU): {replay_ms:.2f} ms; the rest (host work, logits "
                     f"copy, sampler): {step_ms - replay_ms:.2f} ms")

    # 2. eager, kernels named
    kept, eng.runner.graphs = eng.runner.graphs, None
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with tempfile.TemporaryDirectory() as d:
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(steps):
                eng.step()
            gt.sync(device)
        trace = Path(d) / "trace.json"
        prof.export_chrome_trace(str(trace))
        per_kernel = kernel_ms(trace, ("cpu_op",)) if a.smoke else kernel_ms(trace)
    eng.runner.graphs = kept
    fams: dict[str, list[float]] = {}
    for k, ms in per_kernel.items():
        f = fams.setdefault(family(k), [0.0, 0.0, ""])
        f[0] += ms / steps
        if ms / steps > f[1]:
            f[1], f[2] = ms / steps, k
    total = sum(f[0] for f in fams.values())
    if fams:
        what = "CPU op time (smoke: nested ops counted more than once)" if a.smoke else "GPU kernel time"
        lines += ["", f"eager decode step, {what} {total:.2f} ms per step (profiled):", "",
                  "| family | ms / step | share | largest kernel (ms / step) |", "|---|---:|---:|---|"]
        for f, (ms, top, k) in sorted(fams.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"| {f} | {ms:.3f} | {ms / total:.0%} | {k[:70]} ({top:.3f}) |")
    else:
        lines.append("- no GPU kernels in the profile (a CPU run)")

    # 3. roofline
    ctx = plen + 2 * steps
    wb, eb, kvb = roofline_bytes(model, conc, ctx)
    gpu = torch.cuda.get_device_name() if device == "cuda" else ""
    bw = next((v for k, v in PEAK_BW.items() if k in gpu), None)
    gb = (wb + eb + kvb) / 1e9
    line = (f"- roofline: {wb / 1e9:.2f} GB weights + {eb / 1e9:.2f} GB experts touched + {kvb / 1e9:.2f} GB K/V "
            f"(context ~{ctx}) = {gb:.2f} GB read per step")
    if bw:
        floor = gb * 1e9 / bw * 1e3
        line += f" -> {floor:.2f} ms at {bw / 1e12:.2f} TB/s ({conc / floor * 1e3:,.0f} tok/s ceiling)"
        if replay_ms:
            line += f"; the replay reaches {floor / replay_ms:.0%} of it"
    lines += ["", line, f"- setup (build, prefill) {prep:.1f} s", ""]
    del llm, eng, model, graphs, kept
    gt.free_memory(device)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help="comma list of MODEL:CONCURRENCY:PROMPT_LEN (default 350M:256:512,8B-A1B:32:8192)")
    ap.add_argument("--steps", type=int, help="decode steps timed and profiled per shape (default 20)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny presets: runs end to end")
    ap.add_argument("--out", help="also write the report to this file (rewritten after every shape)")
    a = ap.parse_args(argv)
    if not a.smoke and not torch.cuda.is_available():
        print("error: no CUDA device: this profile needs a GPU (--smoke runs a short CPU check)", file=sys.stderr)
        return 2
    device, dtype = ("cpu", torch.float32) if a.smoke else ("cuda", torch.bfloat16)
    a.shapes = a.shapes or ("tiny:4:16,tiny-moe:4:16" if a.smoke else "350M:256:512,8B-A1B:32:8192")
    a.steps = a.steps or (3 if a.smoke else 20)
    head = (f"# lfm decode step profile: random weights, {str(dtype)[6:]}, greedy\n"
            f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (smoke run: figures mean nothing)'}"
            f" | torch {torch.__version__}\n")
    parts = [head]
    print(head, flush=True)
    for spec in a.shapes.split(","):
        try:
            m, c, p = spec.strip().split(":")
            text = profile_shape(gt.MODELS.get(m, m), int(c), int(p), a, device, dtype)
        except Exception as e:  # noqa: BLE001  one failed shape (out of memory, say) must not end the run
            traceback.print_exc()
            text = f"## {spec}: error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}\n"
            gt.free_memory(device)
        parts.append(text)
        print(text, flush=True)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
