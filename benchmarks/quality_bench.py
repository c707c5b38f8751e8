#!/usr/bin/env python
"""Quality of weight-only int8 / int4 against bfloat16, in one run:

    python benchmarks/quality_bench.py [--threads 2] [--seq-len 256] [--max-rows N] [--decode-tokens 256]
                                       [--preset LFM2.5-350M] [--random-tokens 128] [--skip-random]

1. The trained demo model (lfm/assets/demo, bfloat16) on the held-out split of its own corpus: the documents of
   lfm.train.demo.corpus whose name hash puts them out of training (`is_heldout`), regenerated from this Python's
   standard library exactly as the build did (the character count is checked against card.json). Tokenized and
   packed as the build's evaluation does (`document_ids` + `pack_documents`: BOS + text + <|endoftext|>, cut into
   rows of --seq-len = the training context, positions restart per document, no attention across documents), so the
   bfloat16 row reproduces card.json's `heldout_corpus_perplexity`. One row per forward (M = seq_len rows of
   activations, inside the AVX2 kernels' range). Per variant: perplexity, mean / max per-token KL(bf16 || variant)
   over the scored tokens, and top-1 agreement with bfloat16; also through the decode path (one token per forward,
   the engine's paged cache, M = 1 GEMV) over the first --decode-tokens tokens of one document run.
   Variants: float32 (the bf16 activations' own rounding, for scale), int8, int4 g32 / g64 / g128, each with
   lfm.kernels (AVX2) and with the torch fallback (`lfm.kernels.disabled()`). Activations stay bfloat16.
   Targets (issue "edge engine"): int8 perplexity <= bf16 x 1.01, int4 <= bf16 x 1.05.
2. Random weights of the --preset shape (N(0, 0.02), seed 0, bfloat16): logit KL(bf16 || variant), top-1 agreement
   and relative RMS logit error on a fixed --random-tokens sequence (seeded ids), kernels and fallback.

Prints markdown tables; writes benchmarks/results/quality_bench.{json,txt}.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lfm import kernels  # noqa: E402
from lfm.model.quant import prepare, quantize_model  # noqa: E402

torch.set_grad_enabled(False)
# (key, label, bits or None (no quantization), group size, dtype)
VARIANTS = [("bf16", "bfloat16 (reference)", None, 0, torch.bfloat16),
            ("f32", "float32", None, 0, torch.float32),
            ("int8", "int8 (per channel)", 8, 0, torch.bfloat16),
            ("int4-g32", "int4 g32", 4, 32, torch.bfloat16),
            ("int4-g64", "int4 g64", 4, 64, torch.bfloat16),
            ("int4-g128", "int4 g128", 4, 128, torch.bfloat16)]
TARGET = {8: 1.01, 4: 1.05}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def variant_model(base, bits: int | None, group: int, dtype: torch.dtype):
    m = copy.deepcopy(base)
    if dtype != base.dtype:
        m = m.to(dtype)
    if bits is not None:
        quantize_model(m, bits, group or 64)
        prepare(m)
    return m.eval()


def stats(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """ref, got: [N, V] logits of the scored tokens. KL(ref || got) per token, top-1 agreement, relative RMS error."""
    lp, lq = F.log_softmax(ref.float(), -1), F.log_softmax(got.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0)
    rel = ((got.float() - ref.float()).pow(2).mean() / ref.float().pow(2).mean()).sqrt()
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "top1": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(), "rel_rms": rel.item()}


# ---- 1. the trained demo model ---------------------------------------------------------------------------------
def heldout_rows(model_dir: Path, seq_len: int, max_rows: int | None):
    from lfm.text.tokenizer import Tokenizer
    from lfm.train.data import document_ids, pack_documents
    from lfm.train.demo.corpus import is_heldout, iter_documents

    t0 = time.perf_counter()
    docs = [d["text"] for d in iter_documents() if is_heldout(d["name"])]
    card = json.loads((model_dir / "card.json").read_text()) if (model_dir / "card.json").exists() else {}
    want = card.get("data", {}).get("corpus", {}).get("heldout_chars")
    chars = sum(map(len, docs))
    tok = Tokenizer.from_dir(model_dir)
    ids = list(document_ids(tok, docs, "text"))
    rows = pack_documents(ids, seq_len)
    n = len(rows.tokens) if max_rows is None else min(max_rows, len(rows.tokens))
    text = {"source": "lfm.train.demo.corpus held-out split (is_heldout), regenerated", "documents": len(docs),
            "chars": chars, "card_heldout_chars": want, "same_as_build": want == chars, "tokens": sum(map(len, ids)),
            "rows": n, "seq_len": seq_len, "card_heldout_perplexity": card.get("heldout_corpus_perplexity"),
            "seconds": time.perf_counter() - t0}
    tokens = torch.as_tensor(rows.tokens[:n], dtype=torch.long)
    labels = torch.as_tensor(rows.labels[:n], dtype=torch.long)
    pos = torch.as_tensor(rows.positions[:n], dtype=torch.long)
    # the decode-path stretch: the longest run of one document from a row start (positions 0, 1, 2, ...)
    flat_pos, flat_tok = pos.reshape(-1), tokens.reshape(-1)
    starts = (flat_pos == 0).nonzero().flatten().tolist() + [len(flat_pos)]
    a, b = max(zip(starts, starts[1:]), key=lambda s: s[1] - s[0])
    return text, tokens, labels, pos, flat_tok[a:b]


def demo_logits(model, tokens, labels, pos) -> tuple[torch.Tensor, float, float]:
    """Logits of the scored positions [N, V], the mean NLL, and seconds."""
    t0, out, nll = time.perf_counter(), [], 0.0
    for r in range(tokens.shape[0]):
        lg = model(tokens[r:r + 1], position_ids=pos[r:r + 1])[0]
        keep = labels[r] >= 0
        lg = lg[keep].float()
        nll += F.cross_entropy(lg, labels[r][keep], reduction="sum").item()
        out.append(lg)
    logits = torch.cat(out)
    return logits, nll / logits.shape[0], time.perf_counter() - t0


def decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """One token per forward through the engine's paged cache (the generation path; M = 1 in every linear)."""
    from lfm import LLM

    llm = LLM(model, enable_prefix_caching=False, max_num_seqs=1, kv_cache_memory=64 << 20)
    return llm.engine.score(ids.tolist(), chunk_size=1).float()


