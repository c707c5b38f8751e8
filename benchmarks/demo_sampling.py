"""How the demo model's sampling defaults (`lfm/assets/demo/generation_config.json`) were chosen.

Each candidate setting runs over the same seeds and prompts through `LLM.chat`, the path `lfm chat` takes:
- **tool calls**: the README's example (`--tools examples/tools.json`, "Look up the documentation of os.path.join.")
  and two more tool requests; a hit is a parsed call of the expected function with the expected argument;
- **plain questions**: the share of replies that stay on topic (name what was asked about), that end by themselves
  (`<|im_end|>`) within 160 tokens, that contain a U+FFFD (invalid bytes the model sampled), distinct-2 (unique word
  bigrams / bigrams: low = loops), and how many different replies the seeds give per question (variety).
The first sample of each setting is printed so the text can be read, not only counted.

    python benchmarks/demo_sampling.py [--seeds 8] [--out benchmarks/results/demo_sampling.txt]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# None = the field is left at SamplingParams' default (temperature 1, no filter, no penalty)
CANDIDATES: dict[str, dict] = {
    "none (before: t=1)": {},
    "greedy t=0": dict(temperature=0.0),
    "Liquid LFM2.5 (t=.1 k50 p.1 rp1.05)": dict(temperature=0.1, top_k=50, top_p=0.1, repetition_penalty=1.05),
    "t=.2 p.9 rp1.05": dict(temperature=0.2, top_p=0.9, repetition_penalty=1.05),
    "t=.3 p.9 rp1.05": dict(temperature=0.3, top_p=0.9, repetition_penalty=1.05),
    "t=.3 k50 p.9 rp1.0": dict(temperature=0.3, top_k=50, top_p=0.9),
    "t=.5 p.9 rp1.05": dict(temperature=0.5, top_p=0.9, repetition_penalty=1.05),
    "t=.3 min_p.15 rp1.05": dict(temperature=0.3, min_p=0.15, repetition_penalty=1.05),
}
TOOL_PROMPTS = [  # (user message, expected function, expected arguments)
    ("Look up the documentation of os.path.join.", "lookup_doc", {"name": "os.path.join"}),  # the README's
    ("Look up the documentation of json.dumps.", "lookup_doc", {"name": "json.dumps"}),
    ("List the functions of the itertools module.", "list_functions", {"module": "itertools"}),
    ("Can you check the docs for collections.Counter?", "lookup_doc", {"name": "collections.Counter"}),
    ("What public functions does shutil have?", "list_functions", {"module": "shutil"}),
]
QUESTIONS = [  # (question, a word an on-topic reply names)
    ("What does json.dumps do?", "json"), ("How do I join two paths in Python?", "path"),
    ("What is the re module for?", "re"), ("Explain itertools.chain.", "chain"),
    ("What does math.sqrt return?", "sqrt"), ("How do I read a file line by line?", "line"),
]


def distinct2(text: str) -> float:
    w = text.split()
    pairs = list(zip(w, w[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8, help="seeds per setting and prompt (default 8)")
    ap.add_argument("--only", help="comma-separated candidate names (default: all)")
    ap.add_argument("--out", help="also write the table to this file")
    a = ap.parse_args()

    import lfm
    from lfm import SamplingParams

    llm = lfm.LLM()  # the demo model
    tools = json.loads((ROOT / "examples" / "tools.json").read_text())
    names = a.only.split(",") if a.only else list(CANDIDATES)
    lines = [f"demo model, {a.seeds} seeds per prompt; tool hit = parsed call of the expected function and argument",
             f"{'setting':38} {'README tool':>11} {'all tools':>9} {'on topic':>8} {'stops':>6} {'U+FFFD':>6} "
             f"{'distinct-2':>10} {'variety':>7}"]
    samples = []
    t0 = time.perf_counter()
    for name in names:
        kw = CANDIDATES[name]
        readme = tool_hits = n_tool = stops = fffd = topic = 0
        d2: list[float] = []
        replies: dict[str, set[str]] = {q: set() for q, _ in QUESTIONS}
        first = ""
        for seed in range(a.seeds):
            for i, (msg, fn, args) in enumerate(TOOL_PROMPTS):
                sp = SamplingParams(**kw, max_tokens=64, seed=seed, skip_special_tokens=False)
                out = llm.chat([{"role": "user", "content": msg}], sp, tools=tools)
                hit = any(c.name == fn and c.arguments == args for c in out.tool_calls)
                tool_hits += hit
                n_tool += 1
                readme += hit and i == 0
            for j, (q, word) in enumerate(QUESTIONS):
                out = llm.chat([{"role": "user", "content": q}], SamplingParams(**kw, max_tokens=160, seed=seed))
                replies[q].add(out.text)
                topic += word in out.text.lower()
                stops += out.finish_reason == "stop"
                fffd += "\ufffd" in out.text
                d2.append(distinct2(out.text))
                if seed == 0 and j == 0:
                    first = out.text
        nq = a.seeds * len(QUESTIONS)
        variety = sum(len(v) for v in replies.values()) / len(replies)
        lines.append(f"{name:38} {readme:>5}/{a.seeds:<5} {tool_hits / n_tool:>9.0%} {topic / nq:>8.0%} "
                     f"{stops / nq:>6.0%} {fffd / nq:>6.0%} {sum(d2) / len(d2):>10.2f} {variety:>7.1f}")
        samples.append(f"[{name}] {QUESTIONS[0][0]} -> {first[:300]!r}")
        print(lines[-1], flush=True)
    text = "\n".join(lines + ["", "first sample of each setting (seed 0):"] + samples
                     + [f"", f"{time.perf_counter() - t0:.0f} s"])
    print("\n".join(["", *samples]))
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
