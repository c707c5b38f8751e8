#!/usr/bin/env python
"""Batch-1 greedy decode speed of lfm against transformers on the same random-weight checkpoint, plus peak RSS while
loading.

    python benchmarks/decode_bench.py [--preset LFM2.5-350M] [--prompt-len 128] [--gen-len 32] [--repeats 3]
                                      [--threads N] [--dtypes float32,bfloat16]

How it measures (both engines exactly alike):
* One random-weight model of the preset's shape (N(0, 0.02), fixed seed) is saved per dtype as a safetensors
  checkpoint in a temp dir; lfm loads it with `LLM(dir, dtype=...)`, transformers with
  `AutoModelForCausalLM.from_pretrained(dir, dtype=...)`, so both run identical weights.
* Each timed run is one public generate() call: prompt = `--prompt-len` random token ids, batch 1, greedy, EOS
  ignored, `--gen-len` new tokens. A forward hook on the engine's nn.Module stamps the end of every forward pass
  (both engines run exactly one per token, checked). decode tok/s = (gen_len - 1) / (end of last forward - end of
  the prefill forward), i.e. the steady per-token loop including sampling and engine bookkeeping; prefill tok/s =
  prompt_len / (call start -> end of the prefill forward), i.e. TTFT minus the first sample, call setup included.
  (Timing a 1-token call and subtracting it was tried first: on a noisy 2-core box the bf16 prefill is longer than
  the whole decode and its jitter swamped the difference.)
* One warm-up per engine, then `--repeats` rounds interleaved lfm, transformers, lfm, ...
* RSS: a fresh subprocess per engine loads a tiny checkpoint once (a first model build in a process pages in ~150 MiB
  of library code and allocator state, whatever the size), then the bf16 checkpoint, and reports the growth of its
  peak RSS over the RSS just before that load. The peak is VmHWM reset right before the load, not ru_maxrss:
  Linux carries ru_maxrss across fork+exec, so the child would inherit this process's multi-GB peak. Also reported:
  RSS after reading every weight once (transformers maps the file lazily, so its load alone touches almost nothing).
* Defaults are gen-len 32 / 3 repeats: 64 / 5 took 20 min on a shared 2-core box (2 min for 32 / 3 when idle).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MiB = 1 << 20


# ---- helpers --------------------------------------------------------------------------------------------------
def _rss_now() -> int:
    """Current resident set size in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _peak_rss() -> int:
    """This address space's peak RSS in bytes: VmHWM on Linux, else ru_maxrss.

    ru_maxrss alone is useless in a child: Linux carries the parent's high-water mark across fork+exec, so a child
    of this (multi-GB) benchmark process would start with the parent's peak. VmHWM belongs to the new address space
    and can be reset (`_reset_peak`)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_checkpoints(preset_name: str, dtypes: list[str], root: Path, seed: int) -> dict[str, Path]:
    """One checkpoint per dtype, each the same seeded float32 init cast to that dtype (bf16 = rounded fp32 weights)."""
    from lfm.model.checkpoint import empty_model, save_model
    from lfm.model.presets import preset

    dirs = {}
    for name in dtypes + (["bfloat16"] if "bfloat16" not in dtypes else []):  # bf16 is also the RSS checkpoint
        model = empty_model(preset(preset_name), torch.float32)
        model.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
        dirs[name] = save_model(model.to(_dtype(name)), root / name)
        del model
        gc.collect()
    return dirs


# ---- timing ---------------------------------------------------------------------------------------------------
class _Clock:
    """A forward hook on the engine's nn.Module: the time each forward pass ends. Both engines run one forward per
    generated token (the prefill, then gen_len-1 single-token steps), so one generate() call yields TTFT and the
    decode time without a second call."""

    def __init__(self, module) -> None:
        self.ends: list[float] = []
        if isinstance(module, torch.nn.Module):
            module.register_forward_hook(lambda *_: self.ends.append(time.perf_counter()))
            return
        # lfm's engine: one model-runner step per forward pass (forward_step, or the fused CPU decode step)
        run = module.run

        def timed(*a, **k):
            out = run(*a, **k)
            self.ends.append(time.perf_counter())
            return out

        module.run = timed

    def run(self, fn, n: int) -> tuple[float, float, list[int]]:
        """(seconds to the end of the prefill forward, seconds from there to the end of the last forward, tokens)."""
        self.ends.clear()
        t0 = time.perf_counter()
        toks = fn()
        assert len(toks) == n, f"produced {len(toks)} tokens, expected {n}"
        assert len(self.ends) == n, f"{len(self.ends)} forward passes for {n} tokens"
        return self.ends[0] - t0, self.ends[-1] - self.ends[0], toks


class LfmRunner:
    name = "lfm"

    def __init__(self, path: Path, dtype: str) -> None:
        from lfm.engine.llm import LLM

        self.llm = LLM(path, dtype=dtype, enable_prefix_caching=False)  # repeated prompts: measure, not hit
        self.clock = _Clock(self.llm.engine.runner)

    def __call__(self, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        from lfm.engine.sampling import SamplingParams

        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        return self.clock.run(lambda: self.llm.generate([prompt], sp)[0].token_ids, n)


class HfRunner:
    name = "transformers"

    def __init__(self, path: Path, dtype: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype)).eval()
        self.model.generation_config.eos_token_id = None
        self.clock = _Clock(self.model)

    def __call__(self, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        ids = torch.tensor([prompt], dtype=torch.long)

        def gen() -> list[int]:
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False)
            return out[0, ids.shape[1]:].tolist()

        return self.clock.run(gen, n)


def bench_dtype(path: Path, dtype: str, prompt: list[int], gen_len: int, repeats: int) -> dict[str, dict]:
    runners = [LfmRunner(path, dtype), HfRunner(path, dtype)]
    res: dict[str, dict] = {r.name: {"decode": [], "prefill": []} for r in runners}
    toks: dict[str, list[int]] = {}
    for r in runners:  # warm-up
        toks[r.name] = r(prompt, gen_len)[2]
    for i in range(repeats):
        for r in runners:  # interleaved: lfm, transformers, lfm, transformers, ...
            ttft, decode, _ = r(prompt, gen_len)
            res[r.name]["prefill"].append(len(prompt) / ttft)
            res[r.name]["decode"].append((gen_len - 1) / decode)
        print(f"  [{dtype}] repeat {i + 1}/{repeats}: "
              + ", ".join(f"{n} {res[n]['decode'][-1]:.1f} tok/s" for n in res), file=sys.stderr, flush=True)
    a, b = toks["lfm"], toks["transformers"]
    res["lfm"]["agree"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    del runners
    gc.collect()
    return res


# ---- peak RSS while loading (child process) -------------------------------------------------------------------
def rss_child(engine: str, path: str, warmup: str, threads: int) -> None:
    torch.set_num_threads(threads)
    if engine == "lfm":
        from lfm.model.checkpoint import load_model

        def load(d):
            return load_model(d, dtype="bfloat16")
    else:
        from transformers import AutoModelForCausalLM

        def load(d):
            return AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    # one load of a tiny checkpoint first: a process's first model build pages in ~150 MiB of library code and
    # allocator state whatever the model's size; that one-time cost is not what loading this model costs
    del_me = load(warmup)
    del del_me
    gc.collect()
    _reset_peak()
    peak0, rss0 = _peak_rss(), _rss_now()
    t0 = time.perf_counter()
    model = load(path)
    dt = time.perf_counter() - t0
    peak1, rss1 = _peak_rss(), _rss_now()
    params = list({id(p): p for p in model.parameters()}.values())
    with torch.no_grad():  # read every weight once: lazily mapped files become resident, as they will in use
        for p in params:
            p.float().sum()
    peak2, rss2 = _peak_rss(), _rss_now()
    print(json.dumps({"engine": engine, "peak_growth": peak1 - rss0, "rss_growth": rss1 - rss0,
                      "touched_growth": rss2 - rss0, "touched_peak_growth": peak2 - rss0, "peak_before": peak0,
                      "rss_before": rss0, "param_bytes": sum(p.numel() * p.element_size() for p in params),
                      "load_s": dt}))


def measure_rss(path: Path, warmup: Path, threads: int) -> list[dict]:
    out = []
    for engine in ("lfm", "transformers"):
        p = subprocess.run([sys.executable, __file__, "--_rss-child", engine, str(path), str(warmup),
                            "--threads", str(threads)],
                           capture_output=True, text=True, check=True)
        out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


# ---- report ---------------------------------------------------------------------------------------------------
def _stats(xs: list[float]) -> tuple[float, float, float]:
    return min(xs), statistics.median(xs), max(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="LFM2.5-350M")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-rss", action="store_true", help="skip the load-memory measurement")
    ap.add_argument("--_rss-child", nargs=3, metavar=("ENGINE", "DIR", "WARMUP_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._rss_child:
        rss_child(*args._rss_child, threads=args.threads)
        return
    if args.gen_len < 2:
        ap.error("--gen-len must be at least 2 (decode speed excludes the first token)")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            ap.error(f"unknown dtype {d!r}")

    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from lfm.model.presets import preset

    vocab = preset(args.preset).vocab_size
    g = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(16, vocab, (args.prompt_len,), generator=g).tolist()

    t_start = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lfm-bench-") as tmp:
        print(f"building {args.preset} random-weight checkpoints in {tmp} ...", file=sys.stderr, flush=True)
        dirs = build_checkpoints(args.preset, dtypes, Path(tmp), args.seed)
        for d in dtypes:
            print(f"benchmarking {d} ...", file=sys.stderr, flush=True)
            results[d] = bench_dtype(dirs[d], d, prompt, args.gen_len, args.repeats)
        rss = None
        if not args.skip_rss:
            print("measuring load RSS (bfloat16) ...", file=sys.stderr, flush=True)
            rss = measure_rss(dirs["bfloat16"], build_checkpoints("tiny", ["bfloat16"], Path(tmp) / "tiny", args.seed)
                              ["bfloat16"], args.threads)
            wsize = sum(f.stat().st_size for f in dirs["bfloat16"].glob("*.safetensors"))

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(f"\n## decode benchmark: {args.preset}, random weights, batch 1, greedy, prompt {args.prompt_len} tokens, "
          f"{args.gen_len} new tokens, {args.repeats} repeats\n")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"threads {torch.get_num_threads()} (of {os.cpu_count()} cores), "
          f"CPU {cpu} ({torch.backends.cpu.get_cpu_capability()})\n")
    print("| engine | dtype | prefill tok/s (median) | decode tok/s min | median | max | decode ratio lfm/transformers |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for d in dtypes:
        med_hf = statistics.median(results[d]["transformers"]["decode"])
        for eng in ("lfm", "transformers"):
            r = results[d][eng]
            lo, med, hi = _stats(r["decode"])
            ratio = f"{med / med_hf:.2f}x" if eng == "lfm" else "1.00x"
            print(f"| {eng} | {d} | {statistics.median(r['prefill']):.0f} | {lo:.1f} | {med:.1f} | {hi:.1f} | {ratio} |")
    print()
    for d in dtypes:
        print(f"{d}: greedy tokens identical for the first {results[d]['lfm']['agree']}/{args.gen_len} "
              f"generated positions (lfm vs transformers)")
    print("\ndecode tok/s = (gen_len-1) / (end of last forward - end of prefill forward); prefill tok/s = prompt_len / "
          "(generate() call start -> end of prefill forward); timestamps from a forward hook, one generate() call each")
    if rss is not None:
        print(f"\n## peak RSS while loading the bfloat16 checkpoint (fresh process each; weights on disk "
              f"{wsize / MiB:.0f} MiB)\n")
        print("| engine | load s | peak RSS growth during load MiB | RSS growth after load MiB "
              "| RSS growth after reading all weights MiB | peak growth / weights size |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rss:
            print(f"| {r['engine']} | {r['load_s']:.2f} | {r['peak_growth'] / MiB:.0f} | {r['rss_growth'] / MiB:.0f} "
                  f"| {r['touched_growth'] / MiB:.0f} | {r['peak_growth'] / wsize:.2f} |")
        print("\n(peak = VmHWM reset right before the load call; growth is over the RSS just before it, after imports and one "
              "tiny-checkpoint load)")
    print(f"\n(total wall time {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
