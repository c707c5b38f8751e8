#!/usr/bin/env python
"""Long context on an edge CPU: a 32K-token prompt on the LFM2.5-350M shape at int4 g64 through lfm's engine
(`LLMEngine`: paged KV, conv slots, chunked prefill), with the issue's memory and speed targets checked in one run.

    python benchmarks/long_context_bench.py [--prompt-len 32768] [--short-len 512] [--gen-len 32] [--threads 2]
                                            [--prefill-chunk N] [--sweep 256,2048] [--work DIR]
                                            [--kv-cache-dtype auto|int8|auto,int8]

* Weights: the preset's shape, N(0, 0.02) random weights (seed 0) in bfloat16, quantized int4 g64
  (`quantize_model`) and saved once as an lfm int4 checkpoint in --work; every measurement loads that checkpoint in
  a fresh child process (`LLM(dir)`, bfloat16 activations, lfm.kernels), so its peak RSS is its own.
* Engine sizing: each child's `LLM` is built for its run alone: max_num_seqs=1, enable_prefix_caching=False,
  max_model_len = prompt + new tokens + 1 (+ the what-if's steps in the long run), kv_cache_memory = just the
  blocks those tokens need (blocks x `PagedCache.block_bytes`), max_num_batched_tokens = --prefill-chunk if given.
* Baseline (the issue's): peak RSS (VmHWM) of a process that imports lfm and generates with the tiny preset
  (libraries paged in on first use); a bare `python -c "import torch"` process is listed too.
* Runs: one prompt of --short-len (twice: before and after the long run, the lower median step time kept, as other
  processes may stall one) and one of --prompt-len random token ids, greedy, EOS ignored, --gen-len (short: 2x) new
  tokens, through `LLMEngine.add_request` + `step` (what `LLM.generate` runs); the prompt is prefilled in chunks of
  max_num_batched_tokens (the engine's tokens per step; --prefill-chunk sets it). `engine.runner.run` (one call = one
  forward) is wrapped with a clock; a call that computes prompt tokens is prefill, one that computes a generated token
  is decode: prefill tok/s = prompt / (start -> end of the last prefill forward), decode tok/s = decode forwards /
  (end of prefill -> end of the last forward; each interval holds a forward plus the scheduling and sampling around
  it). `engine.runner.backend.attention` is wrapped with a timer (instance attributes, lfm unchanged) to split decode
  time into attention (the step's K / V write into the paged cache + attention over it: lfm.kernels' paged decode
  kernel on CPU) vs everything else. Peak RSS = the child's VmHWM at the end; weights = bytes of the model's
  parameters and buffers (plus, listed apart, tensors the modules derive at load: Int4Linear's torch-fallback
  packing); KV / conv state from the engine's `PagedCache`: its pool (`cache.nbytes()`) is torch.empty, so only the
  pages of blocks in use count in RSS: the formula takes the bytes the run's blocks hold (most blocks in use x
  `PagedCache.block_bytes`), the pool's size is listed apart.
* What-if (32K child, after the run, its sequence still running): one attention layer's decode core over the
  prompt's keys done three ways: `lfm.kernels.paged_decode_attention` on the engine's own cache (the shipped CPU
  decode path), `TorchBackend.decode_attention` (the portable fallback; checked against the kernel), and just reading
  that layer's K and V once (a memory-traffic floor); then whole decode steps (`engine.step`) re-timed at the filled
  cache.
* Sweep: per --sweep chunk size, a fresh child runs only the *last* prefill chunk of a --prompt-len prompt: the
  sequence is admitted by hand (as `LLMEngine.score` drives the block manager and the runner) with
  num_computed_tokens = prompt - chunk (the largest attention span) over a zero-filled, hence resident, KV pool, and
  reports its activation peak (VmHWM growth over the RSS before it) and its tok/s: how the chunk size bounds prefill
  memory.
* --kv-cache-dtype: the whole set of runs per KV cache type (LLM(kv_cache_dtype=...): auto = bf16, int8 = int8
  values + a float32 scale per vector); default auto only, which keeps the run near 10 minutes on 2 idle cores.
* Targets (issue "edge engine"): runs at 32K; peak RSS <= (import lfm + a tiny generate) + 1.15 x (weights + KV +
  conv state); decode
  tok/s at 32K >= decode tok/s at --short-len / 1.5; prefill activation memory bounded (chunked).

Ported from the pre-engine runtime (HybridCache, `model(ids, cache)`, `Attention.attend`, `LLM.prefill_chunk`);
dropped as meaningless now: the what-if's "SDPA enable_gqa" vs "SDPA with GQA heads folded" rows (no decode path
calls SDPA's GQA any more: the fallback folds the heads itself, and it is the row that remains), the KV figure as
"attention layers x max_len slots" (KV is blocks now: the run's blocks and the pool are reported), and the sweep's
"minus the KV slots it writes" (the pool is made resident before the chunk, so nothing is subtracted).

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
def _load(work: Path, threads: int, kv: str = "auto", tokens: int = 64, chunk: int = 0):
    """LLM(dir) sized for this run alone: one sequence, no prefix caching, max_model_len = `tokens`, and a KV pool of
    just the blocks those tokens need (kv_cache_memory = blocks x PagedCache.block_bytes)."""
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    base = hwm()
    from lfm import LLM
    from lfm.engine.cache import PagedCache
    from lfm.model.checkpoint import resolve_config, resolve_dtype

    imported = hwm()
    path = work / "int4"
    cfg = resolve_config(path)
    dtype = resolve_dtype("auto", cfg)
    kv_dtype = torch.int8 if kv == "int8" else dtype
    bs = 16
    per_block = PagedCache.block_bytes(cfg, bs, dtype, kv_dtype, False)
    blocks = -(-tokens // bs)
    kw = {"max_num_batched_tokens": chunk} if chunk else {}
    t0 = time.perf_counter()
    llm = LLM(str(path), kv_cache_dtype=None if kv == "auto" else kv, max_model_len=tokens, max_num_seqs=1,
              enable_prefix_caching=False, block_size=bs, kv_cache_memory=blocks * per_block, **kw)
    load_s = time.perf_counter() - t0
    eng = llm.engine
    assert eng.max_model_len == tokens and eng.cache.num_blocks == blocks, (eng.max_model_len, eng.cache.num_blocks)
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
    """A clock on the engine's steps and a timer around the backend's attention.

    `engine.runner.run` (one call = one forward over the step's scheduled tokens) is wrapped: each call's end time,
    token count, whether it computes prompt tokens (prefill) or one generated token (decode), and the seconds spent
    in `engine.runner.backend.attention` during it (per attention layer: the step's K / V write into the paged cache,
    then the attention over the cache: SDPA over the gathered blocks for a prefill chunk, lfm.kernels' paged kernel
    for a decode on CPU). Instance attributes only: lfm is unchanged."""

    def __init__(self, engine, progress: bool = False) -> None:
        self.ends: list[tuple[float, int, bool]] = []  # (time, tokens in the forward, prefill?)
        self.attend: list[float] = []  # seconds in backend.attention during each forward
        self.blocks_used = 0  # the most KV blocks in use after any step
        self._acc = 0.0
        self.t0 = 0.0
        runner, backend = engine.runner, engine.runner.backend
        run, attention = runner.run, backend.attention

        def timed_run(scheduled):
            self._acc = 0.0
            pre = any(it.seq.num_computed_tokens < it.seq.num_prompt_tokens for it in scheduled)
            T = sum(it.num_tokens for it in scheduled)
            done = max(it.seq.num_computed_tokens + it.num_tokens for it in scheduled)
            out = run(scheduled)
            now = time.perf_counter()
            self.ends.append((now, T, pre))
            self.attend.append(self._acc)
            self.blocks_used = max(self.blocks_used, engine.block_manager.num_used_blocks)
            if progress and pre:
                log(f"    prefill chunk {len(self.ends)}: {done} tokens in {now - self.t0:.0f} s "
                    f"({done / (now - self.t0):.0f} tok/s), peak RSS {hwm() / MiB:.0f} MiB")
            return out

        def timed_attention(*a, **k):
            t = time.perf_counter()
            out = attention(*a, **k)
            self._acc += time.perf_counter() - t
            return out

        runner.run = timed_run
        backend.attention = timed_attention


def _cache_bytes(eng, blocks_used: int) -> dict:
    """The engine's cache: the pool it allocated (`cache.nbytes()`, torch.empty: address space until touched) and
    the bytes the run's blocks hold (blocks used x `PagedCache.block_bytes`: what the KV can cost in RSS)."""
    from lfm.engine.cache import PagedCache

    c = eng.cache
    model = eng.model
    kv_dtype = next(iter(c.k.values())).dtype
    per_block = PagedCache.block_bytes(model.config, c.block_size, model.dtype, kv_dtype, c.conv_snap is not None)
    per_block_scales = sum(t[0].numel() * t.element_size() for d in (c.k_scale, c.v_scale) for t in d.values())
    conv = c.conv.numel() * c.conv.element_size()
    return {"pool_bytes": c.nbytes(), "kv_pool_bytes": c.num_blocks * per_block, "num_blocks": c.num_blocks,
            "block_size": c.block_size, "block_bytes": per_block, "blocks_used": blocks_used,
            "kv_bytes": blocks_used * per_block, "kv_scale_bytes": blocks_used * per_block_scales,
            "conv_bytes": conv, "conv_slots": c.conv.shape[1], "tokens_held": blocks_used * c.block_size,
            "attn_layers": len(c.k), "conv_layers": c.conv.shape[0], "kv_dtype": str(kv_dtype)}


def child_run(a: argparse.Namespace, work: Path) -> dict:
    import torch

    from lfm import SamplingParams

    n, gen = a._n, a._gen
    wi = a.what_if and n > a.short_len
    extra = a.what_if_steps + 2 if wi else 0  # the what-if's decode steps continue the same sequence
    llm, info = _load(work, a.threads, a._kv, n + gen + 1 + extra, a.prefill_chunk)
    eng = llm.engine
    lp = eng.scheduler.long_prefill  # prompts above lp[0] tokens: chunks of lp[1] (the engine's activation budget)
    chunk = lp[1] if lp is not None and n > lp[0] else eng.config.max_num_batched_tokens
    g = torch.Generator().manual_seed(a.seed + 7)
    warm = torch.randint(14, llm.config.vocab_size, (16,), generator=g).tolist()
    sp = lambda k: SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)  # noqa: E731
    llm.generate([warm], sp(4))  # pages in the kernels and library code once
    info["warm_hwm"], info["warm_rss"] = hwm(), rss()
    prompt = torch.randint(14, llm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(a.seed + 1)).tolist()
    ins = _Instrument(eng, progress=n > chunk)
    how = "the long-prompt chunk" if chunk != eng.config.max_num_batched_tokens else "max_num_batched_tokens"
    log(f"  [{n}-token prompt] prefill in chunks of {chunk} ({how}), then {gen} tokens ...")
    reset_peak()  # from here: the run's own peak (the process peak so far is kept in warm_hwm)
    ins.t0 = t0 = time.perf_counter()
    seq = eng.add_request("long-ctx", prompt, sp(gen + extra))  # what LLM.generate does, stopped after gen tokens
    while seq.num_output_tokens < gen:
        for d in eng.step():
            if d.finish_reason == "error":
                raise RuntimeError(d.error)
    run_hwm = hwm()
    out = list(seq.token_ids[n:])
    pre = [i for i, (_, _, p) in enumerate(ins.ends) if p]
    last_pre = pre[-1]
    t_pre = ins.ends[last_pre][0]
    dec = ins.ends[last_pre + 1:]
    dec_att = ins.attend[last_pre + 1:]
    assert all(T == 1 and not p for _, T, p in dec), "a decode step with more than one token"
    dec_s = dec[-1][0] - t_pre
    r = {**info, "prompt_len": n, "gen_len": gen, "prefill_chunk": chunk, "prefill_forwards": len(pre),
         "prefill_s": t_pre - t0, "prefill_tok_s": n / (t_pre - t0), "prefill_attend_s": sum(ins.attend[:last_pre + 1]),
         "decode_forwards": len(dec), "decode_s": dec_s, "decode_tok_s": len(dec) / dec_s,
         "decode_attend_s": sum(dec_att), "tokens": out[:8], "run_hwm": run_hwm, "end_rss": rss(),
         "end_hwm": max(run_hwm, info["warm_hwm"]), "cache": _cache_bytes(eng, ins.blocks_used)}
    r["decode_ms_per_token"] = 1e3 * dec_s / len(dec)
    steps = sorted(b - a_ for a_, b in zip([t_pre] + [t for t, _, _ in dec[:-1]], [t for t, _, _ in dec]))
    r["decode_ms_median"] = 1e3 * steps[len(steps) // 2]  # robust to other processes stealing a core now and then
    r["decode_ms_min"] = 1e3 * steps[0]
    r["decode_attend_ms_per_token"] = 1e3 * sum(dec_att) / len(dec)
    log(f"  [{n}] prefill {r['prefill_tok_s']:.1f} tok/s ({r['prefill_s']:.0f} s, attention "
        f"{r['prefill_attend_s']:.0f} s); decode {r['decode_tok_s']:.2f} tok/s ({r['decode_ms_per_token']:.1f} ms/token, "
        f"attention {r['decode_attend_ms_per_token']:.1f} ms); peak RSS {r['end_hwm'] / MiB:.0f} MiB")
    if wi:
        with torch.inference_mode():
            r["what_if"] = what_if(eng, seq, n, a.what_if_steps)
    eng.abort_request(seq.request_id)
    r["trimmed_rss"] = rss() if malloc_trim() else None  # after the run: RSS without glibc's kept free pages
    return r


def what_if(eng, seq, n: int, steps: int) -> dict:
    """At the filled cache (the run's sequence still running): one attention layer's decode core over its first n
    keys done three ways: lfm.kernels.paged_decode_attention on the engine's own blocks (CpuBackend's decode path),
    TorchBackend.decode_attention (the portable fallback: gather the blocks, mask, SDPA), and just reading that
    layer's K and V for n keys once (a memory-traffic floor); then whole decode steps (`engine.step`)."""
    from types import SimpleNamespace

    import torch

    from lfm import kernels
    from lfm.engine.backend import TorchBackend

    c, model = eng.cache, eng.model
    cfg = model.config
    H, hd, bs = cfg.num_attention_heads, cfg.head_size, c.block_size
    i0 = min(c.k)
    nb = -(-n // bs)
    table = seq.block_table[:nb]
    bt = torch.tensor([table], dtype=torch.int32)
    lens = torch.tensor([n], dtype=torch.int32)
    q = torch.randn(1, H, hd, generator=torch.Generator().manual_seed(3)).to(model.dtype)
    ks, vs = c.k_scale.get(i0), c.v_scale.get(i0)
    tb = TorchBackend(c, H, hd)
    tb.batch = SimpleNamespace(block_tables=bt, decode_lens=lens)  # the two fields decode_attention reads

    def t_core(fn, reps=10):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t0) / reps

    ref = tb.decode_attention(i0, q)
    ker = kernels.paged_decode_attention(q, c.k[i0], c.v[i0], ks, vs, bt, lens, tb.scale)
    # the floor: the layer's blocks in place when the run's blocks are consecutive ids (a fresh engine hands out the
    # lowest free ids first), else a gathered copy of them (same bytes)
    parts = [t for t in (c.k[i0], c.v[i0], ks, vs) if t is not None]
    contiguous = table == list(range(table[0], table[0] + nb))
    parts = [t[table[0]:table[0] + nb] if contiguous else t[torch.tensor(table)] for t in parts]
    probe = [t.view(torch.int16) if t.element_size() < 4 else t for t in parts]
    read_ms = t_core(lambda: [t.amax() for t in probe]) * n / (nb * bs)
    r = {"attn_layers": len(c.k), "core_ms_torch": t_core(lambda: tb.decode_attention(i0, q)),
         "kv_read_ms": read_ms, "kv_read_in_place": contiguous,
         "kv_layer_bytes": sum(t[0].numel() * t.element_size() for t in parts) * n // bs}
    r["read_gb_s"] = r["kv_layer_bytes"] / r["kv_read_ms"] / 1e6
    if ker is not None:
        r["core_ms_kernel"] = t_core(lambda: kernels.paged_decode_attention(q, c.k[i0], c.v[i0], ks, vs, bt, lens,
                                                                            tb.scale))
        r["kernel_max_abs_diff"] = (ker.float() - ref.float()).abs().max().item()
    steps = max(1, min(steps, seq.max_tokens - seq.num_output_tokens - 1))
    eng.step()  # warm
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    r["steps"], r["ms_per_token"] = steps, 1e3 * (time.perf_counter() - t0) / steps
    r["context_at_steps"] = seq.num_computed_tokens
    log(f"  what-if at {n}: decode step {r['ms_per_token']:.1f} ms; one layer's attention core: paged kernel "
        f"{r.get('core_ms_kernel', float('nan')):.2f} ms, torch fallback {r['core_ms_torch']:.2f} ms, reading its KV "
        f"once {r['kv_read_ms']:.2f} ms")
    return r


def child_chunk(a: argparse.Namespace, work: Path) -> dict:
    """Only the last prefill chunk of an n-token prompt: the activation peak at the longest attention span.

    The sequence is admitted by hand (as `LLMEngine.score` drives the block manager and the runner) with
    num_computed_tokens = n - c, and its blocks for all n positions taken; the whole KV pool is zero-filled first, so
    the earlier positions are resident as in a real run and the growth measured over the chunk's forward is its
    activations and temporaries alone (the chunk's own K / V pages are already counted)."""
    import torch

    from lfm import SamplingParams
    from lfm.engine.model_runner import ScheduledSeq

    n, c = a._n, a._chunk
    llm, info = _load(work, a.threads, a._kv, n + 1, c)
    eng = llm.engine
    llm.generate([list(range(20, 36))], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    cache, bm = eng.cache, eng.block_manager
    for d in (cache.k, cache.v, cache.k_scale, cache.v_scale):
        for t in d.values():
            t.zero_()
    ids = torch.randint(14, llm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(a.seed)).tolist()
    seq = eng.add_request("last-chunk", ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    eng.scheduler.waiting.remove(seq)
    bm.admit(seq, [], [], 0)  # a conv slot (zeroed by the step), no blocks yet
    seq.num_computed_tokens = n - c
    bm.grow(seq, c)  # blocks for positions 0 .. n-1
    it = ScheduledSeq(seq, c)
    malloc_trim()  # else the chunk's temporaries land in heap pages freed at load time and never show in RSS
    before = rss()
    reset_peak()
    t0 = time.perf_counter()
    try:
        eng.runner.run([it])
    finally:
        dt = time.perf_counter() - t0
        grow = hwm() - before
        bm.free(seq)
        eng.seqs.pop(seq.request_id, None)
    r = {**info, "chunk": c, "prompt_len": n, "seconds": dt, "tok_s": c / dt, "peak_growth": grow,
         "kv_pool_bytes": cache.nbytes() - cache.conv.numel() * cache.conv.element_size(), "activation_peak": grow}
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
            "LLM(m, max_num_seqs=1, enable_prefix_caching=False, kv_cache_memory=1 << 20)"
            ".generate([list(range(20, 36))], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))\n"
            "for l in open('/proc/self/status'):\n    l.startswith('VmHWM:') and print(int(l.split()[1]) * 1024)"
            % threads)
    p = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    return int(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else 0


def dram_gb_s(threads: int) -> float:
    """Read bandwidth from memory (not cache): the best of 3 passes over a 1 GiB buffer (larger than any L3 here),
    in a child so that its gigabyte is nobody's peak RSS."""
    code = ("import time, torch\ntorch.set_num_threads(%d)\nx = torch.ones(1 << 29, dtype=torch.int16)\nbest = 9.0\n"
            "for _ in range(3):\n    t = time.perf_counter(); x.amax(); best = min(best, time.perf_counter() - t)\n"
            "print((1 << 30) / best / 1e9)" % threads)
    p = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return float(p.stdout.strip()) if p.returncode == 0 and p.stdout.strip() else 0.0


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
      f"prefill chunk at {a.prompt_len:,} tokens: {long_.get('prefill_chunk', '?')} (the engine's long-prompt chunk, "
      f"from its activation byte budget; short prompts: max_num_batched_tokens); each run in a fresh "
      f"process, its engine sized for that run alone (max_num_seqs=1, no prefix caching, max_model_len = prompt + "
      f"new tokens + 1 (+ the what-if's steps in the long run), a KV pool of just those blocks)\n")
    if "error" in long_ or "error" in short:
        p(f"ERROR: {long_.get('error') or short.get('error')}")
        return out
    c = long_["cache"]
    W, D, KV, CV = long_["weights_bytes"], long_["derived_bytes"], c["kv_bytes"], c["conv_bytes"]
    rt = res.get("runtime_overhead_hwm") or base  # the baseline: import lfm + a tiny generate
    budget = rt + RSS_FACTOR * (W + KV + CV)
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
                 (f"KV cache the run's blocks hold ({c['blocks_used']:,} blocks x {c['block_size']} positions = "
                  f"{c['tokens_held']:,} tokens x {c['attn_layers']} attention layers, {c['kv_dtype']}"
                  f"{', with per-vector scales' if c['kv_scale_bytes'] else ''}; blocks used x "
                  f"PagedCache.block_bytes)", KV),
                 (f"KV pool allocated, not in the formula ({c['num_blocks']:,} blocks; torch.empty: only touched "
                  f"pages count in RSS)", c["kv_pool_bytes"]),
                 (f"conv state ({c['conv_layers']} conv layers x {c['conv_slots']} slot, constant in length)", CV),
                 ("engine cache allocated, `cache.nbytes()` (KV pool + conv slots)", c["pool_bytes"]),
                 (f"budget: (import lfm + tiny generate) + {RSS_FACTOR} x (weights + KV + conv)", budget),
                 (f"peak RSS during the {a.prompt_len:,}-token run alone (VmHWM reset after warm-up)",
                  long_["run_hwm"]),
                 ("measured process peak RSS (VmHWM, load included): the target's figure", peak),
                 ("RSS at the end of the run", long_["end_rss"]),
                 ("... after malloc_trim(0) (glibc's kept free pages returned)", long_.get("trimmed_rss") or 0)):
        p(f"{k} | {v / MiB:,.1f}")
    p("")
    dec_ratio = long_["decode_ms_median"] / short["decode_ms_median"]  # medians: robust to a stolen core
    over = peak - rt - (W + KV + CV)
    rows = [
        (f"{a.prompt_len:,}-token context runs at int4", "runs", f"ran: {long_['prefill_s']:.0f} s prefill, "
         f"{long_['decode_forwards']} decode steps", True),
        (f"peak RSS <= (import lfm + tiny generate) + {RSS_FACTOR} x (weights + KV + conv)",
         f"<= {budget / MiB:,.0f} MiB",
         f"{peak / MiB:,.0f} MiB (overhead over that baseline + weights + KV + conv: {over / MiB:,.0f} MiB = "
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
    per_tok_kv = c["block_bytes"] / c["block_size"]
    read_w = W - long_["embedding_bytes"]
    p(f"decode traffic per token at {a.prompt_len:,}: KV read {per_tok_kv * long_['prompt_len'] / MiB:,.0f} MiB "
      f"({per_tok_kv / 1024:.0f} KiB/token of context) vs weights read {read_w / MiB:,.0f} MiB (without the embedding "
      f"table); at {a.short_len}: KV {per_tok_kv * a.short_len / MiB:,.1f} MiB. Attention core (backend.attention): "
      f"{long_['decode_attend_ms_per_token']:.1f} of {long_['decode_ms_per_token']:.1f} ms per token at "
      f"{a.prompt_len:,}, {short['decode_attend_ms_per_token']:.2f} of {short['decode_ms_per_token']:.1f} ms at "
      f"{a.short_len}.")
    if wi := long_.get("what_if"):
        sm = short["decode_ms_median"]
        best = min(wi.get("core_ms_kernel", 1e9), wi["core_ms_torch"])
        p(f"\nattention core over {a.prompt_len:,} keys, one layer ({wi['kv_layer_bytes'] / MiB:.0f} MiB of {kv} K+V), "
          f"x{wi['attn_layers']} layers per token:\n")
        p("| variant | ms per layer | x layers, ms per token |\n|---|---:|---:|")
        for k, label in (("core_ms_kernel", "lfm.kernels.paged_decode_attention on the engine's cache "
                                            "(CpuBackend's decode path)"),
                         ("core_ms_torch", "TorchBackend.decode_attention (the fallback: gather blocks, mask, SDPA)"),
                         ("kv_read_ms", f"just reading the layer's K and V once (floor; {wi['read_gb_s']:.1f} GB/s"
                                        f"{'' if wi['kv_read_in_place'] else ', from a gathered copy'})")):
            if k in wi:
                p(f"| {label} | {wi[k]:.2f} | {wi[k] * wi['attn_layers']:.1f} |")
        floor = sm + wi["attn_layers"] * wi["kv_read_ms"]
        p(f"\nwhole decode step (engine.step) at {wi['context_at_steps']:,} re-timed ({wi['steps']} steps): "
          f"{wi['ms_per_token']:.1f} ms. "
          f"Short decode {sm:.1f} ms + the best core x {wi['attn_layers']} = {sm + best * wi['attn_layers']:.1f} ms "
          f"= {(sm + best * wi['attn_layers']) / sm:.2f}x; with this KV cache ({kv}) the decode at {a.prompt_len:,} cannot "
          f"beat ~{floor:.0f} ms/token = {floor / sm:.2f}x the short decode on this machine (memory-traffic floor)."
          + (f" Paged kernel vs torch fallback max |diff| {wi['kernel_max_abs_diff']:.1e}."
             if "kernel_max_abs_diff" in wi else ""))
        if bw := res.get("dram_gb_s"):  # the real floor: at 32K the KV (and then the weights) stream from memory
            kv_tok = per_tok_kv * long_["prompt_len"]
            t_kv = kv_tok / bw / 1e6
            t_all = (kv_tok + read_w) / bw / 1e6
            p(f"\nmemory-traffic arithmetic with the bandwidth from memory ({bw:.1f} GB/s: 1 GiB read once, "
              f"{a.threads} threads; the figure above is one layer's KV read again from cache): a token at "
              f"{a.prompt_len:,} reads {kv_tok / MiB:,.0f} MiB of KV = {t_kv:.1f} ms at that rate, so even with every "
              f"weight kept in cache it takes >= {sm:.1f} + {t_kv:.1f} = {sm + t_kv:.1f} ms = {(sm + t_kv) / sm:.2f}x "
              f"the short decode; KV + weights ({(kv_tok + read_w) / MiB:,.0f} MiB, more than this machine's L3 "
              f"holds beside other tenants) all from memory: >= {t_all:.1f} ms = {t_all / sm:.2f}x. "
              f"{DECODE_FACTOR}x would need <= {(DECODE_FACTOR - 1) * sm * bw * 1e6 / MiB:,.0f} MiB of KV per token "
              f"at this bandwidth.")
    if sweep:
        p(f"\nprefill chunk sweep: only the last chunk of a {a.prompt_len:,}-token prompt (the widest attention; "
          f"the sequence admitted at {a.prompt_len:,} - chunk computed tokens), fresh process each\n")
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
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="prefill chunk = LLM(max_num_batched_tokens=N), the engine's tokens per step (0: its default)")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="comma list of LLM kv_cache_dtype values to run: auto (bf16), int8 (e.g. 'auto,int8')")
    ap.add_argument("--sweep", default="944,2048", help="chunk sizes for the last-chunk sweep ('' = none; 944: the "
                    "engine's long-prompt chunk for this shape in bfloat16, 2048: its token budget)")
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
        res["dram_gb_s"] = dram_gb_s(a.threads)
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
