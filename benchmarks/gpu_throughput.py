#!/usr/bin/env python
"""GPU serving throughput (issue "GPU runner"): lfm's engine under a closed-loop load, against transformers' batched
`generate` on the same GPU in the same run.

Per model shape (random bf16 weights: speed does not depend on their values) and concurrency C: N random-token
prompts of P tokens, each generating exactly O tokens (greedy, EOS ignored), C requests kept in flight (the next
prompt is added as soon as one finishes), driving `LLM.engine` directly (add_request / step):
- output tok/s = all output tokens / (first add -> last finish), host clock, device synchronised around the run;
- TTFT p50 / p99 = add -> first token of each request (queueing included, as a client sees it);
- ITL p50 = gaps between consecutive tokens of a request (a step delivers one token per request);
- peak GPU memory = torch.cuda.max_memory_allocated over the timed run (weights + KV cache + activations);
- the peer: transformers' own Lfm2 / Lfm2Moe class (`from_config`, random weights, bf16, its default attention and
  experts implementations), one batched `generate` of --peer-batch of the same prompts with the same output length
  (min_new_tokens = max_new_tokens): tok/s = batch x new tokens / time; every lfm row's ratio is against it.
Each row builds its own engine (max_num_seqs = C, KV cache for C whole sequences, capped to free GPU memory; the
engine captures its decode CUDA graphs as it starts) and runs an untimed warm-up on other prompts, so graph capture
and Triton compilation stay outside the clock. q/k/v and w1/w3 are fused, as `LLM` does for a checkpoint it loads
onto a GPU (it leaves a module it is handed alone).

    python benchmarks/gpu_throughput.py --quick --out benchmarks/results/gpu_throughput_quick.md   # ~2 min, H100
    python benchmarks/gpu_throughput.py --moe-long --out benchmarks/results/gpu_throughput.md      # full: > 10 min
    python benchmarks/gpu_throughput.py --models 350M --concurrency 256 --no-peer                  # one row
    python benchmarks/gpu_throughput.py --smoke                                 # CPU, tiny shapes: runs end to end

Targets on one H100 / H200: >= 40,400 output tok/s for the LFM2.5-350M shape at its best concurrency (stretch
50,000); >= 10x transformers' batched generate; TTFT p50 < 50 ms at concurrency 64; LFM2-8B-A1B >= 3,714 output
tok/s at concurrency 32 with 8,192-token prompts and 2,048-token outputs (vLLM's published H100 figure; --moe-long).

--quick: 350M and 8B-A1B, 256 prompts at C = 64 and 256, the 8B-A1B long row with 32 prompts (one wave, run first);
rows are cut at 20 s (the long row at 40 s) and the peer at 10 s: cut figures are marked and only underestimate.
Estimated at about 2 minutes on an H100 with model builds, graph captures, warm-ups and first-time Triton compilation
if lfm is near its targets; the cuts bound it at about 3.5 minutes if it is far slower (benchmarks/gpu_session.sh
allows 240 s). The full run takes well over 10 minutes (split it with --models).
A row that fails (out of memory, say) is reported and the run goes on; the table is rewritten to --out after every
row, so a run stopped early keeps what it measured.
Not yet run on a GPU: written and smoke-tested on CPU only (--smoke; tests/test_gpu_throughput_script.py).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

# the CPU AVX2 extension is never used on this path; without this, LLM() would compile it (minutes) on a fresh machine
os.environ.setdefault("LFM_KERNELS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

GiB = 1 << 30
MODELS = {"350M": "LFM2.5-350M", "1.2B": "LFM2.5-1.2B", "8B-A1B": "LFM2-8B-A1B"}
TARGET_TOK_S, STRETCH_TOK_S, TARGET_RATIO, TARGET_TTFT_MS, TARGET_MOE_TOK_S = 40_400, 50_000, 10.0, 50.0, 3_714
MOE_LONG = (32, 8192, 2048)  # concurrency, prompt, output of vLLM's published 8B-A1B figure
_COMMON = dict(prompt_len=512, output_len=256, peer_batch=64, moe_long_shape=MOE_LONG)
PROFILES = {  # defaults per mode; a flag given on the command line wins
    "full": dict(_COMMON, models="350M,1.2B,8B-A1B", prompts=1024, concurrency="64,256,1024", moe_long_prompts=64,
                 row_limit_s=0.0, peer_limit_s=0.0),
    "quick": dict(_COMMON, models="350M,8B-A1B", prompts=256, concurrency="64,256", moe_long_prompts=32,
                  row_limit_s=20.0, peer_limit_s=10.0),
    "smoke": dict(models="tiny,tiny-moe", prompts=8, prompt_len=16, output_len=8, concurrency="2,4", peer_batch=4,
                  moe_long_prompts=4, moe_long_shape=(2, 48, 8), row_limit_s=0.0, peer_limit_s=0.0),
}


@dataclass
class Row:
    model: str
    conc: int
    prompts: int
    prompt_len: int
    out_len: int
    tok_s: float = math.nan
    ttft_ms: tuple[float, float] = (math.nan, math.nan)  # p50, p99
    itl_ms: float = math.nan  # p50
    peak_gib: float | None = None
    ratio: float | None = None
    cut: bool = False
    notes: str = ""  # cut, failed requests, preemptions, KV capped, graph replays, errors


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def pct_ms(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3 if xs else math.nan


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(16, vocab, (n, length), generator=g).tolist()  # above the special tokens


def closed_loop(engine, prompts: list[list[int]], out_lens: list[int], conc: int, device: str,
                limit_s: float = 0.0) -> dict:
    """Keep `conc` requests in flight until every prompt is done; a token's time is the host clock right after the
    step that delivered it (what a client of the engine sees). limit_s > 0 aborts what is left after that long."""
    from lfm import SamplingParams

    params = {n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in set(out_lens)}
    added: dict[str, float] = {}
    last: dict[str, float] = {}
    ttft: list[float] = []
    itl: list[float] = []
    nxt = tokens = errors = 0
    cut = False

    def add() -> None:
        nonlocal nxt
        added[f"r{nxt}"] = time.perf_counter()
        engine.add_request(f"r{nxt}", prompts[nxt], params[out_lens[nxt]])
        nxt += 1

    steps0 = engine.steps
    sync(device)
    t0 = time.perf_counter()
    while nxt < min(conc, len(prompts)):
        add()
    while added:
        deltas = engine.step()
        now = time.perf_counter()
        for d in deltas:
            rid, k = d.request_id, len(d.token_ids)
            if k:
                if rid in last:  # a delta of k tokens: its gap split evenly between them
                    itl.extend([(now - last[rid]) / k] * k)
                else:
                    ttft.append(now - added[rid])
                last[rid] = now
                tokens += k
            if d.finish_reason is not None:
                errors += d.finish_reason in ("error", "abort")
                added.pop(rid, None)
                last.pop(rid, None)
                if nxt < len(prompts):
                    add()
        if limit_s and added and now - t0 > limit_s:
            for rid in list(added):
                engine.abort_request(rid)
            cut = True
            break
        if added and not deltas and not engine.has_unfinished_requests():
            raise RuntimeError(f"the engine went idle with {len(added)} requests in flight")
    sync(device)
    return dict(tokens=tokens, wall=time.perf_counter() - t0, ttft=ttft, itl=itl, errors=errors, cut=cut,
                steps=engine.steps - steps0)


def build_llm(model, conc: int, plen: int, olen: int, a: argparse.Namespace, device: str):
    """An engine for C concurrent sequences: KV blocks for all of them whole (+2 blocks each, so the scheduler's
    one-free-block-per-running-sequence reserve never holds back admission), capped to what fits beside activations."""
    from lfm import LLM
    from lfm.engine.cache import PagedCache

    bs, note, max_len = 16, "", plen + olen + 32
    per_block = PagedCache.block_bytes(model.config, bs, model.dtype, model.dtype, not a.no_prefix_caching)
    kv = per_block * (conc * -(-max_len // bs) + 1)
    if a.kv_cache_memory:
        kv = int(a.kv_cache_memory * GiB)
    elif device == "cuda":
        free, total = torch.cuda.mem_get_info()
        cap = free - max(6 * GiB, total // 10)  # prefill activations, logits, sampler, graph pools
        if cap < kv:
            note = f"KV capped at {cap / GiB:.1f} GiB ({cap / kv:.0%} of {conc} whole sequences)"
            kv = max(cap, per_block * 2)
    budget = min(max(a.max_batched_tokens, plen + conc), 32768)  # a whole prompt and every decode fit one step
    llm = LLM(model, max_num_seqs=conc, max_num_batched_tokens=budget, kv_cache_memory=kv, block_size=bs,
              max_model_len=max_len, enable_prefix_caching=not a.no_prefix_caching, enforce_eager=a.eager)
    return llm, note


def measure(model, name: str, conc: int, n: int, plen: int, olen: int, limit_s: float, a: argparse.Namespace,
            device: str) -> Row:
    """One table row: its own engine, an untimed warm-up on other prompts (staggered output lengths: decode batches
    of many sizes, so graphs and kernels for them exist), then the timed closed loop."""
    row, llm = Row(name, conc, n, plen, olen), None
    try:
        llm, note = build_llm(model, conc, plen, olen, a, device)
        vocab = model.config.vocab_size
        w = min(conc, n, max(4, 32768 // plen))  # ~32K warm-up prompt tokens (graphs are captured already)
        closed_loop(llm.engine, random_prompts(w, plen, vocab, a.seed + 7919), [2 + i % 15 for i in range(w)], conc,
                    device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        graphs = llm.engine.runner.graphs  # None when eager
        replays0 = graphs.replays if graphs is not None else 0
        r = closed_loop(llm.engine, random_prompts(n, plen, vocab, a.seed + plen), [olen] * n, conc, device, limit_s)
        row.tok_s, row.cut = r["tokens"] / r["wall"], r["cut"]
        row.ttft_ms, row.itl_ms = (pct_ms(r["ttft"], 50), pct_ms(r["ttft"], 99)), pct_ms(r["itl"], 50)
        row.peak_gib = torch.cuda.max_memory_allocated() / GiB if device == "cuda" else None
        pre = llm.engine.scheduler.num_preemptions
        notes = ([note] if note else []) + ([f"{pre} preemptions"] if pre else [])
        notes += [f"cut at {r['wall']:.1f} s (tok/s over the part run)"] if r["cut"] else []
        notes += [f"{r['errors']} requests failed"] if r["errors"] else []
        if graphs is not None and graphs.graphs:
            notes.append(f"CUDA graph replays {graphs.replays - replays0} in {r['steps']} steps")
        elif device == "cuda" and not a.eager:
            notes.append("decode steps ran eagerly (no graphs captured: see the engine's warning)")
        row.notes = "; ".join(notes)
    except Exception as e:  # noqa: BLE001  one failed row (out of memory, say) must not end the run
        traceback.print_exc()
        row.notes = f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:200]
    finally:
        del llm
        free_memory(device)
    return row


def peer(cfg, prompts: list[list[int]], olen: int, a: argparse.Namespace, device: str,
         dtype: torch.dtype) -> tuple[float | None, str]:
    """transformers' batched generate (greedy, exactly olen new tokens) on random weights of the same shape:
    (tok/s or None, a one-line description or error)."""
    m = None
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device(device):  # weights made on the GPU directly (an 8B CPU init would take minutes)
            m = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.to_dict()), dtype=dtype)
        m = m.to(device).eval()
        ids = torch.tensor([prompts[i % len(prompts)] for i in range(a.peer_batch)], device=device)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=cfg.pad_token_id or 0)
        m.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        if a.peer_limit_s:
            kw["max_time"] = a.peer_limit_s
        sync(device)
        t0 = time.perf_counter()
        new = m.generate(ids, max_new_tokens=olen, min_new_tokens=olen, **kw).shape[1] - ids.shape[1]
        sync(device)
        tok_s = a.peer_batch * new / (time.perf_counter() - t0)
        conv = "causal_conv1d" if importlib.util.find_spec("causal_conv1d") else "PyTorch conv fallback"
        experts = f"experts {getattr(m.config, '_experts_implementation', None)}, " if cfg.is_moe else ""
        return tok_s, (f"{tok_s:,.0f} tok/s (batch {a.peer_batch}, {ids.shape[1]} / {new} tokens"
                       f"{', cut at the time limit' if new < olen else ''}, {str(dtype)[6:]}, transformers "
                       f"{transformers.__version__}, attention {m.config._attn_implementation}, {experts}{conv}; "
                       "random weights)")
    except Exception as e:  # noqa: BLE001  no peer figure and no ratio; the run goes on
        return None, f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
    finally:
        del m
        free_memory(device)


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, spec)


def targets(rows: list[Row], a: argparse.Namespace) -> str:
    ok = [r for r in rows if not math.isnan(r.tok_s)]
    best = max((r for r in ok if r.model == MODELS["350M"]), key=lambda r: r.tok_s, default=None)
    c64 = next((r for r in ok if r.model == MODELS["350M"] and r.conc == 64 and r.prompt_len == a.prompt_len), None)
    moe = next((r for r in ok if r.model == MODELS["8B-A1B"] and (r.conc, r.prompt_len, r.out_len) == MOE_LONG), None)

    def met(v: float, good: bool, spec: str, where: str = "") -> str:
        return f"{format(v, spec)}{where}: {'met' if good else 'NOT met'}"

    na = "not measured"
    t = [f">= {TARGET_TOK_S:,} tok/s for 350M (stretch {STRETCH_TOK_S:,}): "
         + (met(best.tok_s, best.tok_s >= TARGET_TOK_S, ",.0f", f" at C={best.conc}")
            + (" (stretch met)" if best.tok_s >= STRETCH_TOK_S else "") if best else na),
         f">= {TARGET_RATIO:.0f}x transformers (350M): "
         + (met(best.ratio, best.ratio >= TARGET_RATIO, ".1f", "x") if best and best.ratio else na),
         f"TTFT p50 < {TARGET_TTFT_MS:.0f} ms at C=64 (350M): "
         + (met(c64.ttft_ms[0], c64.ttft_ms[0] < TARGET_TTFT_MS, ".1f", " ms") if c64 else na),
         f"8B-A1B >= {TARGET_MOE_TOK_S:,} tok/s at C=32, 8192 / 2048: "
          + (met(moe.tok_s, moe.tok_s >= TARGET_MOE_TOK_S, ",.0f") + " (cut row)" * moe.cut if moe else na)]
    return "Targets: " + "; ".join(t)


def report(header: list[str], rows: list[Row], peers: dict[str, str], a: argparse.Namespace, done: bool) -> str:
    out = header + ["", "| model | concurrency | prompts x (prompt / output) | output tok/s | TTFT p50 / p99 (ms) | "
                    "ITL p50 (ms) | peak GPU memory (GiB) | vs transformers |",
                    "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.model} | {r.conc} | {r.prompts} x ({r.prompt_len} / {r.out_len}) | "
                   f"{fmt(r.tok_s, ',.0f')}{' (cut)' if r.cut else ''} | {fmt(r.ttft_ms[0], '.1f')} / "
                   f"{fmt(r.ttft_ms[1], '.1f')} | {fmt(r.itl_ms, '.2f')} | {fmt(r.peak_gib, '.1f')} | "
                   f"{fmt(r.ratio, '.1f') + 'x' if r.ratio else '-'} |")
    notes = [f"- {r.model} C={r.conc} {r.prompt_len}/{r.out_len}: {r.notes}" for r in rows if r.notes]
    out += ([""] + notes if notes else []) + [""] + [f"transformers {m}: {s}" for m, s in peers.items()]
    out += ["", targets(rows, a)] + ([] if done else ["(run in progress or stopped early: the rows so far)"])
    return "\n".join(out) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--models", help="comma list of 350M, 1.2B, 8B-A1B or preset names (default: all three)")
    add("--prompts", type=int, help="prompts per row (default 1024)")
    add("--prompt-len", type=int, help="prompt tokens (default 512)")
    add("--output-len", type=int, help="output tokens per request (default 256)")
    add("--concurrency", help="comma list: requests kept in flight, one row each (default 64,256,1024)")
    add("--peer-batch", type=int, help="transformers generate batch size (default 64)")
    add("--no-peer", action="store_true", help="skip transformers")
    add("--eager", action="store_true", help="enforce_eager: no CUDA graphs")
    add("--no-prefix-caching", action="store_true", help="engine without prefix caching (on by default, as vLLM)")
    add("--kv-cache-memory", type=float, help="KV cache GiB per engine (default: C whole sequences, capped to free)")
    add("--max-batched-tokens", type=int, default=8192, help="tokens per engine step, at least (default 8192)")
    add("--moe-long", action="store_true", default=None,
        help="add the 8B-A1B target row: C=32, 8192-token prompts, 2048-token outputs (on with --quick / --smoke)")
    add("--moe-long-prompts", type=int, help="prompts of that row (default 64)")
    add("--row-limit-s", type=float, help="abort a row after this many seconds (the long MoE row: twice that) and "
        "report it cut (0: never; --quick: 20)")
    add("--peer-limit-s", type=float, help="transformers generate's max_time in seconds (0: none; --quick: 10)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short run for a time-limited GPU session (see below)")
    mode.add_argument("--smoke", action="store_true", help="CPU, tiny presets, a few short prompts: runs end to end")
    add("--out", help="also write the table to this file (rewritten after every row)")
    add("--seed", type=int, default=0, help="weights and prompts")
    a = ap.parse_args(argv)
    for k, v in PROFILES["smoke" if a.smoke else "quick" if a.quick else "full"].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.moe_long = bool(a.moe_long) or a.quick or a.smoke
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if not a.smoke and not torch.cuda.is_available():
        print("error: no CUDA device: this benchmark needs a GPU (--smoke runs a short CPU check)", file=sys.stderr)
        return 2
    from lfm.model.checkpoint import empty_model
    from lfm.model.presets import preset, preset_name

    device, dtype = ("cpu", torch.float32) if a.smoke else ("cuda", torch.bfloat16)
    if a.smoke:
        torch.set_num_threads(1)  # tiny matrices: more threads only add syncs
    names = [MODELS.get(m.strip()) or preset_name(m.strip()) or m.strip() for m in a.models.split(",") if m.strip()]
    concs = [int(c) for c in a.concurrency.split(",") if c.strip()]
    triton_v = importlib.util.find_spec("triton") and __import__("triton").__version__ or "not installed"
    header = [f"# lfm serving throughput: random weights, {str(dtype)[6:]}, greedy, EOS ignored",
              f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (smoke run: figures mean nothing)'}"
              f" | torch {torch.__version__} | triton {triton_v} | CUDA graphs: "
              + ("n/a (CPU)" if device == "cpu" else "off (--eager)" if a.eager else "on (enforce_eager=False)")
              + f" | prefix caching: {'off' if a.no_prefix_caching else 'on'} | closed loop, a fresh engine per row"]
    print("\n".join(header), flush=True)
    rows: list[Row] = []
    peers: dict[str, str] = {}

    def save(done: bool) -> str:
        text = report(header, rows, peers, a, done)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(text)
        return text

    for name in names:
        t0 = time.perf_counter()
        try:
            cfg = preset(name)
            torch.manual_seed(a.seed)
            model = empty_model(cfg, dtype, device)
            model.init_weights(std=0.02)
            if device == "cuda":  # what LLM serves a checkpoint it loads onto a GPU with
                model.fuse_projections()
            model.eval()
        except Exception as e:  # noqa: BLE001  an unknown name or no memory: the other models still run
            traceback.print_exc()
            peers[name] = f"not run, nor lfm: the model could not be built: {type(e).__name__}: {e}"[:300]
            model = None
            free_memory(device)
            continue
        gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
        print(f"{name}: random weights built in {time.perf_counter() - t0:.1f} s ({gib:.2f} GiB)", flush=True)
        specs = [(c, a.prompts, a.prompt_len, a.output_len, a.row_limit_s) for c in concs]
        if a.moe_long and cfg.is_moe:  # the target row first: what a session cut short should still have
            specs.insert(0, (a.moe_long_shape[0], a.moe_long_prompts, *a.moe_long_shape[1:], 2 * a.row_limit_s))
        mine = []
        for c, n, p, o, limit in specs:
            t0 = time.perf_counter()
            r = measure(model, name, c, n, p, o, limit, a, device)
            mine.append(r)
            rows.append(r)
            print(f"{name} C={c} {n} x {p}/{o}: {fmt(r.tok_s, ',.0f')} tok/s, TTFT p50 {fmt(r.ttft_ms[0], '.1f')} ms, "
                  f"ITL p50 {fmt(r.itl_ms, '.2f')} ms ({time.perf_counter() - t0:.0f} s with warm-up) {r.notes}",
                  flush=True)
            save(False)
        del model
        free_memory(device)
        if a.no_peer:
            peers[name] = "not run (--no-peer)"
        else:
            t0 = time.perf_counter()
            prompts = random_prompts(a.peer_batch, a.prompt_len, cfg.vocab_size, a.seed + a.prompt_len)  # rows' first
            hf, peers[name] = peer(cfg, prompts, a.output_len, a, device, dtype)
            print(f"transformers {name}: {peers[name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
            for r in mine:  # rows of the peer's prompt / output lengths only (not the long MoE row)
                same = (r.prompt_len, r.out_len) == (a.prompt_len, a.output_len)
                r.ratio = r.tok_s / hf if hf and same and not math.isnan(r.tok_s) else None
        save(False)
    print("\n" + save(True), end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
