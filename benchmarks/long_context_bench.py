#!/usr/bin/env python
"""Long context on an edge CPU: a 32K-token prompt on the LFM2.5-350M shape at int4 g64 through lfm's engine, with
the issue's memory and speed targets checked in one run.

    python benchmarks/long_context_bench.py [--prompt-len 32768] [--short-len 512] [--gen-len 32] [--threads 2]
                                            [--prefill-chunk N] [--sweep 256,2048] [--work DIR]
                                            [--kv-cache-dtype auto|int8|auto,int8]

* Weights: the preset's shape, N(0, 0.02) random weights (seed 0) in bfloat16, quantized int4 g64
  (`quantize_model`) and saved once as an lfm int4 checkpoint in --work; every measurement loads that checkpoint in
  a fresh child process (`LLM(dir)`, bfloat16 activations, lfm.kernels), so its peak RSS is its own.
* Baseline: peak RSS (VmHWM) of a bare `python -c "import torch"` process.
* Runs: `LLM.generate` on one prompt of --short-len (twice: before and after the long run, the lower median step
  time kept, as other processes may stall one) and one of --prompt-len random token ids, greedy, EOS ignored,
  --gen-len (short: 2x) new tokens, prefill chunked by `LLM.prefill_chunk` (its default unless --prefill-chunk).
  A forward hook stamps every forward: prefill tok/s = prompt / (call start -> end of the last prefill chunk), decode
  tok/s = decode forwards / (end of prefill -> end of the last forward). Each Attention's `attend` (the SDPA core
  over the cache) is wrapped with a timer (instance attribute, lfm unchanged) to split decode time into attention
  core vs everything else. Peak RSS = the child's VmHWM at the end; weights = bytes of the model's parameters and
  buffers (plus, listed apart, tensors the modules derive at load: Int4Linear's torch-fallback packing);
  KV / conv state = the engine's own HybridCache (captured from the forward call), per part.
* What-if (32K child, after the run): decode steps re-timed from the same cache with the SDPA core as it is and with
  GQA query heads folded into the query-length axis (q [B, H, 1, d] -> [B, KV, H/KV, d], no enable_gqa: same
  maths, checked equal), to show what the attention core costs and could cost.
* Sweep: per --sweep chunk size, a fresh child runs only the *last* prefill chunk of a --prompt-len prompt (cache
  position set to prompt - chunk: the largest attention span), and reports its activation peak (VmHWM growth over
  the RSS before it, minus the KV slots it writes) and its tok/s: how the chunk size bounds prefill memory.
* --kv-cache-dtype: the whole set of runs per KV cache type (LLM(kv_cache_dtype=...): auto = bf16, int8 = int8
  values + a float32 scale per vector); default auto only, which keeps the run near 10 minutes on 2 idle cores.
* Targets (issue "edge engine"): runs at 32K; peak RSS <= bare torch + 1.15 x (weights + KV + conv state); decode
  tok/s at 32K >= decode tok/s at --short-len / 1.5; prefill activation memory bounded (chunked).

Prints markdown tables; writes benchmarks/results/long_context_bench.{json,txt}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MiB = 1 << 20
RSS_FACTOR, DECODE_FACTOR = 1.15, 1.5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def hwm() -> int:
    return _status("VmHWM")


def rss() -> int:
    return _status("VmRSS")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS


def malloc_trim() -> bool:
    """Give glibc's free heap pages back to the OS (diagnostic: how much of the RSS is freed-but-kept memory)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except OSError:
        return False


# ---- child: one measurement ------------------------------------------------------------------------------------
def _load(work: Path, threads: int, kv: str = "auto"):
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    base = hwm()
    from lfm import LLM

    imported = hwm()
    t0 = time.perf_counter()
    llm = LLM(str(work / "int4"), kv_cache_dtype=None if kv == "auto" else kv)
    load_s = time.perf_counter() - t0
    m = llm.model
    seen, wbytes = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            wbytes += t.numel() * t.element_size()
    derived = sum(t.numel() * t.element_size() for mod in m.modules()
                  for t in (getattr(mod, "_packed", None), getattr(mod, "_sz", None)) if isinstance(t, torch.Tensor))
    emb = m.model.embed_tokens
    emb_bytes = sum(t.numel() * t.element_size() for t in emb.buffers()) + sum(
        t.numel() * t.element_size() for t in emb.parameters())
    info = {"base_hwm": base, "import_hwm": imported, "load_s": load_s, "load_hwm": hwm(), "load_rss": rss(),
            "weights_bytes": wbytes, "derived_bytes": derived, "embedding_bytes": emb_bytes}
    return llm, info