def run_demo(a: argparse.Namespace) -> dict:
    from lfm.model.checkpoint import DEMO_MODEL, load_model

    text, tokens, labels, pos, dec_ids = heldout_rows(DEMO_MODEL, a.seq_len, a.max_rows)
    dec_ids = dec_ids[:a.decode_tokens]
    log(f"demo: {text['documents']} held-out documents, {text['chars']:,} chars (card: {text['card_heldout_chars']}), "
        f"{text['tokens']} tokens -> {text['rows']} rows of {a.seq_len}; decode stretch {len(dec_ids)} tokens")
    base = load_model(DEMO_MODEL, dtype="bfloat16").eval()
    res: dict = {"text": text, "variants": {}}
    ref = ref_dec = None
    for key, label, bits, group, dtype in VARIANTS:
        m = variant_model(base, bits, group, dtype)
        for path in (("kernels", "torch fallback") if bits is not None else ("-",)):
            ctx = kernels.disabled() if path == "torch fallback" else _null()
            with ctx:
                logits, nll, sec = demo_logits(m, tokens, labels, pos)
                dec = decode_logits(m, dec_ids)
            if ref is None:
                ref, ref_dec = logits, dec
            r = {"label": label, "bits": bits, "group": group, "path": path, "nll": nll, "ppl": math.exp(nll),
                 "seconds": sec, **stats(ref, logits), "decode": stats(ref_dec, dec)}
            res["variants"][f"{key}/{path}"] = r
            log(f"  {label:22s} {path:15s} ppl {r['ppl']:.3f}  KL mean {r['kl_mean']:.2e} max {r['kl_max']:.2e}  "
                f"top-1 {r['top1']:.4f}  decode-path KL {r['decode']['kl_mean']:.2e}  ({sec:.1f} s)")
        del m
    return res


