#!/usr/bin/env python
"""Edge engines on one CPU, same random weights: lfm (float32, bfloat16, int8, int4 g64), transformers bfloat16 and
llama.cpp (F16, Q8_0, Q4_K_M): prefill, batch-1 decode, batch-B aggregate decode and peak RSS, in one run.

    python benchmarks/edge_bench.py [--preset LFM2.5-350M] [--prompt-len 512] [--gen-len 128] [--batch 32]
                                    [--repeats 3] [--threads N] [--engines a,b,...] [--skip-rss] [--work DIR]

* Weights: one float32 checkpoint of the preset's shape, N(0, 0.02), fixed seed, written once into --work (reused if
  its stamp matches); lfm and transformers cast it on load, `lfm export gguf` writes F16 and Q8_0 from it, llama.cpp's
  quantizer makes Q4_K_M from the F16 file. Each engine runs in its own fresh subprocess (torch threads = llama.cpp
  n_threads = n_threads_batch = --threads), one measurement at a time, engines interleaved, order rotated per repeat.
* prefill tok/s = prompt_len / (call start -> end of the prefill forward), one --prompt-len prompt.
* decode tok/s = B * (n - 1) / (end of the first forward -> end of the last forward), greedy, EOS ignored, after a
  --decode-prompt-len prompt per row: batch 1 with --gen-len new tokens, batch --batch with --batch-gen-len per row
  (lfm: one LLM.generate over B prompts; llama.cpp: a context with n_seq_max=B, a llama_batch of one token per
  sequence id per step). Forward ends come from a forward hook (lfm, transformers: one forward per token, checked)
  or right after llama_decode returns: sampling (argmax) and bookkeeping between steps count for every engine.
  transformers runs at batch 1 only (it is not in the batch comparison, and is the slowest).
* Peak RSS: the engine process's VmHWM after loading and the batch-1 warm-ups, absolute and as growth over the same
  process right after `import torch` (the bare baseline); also the growth after the batch-B warm-up.
* One warm-up of each measurement, then --repeats rounds: min / median / max; ratios are of medians.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
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

import torch  # noqa: E402

from decode_bench import _Clock, _peak_rss, _rss_now  # noqa: E402  (VmHWM / RSS readers, forward-hook clock)

MiB = 1 << 20
# key: (label, kind, options)
ENGINES: dict[str, tuple[str, str, dict]] = {
    "lfm-f32": ("lfm float32", "lfm", {"dtype": "float32"}),
    "lfm-bf16": ("lfm bfloat16", "lfm", {"dtype": "bfloat16"}),
    "lfm-int8": ("lfm int8", "lfm", {"dtype": "float32", "quantization": "int8"}),
    "lfm-int4": ("lfm int4 g64", "lfm", {"dtype": "float32", "quantization": "int4", "group_size": 64}),
    # bfloat16 activations: the int kernels then quantize activations too (int16 for int8, int8 for int4 weights)
    "lfm-int8-bf16": ("lfm int8, bf16 act.", "lfm", {"dtype": "bfloat16", "quantization": "int8"}),
    "lfm-int4-bf16": ("lfm int4 g64, bf16 act.", "lfm", {"dtype": "bfloat16", "quantization": "int4", "group_size": 64}),
    "hf-bf16": ("transformers bfloat16", "hf", {}),
    "llama-f16": ("llama.cpp F16", "llama", {"file": "f16.gguf"}),
    "llama-q8_0": ("llama.cpp Q8_0", "llama", {"file": "q8_0.gguf"}),
    "llama-q4_k_m": ("llama.cpp Q4_K_M", "llama", {"file": "q4_k_m.gguf"}),
}
RATIOS = [("lfm int4 / llama.cpp Q4_K_M", "lfm-int4*", "llama-q4_k_m"), ("lfm int8 / llama.cpp Q8_0", "lfm-int8*", "llama-q8_0"),
          ("lfm bf16 / llama.cpp F16", "lfm-bf16", "llama-f16"), ("lfm bf16 / transformers bf16", "lfm-bf16", "hf-bf16"),
          ("best lfm / transformers bf16", "lfm*", "hf-bf16"), ("best lfm / best llama.cpp", "lfm*", "llama*")]
CHECK_TOKENS = 8


# ---- engines (inside a worker process) ------------------------------------------------------------------------
class LfmEngine:
    def __init__(self, work: Path, threads: int, dtype: str, quantization: str | None = None, group_size: int = 64):
        from lfm import LLM, SamplingParams

        self.llm = LLM(work / "ckpt", dtype, quantization=quantization, group_size=group_size,
                       enable_prefix_caching=False)  # repeated prompts: measure, not hit
        self.sp = SamplingParams
        self.clock = _Clock(self.llm.engine.runner)

    def run(self, prompts: list[list[int]], n: int) -> tuple[float, float, list[int]]:
        sp = self.sp(temperature=0, max_tokens=n, ignore_eos=True)
        fused = self.llm.engine.runner.fused
        if fused is not None:
            fused.reset_timings()
        ttft, dt, toks = self.clock.run(lambda: self.llm.generate(prompts, sp)[0].token_ids, n)
        self.last_split = None  # ms per decode step: the fused step's GEMVs / attention / rest, and outside it
        t = fused.timings() if fused is not None else {"steps": 0}
        if t["steps"] and n > 1:
            k = t["steps"]
            sp_ = {"gemv": t["gemv_s"] / k, "attention": t["attention_s"] / k, "other": t["other_s"] / k}
            sp_["outside"] = dt / (n - 1) - sum(sp_.values())
            self.last_split = {key: v * 1e3 for key, v in sp_.items()}
        return ttft, dt, toks


class HfEngine:
    def __init__(self, work: Path, threads: int):
        import transformers

        transformers.logging.set_verbosity_error()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(work / "ckpt", dtype=torch.bfloat16).eval()
        self.model.generation_config.eos_token_id = None
        self.clock = _Clock(self.model)

    def run(self, prompts: list[list[int]], n: int) -> tuple[float, float, list[int]]:
        ids = torch.tensor(prompts, dtype=torch.long)
        return self.clock.run(lambda: self.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            pad_token_id=0)[0, ids.shape[1]:].tolist(), n)


class LlamaEngine:
    """llama.cpp through llama-cpp-python's low-level API: per run, one context with n_seq_max = rows and the whole
    prompt (all rows) in one ubatch; then a llama_batch of one token per sequence id per step; greedy argmax."""

    def __init__(self, work: Path, threads: int, file: str):
        import llama_cpp as L
        import numpy as np

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's log callback obeys this level
        self.L, self.np, self.threads = L, np, threads
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(work / file).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {work / file}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    def _step(self, ctx, b, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """Decode (token, pos, seq, wants_logits) items in one llama_decode; argmax of each output, in order."""
        b.n_tokens = len(items)
        for i, (t, p, s, o) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, int(o)
            b.seq_id[i][0] = s
        if (rc := self.L.llama_decode(ctx, b)) != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(items)} tokens")
        self.stamp = time.perf_counter()
        return [int(self.np.ctypeslib.as_array(self.L.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,)).argmax())
                for i, it in enumerate(items) if it[3]]

    def run(self, prompts: list[list[int]], n: int) -> tuple[float, float, list[int]]:
        L, rows, plen = self.L, len(prompts), len(prompts[0])
        cp = L.llama_context_default_params()
        cp.n_seq_max, cp.n_ctx = rows, rows * (-(-(plen + n + 1) // 256) * 256)  # per sequence, unless unified
        cp.n_batch = cp.n_ubatch = rows * plen
        cp.n_threads = cp.n_threads_batch = self.threads
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError(f"llama_init_from_model failed (n_seq_max={rows}, n_ctx={cp.n_ctx})")
        b = L.llama_batch_init(rows * plen, 0, 1)
        try:
            t0 = time.perf_counter()
            nxt = self._step(ctx, b, [(t, j, s, j == plen - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)])
            first, toks = self.stamp, [nxt[0]]
            for k in range(n - 1):
                nxt = self._step(ctx, b, [(nxt[s], plen + k, s, True) for s in range(rows)])
                toks.append(nxt[0])
            return first - t0, self.stamp - first, toks
        finally:
            L.llama_batch_free(b)
            L.llama_free(ctx)


def worker(engine: str, work: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    base = _peak_rss()  # this process right after `import torch` (+ the stdlib): the bare baseline
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # replies on a private fd; anything printed goes to stderr
    os.dup2(2, 1)
    spec = json.loads((work / "prompts.json").read_text())
    try:
        t0, (_, kind, opts) = time.perf_counter(), ENGINES[engine]
        eng = {"lfm": LfmEngine, "hf": HfEngine, "llama": LlamaEngine}[kind](work, threads, **opts)
        proto.write(json.dumps({"base": base, "load_s": time.perf_counter() - t0}) + "\n")
    except Exception as e:  # noqa: BLE001 - reported, the other engines go on
        proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        return
    for line in iter(sys.stdin.readline, ""):
        if (cmd := json.loads(line))["op"] == "quit":
            break
        try:
            if cmd["op"] == "mem":
                r = {"hwm": _peak_rss(), "rss": _rss_now()}
            elif cmd["op"] == "prefill":
                r = {"v": len(spec["prompt"]) / eng.run([spec["prompt"]], 1)[0]}
            else:  # decode
                _, dt, toks = eng.run(spec["decode"][:cmd["rows"]], cmd["n"])
                r = {"v": cmd["rows"] * (cmd["n"] - 1) / dt, "tokens": toks}
                if getattr(eng, "last_split", None):
                    r["split"] = eng.last_split
        except Exception as e:  # noqa: BLE001
            r = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(r) + "\n")


# ---- parent ---------------------------------------------------------------------------------------------------
def build(work: Path, preset_name: str, seed: int, threads: int, files: set[str]) -> float:
    """The checkpoint and GGUF files in `work` (kept when the stamp matches); returns seconds spent."""
    t0 = time.perf_counter()
    sp, stamp = work / "stamp.json", {"preset": preset_name, "seed": seed, "std": 0.02}
    if not (sp.exists() and json.loads(sp.read_text()) == stamp):
        from lfm.model.checkpoint import empty_model, save_model
        from lfm.model.presets import preset
        from lfm.text.tiny_tokenizer import build_tiny_tokenizer

        _ = [f.unlink() for f in work.glob("*.gguf")]  # made from older weights
        print(f"building {preset_name} random weights (seed {seed}) in {work} ...", file=sys.stderr, flush=True)
        model = empty_model(preset(preset_name), torch.float32)
        model.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
        save_model(model, work / "ckpt", tokenizer_dir=build_tiny_tokenizer(work / "tokenizer"))
        del model
        sp.write_text(json.dumps(stamp))
    for t in ("f16", "q8_0"):
        if (f"{t}.gguf" in files or (t == "f16" and "q4_k_m.gguf" in files)) and not (work / f"{t}.gguf").exists():
            from lfm.gguf import export_gguf

            print(f"lfm export gguf --type {t} ...", file=sys.stderr, flush=True)
            export_gguf(work / "ckpt", work / f"{t}.gguf", type=t, progress=False)
    if "q4_k_m.gguf" in files and not (work / "q4_k_m.gguf").exists():
        import ctypes

        import llama_cpp as L

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        print("llama_model_quantize F16 -> Q4_K_M ...", file=sys.stderr, flush=True)
        qp = L.llama_model_quantize_default_params()
        qp.ftype, qp.nthread = L.LLAMA_FTYPE_MOSTLY_Q4_K_M, threads
        tmp = work / "q4_k_m.gguf.tmp"
        if L.llama_model_quantize(str(work / "f16.gguf").encode(), str(tmp).encode(), ctypes.byref(qp)) != 0:
            raise RuntimeError("llama_model_quantize to Q4_K_M failed")
        tmp.replace(work / "q4_k_m.gguf")
    return time.perf_counter() - t0


class Worker:
    """One engine's subprocess: JSON lines in, JSON lines out."""

    def __init__(self, key: str, work: Path, threads: int) -> None:
        self.key, self.error = key, None
        self.p = subprocess.Popen([sys.executable, __file__, "--_worker", key, "--work", str(work),
                                   "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self.ask()
        self.error = self.hello.get("error")

    def ask(self, **cmd) -> dict:
        if self.error:
            return {"error": self.error}
        if cmd:
            self.p.stdin.write(json.dumps(cmd) + "\n")
            self.p.stdin.flush()
        line = self.p.stdout.readline()  # no timeout: a hung engine hangs the run (none seen)
        if not line:
            self.error = f"worker exited (rc {self.p.wait()}); see its stderr above"
        return json.loads(line) if line else {"error": self.error}

    def close(self) -> None:
        try:
            self.p.communicate('{"op": "quit"}\n', timeout=60)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.p.kill()
            self.p.wait()


def _mmm(xs: list[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in (min(xs), statistics.median(xs), max(xs))) if xs else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="LFM2.5-350M", help="model shape (lfm.model.presets), random weights")
    for flag, default, help_ in (
            ("--prompt-len", 512, "prompt tokens of the prefill run"), ("--gen-len", 128, "new tokens, batch-1 decode"),
            ("--batch", 32, "rows of the batch decode"), ("--batch-gen-len", 32, "new tokens per row, batch decode"),
            ("--decode-prompt-len", 8, "prompt tokens per row before a decode run"), ("--repeats", 3, "timed rounds"),
            ("--threads", os.cpu_count(), "torch and llama.cpp threads (default: all cores)"), ("--seed", 0, "")):
        ap.add_argument(flag, type=int, default=default, help=help_ or None)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma list of: " + ", ".join(ENGINES))
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--work", help="where the weights and GGUF files go (default: a temp dir, removed after)")
    ap.add_argument("--out", default=str(HERE / "results" / "edge_bench.json"))
    ap.add_argument("--busy", type=int, default=0,
                    help="run N CPU-spinning processes during the timed repeats: a phone / laptop running other apps "
                         "(how each engine degrades on a busy CPU)")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        return worker(a._worker, Path(a.work), a.threads)
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    if bad := [e for e in engines if e not in ENGINES]:
        ap.error(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
    if min(a.gen_len, a.batch_gen_len) < CHECK_TOKENS or a.decode_prompt_len < 1:
        ap.error(f"--gen-len and --batch-gen-len must be at least {CHECK_TOKENS}, --decode-prompt-len at least 1")
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="edge-bench-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    from lfm.model.presets import preset

    g = torch.Generator().manual_seed(a.seed + 1)
    vocab = preset(a.preset).vocab_size
    spec = {"prompt": torch.randint(16, vocab, (a.prompt_len,), generator=g).tolist(),
            "decode": torch.randint(16, vocab, (a.batch, a.decode_prompt_len), generator=g).tolist()}
    (work / "prompts.json").write_text(json.dumps(spec))
    build_s = build(work, a.preset, a.seed, a.threads, {ENGINES[e][2]["file"] for e in engines if "file" in ENGINES[e][2]})
    res: dict[str, dict] = {e: {"prefill": [], "decode_b1": [], "decode_batch": [], "errors": {}} for e in engines}
    ops = {"prefill": {"op": "prefill"}, "decode_b1": {"op": "decode", "rows": 1, "n": a.gen_len},
           "decode_batch": {"op": "decode", "rows": a.batch, "n": a.batch_gen_len}}
    workers: list[Worker] = []

    def measure(w: Worker, name: str, store: bool = True, **cmd) -> dict:
        if name == "decode_batch" and w.key == "hf-bf16":
            res[w.key]["errors"][name] = "not measured (transformers is compared at batch 1 only)"
            return {}
        r = w.ask(**(cmd or ops[name]))
        if "error" in r:
            res[w.key]["errors"][name] = r["error"]
            print(f"  {w.key} {name}: {r['error']}", file=sys.stderr, flush=True)
        elif store:
            res[w.key][name].append(r["v"])
            if "split" in r:
                res[w.key].setdefault(name + "_split", []).append(r["split"])
        return r

    try:
        for e in engines:  # loaded one at a time, then all kept alive (idle ones block on stdin)
            print(f"loading {ENGINES[e][0]} ...", file=sys.stderr, flush=True)
            workers.append(w := Worker(e, work, a.threads))
            res[e].update(load_s=w.hello.get("load_s"), baseline_hwm=w.hello.get("base"))
            res[e]["errors"].update({"load": w.error} if w.error else {})
        print("warm-up, greedy-token checks, peak RSS ...", file=sys.stderr, flush=True)
        for w in workers:
            measure(w, "prefill", False)
            r = res[w.key]["check"] = measure(w, "decode_b1", False, op="decode", rows=1, n=CHECK_TOKENS).get("tokens")
            res[w.key]["mem_b1"] = {} if a.skip_rss else w.ask(op="mem")
            rb = measure(w, "decode_batch", False, op="decode", rows=a.batch, n=CHECK_TOKENS).get("tokens")
            res[w.key]["mem_batch"] = {} if a.skip_rss else w.ask(op="mem")
            if r and rb:  # row 0 of the batch has the batch-1 prompt: the same greedy tokens, if rows are independent
                res[w.key]["batch_row0_agree"] = _agree(r, rb)
        ref = res.get("lfm-f32", {}).get("check")
        for e in engines:  # greedy tokens may part early on random weights (near-tied logits): reported, not failed
            c, rb = res[e].get("check"), res[e].get("batch_row0_agree", "n/a")
            res[e]["agree_with_lfm_f32"] = _agree(ref, c) if ref and c else None
            print(f"check {ENGINES[e][0]}: first {CHECK_TOKENS} greedy tokens equal to lfm float32's: "
                  f"{_agree(ref, c) if ref and c else 'n/a'}; batch-{a.batch} row 0 equal to batch 1: {rb}", flush=True)
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
        for i in range(a.repeats):
            t_rep = time.perf_counter()
            order = workers[i % len(workers):] + workers[:i % len(workers)]  # rotate: no engine always goes first
            for name in ops:
                for w in order:
                    measure(w, name)
                    time.sleep(0.05)  # let the previous engine's threads go idle
            print(f"repeat {i + 1}/{a.repeats} ({time.perf_counter() - t_rep:.0f} s): " + ", ".join(
                f"{e} {res[e]['decode_b1'][-1]:.1f}" for e in engines if res[e]["decode_b1"]) + " tok/s at batch 1",
                file=sys.stderr, flush=True)
    finally:
        for h in locals().get("hogs", []):
            h.kill()
        for w in workers:
            w.close()
        if tmp is not None:
            tmp.cleanup()
    report(a, engines, res, build_s, t_start)


def _version(dist: str) -> str:
    return next((d.version for d in importlib.metadata.distributions(name=dist)), "not installed")


def _agree(x: list[int], y: list[int]) -> int:
    """Leading positions where two greedy token lists agree."""
    return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))


def report(a: argparse.Namespace, engines: list[str], res: dict, build_s: float, t_start: float) -> None:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), platform.machine())
    env = {"torch": torch.__version__, "transformers": _version("transformers"), "llama_cpp": _version("llama_cpp_python"),
           "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    keys = ("prefill", "decode_b1", "decode_batch")
    med = {e: {k: statistics.median(res[e][k]) if res[e][k] else None for k in keys} for e in engines}
    wall = time.perf_counter() - t_start
    print(f"\n## edge engines: {a.preset}, random weights, greedy, prefill {a.prompt_len} tokens; decode {a.gen_len} "
          f"tokens at batch 1, {a.batch_gen_len} per row at batch {a.batch} (after {a.decode_prompt_len}-token "
          f"prompts); {a.repeats} repeats\n")
    print(f"torch {env['torch']}, transformers {env['transformers']}, llama-cpp-python {env['llama_cpp']}, "
          f"threads {a.threads} (of {os.cpu_count()} cores), CPU {cpu} ({torch.backends.cpu.get_cpu_capability()})"
          + (f"; {a.busy} CPU-spinning process(es) ran during the timed repeats" if a.busy else "") + "\n")
    rss_h = "" if a.skip_rss else (" peak RSS MiB after batch 1: growth over `import torch` / absolute (RSS now) |"
                                   f" peak growth after batch {a.batch} |")
    print(f"| engine | prefill tok/s | decode tok/s, batch 1 | aggregate decode tok/s, batch {a.batch} |{rss_h}")
    print("|---|---:|---:|---:|" + ("" if a.skip_rss else "---:|---:|"))
    for e in engines:
        r, b = res[e], res[e].get("baseline_hwm")
        cells = [_mmm(r[k]) for k in keys]
        if not a.skip_rss:
            m1, mb = r.get("mem_b1") or {}, r.get("mem_batch") or {}
            cells.append(f"{(m1['hwm'] - b) / MiB:.0f} / {m1['hwm'] / MiB:.0f} ({m1['rss'] / MiB:.0f})"
                         if b and "hwm" in m1 else "n/a")
            cells.append(f"{(mb['hwm'] - b) / MiB:.0f}" if b and "hwm" in mb else "n/a")
        print(f"| {ENGINES[e][0]} | " + " | ".join(cells) + " |")
    print("\n(tok/s: min / median / max over the repeats)\n")
    ratios = {}
    print(f"| ratio of medians | prefill | decode batch 1 | decode batch {a.batch} |\n|---|---:|---:|---:|")
    for label, x, y in RATIOS:
        row = {}
        for k in keys:
            def pick(sel: str) -> tuple[str | None, float | None]:
                pool = [e for e in engines if med[e][k] and (e.startswith(sel[:-1]) if sel[-1] == "*" else e == sel)]
                best = max(pool, key=lambda e: med[e][k], default=None)
                return best, med[best][k] if best else None
            (ex, vx), (ey, vy) = pick(x), pick(y)
            row[k] = {"ratio": vx / vy, "num": ex, "den": ey} if vx and vy else None
        ratios[label] = row
        print(f"| {label} | " + " | ".join("n/a" if c is None else f"{c['ratio']:.2f}x" + (
            f" ({ENGINES[c['num']][0]} / {ENGINES[c['den']][0]})" if "*" in x + y else "") for c in row.values()) + " |")
    split_rows = [(e, k) for e in engines for k in ("decode_b1", "decode_batch") if res[e].get(k + "_split")]
    if split_rows:
        print("\n| lfm decode step, ms per step (median repeat) | weight GEMVs | attention | rest of the fused step "
              "| outside it (scheduler, sampler, Python) | GEMV share |\n|---|---:|---:|---:|---:|---:|")
        for e, k in split_rows:
            sps = sorted(res[e][k + "_split"], key=lambda d: sum(d.values()))
            m = sps[len(sps) // 2]
            res[e][k + "_split_median"] = m
            print(f"| {ENGINES[e][0]}, {'batch 1' if k == 'decode_b1' else f'batch {a.batch}'} | {m['gemv']:.2f} | "
                  f"{m['attention']:.2f} | {m['other']:.2f} | {m['outside']:.2f} | "
                  f"{100 * m['gemv'] / sum(m.values()):.0f}% |")
    errs = [f"- {ENGINES[e][0]} {k}: {v}" for e in engines for k, v in res[e]["errors"].items()]
    print("\nn/a or errors:\n" + "\n".join(errs)) if errs else None
    print(f"\n(build + export {build_s:.0f} s, total wall time {wall:.0f} s)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if not k.startswith("_")}, "env": env,
                               "results": res, "medians": med, "ratios": ratios, "build_s": build_s, "wall_s": wall},
                              indent=1) + "\n")
    print(f"(JSON: {out})")


if __name__ == "__main__":
    main()
