"""The built-in local tasks of `lfm eval` (no downloads): tool calling, JSON extraction, instruction following,
multiple choice from a jsonl file and perplexity on text files. Each returns a `TaskResult` of metrics in [0, 1]
(perplexities aside) plus per-sample records.

Data: lfm/eval/data/*.jsonl, hand-written held-out prompts (not from the demo model's SFT templates; a test checks
it). Generation is greedy unless the caller's SamplingParams say otherwise, through the checkpoint's chat template.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.sampling import SamplingParams
from .checks import INSTRUCTIONS, follow_instructions
from .json_match import score_json
from .scoring import Scorer
from .tool_match import score_tool_calls

DATA = Path(__file__).parent / "data"
DEFAULT_FILES = {"tools": DATA / "tools.jsonl", "json": DATA / "json.jsonl", "ifeval-lite": DATA / "ifeval_lite.jsonl",
                 "mc": DATA / "stdlib_mc.jsonl", "ppl": DATA / "stdlib_notes.txt"}


@dataclass
class TaskResult:
    task: str  # as named on the command line: "tools", "mc:my.jsonl", "lm-eval:ifeval"
    metrics: dict[str, float]
    primary: str  # the metric a summary shows
    n: int  # items scored
    samples: list[dict[str, Any]] = field(default_factory=list)


def read_jsonl(path: str | Path) -> list[dict]:
    """Objects of a jsonl file; a bad line is a one-line ValueError naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not JSON ({e.msg})") from None
            if not isinstance(rows[-1], dict):
                raise ValueError(f"{p}:{n}: expected a JSON object")
    if not rows:
        raise ValueError(f"{p}: no items")
    return rows


