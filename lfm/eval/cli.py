"""`lfm eval`: built-in local tasks (tools, json, ifeval-lite, mc, ppl; each `:FILE` for own data) and any lm-evaluation-harness
task (`lm-eval:NAME,...`), through the engine. Only argparse is imported here; torch, the engine and lm-eval are
imported when the command runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BUILTIN = ("tools", "json", "ifeval-lite", "mc", "ppl")
DEFAULT_TASKS = ",".join(BUILTIN)
EXAMPLES = """examples:
  lfm eval                                          # the demo model on every built-in task, greedy, offline
  lfm eval ./my-model --tasks tools,json,ifeval-lite,mc:my_mc.jsonl,ppl:held_out.txt
  lfm eval LiquidAI/LFM2.5-350M --tasks lm-eval:ifeval,mmlu_pro --apply-chat-template --limit 100
built-in tasks (data in lfm/eval/data, no downloads; TASK:FILE uses your own file in the same format):
  tools        {"messages", "tools", "expected": [{"name", "arguments": {arg: [acceptable values]}}]} (BFCL-style)
  json         {"prompt", "schema", "expected": {field: value}}: JSON found, schema-valid, field accuracy
  ifeval-lite  {"prompt", "instructions": [{"id", "kwargs"}]}: IFEval's instruction ids, strict and loose
  mc           {"question", "choices", "answer": index}: log-likelihood of each choice
  ppl          a text file (one document) or a jsonl file's "text" fields: perplexity, bits per byte
lm-eval:NAME runs lm-evaluation-harness tasks; the names after it, up to the next built-in task, are lm-eval's too.
"""


def parse_tasks(spec: str) -> list[tuple[str, str | None]]:
    """"tools,mc:a.jsonl,lm-eval:ifeval,mmlu" -> [("tools", None), ("mc", "a.jsonl"), ("lm-eval", "ifeval"), ...]."""
    out: list[tuple[str, str | None]] = []
    in_lm_eval = False
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        kind, sep, arg = item.partition(":")
        if kind == "lm-eval":
            if not arg:
                raise ValueError("lm-eval: needs a task name, e.g. --tasks lm-eval:ifeval")
            in_lm_eval = True
            out.append(("lm-eval", arg))
        elif kind in BUILTIN:
            in_lm_eval = False
            if sep and not arg:
                raise ValueError(f"task {item!r}: give a file after the colon, or none for the built-in data")
            out.append((kind, arg or None))
        elif in_lm_eval and not sep:
            out.append(("lm-eval", item))
        else:
            raise ValueError(f"unknown task {item!r}: built-in tasks are {', '.join(BUILTIN)} (mc:FILE, ppl:FILE); "
                             "lm-evaluation-harness tasks are named lm-eval:NAME")
    if not out:
        raise ValueError("no task given")
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("eval", help="score a model: tool calls, JSON, instructions, multiple choice, "
                              "perplexity, lm-eval tasks", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("model", nargs="?", help="checkpoint directory, .gguf or Hub id (default: the built-in demo model)")
    s.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated (default: {DEFAULT_TASKS})")
    s.add_argument("-o", "--output", default="eval-results", help="directory for results.json and results.png "
                   "(default: ./eval-results)")
    s.add_argument("--limit", type=int, help="at most this many items per task")
    s.add_argument("--seed", type=int, default=0, help="sampling and lm-eval seeds (default 0)")
    s.add_argument("--temperature", type=float, default=0.0, help="built-in generation tasks (default 0: greedy)")
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens per generated answer (default 256)")
    s.add_argument("--batch-size", default="auto", help="requests in flight at once; auto (default): all, and the "
                   "engine batches up to its max_num_seqs")
    s.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--quantization", choices=["int8", "int4"],
                   help="quantize the weights on load, weight-only, CPU (default: none)")
    s.add_argument("--max-model-len", type=int, help="context length for scoring and generation")
    s.add_argument("--num-fewshot", type=int, help="lm-eval tasks: few-shot examples")
    s.add_argument("--apply-chat-template", action="store_true", help="lm-eval tasks: prompts through the chat template")
    s.add_argument("--include-path", help="lm-eval tasks: a directory of extra task YAML files")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(fn=run)
    return s


def _batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"--batch-size must be auto or a positive integer, got {value!r}")
    return n


def run(a: argparse.Namespace) -> None:
    tasks = parse_tasks(a.tasks)
    batch = _batch_size(a.batch_size)
    if a.limit is not None and a.limit < 1:
        raise ValueError("--limit must be a positive integer")
    from .tasks import DEFAULT_FILES
    for kind, arg in tasks:  # every file checked before the model loads
        if kind != "lm-eval" and arg and not Path(arg).is_file():
            raise ValueError(f"{kind}:{arg}: no such file")
    if any(k == "lm-eval" for k, _ in tasks):
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError("lm-eval tasks need lm-evaluation-harness: pip install 'lfm[eval]'")

    import random

    import torch

    from ..engine.llm import LLM
    from ..engine.sampling import SamplingParams
    from . import report, tasks as T
    from .scoring import Scorer

    for kind, arg in tasks:  # data errors before the model loads
        if kind in T.FIELDS:
            T.load_rows(kind, arg or DEFAULT_FILES[kind], a.limit)

    random.seed(a.seed)
    torch.manual_seed(a.seed)
    print(f"loading {a.model or 'the built-in demo model'} ...", file=sys.stderr, flush=True)
    llm = LLM(a.model, dtype=a.dtype, device=a.device, quantization=a.quantization, max_model_len=a.max_model_len)
    scorer = Scorer(llm, batch_size=batch, seed=a.seed, progress=not a.no_progress)
    sp = SamplingParams(temperature=a.temperature, max_tokens=a.max_tokens, seed=a.seed)
    results = []
    for kind, arg in tasks:
        if kind == "lm-eval":
            continue
        path = Path(arg) if arg else DEFAULT_FILES[kind]
        name = f"{kind}:{arg}" if arg else kind
        if kind == "tools":
            results.append(T.run_tools(scorer, path, sp, a.limit))
        elif kind == "json":
            results.append(T.run_json(scorer, path, sp, a.limit))
        elif kind == "ifeval-lite":
            results.append(T.run_ifeval_lite(scorer, path, sp, a.limit))
        elif kind == "mc":
            results.append(T.run_mc(scorer, path, a.limit, name))
        else:
            results.append(T.run_ppl(scorer, path, name))
        print(f"{name}: {results[-1].primary} {results[-1].metrics[results[-1].primary]:.4f}", file=sys.stderr)
    lm_names = [arg for kind, arg in tasks if kind == "lm-eval"]
    if lm_names:
        from .harness import run_lm_eval

        results += run_lm_eval(llm, lm_names, batch, a.seed, a.limit, a.num_fewshot, a.apply_chat_template,
                               a.include_path, a.max_tokens, not a.no_progress)
    out = Path(a.output)
    label = str(a.model or "demo")
    config = {"model": label, "tasks": a.tasks, "seed": a.seed, "temperature": a.temperature,
              "max_tokens": a.max_tokens, "limit": a.limit, "dtype": str(llm.model.dtype).replace("torch.", ""),
              "batch_size": a.batch_size}
    print(report.format_table(results))
    report.write_json(out / "results.json", results, config)
    drew = report.plot(out / "results.png", results, f"lfm eval: {label}")
    print(f"wrote {out / 'results.json'}" + (f" and {out / 'results.png'}" if drew else
                                             " (no chart: matplotlib is not installed; pip install 'lfm[train]')"),
          file=sys.stderr)
