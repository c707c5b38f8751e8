#!/usr/bin/env python
"""MoE on CPU: the LFM2-8B-A1B shape at 4 bits, lfm int4 g64 against llama.cpp Q4_0: prefill, batch-1 decode and
peak RSS, in one run.

    python benchmarks/moe_bench.py [--preset LFM2-8B-A1B] [--prompt-len 128] [--gen-len 32] [--repeats 3]
                                   [--rounds 2] [--threads 2] [--engines lfm-int4,llama-q4_0] [--work DIR]
                                   [--out benchmarks/results/moe_bench]   (writes OUT.txt, OUT.json)

* Weights are random and generated directly in quantized form, never as floats (an 8B float copy would not fit):
  lfm: the model is built on the meta device with the quantized skeleton (`quantized_skeleton`: Int4Linear g64 for
  every linear, QuantExperts for the experts, an int8 embedding), then materialised and filled in place with random
  nibbles, scales about N(0, 0.02)-sized and zeros centring them; norms 1, router and conv kernels N(0, 0.02), expert
  bias 0. llama.cpp: a GGUF file (arch lfm2moe, written with the `gguf` package and lfm.gguf's metadata and tensor
  table) whose Q4_0 blocks are random nibbles with random fp16 scales of the same size; every 2-D weight is Q4_0,
  embedding/head included ("pure" Q4_0, as lfm's int4 head); norms, conv kernels, router and expert bias F32; the
  tokenizer is lfm's tiny test tokenizer padded to the 65,536 vocabulary. The two engines run different random
  weights of the same shape and bit width, so their tokens are not compared.
* Engines run one at a time, each in a fresh subprocess (threads: torch and the kernels' OpenMP, or llama.cpp's
  n_threads = n_threads_batch = --threads), so at most one 8B model is in memory and each peak RSS is clean.
* prefill tok/s = prompt_len / (call start -> end of the prefill forward) for one --prompt-len prompt; decode tok/s =
  (gen_len - 1) / (end of the first forward -> end of the last) after an 8-token prompt, greedy, EOS ignored. lfm: one
  `LLM.generate` call, forward ends from the engine's model-runner step (general or fused CPU decode step); llama.cpp: llama-cpp-python's low-level API (as
  benchmarks/edge_bench.py: one llama_decode per step, argmax on the logits), forward ends when llama_decode returns.
* Per engine process: one warm-up (prefill + a short decode), then --repeats timed runs; --rounds processes per
  engine, engines alternating (lfm, llama.cpp, lfm, ...); min / median / max over all runs, ratios of medians.
* Peak RSS: VmHWM of the engine's process after its last measurement (absolute: what "fits in N GB" means).
  llama.cpp's includes its mmap of the file plus the copy it repacks Q4_0 into for its AVX2 kernels.
* Noise: the box may be shared. "other CPU" = CPU time used by other processes during an engine's process, from
  /proc/stat minus the engine's own rusage, as a fraction of all cores; figures taken above ~10% are suspect.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parent), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

GiB, MiB = 1 << 30, 1 << 20
ENGINES = {  # key: (label, kind, options)
    "lfm-int4": ("lfm int4 g64 (bf16 act.)", "lfm", {"dtype": "bfloat16"}),
    "lfm-int4-f32": ("lfm int4 g64 (f32 act.)", "lfm", {"dtype": "float32"}),
    "llama-q4_0": ("llama.cpp Q4_0", "llama", {"file": "q4_0.gguf"}),
}
DECODE_PROMPT = 8
STD = 0.02  # the size of the random weights (std of a weight), both engines


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


# ---- random weights, directly quantized ---------------------------------------------------------------------------
def random_int4_model(preset_name: str, dtype, group: int = 64, seed: int = 0):
    """The preset's shape as lfm's int4 model (meta-built skeleton, filled in place; no float weights)."""
    import torch

    from lfm.model.checkpoint import empty_model
    from lfm.model.presets import preset

    cfg = preset(preset_name, quantization_config={"quant_method": "lfm", "bits": 4, "group_size": group})
    model = empty_model(cfg, dtype)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v.data for k, v in model.named_parameters()}
    tensors.update(model.named_buffers())
    with torch.no_grad():
        for name, t in tensors.items():
            parent = name.rpartition(".")[0]
            if t.dtype == torch.uint8:  # packed int4 nibbles: uniform 0..15
                t.random_(0, 256, generator=g)
            elif t.dtype == torch.int8:  # int8 rows (embedding)
                t.random_(-127, 128, generator=g)
            elif name.endswith(".scales"):  # std(q - 7.5) = 4.61 for uniform nibbles, 73.3 for uniform int8
                t.uniform_(0.8, 1.2, generator=g).mul_(STD / (4.61 if f"{parent}.qweight" in tensors else 73.3))
            elif name.endswith(".zeros"):  # w = (q - 8) s + z: centred at q = 7.5
                t.copy_(tensors[f"{parent}.scales"] * 0.5)
            elif name.endswith("norm.weight"):
                t.fill_(1.0)
            elif name.endswith("expert_bias"):
                t.zero_()
            else:  # router, conv kernels
                t.normal_(0, STD, generator=g)
    return model.eval()


def write_q4_0_gguf(path: Path, preset_name: str, tok_dir: Path, seed: int = 0) -> None:
    """A GGUF file of the preset's shape: Q4_0 blocks of random nibbles and fp16 scales, written block bytes as they are."""
    import gguf
    import numpy as np

    from lfm.gguf.mapping import ARCH, tensor_specs
    from lfm.gguf.vocab import tokenizer_metadata
    from lfm.gguf.writer import _add, model_metadata
    from lfm.model.presets import preset
    from lfm.text.tokenizer import Tokenizer

    c = preset(preset_name)
    rng = np.random.default_rng(seed)
    specs = tensor_specs(c)
    q4 = gguf.GGMLQuantizationType.Q4_0
    block, bsize = gguf.GGML_QUANT_SIZES[q4]
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, ARCH[c.model_type])
    meta = {"general.name": f"{preset_name} random Q4_0", "general.file_type": 2,  # LLAMA_FTYPE_MOSTLY_Q4_0
            "general.quantization_version": gguf.GGML_QUANT_VERSION}
    meta.update(model_metadata(c))
    meta.update(tokenizer_metadata(Tokenizer.from_dir(tok_dir), c.vocab_size))
    for k, v in meta.items():
        _add(w, k, v)
    kinds = []
    for s in specs:
        f32 = s.keep_f32 or len(s.shape) == 1
        assert f32 or s.shape[-1] % block == 0, s
        n = int(np.prod(s.shape)) * 4 if f32 else int(np.prod(s.shape)) // block * bsize
        w.add_tensor_info(s.gguf, s.shape, np.dtype(np.float32), n, raw_dtype=gguf.GGMLQuantizationType.F32 if f32 else q4)
        kinds.append(f32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for s, f32 in zip(specs, kinds):
        if f32:
            if s.gguf.endswith("norm.weight"):
                a = np.ones(s.shape, np.float32)
            elif s.gguf.endswith("exp_probs_b.bias"):
                a = np.zeros(s.shape, np.float32)
            else:
                a = rng.normal(0, STD, s.shape).astype(np.float32)
        else:  # Q4_0 block: fp16 d, 16 bytes of nibbles; w = d (q - 8), std(q - 8) = 4.76 for uniform q
            nb = int(np.prod(s.shape)) // block
            a = rng.integers(0, 256, (nb, bsize), dtype=np.uint8)
            d = (rng.uniform(0.8, 1.2, nb) * (STD / 4.76)).astype(np.float16)
            a[:, :2] = d.view(np.uint8).reshape(nb, 2)
        w.write_tensor_data(a)
    w.close()
    os.replace(tmp, path)


# ---- engines (inside a worker process) ----------------------------------------------------------------------------
class LfmEngine:
    def __init__(self, a: argparse.Namespace, dtype: str) -> None:
        import torch

        import lfm.kernels
        from lfm import LLM, SamplingParams

        model = random_int4_model(a.preset, getattr(torch, dtype), seed=a.seed)
        self.llm, self.sp = LLM(model, enable_prefix_caching=False), SamplingParams
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from decode_bench import _Clock  # the end of every engine step (general or fused), one per token

        runner = self.llm.engine.runner
        self.clock = _Clock(runner)
        self.info = {"kernels": lfm.kernels.available(), "fused_decode": runner.fused is not None}

    def run(self, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        """(seconds to the end of the prefill forward, seconds from there to the end of the last forward, tokens)."""
        sp = self.sp(temperature=0, max_tokens=n, ignore_eos=True)
        return self.clock.run(lambda: self.llm.generate([prompt], sp)[0].token_ids, n)


class LlamaEngine:
    """llama.cpp through llama-cpp-python's low-level API, as benchmarks/edge_bench.py (without importing torch, so
    the process's RSS is llama.cpp's own): the prompt in one llama_decode, then one token per llama_decode, argmax."""

    def __init__(self, a: argparse.Namespace, file: str) -> None:
        import llama_cpp as L
        import numpy as np

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self.L, self.np, self.threads = L, np, a.threads
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(Path(a.work) / file).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {Path(a.work) / file}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.info = {"llama_cpp": _version("llama_cpp_python"), "finite_logits": True}

    def _step(self, ctx, b, toks: list[int], pos0: int) -> int:
        b.n_tokens = len(toks)
        for i, t in enumerate(toks):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos0 + i, 1, int(i == len(toks) - 1)
            b.seq_id[i][0] = 0
        if (rc := self.L.llama_decode(ctx, b)) != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {len(toks)} tokens")
        self.stamp = time.perf_counter()
        logits = self.np.ctypeslib.as_array(self.L.llama_get_logits_ith(ctx, len(toks) - 1), shape=(self.n_vocab,))
        self.info["finite_logits"] &= bool(self.np.isfinite(logits).all())
        return int(logits.argmax())

    def run(self, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        L = self.L
        cp = L.llama_context_default_params()
        cp.n_ctx = -(-(len(prompt) + n + 1) // 256) * 256
        cp.n_batch = cp.n_ubatch = len(prompt)
        cp.n_threads = cp.n_threads_batch = self.threads
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed")
        b = L.llama_batch_init(len(prompt), 0, 1)
        try:
            t0 = time.perf_counter()
            toks = [self._step(ctx, b, prompt, 0)]
            first = self.stamp
            for k in range(n - 1):
                toks.append(self._step(ctx, b, toks[-1:], len(prompt) + k))
            return first - t0, self.stamp - first, toks
        finally:
            L.llama_batch_free(b)
            L.llama_free(ctx)


def worker(a: argparse.Namespace) -> None:
    base = _status("VmHWM")  # before the engine's libraries and weights
    _, kind, opts = ENGINES[a._worker]
    if kind == "lfm":
        import torch

        torch.set_num_threads(a.threads)
        torch.set_grad_enabled(False)
    spec = json.loads((Path(a.work) / "prompts.json").read_text())
    t0 = time.perf_counter()
    eng = (LfmEngine if kind == "lfm" else LlamaEngine)(a, **opts)
    r: dict = {"load_s": time.perf_counter() - t0, "base_hwm": base, "info": eng.info, "prefill": [], "decode": []}
    r["hwm_after_load"] = _status("VmHWM")
    eng.run(spec["prompt"], 1)  # warm-up
    r["check_tokens"] = eng.run(spec["decode"], 8)[2]
    for i in range(a.repeats):
        r["prefill"].append(len(spec["prompt"]) / eng.run(spec["prompt"], 1)[0])
        _, dt, toks = eng.run(spec["decode"], a.gen_len)
        r["decode"].append((a.gen_len - 1) / dt)
        print(f"  {a._worker} repeat {i + 1}/{a.repeats}: prefill {r['prefill'][-1]:.1f} tok/s, decode "
              f"{r['decode'][-1]:.2f} tok/s", file=sys.stderr, flush=True)
    r["tokens_agree_with_check"] = toks[:8] == r["check_tokens"]  # greedy decode is deterministic
    r["hwm"], r["rss"] = _status("VmHWM"), _status("VmRSS")
    print("RESULT " + json.dumps(r), flush=True)


# ---- parent -----------------------------------------------------------------------------------------------------------
def _version(dist: str) -> str:
    return next((d.version for d in importlib.metadata.distributions(name=dist)), "not installed")


def _mmm(xs: list[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in (min(xs), statistics.median(xs), max(xs))) if xs else "n/a"


def _busy_s() -> float:
    """CPU seconds all cores have spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def run_engine(key: str, a: argparse.Namespace, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--_worker", key, "--work", str(work)]
    for k in ("preset", "prompt_len", "gen_len", "repeats", "rounds", "threads", "seed"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    t0, busy0, ru0 = time.perf_counter(), _busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    ru1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    own = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    other = max(0.0, (_busy_s() - busy0 - own) / (wall * os.cpu_count()))
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        return {"error": f"worker exited with rc {p.returncode} (see its stderr above)", "wall_s": wall}
    return dict(json.loads(line[len("RESULT "):]), wall_s=wall, other_cpu=other)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="LFM2-8B-A1B")
    for flag, default, help_ in (("--prompt-len", 128, "prompt tokens of the prefill run"),
                                 ("--gen-len", 32, "new tokens of the batch-1 decode run"),
                                 ("--repeats", 3, "timed runs per engine process"),
                                 ("--rounds", 2, "engine processes per engine, alternating engines (noise)"),
                                 ("--threads", 2, "CPU threads"),
                                 ("--seed", 0, "weights and prompts")):
        ap.add_argument(flag, type=int, default=default, help=help_)
    ap.add_argument("--engines", default="lfm-int4,llama-q4_0", help="comma list of: " + ", ".join(ENGINES))
    ap.add_argument("--work", help="where the GGUF file goes (kept and reused; default: a temp dir, removed after)")
    ap.add_argument("--out", default=str(HERE / "results" / "moe_bench"), help="writes OUT.txt and OUT.json")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        return worker(a)
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    if bad := [e for e in engines if e not in ENGINES]:
        ap.error(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
    t_start = time.perf_counter()
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="moe-bench-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        import torch

        from lfm.model.presets import preset

        g = torch.Generator().manual_seed(a.seed + 1)
        vocab = preset(a.preset).vocab_size
        spec = {"prompt": torch.randint(16, vocab, (a.prompt_len,), generator=g).tolist(),
                "decode": torch.randint(16, vocab, (DECODE_PROMPT,), generator=g).tolist()}
        (work / "prompts.json").write_text(json.dumps(spec))
        t0 = time.perf_counter()
        if any(ENGINES[e][1] == "llama" for e in engines):
            stamp, sp = {"preset": a.preset, "seed": a.seed, "std": STD, "v": 1}, work / "q4_0.json"
            if not ((work / "q4_0.gguf").exists() and sp.exists() and json.loads(sp.read_text()) == stamp):
                from lfm.text.tiny_tokenizer import build_tiny_tokenizer

                print(f"writing a random Q4_0 {a.preset} GGUF in {work} ...", file=sys.stderr, flush=True)
                write_q4_0_gguf(work / "q4_0.gguf", a.preset, build_tiny_tokenizer(work / "tokenizer"), a.seed)
                sp.write_text(json.dumps(stamp))
        build_s = time.perf_counter() - t0
        res: dict[str, dict] = {e: {"runs": []} for e in engines}
        for i in range(a.rounds):  # one engine in memory at a time; rounds alternate engines against drifting load
            for e in engines:
                print(f"round {i + 1}/{a.rounds}: {ENGINES[e][0]} ...", file=sys.stderr, flush=True)
                r = run_engine(e, a, work)
                res[e]["runs"].append(r)
                if "error" in r:
                    res[e]["error"] = r["error"]
        for e in engines:  # all repeats of all rounds; peak RSS: the highest of the engine's processes
            ok = [r for r in res[e]["runs"] if "error" not in r]
            res[e].update(prefill=[v for r in ok for v in r["prefill"]], decode=[v for r in ok for v in r["decode"]],
                          hwm=max((r["hwm"] for r in ok), default=0),
                          load_s=statistics.median([r["load_s"] for r in ok]) if ok else 0,
                          other_cpu=[round(r["other_cpu"], 3) for r in ok])
            if not ok:
                res[e]["error"] = res[e].get("error", "no run")
        gguf_gib = (work / "q4_0.gguf").stat().st_size / GiB if (work / "q4_0.gguf").exists() else None
    finally:
        if tmp is not None:
            tmp.cleanup()
    report(a, engines, res, build_s, gguf_gib, time.perf_counter() - t_start)


def report(a, engines, res, build_s, gguf_gib, wall) -> None:
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), platform.machine())
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    env = {"torch": torch.__version__, "llama_cpp": _version("llama_cpp_python"), "cpu": cpu, "cores": os.cpu_count(),
           "loadavg_at_end": load}
    med = {e: {k: statistics.median(res[e][k]) if res[e].get(k) else None for k in ("prefill", "decode")} for e in engines}
    out: list[str] = []
    out.append(f"## MoE on CPU: {a.preset} shape, random 4-bit weights; prefill {a.prompt_len} tokens, batch-1 decode "
               f"{a.gen_len} tokens after an {DECODE_PROMPT}-token prompt; {a.rounds} rounds x {a.repeats} repeats, "
               f"{a.threads} threads\n")
    out.append(f"torch {env['torch']}, llama-cpp-python {env['llama_cpp']}, CPU {cpu} ({os.cpu_count()} cores, "
               f"{torch.backends.cpu.get_cpu_capability()}); load average at the end "
               f"{' / '.join(f'{x:.1f}' for x in load) if load else 'n/a'} (1 / 5 / 15 min)\n")
    out.append("| engine | prefill tok/s | decode tok/s, batch 1 | peak RSS GiB | load s | other CPU per round |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for e in engines:
        r = res[e]
        if not r.get("decode"):
            out.append(f"| {ENGINES[e][0]} | {r.get('error', 'n/a')} | | | | |")
            continue
        out.append(f"| {ENGINES[e][0]} | {_mmm(r['prefill'])} | {_mmm(r['decode'])} | {r['hwm'] / GiB:.2f} | "
                   f"{r['load_s']:.0f} | {', '.join(f'{100 * x:.0f}%' for x in r['other_cpu'])} |")
    out.append(f"\n(tok/s: min / median / max over {a.rounds} rounds x {a.repeats} repeats; peak RSS = the highest VmHWM "
               "of the engine's own processes; load s = build or load time, median)\n")
    quiet = {}  # each engine's round with the least CPU taken by other processes
    for e in engines:
        ok = [r for r in res[e]["runs"] if "error" not in r]
        if ok:
            q = min(ok, key=lambda r: r["other_cpu"])
            quiet[e] = {"other_cpu": q["other_cpu"], "prefill": statistics.median(q["prefill"]),
                        "decode": statistics.median(q["decode"])}
    ratios: dict[str, dict] = {}
    llama = "llama-q4_0" if med.get("llama-q4_0", {}).get("decode") else None
    for e in engines:
        if ENGINES[e][1] == "lfm" and llama and med[e]["decode"]:
            ratios[e] = {"all runs": {k: med[e][k] / med[llama][k] for k in ("prefill", "decode")},
                         "quietest rounds": {k: quiet[e][k] / quiet[llama][k] for k in ("prefill", "decode")}}
    if ratios:
        out.append("| ratio of medians (target) | runs | prefill (>= 3x) | decode batch 1 (>= 1.3x) | peak RSS (<= 6 GB) |")
        out.append("|---|---|---:|---:|---:|")
        for e, rr in ratios.items():
            for which, r in rr.items():
                note = "" if which == "all runs" else (f" (other CPU {100 * quiet[e]['other_cpu']:.0f}% / "
                                                       f"{100 * quiet[llama]['other_cpu']:.0f}%)")
                out.append(f"| {ENGINES[e][0]} / llama.cpp Q4_0 | {which}{note} | {r['prefill']:.2f}x | "
                           f"{r['decode']:.2f}x | {res[e]['hwm'] / 1e9:.2f} GB |")
    if gguf_gib:
        out.append(f"\n(GGUF file {gguf_gib:.2f} GiB; weights written in {build_s:.0f} s; total wall time {wall:.0f} s)")
    text = "\n".join(out)
    print("\n" + text)
    base = Path(a.out)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".txt").write_text(text + "\n")
    base.with_suffix(".json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(a).items() if not k.startswith("_")}, "env": env, "results": res,
         "medians": med, "quietest_round_medians": quiet, "ratios": ratios, "build_s": build_s, "wall_s": wall}, indent=1) + "\n")
    print(f"(written: {base.with_suffix('.txt')}, {base.with_suffix('.json')})")


if __name__ == "__main__":
    main()