def _need(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")


FIELDS = {"tools": ("messages", "tools", "expected"), "json": ("prompt", "schema", "expected"),
          "ifeval-lite": ("prompt", "instructions"), "mc": ("question", "choices", "answer")}


def load_rows(kind: str, path: str | Path, limit: int | None = None) -> list[dict]:
    """A task's rows, checked (fields present, instruction ids known, answers index choices): `lfm eval` calls it
    for every task before the model loads, so a data error costs no generation."""
    rows = read_jsonl(path)[:limit]
    for i, r in enumerate(rows):
        where = f"{path}: item {i}"
        _need(r, FIELDS[kind], where)
        if kind == "ifeval-lite":
            unknown = [ins.get("id") for ins in r["instructions"] if ins.get("id") not in INSTRUCTIONS]
            if unknown:
                raise ValueError(f"{where}: unknown instruction id {unknown[0]!r}")
        if kind == "mc":
            choices, answer = r["choices"], r["answer"]
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
                raise ValueError(f"{where}: choices must be a list of strings")
            if not (isinstance(answer, int) and 0 <= answer < len(choices)):
                raise ValueError(f"{where}: answer must be the index of the right choice")
    return rows


def _chat(scorer: Scorer, convs: list[tuple[list[dict], list[dict] | None]], sp: SamplingParams, desc: str) -> list[str]:
    ids = [scorer.llm.encode_chat(messages, tools) for messages, tools in convs]
    return [o.text.removesuffix("<|im_end|>") for o in scorer.run(ids, sp, desc, chat=True)]


def run_tools(scorer: Scorer, path: Path, sp: SamplingParams, limit: int | None = None) -> TaskResult:
    """Tool calling: the call parses, names the right function with the right arguments (BFCL AST matching), and
    no call is made when none is needed. Rows: {"messages", "tools", "expected": [{"name", "arguments"}]}."""
    rows = load_rows("tools", path, limit)
    sp = dataclasses.replace(sp, skip_special_tokens=False)  # keep the call sentinels, to parse the calls
    texts = _chat(scorer, [(r["messages"], r["tools"]) for r in rows], sp, "tools")
    scores = [score_tool_calls(t, r["expected"], r["tools"]) for t, r in zip(texts, rows)]
    need = [s for s, r in zip(scores, rows) if r["expected"]]
    none = [s for s, r in zip(scores, rows) if not r["expected"]]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    metrics = {"accuracy": mean([s.correct for s in scores]), "parse_rate": mean([s.parsed for s in scores]),
               "call_accuracy": mean([s.correct for s in need]), "name_accuracy": mean([s.name_ok for s in need]),
               "no_call_accuracy": mean([s.correct for s in none])}
    samples = [{"prompt": r["messages"][-1]["content"], "output": t, "correct": s.correct, "reason": s.reason}
               for r, t, s in zip(rows, texts, scores)]
    return TaskResult("tools", {k: v for k, v in metrics.items() if not math.isnan(v)}, "accuracy", len(rows), samples)


def run_json(scorer: Scorer, path: Path, sp: SamplingParams, limit: int | None = None) -> TaskResult:
    """JSON extraction: the reply holds a JSON object (json_valid), it validates against the schema (schema_valid),
    and its fields equal the reference (field_accuracy: mean fraction per item; exact: all fields right).
    Rows: {"prompt", "schema", "expected": {field: value}}."""
    rows = load_rows("json", path, limit)
    texts = _chat(scorer, [([{"role": "user", "content": r["prompt"]}], None) for r in rows], sp, "json")
    scores = [score_json(t, r["schema"], r["expected"]) for r, t in zip(rows, texts)]
    samples = [{"prompt": r["prompt"], "output": t, "json_valid": s.json_valid, "schema_valid": s.schema_valid,
                "field_accuracy": s.field_accuracy} for r, t, s in zip(rows, texts, scores)]
    valid = sum(s.json_valid for s in scores)
    schema_ok = sum(s.schema_valid for s in scores)
    fields = sum(s.field_accuracy for s in scores)
    exact = sum(s.json_valid and s.field_accuracy == 1.0 for s in scores)
    n = len(rows)
    metrics = {"field_accuracy": fields / n, "json_valid": valid / n, "schema_valid": schema_ok / n, "exact": exact / n}
    return TaskResult("json", metrics, "field_accuracy", n, samples)


def run_ifeval_lite(scorer: Scorer, path: Path, sp: SamplingParams, limit: int | None = None) -> TaskResult:
    """Instruction following with verifiable checks, IFEval's four scores: prompt_accuracy = every instruction of a
    prompt followed; instruction_accuracy = over all instructions; each strict and `_loose` (the response's first
    or last line, or asterisks, dropped). Rows: {"prompt", "instructions": [{"id", "kwargs"}]}."""
    rows = load_rows("ifeval-lite", path, limit)
    texts = _chat(scorer, [([{"role": "user", "content": r["prompt"]}], None) for r in rows], sp, "ifeval-lite")
    results = [follow_instructions(t, r["instructions"]) for t, r in zip(texts, rows)]
    loose = [follow_instructions(t, r["instructions"], loose=True) for t, r in zip(texts, rows)]
    metrics = {}
    for suffix, res_ in (("", results), ("_loose", loose)):
        flat = [ok for res in res_ for ok in res]
        metrics[f"prompt_accuracy{suffix}"] = sum(all(res) for res in res_) / len(rows)
        metrics[f"instruction_accuracy{suffix}"] = sum(flat) / len(flat)
    samples = [{"prompt": r["prompt"], "output": t, "followed": res} for r, t, res in zip(rows, texts, results)]
    return TaskResult("ifeval-lite", metrics, "prompt_accuracy", len(rows), samples)


def run_mc(scorer: Scorer, path: Path, limit: int | None = None, name: str = "mc") -> TaskResult:
    """Multiple choice by log-likelihood, as lm-eval's multiple_choice tasks: acc = the most likely choice is the
    answer; acc_norm = the same after dividing by the choice's length in bytes. Rows: {"question", "choices",
    "answer": index} (the format of lm-eval's local json tasks, tests/data/tiny_mc.jsonl)."""
    rows = load_rows("mc", path, limit)
    reqs, owner = [], []
    for i, r in enumerate(rows):
        for c in r["choices"]:
            reqs.append((r["question"], c))
            owner.append(i)
    lls = scorer.loglikelihood(reqs, name)
    acc = acc_norm = 0
    samples = []
    for i, r in enumerate(rows):
        mine = [(ll, len(c.encode("utf-8"))) for (ll, _), o, (_, c) in zip(lls, owner, reqs) if o == i]
        best = max(range(len(mine)), key=lambda k: mine[k][0])
        best_norm = max(range(len(mine)), key=lambda k: mine[k][0] / max(1, mine[k][1]))
        acc += best == int(r["answer"])
        acc_norm += best_norm == int(r["answer"])
        samples.append({"question": r["question"], "loglikelihoods": [m[0] for m in mine], "pred": best,
                        "answer": int(r["answer"])})
    return TaskResult(name, {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows)}, "acc", len(rows), samples)


def run_ppl(scorer: Scorer, path: Path, name: str = "ppl") -> TaskResult:
    """Perplexity of a text file (one document), or of a jsonl file's "text" fields (one document each), as
    lm-eval's wikitext: word_perplexity, byte_perplexity and bits_per_byte from the rolling log-likelihood."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    docs = [r["text"] for r in read_jsonl(p)] if p.suffix == ".jsonl" else [p.read_text(encoding="utf-8")]
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise ValueError(f"{p}: no text")
    scored = scorer.loglikelihood_rolling(docs, name)
    ll = sum(s for s, _ in scored)
    tokens = sum(n for _, n in scored)
    words = sum(len(re.findall(r"\S+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    metrics = {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
               "bits_per_byte": -ll / nbytes / math.log(2), "token_perplexity": math.exp(-ll / tokens)}
    return TaskResult(name, metrics, "bits_per_byte", len(docs), [{"loglikelihood": s, "tokens": n} for s, n in scored])
