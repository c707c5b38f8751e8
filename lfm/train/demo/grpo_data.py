"""Held-in RL prompts for the demo model's GRPO stage, drawn from the same corpus index as its SFT chat data.

Two kinds of verifiable prompt (`lfm.train.grpo` records), scored by `reward` exactly as `lfm eval` scores them:

- tool prompts: a request over the demo's three tools (`chat_data.TOOLS`, offered in random order) with the
  reference in BFCL's possible-answer form (`expected`, as lfm/eval/data/tools.jsonl), including "no call needed"
  prompts (small talk, off-topic questions) whose reference is `[]`; scored by `lfm.eval.tool_match`.
- instruction prompts: a question about a corpus name with one or two IFEval-kind instructions (`instructions`),
  scored by `lfm.eval.checks.instruction_reward`, so the stage does not trade instruction following for tool use.

The phrasings here are written apart from the evaluation's, and `build_grpo_prompts` drops any prompt whose text
equals one of `lfm eval`'s built-in prompts (`eval_prompts`), so the eval stays held out.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from lfm.train.demo.chat_data import TOOLS, _Index
from lfm.train.demo.corpus import read_jsonl

TOOL_DOC = ["Use the docs tool on {n}.", "Look up {n}, please.", "Can you look up {n}?", "Open the documentation of {n}.",
            "Read me the docs for {n}.", "Fetch the docs of {n}.", "What do the docs say about {n}?",
            "Retrieve the documentation for {n}.", "I want the docs of {n}.", "Please find the docs for {n}.",
            "Documentation for {n}?", "Look {n} up in the documentation.", "Check the documentation of {n}."]
TOOL_SIG = ["Get me the signature of {n}.", "Look up the signature of {n}, please.", "Which arguments does {n} take?",
            "Fetch {n}'s call signature.", "What is the parameter list of {n}?", "Check how {n} is called.",
            "Show the call signature for {n}.", "What are the parameters of {n}? Look it up.",
            "Find the signature of {n}.", "Retrieve the signature for {n}."]
TOOL_LIST = ["List the functions in {n}.", "What does the {n} module contain?", "Show me everything in {n}.",
             "Which names are in the {n} module?", "List all public names of the {n} module.",
             "What functions and classes does {n} have?", "Give me the list of functions in {n}.",
             "Enumerate what the {n} module defines.", "What is inside the {n} module? List it.",
             "Show all functions of the module {n}.", "Which functions does {n} offer?",
             "List the contents of the {n} module."]
NO_CALL = ["Hi there!", "Good afternoon.", "Hello, how is it going?", "Thank you so much!", "Thanks, bye!",
           "Have a nice day.", "Who built you?", "What is your purpose?", "Are you a person?", "Nice work, thanks.",
           "What's the date today?", "Can you sing a song?", "Recommend a good book.", "What is 2 plus 2?",
           "Where is Paris?", "Tell me something funny.", "What is the best pizza topping?",
           "How tall is Mount Everest?", "Who is the president?", "What should I cook tonight?", "Good night!",
           "See you soon.", "Cheers!", "How old are you?", "Do you like music?", "What's the news today?",
           "Is it going to rain?", "Can you book a flight?", "Okay, thanks.", "Hey!", "Greetings!", "Morning!"]
SYSTEMS = [None, None, "You are a helpful assistant.", "You answer questions about the Python standard library."]

# (question, instruction ids+kwargs) templates; {n} is a corpus name, {w} a word of it
INSTRUCT: list[tuple[str, list[dict[str, Any]]]] = [
    ("Explain {n} in fewer than {k} words.", [{"id": "length_constraints:number_words",
                                              "kwargs": {"relation": "less than", "num_words": "{k}"}}]),
    ("What does {n} do? Reply in a single sentence.", [{"id": "length_constraints:number_sentences",
                                                         "kwargs": {"relation": "less than", "num_sentences": 2}}]),
    ("Describe {n} without any commas.", [{"id": "punctuation:no_comma", "kwargs": {}}]),
    ("Tell me about {n}; write only in lowercase.", [{"id": "change_case:english_lowercase", "kwargs": {}}]),
    ("What is {n}? Use the word \"{w}\" in your answer.", [{"id": "keywords:existence", "kwargs": {"keywords": ["{w}"]}}]),
    ("Explain {n}. Do not say the word \"{f}\".", [{"id": "keywords:forbidden_words",
                                                  "kwargs": {"forbidden_words": ["{f}"]}}]),
    ("Begin with \"{s}\" and tell me what {n} does.", [{"id": "startend:start_checker",
                                                       "kwargs": {"start_phrase": "{s}"}}]),
    ("Describe {n}, and end with the words \"{e}\"", [{"id": "startend:end_checker", "kwargs": {"end_phrase": "{e}"}}]),
    ("Put your whole reply about {n} inside double quotes.", [{"id": "startend:quotation", "kwargs": {}}]),
    ("Summarize {n} in under {k} words, with no commas.", [
        {"id": "length_constraints:number_words", "kwargs": {"relation": "less than", "num_words": "{k}"}},
        {"id": "punctuation:no_comma", "kwargs": {}}]),
    ("What is {n}? Answer with at least 2 sentences.", [{"id": "length_constraints:number_sentences",
                                                         "kwargs": {"relation": "at least", "num_sentences": 2}}]),
]
FORBIDDEN = ["return", "object", "string", "list", "value", "file", "function"]
STARTS = ["Sure.", "Answer:", "Here it is:", "OK."]
ENDS = ["Hope this helps.", "That is it.", "Done."]


def eval_prompts(data_dir: str | Path | None = None) -> set[str]:
    """The user texts of `lfm eval`'s built-in tools and ifeval-lite data, normalised (`_norm`)."""
    d = Path(data_dir) if data_dir else Path(__file__).resolve().parents[2] / "eval" / "data"
    out = set()
    for row in read_jsonl(d / "tools.jsonl"):
        out |= {_norm(m["content"]) for m in row["messages"] if m["role"] == "user"}
    for row in read_jsonl(d / "ifeval_lite.jsonl"):
        out.add(_norm(row["prompt"]))
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def user_text(record: dict) -> str:
    return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user")