class _Instrument:
    """Forward-hook clock on the model (+ the cache it is called with) and a timer around every attention core."""

    def __init__(self, model, progress_every: int = 0) -> None:
        import torch

        self.ends: list[tuple[float, int]] = []  # (time, tokens in the forward)
        self.attend: list[float] = []  # seconds in Attention.attend during each forward
        self.cache = None
        self._acc = 0.0
        self.t0 = 0.0
        self.progress = progress_every

        def pre(mod, args):
            self._acc = 0.0
            if len(args) > 1 and args[1] is not None:
                self.cache = args[1]

        def post(mod, args, out):
            now = time.perf_counter()
            T = args[0].shape[1]
            self.ends.append((now, T))
            self.attend.append(self._acc)
            if self.progress and T > 1:
                done = self.cache.pos if self.cache is not None else 0
                log(f"    prefill chunk {len(self.ends)}: {done} tokens in {now - self.t0:.0f} s "
                    f"({done / (now - self.t0):.0f} tok/s), peak RSS {hwm() / MiB:.0f} MiB")

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)
        for mod in model.modules():
            if type(mod).__name__ == "Attention":
                for name in ("attend", "decode"):  # the SDPA core, and the decode kernel where lfm has one
                    if hasattr(mod, name):
                        setattr(mod, name, self._timed(getattr(mod, name)))
        self.torch = torch

    def _timed(self, fn):
        def wrapped(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            self._acc += time.perf_counter() - t
            return out
        return wrapped


def _cache_bytes(cache) -> dict:
    part = lambda d: sum(t.numel() * t.element_size() for t in d.values())  # noqa: E731
    scales = part(getattr(cache, "k_scale", {})) + part(getattr(cache, "v_scale", {}))
    return {"kv_bytes": part(cache.k) + part(cache.v) + scales, "kv_scale_bytes": scales, "conv_bytes": part(cache.conv),
            "total": cache.nbytes(), "max_len": cache.max_len, "attn_layers": len(cache.k),
            "conv_layers": len(cache.conv), "kv_dtype": str(next(iter(cache.k.values())).dtype)}


def child_run(a: argparse.Namespace, work: Path) -> dict:
    import torch

    from lfm import SamplingParams

    llm, info = _load(work, a.threads, a._kv)
    if a.prefill_chunk:
        llm.prefill_chunk = a.prefill_chunk
    n, gen = a._n, a._gen
    llm.max_model_len = max(llm.max_model_len, n + gen + 1)
    g = torch.Generator().manual_seed(a.seed + 7)
    warm = torch.randint(14, llm.config.vocab_size, (16,), generator=g).tolist()
    sp = lambda k: SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)  # noqa: E731
    llm.generate([warm], sp(4))  # pages in the kernels and library code once
    info["warm_hwm"], info["warm_rss"] = hwm(), rss()
    prompt = torch.randint(14, llm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(a.seed + 1)).tolist()
    ins = _Instrument(llm.model, progress_every=1 if n > llm.prefill_chunk else 0)
    log(f"  [{n}-token prompt] prefill in chunks of {llm.prefill_chunk}, then {gen} tokens ...")
    reset_peak()  # from here: the run's own peak (the process peak so far is kept in warm_hwm)
    ins.t0 = t0 = time.perf_counter()
    out = llm.generate([prompt], sp(gen))[0].token_ids
    run_hwm = hwm()
    pre = [i for i, (_, T) in enumerate(ins.ends) if T > 1]
    last_pre = pre[-1]
    t_pre = ins.ends[last_pre][0]
    dec = ins.ends[last_pre + 1:]
    dec_att = ins.attend[last_pre + 1:]
    dec_s = dec[-1][0] - t_pre
    r = {**info, "prompt_len": n, "gen_len": gen, "prefill_chunk": llm.prefill_chunk, "prefill_forwards": len(pre),
         "prefill_s": t_pre - t0, "prefill_tok_s": n / (t_pre - t0), "prefill_attend_s": sum(ins.attend[:last_pre + 1]),
         "decode_forwards": len(dec), "decode_s": dec_s, "decode_tok_s": len(dec) / dec_s,
         "decode_attend_s": sum(dec_att), "tokens": out[:8], "run_hwm": run_hwm, "end_rss": rss(),
         "end_hwm": max(run_hwm, info["warm_hwm"]), "cache": _cache_bytes(ins.cache)}
    r["decode_ms_per_token"] = 1e3 * dec_s / len(dec)
    steps = sorted(b - a_ for a_, b in zip([t_pre] + [t for t, _ in dec[:-1]], [t for t, _ in dec]))
    r["decode_ms_median"] = 1e3 * steps[len(steps) // 2]  # robust to other processes stealing a core now and then
    r["decode_ms_min"] = 1e3 * steps[0]
    r["decode_attend_ms_per_token"] = 1e3 * sum(dec_att) / len(dec)
    log(f"  [{n}] prefill {r['prefill_tok_s']:.1f} tok/s ({r['prefill_s']:.0f} s, attention core "
        f"{r['prefill_attend_s']:.0f} s); decode {r['decode_tok_s']:.2f} tok/s ({r['decode_ms_per_token']:.1f} ms/token, "
        f"attention core {r['decode_attend_ms_per_token']:.1f} ms); peak RSS {r['end_hwm'] / MiB:.0f} MiB")
    if a.what_if and n > a.short_len:
        with torch.inference_mode():
            r["what_if"] = what_if(llm.model, ins.cache, n, a.what_if_steps)
    r["trimmed_rss"] = rss() if malloc_trim() else None  # after the run: RSS without glibc's kept free pages
    return r


def what_if(model, cache, n: int, steps: int) -> dict:
    """At the filled cache: whole decode steps as shipped, and one layer's attention core over n keys done four ways:
    lfm.kernels.decode_attention (the shipped decode path when available), SDPA with enable_gqa (the fallback),
    SDPA with the GQA query heads folded into q's length ([1, KV, H/KV, d], no enable_gqa: same maths), and just
    reading that layer's K and V once (a memory-traffic floor)."""
    import torch
    import torch.nn.functional as F

    from lfm import kernels

    steps = max(1, min(steps, cache.max_len - n - 2))
    tok = torch.tensor([[100]])
    cache.pos = n
    model(tok, cache)  # warm
    t0 = time.perf_counter()
    for _ in range(steps):
        model(tok, cache)
    ms_step = (time.perf_counter() - t0) / steps
    a0 = next(m for m in model.modules() if type(m).__name__ == "Attention")
    i0 = next(i for i, layer in enumerate(model.model.layers) if layer.is_attn)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, a0.nh, 1, a0.hd, generator=g).to(model.dtype)
    kn = torch.randn(1, a0.nkv, a0.hd, generator=g).to(model.dtype)
    vn = torch.randn(1, a0.nkv, a0.hd, generator=g).to(model.dtype)
    kc, vc = cache.k[i0], cache.v[i0]
    quant = bool(getattr(cache, "k_scale", None))
    scales = ([cache.k_scale[i0]], [cache.v_scale[i0]]) if quant else ()
    if quant:
        cache.write(i0, n, kn[:, :, None], vn[:, :, None])
        k, v = cache.read(i0, n + 1, model.dtype)  # what the SDPA path attends over (dequantized copies)
    else:
        kc[:, :, n], vc[:, :, n] = kn, vn
        k, v = kc[:, :, :n + 1], vc[:, :, :n + 1]

    def t_core(fn, reps=10):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t0) / reps

    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    ker = kernels.decode_attention(q[:, :, 0].contiguous(), kn, vn, [kc], [vc], [n], a0.hd ** -0.5, *scales) \
        if hasattr(kernels, "decode_attention") else None
    fold = F.scaled_dot_product_attention(q.reshape(1, a0.nkv, -1, a0.hd), k, v).reshape(1, a0.nh, 1, a0.hd)
    r = {"steps": steps, "ms_per_token": 1e3 * ms_step, "attn_layers": sum(1 for m in model.modules()
                                                                           if type(m).__name__ == "Attention"),
         "core_ms_sdpa_gqa": t_core(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
         "core_ms_sdpa_folded": t_core(lambda: F.scaled_dot_product_attention(q.reshape(1, a0.nkv, -1, a0.hd), k, v)),
         # memory-traffic probe: a max over the whole (contiguous) K and V buffers as int16, the cheapest full read
         "kv_read_ms": t_core(lambda: (kc.view(torch.int16).amax(), vc.view(torch.int16).amax())) * (n + 1) / kc.shape[2],
         "folded_max_abs_diff": (fold.float() - ref.float()).abs().max().item(),
         "kv_layer_bytes": 2 * (n + 1) * kc[:, :, 0].numel() * kc.element_size()}
    r["read_gb_s"] = r["kv_layer_bytes"] / r["kv_read_ms"] / 1e6
    if ker is not None:
        r["core_ms_kernel"] = t_core(lambda: kernels.decode_attention(q[:, :, 0].contiguous(), kn, vn, [kc], [vc], [n],
                                                                      a0.hd ** -0.5, *scales))
        r["kernel_max_abs_diff"] = (ker.float() - ref[:, :, 0].float()).abs().max().item()
    log(f"  what-if at {n}: decode step {r['ms_per_token']:.1f} ms; one layer's attention core: kernel "
        f"{r.get('core_ms_kernel', float('nan')):.2f} ms, SDPA gqa {r['core_ms_sdpa_gqa']:.2f} ms, SDPA folded "
        f"{r['core_ms_sdpa_folded']:.2f} ms, reading its KV once {r['kv_read_ms']:.2f} ms")
    return r


def child_chunk(a: argparse.Namespace, work: Path) -> dict:
    """Only the last prefill chunk of an n-token prompt: the activation peak at the longest attention span."""
    import torch

    from lfm import SamplingParams

    llm, info = _load(work, a.threads, a._kv)
    n, c = a._n, a._chunk
    m = llm.model
    llm.generate([list(range(20, 36))], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    cache = m.new_cache(1, n)
    cache.pos = n - c  # earlier slots stay zero pages: only this chunk's reads, writes and temporaries
    ids = torch.randint(14, m.config.vocab_size, (1, c), generator=torch.Generator().manual_seed(a.seed))
    kv_written = c * sum(t[:, :, 0].numel() * t.element_size() for d in (cache.k, cache.v, getattr(cache, "k_scale", {}),
                                                                        getattr(cache, "v_scale", {})) for t in d.values())
    malloc_trim()  # else the chunk's temporaries land in heap pages freed at load time and never show in RSS
    before = rss()
    reset_peak()
    t0 = time.perf_counter()
    with torch.inference_mode():
        m(ids, cache, logits_to_keep=1)
    dt = time.perf_counter() - t0
    grow = hwm() - before
    r = {**info, "chunk": c, "prompt_len": n, "seconds": dt, "tok_s": c / dt, "peak_growth": grow,
         "kv_written": kv_written, "activation_peak": grow - kv_written}
    log(f"  [last chunk of {c} at {n}] {c / dt:.0f} tok/s, activation peak {r['activation_peak'] / MiB:.0f} MiB")
    return r


# ---- parent ----------------------------------------------------------------------------------------------------
def build(work: Path, preset_name: str, group: int, seed: int) -> float:
    import torch

    from lfm.model.checkpoint import empty_model, save_model
    from lfm.model.presets import preset
    from lfm.model.quant import quantize_model

    t0 = time.perf_counter()
    stamp = {"preset": preset_name, "seed": seed, "std": 0.02, "bits": 4, "group": group, "dtype": "bfloat16"}
    sp = work / "stamp.json"
    if sp.exists() and json.loads(sp.read_text()) == stamp and (work / "int4" / "config.json").exists():
        return 0.0
    log(f"building {preset_name} random weights (bf16, seed {seed}) -> int4 g{group} checkpoint in {work} ...")
    model = empty_model(preset(preset_name), torch.bfloat16)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
    quantize_model(model, 4, group)
    save_model(model, work / "int4")
    sp.write_text(json.dumps(stamp))
    return time.perf_counter() - t0


def spawn(a: argparse.Namespace, work: Path, mode: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--_child", mode, "--work", str(work), "--threads", str(a.threads),
           "--seed", str(a.seed), "--short-len", str(a.short_len), "--what-if-steps", str(a.what_if_steps)]
    cmd += [f"--_{k}={v}" for k, v in kw.items()]
    if a.prefill_chunk:
        cmd += ["--prefill-chunk", str(a.prefill_chunk)]
    if not a.what_if:
        cmd += ["--no-what-if"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": f"child {mode} {kw} exited with {p.returncode}"}
    return json.loads(lines[-1])


def runtime_overhead_hwm(threads: int) -> int:
    """Peak RSS of a process that imports lfm and runs the tiny preset once (kernels loaded, one generate): what the
    libraries page in on first use, independent of the model's size."""
    code = ("import torch\ntorch.set_num_threads(%d)\nfrom lfm import LLM, SamplingParams\n"
            "from lfm.model.checkpoint import empty_model\nfrom lfm.model.presets import preset\n"
            "from lfm.model.quant import quantize_model, prepare\n"
            "m = empty_model(preset('tiny'), torch.bfloat16); m.init_weights(); quantize_model(m, 4, 64); prepare(m)\n"
            "LLM(m).generate([list(range(20, 36))], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))\n"
            "for l in open('/proc/self/status'):\n    l.startswith('VmHWM:') and print(int(l.split()[1]) * 1024)"
            % threads)
    p = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    return int(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else 0


def bare_torch_hwm() -> int:
    code = ("import torch\nfor l in open('/proc/self/status'):\n    "
            "l.startswith('VmHWM:') and print(int(l.split()[1]) * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True).stdout)


def report(a: argparse.Namespace, res: dict, env: dict) -> list[str]:
    out: list[str] = []
    for kv, r in res["kv"].items():
        out += report_kv(a, res, r, kv, env)
        out.append("")
    out.append(f"(build {res['build_s']:.0f} s, total wall time {res['wall_s']:.0f} s; load average "
               f"{env['load_avg_start'][0]:.1f} at the start, {env['load_avg_end'][0]:.1f} at the end: other processes "
               f"share these 2 cores, so compare ratios within one run)")
    return out


def report_kv(a: argparse.Namespace, res: dict, r: dict, kv: str, env: dict) -> list[str]:
    out: list[str] = []
    p = out.append
    short, long_, base = r["short"], r["long"], res["bare_torch_hwm"]
    res = {**res, "sweep": r["sweep"]}
    p(f"## long context: {a.preset} shape, random weights, int4 g{a.group_size}, KV cache {kv} (bf16 activations, "
      f"lfm.kernels {'on' if env['kernels'] else 'off'}), {a.prompt_len:,}-token prompt vs {a.short_len}, greedy\n")
    p(f"torch {env['torch']}, threads {a.threads} (of {env['cores']} cores), CPU {env['cpu']}; "
      f"prefill chunk {long_.get('prefill_chunk', '?')} tokens (LLM.prefill_chunk); each run in a fresh process\n")
    if "error" in long_ or "error" in short:
        p(f"ERROR: {long_.get('error') or short.get('error')}")
        return out
    c = long_["cache"]
    W, D, KV, CV = long_["weights_bytes"], long_["derived_bytes"], c["kv_bytes"], c["conv_bytes"]
    budget = base + RSS_FACTOR * (W + KV + CV)
    peak = long_["end_hwm"]
    if len(r.get("short_runs", [])) > 1:
        p("short run done twice (before and after the long one), the lower median kept: decode medians "
          + " / ".join(f"{x['decode_ms_median']:.1f}" for x in r["short_runs"] if "error" not in x) + " ms/token\n")
    p("| run | prompt | prefill tok/s | decode tok/s (mean) | decode ms/token: mean / median / min | "
      "of which attention core (mean) | peak RSS MiB: process / run only |")
    p("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in (("short", short), ("long", long_)):
        p(f"| {name} | {r['prompt_len']:,} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | "
          f"{r['decode_ms_per_token']:.1f} / {r['decode_ms_median']:.1f} / {r['decode_ms_min']:.1f} | "
          f"{r['decode_attend_ms_per_token']:.1f} ms | {r['end_hwm'] / MiB:.0f} / {r['run_hwm'] / MiB:.0f} |")
    p("")
    p("memory (MiB) | value\n---|---:")
    for k, v in (("bare `python -c 'import torch'` peak RSS", base),
                 ("a process that imports lfm and generates with the tiny preset (libraries paged in on first use)",
                  res.get("runtime_overhead_hwm") or 0),
                 ("this child right after `import torch`", long_["base_hwm"]),
                 ("... after `import lfm`", long_["import_hwm"]),
                 ("... after loading the int4 checkpoint", long_["load_hwm"]),
                 ("... after a 16-token warm-up generate (process peak before the run)", long_["warm_hwm"]),
                 ("RSS after load + warm-up", long_["warm_rss"]),
                 ("weights: parameters + buffers (int4 linears, int8 embedding, norms, conv)", W),
                 ("  of which the int8 embedding table (one row read per token)", long_["embedding_bytes"]),
                 ("derived at load, not in the formula: Int4Linear torch-fallback packing (_packed, _sz)", D),
                 (f"KV cache ({c['attn_layers']} attention layers x {c['max_len']:,} slots, {c.get('kv_dtype')}"
                  f"{', with per-vector scales' if c.get('kv_scale_bytes') else ''})", KV),
                 (f"conv state ({c['conv_layers']} conv layers, constant in length)", CV),
                 (f"budget: bare torch + {RSS_FACTOR} x (weights + KV + conv)", budget),
                 (f"peak RSS during the {a.prompt_len:,}-token run alone (VmHWM reset after warm-up)",
                  long_["run_hwm"]),
                 ("measured process peak RSS (VmHWM, load included): the target's figure", peak),
                 ("RSS at the end of the run", long_["end_rss"]),
                 ("... after malloc_trim(0) (glibc's kept free pages returned)", long_.get("trimmed_rss") or 0)):
        p(f"{k} | {v / MiB:,.1f}")
    p("")
    dec_ratio = long_["decode_ms_median"] / short["decode_ms_median"]  # medians: robust to a stolen core
    over = peak - base - (W + KV + CV)
    rows = [
        (f"{a.prompt_len:,}-token context runs at int4", "runs", f"ran: {long_['prefill_s']:.0f} s prefill, "
         f"{long_['decode_forwards']} decode steps", True),
        (f"peak RSS <= bare torch + {RSS_FACTOR} x (weights + KV + conv)", f"<= {budget / MiB:,.0f} MiB",
         f"{peak / MiB:,.0f} MiB (overhead over bare torch + weights + KV + conv: {over / MiB:,.0f} MiB = "
         f"{over / (W + KV + CV) * 100:.0f}% of W+KV+conv, allowed {(RSS_FACTOR - 1) * 100:.0f}%)", peak <= budget),
        (f"decode at {a.prompt_len:,} within {DECODE_FACTOR}x of decode at {a.short_len}",
         f"<= {short['decode_ms_median'] * DECODE_FACTOR:.1f} ms/token",
         f"median {long_['decode_ms_median']:.1f} vs {short['decode_ms_median']:.1f} ms/token = {dec_ratio:.2f}x "
         f"slower (means: {long_['decode_tok_s']:.2f} vs {short['decode_tok_s']:.2f} tok/s = "
         f"{short['decode_tok_s'] / long_['decode_tok_s']:.2f}x)",
         dec_ratio <= DECODE_FACTOR)]
    sweep = res.get("sweep") or []
    ok_sweep = [s for s in sweep if "error" not in s]
    if ok_sweep:
        big = max(ok_sweep, key=lambda s: s["chunk"])
        rows.append((f"prefill chunked: activation memory bounded at {a.prompt_len:,}", "bounded by the chunk",
                     f"last-chunk activation peak {big['activation_peak'] / MiB:.0f} MiB at chunk {big['chunk']}"
                     f" (see sweep; grows with chunk x context)", True))
    p("| target | needs | measured | verdict |\n|---|---|---|---|")
    for t, need, got, ok in rows:
        p(f"| {t} | {need} | {got} | **{'PASS' if ok else 'MISS'}** |")
    p("")
    per_tok_kv = KV / c["max_len"]
    read_w = W - long_["embedding_bytes"]
    p(f"decode traffic per token at {a.prompt_len:,}: KV read {per_tok_kv * long_['prompt_len'] / MiB:,.0f} MiB "
      f"({per_tok_kv / 1024:.0f} KiB/token of context) vs weights read {read_w / MiB:,.0f} MiB (without the embedding "
      f"table); at {a.short_len}: KV {per_tok_kv * a.short_len / MiB:,.1f} MiB. Attention core: "
      f"{long_['decode_attend_ms_per_token']:.1f} of {long_['decode_ms_per_token']:.1f} ms per token at "
      f"{a.prompt_len:,}, {short['decode_attend_ms_per_token']:.2f} of {short['decode_ms_per_token']:.1f} ms at "
      f"{a.short_len}.")
    if wi := long_.get("what_if"):
        sm = short["decode_ms_median"]
        best = min(wi.get("core_ms_kernel", 1e9), wi["core_ms_sdpa_gqa"], wi["core_ms_sdpa_folded"])
        p(f"\nattention core over {a.prompt_len:,} keys, one layer ({wi['kv_layer_bytes'] / MiB:.0f} MiB of {kv} K+V), "
          f"x{wi['attn_layers']} layers per token:\n")
        p("| variant | ms per layer | x layers, ms per token |\n|---|---:|---:|")
        for k, label in (("core_ms_kernel", "lfm.kernels.decode_attention (shipped decode path)"),
                         ("core_ms_sdpa_gqa", "SDPA enable_gqa (the fallback)"),
                         ("core_ms_sdpa_folded", f"SDPA, GQA heads folded into q's length (max diff "
                                                 f"{wi['folded_max_abs_diff']:.1e})"),
                         ("kv_read_ms", f"just reading the layer's K and V once (floor; {wi['read_gb_s']:.1f} GB/s)")):
            if k in wi:
                p(f"| {label} | {wi[k]:.2f} | {wi[k] * wi['attn_layers']:.1f} |")
        floor = sm + wi["attn_layers"] * wi["kv_read_ms"]
        p(f"\nwhole decode step at {a.prompt_len:,} re-timed ({wi['steps']} steps): {wi['ms_per_token']:.1f} ms. "
          f"Short decode {sm:.1f} ms + the best core x {wi['attn_layers']} = {sm + best * wi['attn_layers']:.1f} ms "
          f"= {(sm + best * wi['attn_layers']) / sm:.2f}x; with this KV cache ({kv}) the decode at {a.prompt_len:,} cannot "
          f"beat ~{floor:.0f} ms/token = {floor / sm:.2f}x the short decode on this machine (memory-traffic floor)."
          + (f" Kernel vs SDPA max |diff| {wi['kernel_max_abs_diff']:.1e}." if "kernel_max_abs_diff" in wi else ""))
    if sweep:
        p(f"\nprefill chunk sweep: only the last chunk of a {a.prompt_len:,}-token prompt (the widest attention), "
          f"fresh process each\n")
        p("| chunk | tok/s of that chunk | activation peak MiB | full-run peak ≈ end RSS + activations (MiB) | "
          "same without glibc's kept free heap (trimmed end RSS + activations) |")
        p("|---:|---:|---:|---:|---:|")
        for s in sweep:
            if "error" in s:
                p(f"| {s.get('chunk', '?')} | error | {s['error']} | |")
                continue
            est = long_["end_rss"] + s["activation_peak"]
            est2 = (long_.get("trimmed_rss") or long_["end_rss"]) + s["activation_peak"]
            p(f"| {s['chunk']} | {s['tok_s']:.0f} | {s['activation_peak'] / MiB:.0f} | ~{est / MiB:,.0f} "
              f"({'within' if est <= budget else 'over'} {budget / MiB:,.0f}) | ~{est2 / MiB:,.0f} "
              f"({'within' if est2 <= budget else 'over'} {budget / MiB:,.0f}) |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="LFM2.5-350M")
    ap.add_argument("--prompt-len", type=int, default=32768)
    ap.add_argument("--short-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32, help="new tokens after the long prompt (short: twice as many)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill-chunk", type=int, default=0, help="LLM.prefill_chunk (0: the engine's default)")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="comma list of LLM kv_cache_dtype values to run: auto (bf16), int8 (e.g. 'auto,int8')")
    ap.add_argument("--sweep", default="256,2048", help="chunk sizes for the last-chunk sweep ('' = none)")
    ap.add_argument("--no-what-if", dest="what_if", action="store_false")
    ap.add_argument("--what-if-steps", type=int, default=8)
    ap.add_argument("--work", help="checkpoint dir (default: a temp dir, removed after)")
    ap.add_argument("--out", default=str(HERE / "results" / "long_context_bench.json"))
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_gen", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_chunk", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_kv", default="auto", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        r = (child_run if a._child == "run" else child_chunk)(a, Path(a.work))
        print(json.dumps(r), flush=True)
        return
    t_start = time.perf_counter()
    import torch

    from lfm import kernels

    torch.set_num_threads(a.threads)
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
               platform.machine())
    env = {"torch": torch.__version__, "cpu": cpu, "cores": os.cpu_count(), "kernels": kernels.available(),
           "python": platform.python_version(), "load_avg_start": os.getloadavg()}
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="long-ctx-bench-")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    try:
        res["build_s"] = build(work, a.preset, a.group_size, a.seed)
        res["bare_torch_hwm"] = bare_torch_hwm()
        res["runtime_overhead_hwm"] = runtime_overhead_hwm(a.threads)
        log(f"bare `import torch` peak RSS {res['bare_torch_hwm'] / MiB:.0f} MiB; import lfm + a tiny-model generate "
            f"{res['runtime_overhead_hwm'] / MiB:.0f} MiB")
        res["kv"] = {}
        for kv in [x.strip() for x in a.kv_cache_dtype.split(",") if x.strip()]:
            r = res["kv"][kv] = {}
            log(f"[KV {kv}] short run ({a.short_len} tokens) ...")
            r["short"] = spawn(a, work, "run", n=a.short_len, gen=2 * a.gen_len, kv=kv)
            r["sweep"] = []
            for ch in [int(x) for x in a.sweep.split(",") if x.strip()]:
                log(f"[KV {kv}] sweep: last chunk of {ch} at {a.prompt_len} ...")
                r["sweep"].append({"chunk": ch, **spawn(a, work, "chunk", n=a.prompt_len, chunk=ch, kv=kv)})
            log(f"[KV {kv}] long run ({a.prompt_len} tokens; a few minutes on 2 threads) ...")
            r["long"] = spawn(a, work, "run", n=a.prompt_len, gen=a.gen_len, kv=kv)
            # the short run again, after the long one: other processes on a shared box can stall one of them; the
            # run with the lower median step time is kept (both are in the JSON)
            log(f"[KV {kv}] short run again ({a.short_len} tokens) ...")
            again = spawn(a, work, "run", n=a.short_len, gen=2 * a.gen_len, kv=kv)
            r["short_runs"] = [r["short"], again]
            ok = [x for x in r["short_runs"] if "error" not in x]
            if ok:
                r["short"] = min(ok, key=lambda x: x["decode_ms_median"])
    finally:
        if tmp is not None:
            tmp.cleanup()
    res["wall_s"] = time.perf_counter() - t_start
    env["load_avg_end"] = os.getloadavg()
    lines = report(a, res, env)
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if not k.startswith("_")}, "env": env,
                               "results": res}, indent=1) + "\n")
    out.with_suffix(".txt").write_text(text + "\n")
    print(f"(JSON: {out}; table: {out.with_suffix('.txt')})")


if __name__ == "__main__":
    main()
