"""Build the demo model from nothing but this Python install, in one command (49 minutes on 2 CPU cores, as shipped):

    python -m lfm.train.demo.build                       # -> lfm/assets/demo (the offline default model)

corpus + tokenizer + chat data (`prepare_demo_data`), pretraining (`pretrain.toml`), chat SFT (`sft.toml`), RL with
verifiable rewards (`grpo.toml`: GRPO on held-in tool-calling and instruction prompts, `grpo_data.py`; the step
shipped is the checkpoint with the best greedy reward on a held-in validation split, never chosen on the eval), then a
bfloat16 export with its config, tokenizer, metrics, loss plots, held-out perplexity, `lfm eval` scores on held-out
prompts before and after the GRPO stage, and sample chats. A stage that finished is not rerun (its run directory
holds the final checkpoint); an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent.parent / "assets" / "demo"
# sampling defaults shipped in the demo's generation_config.json, chosen by benchmarks/demo_sampling.py (seeds x
# prompts): as coherent and as good at tool calls as greedy, yet replies vary; temperature 1 talks nonsense
DEMO_SAMPLING = {"do_sample": True, "temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.05}

SAMPLE_TOOLS = [{"type": "function", "function": {
    "name": "lookup_doc", "description": "Look up the documentation of a Python standard library object.",
    "parameters": {"type": "object", "properties": {"name": {"type": "string", "description": "qualified name"}},
                   "required": ["name"]}}}]
SAMPLES = [
    {"messages": [{"role": "user", "content": "Hi! Who are you?"}]},
    {"messages": [{"role": "user", "content": "What does json.dumps do?"}]},
    {"messages": [{"role": "user", "content": "Look up the documentation of os.path.join."}], "tools": SAMPLE_TOOLS},
]


def _eval(model_dir: Path, sources: list[str], task: str, seq_len: int) -> float:
    """Mean loss per trained token of a saved model on held-out data (as it ships: bfloat16)."""
    import torch.nn.functional as F

    from ...model.checkpoint import load_model
    from ...text.tokenizer import Tokenizer
    from ..data import IGNORE, build_rows

    model = load_model(model_dir)
    rows = build_rows(Tokenizer.from_dir(model_dir), sources, task, seq_len)
    tot, n = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(rows), 16):
            b = rows.take(list(range(lo, min(lo + 16, len(rows)))))
            logits = model(b["input_ids"], position_ids=b["position_ids"]).float()
            tot += F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE, reduction="sum").item()
            n += int((b["labels"] != IGNORE).sum())
    return tot / max(n, 1)


def _samples(model_dir: Path) -> list[dict]:
    """Greedy replies to the sample chats, as a user of `lfm chat` would see them (tool calls parsed)."""
    from ...engine.llm import LLM
    from ...engine.sampling import SamplingParams

    llm = LLM(str(model_dir))
    out = []
    for s in SAMPLES:
        r = llm.chat(s["messages"], SamplingParams(max_tokens=96, temperature=0.0), tools=s.get("tools"))
        out.append({"messages": s["messages"], "tools": [t["function"]["name"] for t in s.get("tools", [])],
                    "raw": llm.tokenizer.decode(r.token_ids, skip_special_tokens=False),
                    "content": r.content, "tool_calls": [c.to_openai() for c in r.tool_calls],
                    "finish_reason": r.finish_reason})
    return out


EVAL_TASKS = "tools,ifeval-lite"  # the scores the GRPO stage is meant to move (tools) and keep (instructions)


def _lfm_eval(model_dir: Path, out_dir: Path) -> dict[str, dict[str, float]]:
    """`lfm eval` (greedy, built-in held-out data) of an exported model: {task: metrics}."""
    from ...cli import main as lfm_main

    lfm_main(["eval", str(model_dir), "--tasks", EVAL_TASKS, "-o", str(out_dir), "--no-progress"])
    results = json.loads((out_dir / "results.json").read_text())["results"]
    return {task: r["metrics"] for task, r in results.items()}


def _export(final: Path, out: Path) -> None:
    """bfloat16 weights, config and tokenizer of a run's final checkpoint, with the demo's sampling defaults."""
    from ...model.checkpoint import load_model, save_model

    shutil.rmtree(out, ignore_errors=True)
    save_model(load_model(final, dtype="bfloat16"), out, final)
    gen = json.loads((out / "generation_config.json").read_text())  # + the sampling the demo reads best at
    (out / "generation_config.json").write_text(json.dumps({**gen, **DEMO_SAMPLING}, indent=2) + "\n")


def _validate(model_dir: Path, records: list[dict], max_tokens: int) -> float:
    """Mean greedy reward of an exported model on held-in validation prompts, as the GRPO stage scores samples."""
    from ...engine.llm import LLM
    from ...engine.sampling import SamplingParams
    from ...eval.scoring import Scorer
    from .grpo_data import reward

    llm = LLM(str(model_dir))
    ids = [llm.encode_chat(r["messages"], r.get("tools")) for r in records]
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=False)
    outs = Scorer(llm, progress=False).run(ids, sp, "validate", chat=True)
    return sum(reward(o.text.removesuffix("<|im_end|>"), r) for o, r in zip(outs, records)) / len(records)


def _pick_grpo_step(rl, sft_export: Path, val_path: Path, work: Path) -> tuple[Path, dict[int, float]]:
    """The GRPO checkpoint (or the SFT start, step 0) with the best validation reward; ties go to fewer steps."""
    from .corpus import read_jsonl

    records = list(read_jsonl(val_path))
    scores = {0: _validate(sft_export, records, rl.grpo.max_tokens)}
    best, best_dir = 0, sft_export
    for ckpt in sorted((Path(rl.out_dir) / "checkpoints").glob("step_*")):
        step = int(ckpt.name.removeprefix("step_"))
        out = work / f"grpo-export-{step}"
        _export(ckpt / "model", out)
        scores[step] = _validate(out, records, rl.grpo.max_tokens)
        print(f"      validation reward at step {step}: {scores[step]:.3f}", flush=True)
        if scores[step] > scores[best]:
            best, best_dir = step, out
    return best_dir, scores


def _run(cfg) -> Path:
    """Train a stage, resuming its run directory when it holds a checkpoint; a finished stage returns at once."""
    from ..loop import train
    from ..state import find_checkpoint

    ckpt, _ = find_checkpoint(Path(cfg.out_dir)) if Path(cfg.out_dir).is_dir() else (None, [])
    return train(cfg, resume=ckpt is not None)


def build(out: Path, work: Path, pretrain_steps: int | None, sft_steps: int | None, threads: int | None,
          max_chars: int | None, grpo_steps: int | None = None) -> dict:
    from ...model.checkpoint import load_model
    from ..config import TrainConfig
    from . import prepare_demo_data
    from .grpo_data import build_grpo_prompts

    t_start = time.perf_counter()
    data = work / "data"
    print(f"[1/5] data -> {data}", flush=True)
    stats = prepare_demo_data(data, max_chars=max_chars, progress=lambda line: print("      " + line, flush=True))
    stats["grpo"] = build_grpo_prompts(data / "corpus.jsonl", data / "grpo.jsonl")
    stats["grpo_validation"] = build_grpo_prompts(data / "corpus.jsonl", data / "grpo.val.jsonl", n_tool=120,
                                                  n_instruct=30, seed=2, exclude=data / "grpo.jsonl")

    pre = TrainConfig.from_toml(HERE / "pretrain.toml")
    pre.out_dir, pre.model.tokenizer = str(work / "pretrain"), str(data / "tokenizer")
    pre.data.train, pre.data.eval = [str(data / "corpus.jsonl")], [str(data / "corpus.heldout.jsonl")]
    sft = TrainConfig.from_toml(HERE / "sft.toml")
    sft.out_dir = str(work / "sft")
    sft.data.train, sft.data.eval = [str(data / "chat.jsonl")], [str(data / "chat.heldout.jsonl")]
    rl = TrainConfig.from_toml(HERE / "grpo.toml")
    rl.out_dir, rl.data.train = str(work / "grpo"), [str(data / "grpo.jsonl")]
    for cfg, steps in ((pre, pretrain_steps), (sft, sft_steps), (rl, grpo_steps)):
        if steps:
            cfg.steps = steps
            cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(1, steps // 10))
        if threads:
            cfg.threads = threads
    print(f"[2/5] pretraining {pre.steps} steps x {pre.batch_size} x {pre.data.seq_len} tokens", flush=True)
    t0 = time.perf_counter()
    pre_final = _run(pre)
    t_pre = time.perf_counter() - t0
    sft.model.init = str(pre_final)
    print(f"[3/5] chat fine-tuning {sft.steps} steps", flush=True)
    t0 = time.perf_counter()
    sft_final = _run(sft)
    t_sft = time.perf_counter() - t0

    rl.model.init = str(sft_final)
    print(f"[4/5] GRPO {rl.steps} steps x {rl.batch_size} prompts x {rl.grpo.group_size} samples", flush=True)
    t0 = time.perf_counter()
    _run(rl)
    _export(sft_final, work / "sft-export")
    picked, val_scores = _pick_grpo_step(rl, work / "sft-export", data / "grpo.val.jsonl", work)
    t_rl = time.perf_counter() - t0

    print(f"[5/5] export -> {out}, lfm eval before/after GRPO", flush=True)
    before = _lfm_eval(work / "sft-export", work / "eval-before-grpo")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(picked, out)
    after = _lfm_eval(out, work / "eval-after-grpo")
    for name, cfg in (("pretrain", pre), ("sft", sft), ("grpo", rl)):
        shutil.copy(Path(cfg.out_dir) / "metrics.jsonl", out / f"{name}-metrics.jsonl")
        shutil.copy(Path(cfg.out_dir) / "loss.png", out / f"{name}-loss.png")
        (out / f"{name}.toml").write_text(cfg.to_toml())

    def rate(name: str) -> float:
        rows = [json.loads(x) for x in (out / f"{name}-metrics.jsonl").read_text().splitlines()]
        return rows[-1]["tokens_per_s"]

    corpus_loss = _eval(out, [str(data / "corpus.heldout.jsonl")], "pretrain", pre.data.seq_len)
    chat_loss = _eval(out, [str(data / "chat.heldout.jsonl")], "sft", sft.data.seq_len)
    card = {
        "parameters": sum(p.numel() for p in load_model(out).parameters()),
        "heldout_corpus_loss": corpus_loss, "heldout_corpus_perplexity": math.exp(corpus_loss),
        "heldout_chat_loss": chat_loss, "heldout_chat_perplexity": math.exp(chat_loss),
        "pretrain_tokens_per_s": rate("pretrain"), "sft_tokens_per_s": rate("sft"),
        "pretrain_minutes": t_pre / 60, "sft_minutes": t_sft / 60, "grpo_minutes": t_rl / 60,
        "eval_before_grpo": before, "eval_after_grpo": after, "grpo": _grpo_summary(out / "grpo-metrics.jsonl"),
        "grpo_validation_reward": {str(k): v for k, v in val_scores.items()},
        "grpo_step_shipped": max(val_scores, key=lambda k: (val_scores[k], -k)),
        "total_minutes": (time.perf_counter() - t_start) / 60, "threads": torch.get_num_threads(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "data": {k: {kk: vv for kk, vv in v.items() if not isinstance(vv, (dict, list))} if isinstance(v, dict) else v
                 for k, v in stats.items()},
        "samples": _samples(out),
    }
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"done in {card['total_minutes']:.1f} min: {out} ({size:.1f} MiB), held-out corpus perplexity "
          f"{card['heldout_corpus_perplexity']:.1f}, chat perplexity {card['heldout_chat_perplexity']:.2f}, "
          f"tools accuracy {before['tools']['accuracy']:.3f} -> {after['tools']['accuracy']:.3f}, ifeval-lite "
          f"{before['ifeval-lite']['prompt_accuracy']:.3f} -> {after['ifeval-lite']['prompt_accuracy']:.3f}")
    return card


def _grpo_summary(metrics_jsonl: Path) -> dict:
    """Mean reward over the first and the last 5 logged GRPO steps (the training prompts, sampled)."""
    rows = [json.loads(x) for x in metrics_jsonl.read_text().splitlines() if "reward_mean" in x]
    mean = lambda rs: sum(r["reward_mean"] for r in rs) / max(len(rs), 1)  # noqa: E731
    return {"steps": rows[-1]["step"] if rows else 0, "reward_first5": mean(rows[:5]), "reward_last5": mean(rows[-5:])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lfm.train.demo.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where the model goes (default {DEFAULT_OUT})")
    p.add_argument("--work", type=Path, default=Path("runs/demo"), help="data and run directories")
    p.add_argument("--pretrain-steps", type=int, help="override pretrain.toml's steps (for a quick trial)")
    p.add_argument("--sft-steps", type=int, help="override sft.toml's steps")
    p.add_argument("--grpo-steps", type=int, help="override grpo.toml's steps")
    p.add_argument("--threads", type=int, help="torch threads (default: the configs' 2)")
    p.add_argument("--max-chars", type=int, help="cap the corpus size (for a quick trial)")
    a = p.parse_args(argv)
    build(a.out, a.work, a.pretrain_steps, a.sft_steps, a.threads, a.max_chars, a.grpo_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