def _fill(obj: Any, fields: dict[str, Any]) -> Any:
    """Template fields in nested kwargs; a whole-string "{k}" becomes the int it names."""
    if isinstance(obj, str):
        s = obj.format(**fields)
        return int(s) if obj == "{k}" else s
    if isinstance(obj, list):
        return [_fill(x, fields) for x in obj]
    if isinstance(obj, dict):
        return {k: _fill(v, fields) for k, v in obj.items()}
    return obj


class _Drawer:
    def __init__(self, index: _Index, rng: random.Random) -> None:
        self.ix, self.rng = index, rng

    def chat(self, question: str) -> list[dict]:
        system = self.rng.choice(SYSTEMS)
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]

    def tools(self) -> list[dict]:
        names = list(TOOLS)
        self.rng.shuffle(names)
        return [TOOLS[t] for t in names]

    def name(self) -> str:
        n = self.rng.choice(self.ix.qa_docs)["name"]
        return n

    def tool(self, kind: str) -> dict:
        r = self.rng
        if kind == "no_call":
            return {"messages": self.chat(r.choice(NO_CALL)), "tools": self.tools(), "expected": [], "kind": kind}
        if kind == "list":
            m = r.choice(self.ix.modules)
            q, call = r.choice(TOOL_LIST).format(n=m), {"name": "list_functions", "arguments": {"module": [m]}}
        elif kind == "sig":
            n = r.choice(self.ix.sigs)["name"]
            q, call = r.choice(TOOL_SIG).format(n=n), {"name": "get_signature", "arguments": {"name": [n]}}
        else:
            n = self.name()
            q, call = r.choice(TOOL_DOC).format(n=n), {"name": "lookup_doc", "arguments": {"name": [n]}}
        return {"messages": self.chat(q), "tools": self.tools(), "expected": [call], "kind": kind}

    def instruct(self) -> dict:
        r = self.rng
        n = self.name()
        q, inst = r.choice(INSTRUCT)
        fields = {"n": n, "w": n.split(".")[-1], "k": r.randint(12, 30), "f": r.choice(FORBIDDEN),
                  "s": r.choice(STARTS), "e": r.choice(ENDS)}
        return {"messages": self.chat(q.format(**fields)), "instructions": _fill(inst, fields), "kind": "instruct"}


def build_grpo_prompts(corpus_jsonl: str | Path, out_path: str | Path, n_tool: int = 400, n_instruct: int = 100,
                       seed: int = 1, no_call_share: float = 0.12, exclude: str | Path | None = None) -> dict:
    """Write GRPO prompt records (jsonl); tool kinds are lookup_doc/get_signature/list_functions/no-call, the calls
    split evenly, no-call prompts `no_call_share` of the tool prompts. Prompts of `lfm eval`'s built-in tasks never
    appear, nor (for a validation split) those of the prompt file `exclude`. Returns counts per kind."""
    rng = random.Random(seed)
    drawer = _Drawer(_Index(list(read_jsonl(corpus_jsonl))), rng)
    held_out = eval_prompts()
    if exclude is not None:
        held_out |= {_norm(user_text(r)) for r in read_jsonl(exclude)}
    kinds = ["no_call"] * round(n_tool * no_call_share)
    kinds += [("doc", "sig", "list")[i % 3] for i in range(n_tool - len(kinds))] + ["instruct"] * n_instruct
    rng.shuffle(kinds)
    counts: Counter[str] = Counter()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for kind in kinds:
            for _ in range(100):
                rec = drawer.instruct() if kind == "instruct" else drawer.tool(kind)
                if _norm(user_text(rec)) not in held_out:
                    break
            else:
                raise ValueError(f"cannot draw a {kind} prompt outside the excluded prompts")
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts[kind] += 1
    return {"prompts": sum(counts.values()), "kinds": dict(sorted(counts.items())), "path": str(out)}


def reward(completion: str, record: dict[str, Any]) -> float:
    """`lfm eval`'s own scoring as a reward: tool prompts by `tool_call_reward` (1 correct, 0.5 right function),
    instruction prompts by the share of instructions followed."""
    if "expected" in record:
        from lfm.eval.tool_match import tool_call_reward

        return tool_call_reward(completion, record["expected"], record.get("tools"))
    from lfm.eval.checks import instruction_reward

    return instruction_reward(completion, record["instructions"])