# ---- 2. random weights, a published shape ----------------------------------------------------------------------
def run_random(a: argparse.Namespace) -> dict:
    from lfm.model.checkpoint import empty_model
    from lfm.model.presets import preset

    cfg = preset(a.preset)
    base = empty_model(cfg, torch.bfloat16)
    base.init_weights(std=0.02, generator=torch.Generator().manual_seed(a.seed))
    base.eval()
    ids = torch.randint(14, cfg.vocab_size, (1, a.random_tokens), generator=torch.Generator().manual_seed(a.seed + 1))
    res: dict = {"preset": a.preset, "tokens": a.random_tokens, "seed": a.seed, "variants": {}}
    ref = None
    for key, label, bits, group, dtype in VARIANTS:
        t0 = time.perf_counter()
        m = variant_model(base, bits, group, dtype)
        for path in (("kernels", "torch fallback") if bits is not None else ("-",)):
            with kernels.disabled() if path == "torch fallback" else _null():
                logits = m(ids)[0].float()
            if ref is None:
                ref = logits
            r = {"label": label, "bits": bits, "group": group, "path": path, **stats(ref, logits),
                 "seconds": time.perf_counter() - t0}
            res["variants"][f"{key}/{path}"] = r
            log(f"  {a.preset} {label:22s} {path:15s} KL mean {r['kl_mean']:.2e} max {r['kl_max']:.2e} "
                f"top-1 {r['top1']:.4f} rel. RMS {r['rel_rms']:.4f}")
        del m
    return res


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---- report ----------------------------------------------------------------------------------------------------
def report(a: argparse.Namespace, demo: dict | None, rnd: dict | None, env: dict) -> None:
    print(f"## quantization quality vs bfloat16 (torch {env['torch']}, {env['cpu']}, threads {a.threads}, "
          f"lfm.kernels {'available' if env['kernels'] else 'unavailable'})\n")
    if demo:
        t = demo["text"]
        bf = demo["variants"]["bf16/-"]["ppl"]
        print("### trained demo model (lfm/assets/demo, 6.1M params) on its held-out corpus split\n")
        print(f"{t['documents']} documents / {t['chars']:,} chars never trained on (same split as the build: "
              f"{'yes' if t['same_as_build'] else 'NO'}, card.json says {t['card_heldout_chars']:,} chars), "
              f"{t['rows'] * t['seq_len']:,} tokens in {t['rows']} rows of {t['seq_len']} (the training context); "
              f"card.json's bf16 held-out perplexity: {t['card_heldout_perplexity']:.3f}. Activations bfloat16. "
              f"Decode path: {a.decode_tokens} tokens one at a time through the cache.\n")
        print("| weights | path | perplexity | vs bf16 | target | KL(bf16‖q) mean | KL max | top-1 agree | "
              "decode-path KL mean | decode top-1 |")
        print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
        for r in demo["variants"].values():
            d = r["ppl"] / bf - 1
            tgt = TARGET.get(r["bits"])
            verdict = "—" if tgt is None else f"≤ +{(tgt - 1) * 100:.0f}%: **{'PASS' if r['ppl'] <= bf * tgt else 'MISS'}**"
            r["delta"], r["verdict"] = d, verdict
            print(f"| {r['label']} | {r['path']} | {r['ppl']:.3f} | {d * 100:+.2f}% | {verdict} | {r['kl_mean']:.2e} | "
                  f"{r['kl_max']:.2e} | {r['top1'] * 100:.2f}% | {r['decode']['kl_mean']:.2e} | "
                  f"{r['decode']['top1'] * 100:.1f}% |")
        print()
    if rnd:
        print(f"### {rnd['preset']} shape, random weights N(0, 0.02) (seed {rnd['seed']}), {rnd['tokens']} fixed "
              f"tokens, one forward\n")
        print("(random weights give near-uniform logits: KL here measures the logit perturbation, not quality)\n")
        print("| weights | path | KL(bf16‖q) mean | KL max | top-1 agree | rel. RMS logit error |")
        print("|---|---|---:|---:|---:|---:|")
        for r in rnd["variants"].values():
            print(f"| {r['label']} | {r['path']} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['top1'] * 100:.1f}% | "
                  f"{r['rel_rms']:.4f} |")
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256, help="row length = the demo model's training context")
    ap.add_argument("--max-rows", type=int, default=None, help="cap the held-out rows (default: all)")
    ap.add_argument("--decode-tokens", type=int, default=256, help="tokens scored through the decode path")
    ap.add_argument("--preset", default="LFM2.5-350M")
    ap.add_argument("--random-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-random", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "quality_bench.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
               platform.machine())
    env = {"torch": torch.__version__, "cpu": cpu, "cores": os.cpu_count(), "kernels": kernels.available(),
           "python": platform.python_version()}
    demo = None if a.skip_demo else run_demo(a)
    rnd = None if a.skip_random else run_random(a)
    wall = time.perf_counter() - t0
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        report(a, demo, rnd, env)
        print(f"(total wall time {wall:.0f} s; load average {os.getloadavg()[0]:.1f} at the end)")
    print(buf.getvalue(), end="")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(buf.getvalue())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "env": env, "demo": demo, "random": rnd, "wall_s": wall},
                              indent=1) + "\n")
    print(f"(JSON: {out})")


if __name__ == "__main__":
    main()
