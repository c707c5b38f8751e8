"""SFT conversations for the demo model, templated from the stdlib corpus so every answer is grounded in it.

A few-million-parameter model learns a chat format and a narrow domain, not open-ended knowledge, so each answer is
corpus text: a docstring's first sentences, a signature, a module's public names. Tool conversations (OpenAI message
format) call a small fixed tool set whose results are real corpus content; some offer tools but need none (small
talk, identity) so the model learns when not to call. Phrasings vary; a seeded `random.Random` makes runs repeat.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections import Counter
from itertools import groupby
from pathlib import Path
from typing import Any

from lfm.text.tokenizer import Tokenizer
from lfm.text.tool_calls import parse_tool_calls
from lfm.train.demo.corpus import heldout_path, read_jsonl

HELDOUT_MOD = 50  # a conversation is held out when crc32(its json line) % 50 == 0
# Where users' questions most likely go (builtins, str/list/dict methods, everyday modules): drawn 4x as often.
POPULAR = {"builtins", "str", "list", "dict", "set", "json", "os", "os.path", "re", "math", "random", "itertools",
           "collections", "functools", "datetime", "sys", "pathlib", "pathlib.Path", "subprocess", "time", "shutil",
           "string", "glob", "csv", "heapq", "statistics", "textwrap", "copy", "typing", "logging", "argparse"}
_SIGNATURE_ONLY = re.compile(r"^[\w.]+\(.*\)\s*(-+>.*)?$")  # e.g. "dumps(obj) -> str" opening a C docstring


# The demo's fixed tool set, as OpenAI JSON-schema function definitions with one string parameter each.
TOOLS: dict[str, dict] = {name: {"type": "function", "function": {"name": name, "description": doc, "parameters": {
    "type": "object", "properties": {param: {"type": "string", "description": hint}}, "required": [param]}}}
    for name, doc, param, hint in [
        ("lookup_doc", "Look up the documentation of a Python standard library module, class or function.", "name",
         "Qualified name, e.g. json.dumps"),
        ("list_functions", "List the public functions and classes of a Python standard library module.", "module",
         "Module name, e.g. os.path"),
        ("get_signature", "Get the call signature of a Python standard library function or class.", "name",
         "Qualified name, e.g. str.split")]}
SYSTEM_PROMPTS = [None, None, None, "You are a helpful assistant.", "You answer questions about the Python standard "
                  "library.", "You are a concise assistant for Python programmers."]
# kind -> (weight, the index pool it draws from); kinds whose pool is empty (a small corpus) are left out
QA_KINDS = {"qa_doc": (60, "qa_docs"), "qa_signature": (18, "sigs"), "qa_list": (10, "modules"),
            "qa_topic": (3, "topics"), "qa_multi": (9, "qa_docs")}
TOOL_KINDS = {"tool_lookup": (38, "qa_docs"), "tool_signature": (14, "sigs"), "tool_list": (14, "modules"),
              "tool_parallel": (7, "sigs"), "tool_missing": (6, "modules"), "tool_direct": (21, "qa_docs")}

ASK_DOC = ["What does {n} do?", "What is {n}?", "Explain {n}.", "Tell me about {n}.", "What is {n} for?",
           "Describe the {noun} {n}.", "What's the purpose of {n}?", "Can you explain what {n} does?", "{n}?",
           "I'm reading code that uses {n}. What does it do?", "How does {n} work?", "Briefly, what does {n} do?",
           "what does {n} do", "Explain the {noun} {n} in one or two sentences."]
ASK_MODULE = ["What is the {n} module?", "What is {n} for?", "Tell me about the {n} module.", "Explain the {n} module.",
              "What does the {n} module do?", "What is the purpose of the {n} module?"]
ASK_SIG = ["What is the signature of {n}?", "How do I call {n}?", "What arguments does {n} take?",
           "What parameters does {n} accept?", "Show me the signature of {n}.", "How is {n} called?"]
ASK_LIST = ["What functions are in the {n} module?", "List the functions and classes of {n}.",
            "What can I use from {n}?", "What does the {n} module provide?", "Which names does the {n} module define?"]
ASK_TOPIC = ["Tell me about {t}.", "What does the Python reference say about {t}?", "Explain {t} in Python."]
ASK_FOLLOW = ["And {n}?", "What about {n}?", "And what does {n} do?", "How about {n}?"]
ASK_BOTH = ["What does {n} do and how do I call it?", "Give me the signature and a description of {n}.",
            "Explain {n}, including its arguments."]
ANS_DOC = ["{s}", "`{n}`: {s}", "According to its documentation: {s}", "`{h}` — {s}"]
ANS_SIG = ["`{h}`", "The signature is `{h}`.", "You call it as `{h}`.", "`{h}` — {s}"]
ANS_LIST = ["The `{n}` module defines: {names}.", "Public names in `{n}`: {names}.", "`{n}` provides {names}."]
ANS_MISSING = ["I couldn't find `{n}` in the standard library documentation. Please check the name.",
               "There is no documentation for `{n}`; it may not exist. Did you mean something else?"]
SMALL_TALK: list[tuple[list[str], list[str]]] = [  # (user phrasings, assistant replies); index 2 is "thanks"
    (["Hi", "Hello", "Hey", "Hi!", "Hello there", "Good morning", "hey there", "hello!"],
     ["Hello! I can answer questions about the Python standard library.", "Hi! Ask me about any Python standard "
      "library module, class or function.", "Hello! What would you like to know about Python's standard library?"]),
    (["Who are you?", "What are you?", "What can you do?", "Are you an AI?", "What is your name?"],
     ["I'm a tiny demo model built on Liquid AI's LFM2 architecture and trained on the Python standard library's "
      "documentation, so I can answer questions about its modules, classes and functions.",
      "I'm a small LFM2 demo model. I know the documentation of the Python standard library: ask me what a "
      "function does or how to call it."]),
    (["Thanks!", "Thank you", "thx", "Great, thanks.", "Thanks, that helps."],
     ["You're welcome!", "Glad I could help.", "Any time! Ask me about another function if you like."]),
    (["Bye", "Goodbye", "See you later"], ["Goodbye!", "Bye! Happy coding."]),
    (["How do I use you?", "Help", "What should I ask you?"], ["Ask me about a Python standard library module, class "
      "or function, for example \"What does json.dumps do?\" or \"What is the signature of os.path.join?\""]),
    (["What's the weather today?", "Tell me a joke.", "What is the capital of France?", "Who won the game?"],
     ["I'm a small model that only knows the Python standard library's documentation, so I can't answer that. "
      "Try asking about a module or function.",
      "Sorry, that's outside what I know. I can help with questions about the Python standard library."]),
]


def summarize(doc: str, limit: int = 300) -> str | None:
    """The first sentences (≤ limit chars) of the docstring's first prose paragraph; None if unusable."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()][:3]
    paras = [p for p in paras if not (_SIGNATURE_ONLY.match(p) or p.endswith(":") or "::=" in p)]
    text = " ".join(line.strip() for line in paras[0].splitlines()) if paras else ""
    if len(text) > limit:  # keep the leading sentences that fit
        sentences = re.split(r"(?<=[.!?])\s+", text)
        text = " ".join(s for i, s in enumerate(sentences) if len(" ".join(sentences[: i + 1])) <= limit)
    ok = len(text) >= 12 and re.search(r"[A-Za-z]{3}", text) and not text.startswith((">>>", ":", "..", "-"))
    return text if ok and ">>>" not in text else None


def _excerpt(doc: str, limit: int = 600) -> str:
    """A tool result: whole paragraphs of the docstring up to `limit` chars (at least the first one, truncated)."""
    out = ""
    for para in re.split(r"\n\s*\n", doc.strip()):
        if out and len(out) + len(para) + 2 > limit:
            break
        out = f"{out}\n\n{para}" if out else para
    return out if len(out) <= limit else out[:limit].rsplit(" ", 1)[0] + " ..."


class _Index:
    """Corpus entries by name, with summary, signature and module membership."""

    def __init__(self, rows: list[dict]) -> None:
        self.entries: dict[str, dict] = {}
        self.members: dict[str, list[str]] = {}
        for row in rows:
            header, _, doc = row["text"].partition("\n\n")
            sig = header.removeprefix("class ").removeprefix("async ")
            sig = sig if sig.startswith(row["name"] + "(") and len(sig) <= 160 else None
            self.entries[row["name"]] = {"name": row["name"], "kind": row["kind"], "header": header, "doc": doc,
                                         "summary": summarize(doc), "sig": sig}
            module, _, short = row["name"].rpartition(".")
            if row["kind"] in ("function", "class") and self.entries.get(module, {}).get("kind") != "class":
                self.members.setdefault(module or "builtins", []).append(short)  # not nested classes
        ok = [e for e in self.entries.values() if e["summary"]]
        self.docs = [e for e in ok if e["kind"] != "topic"]
        # methods are half the corpus but seldom asked about: others enter the Q&A deck twice, popular ones 4x
        popular = [e for e in self.docs if {e["name"], e["name"].rpartition(".")[0] or "builtins"} & POPULAR]
        self.qa_docs = self.docs + [e for e in self.docs if e["kind"] != "method"] + popular * 2
        self.topics = [e for e in ok if e["kind"] == "topic"]
        self.sigs = [e for e in self.qa_docs if e["sig"]]
        self.modules = sorted(m for m, names in self.members.items() if len(names) >= 2)
        self.modules += [m for m in self.modules if m in POPULAR] * 3
        self.listed = {m: sorted(set(names))[:30] for m, names in self.members.items()}
        self.by_module: dict[str, list[dict]] = {}  # documented functions and classes, for follow-up questions
        for e in (e for e in self.docs if e["kind"] in ("function", "class")):
            self.by_module.setdefault(e["name"].rpartition(".")[0] or "builtins", []).append(e)


class _Builder:
    """Draws conversations of each kind from the index with one seeded RNG."""

    def __init__(self, index: _Index, rng: random.Random) -> None:
        self.ix, self.rng = index, rng
        self.decks: dict[str, list] = {}

    def draw(self, pool: str) -> Any:
        """Next item of a shuffled deck (reshuffled when spent), so draws cover the whole pool before repeating."""
        deck = self.decks.get(pool)
        if not deck:
            deck = self.decks[pool] = list(getattr(self.ix, pool))
            self.rng.shuffle(deck)
        return deck.pop()

    def pick(self, options: list[str], **fields: Any) -> str:
        return self.rng.choice(options).format(**fields)

    def ask(self, options: list[str], name: str, **fields: Any) -> str:
        """A question about `name`, written plain or in backticks at random."""
        return self.pick(options, n=self.rng.choice([name, f"`{name}`"]), **fields)

    def start(self) -> list[dict]:
        system = self.rng.choice(SYSTEM_PROMPTS)
        return [{"role": "system", "content": system}] if system else []

    def ask_doc(self, e: dict, phrasings: list[str] | None = None) -> tuple[str, str]:
        """(question, answer) on what `e` is; `phrasings` overrides the question forms (follow-ups)."""
        noun = {"property": "attribute"}.get(e["kind"], e["kind"])
        q = self.ask(phrasings or (ASK_MODULE if e["kind"] == "module" else ASK_DOC), e["name"], noun=noun)
        return q, self.pick(ANS_DOC, s=e["summary"], n=e["name"], h=e["sig"] or e["name"])

    def qa(self, kind: str) -> dict:
        msgs = self.start()
        if kind in ("qa_doc", "qa_multi"):
            e = self.draw("qa_docs")
            pairs = [self.ask_doc(e)]
            if kind == "qa_multi":
                module = e["name"].rpartition(".")[0] or "builtins"
                others = [o for o in self.ix.by_module.get(module, []) if o is not e] or self.ix.docs
                pairs.append(self.ask_doc(self.rng.choice(others), ASK_FOLLOW))
        elif kind == "qa_signature":
            e = self.draw("sigs")
            pairs = [(self.ask(ASK_SIG, e["name"]), self.pick(ANS_SIG, h=e["sig"], s=e["summary"]))]
        elif kind == "qa_list":
            m = self.draw("modules")
            pairs = [(self.ask(ASK_LIST, m), self.pick(ANS_LIST, n=m, names=", ".join(self.ix.listed[m])))]
        else:  # qa_topic
            e = self.draw("topics")
            pairs = [(self.pick(ASK_TOPIC, t=e["header"].replace('"', "").strip().lower()), e["summary"])]
        for q, a in pairs:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return {"messages": msgs}

    def tools_for(self, needed: list[str]) -> list[dict]:
        """The needed tools plus, at random, the others, in random order."""
        names = [t for t in TOOLS if t in needed or self.rng.random() < 0.5]
        self.rng.shuffle(names)
        return [TOOLS[t] for t in names]

    def tool(self, kind: str) -> dict:
        msgs = self.start()
        if kind == "tool_direct":
            return {"messages": msgs + self.chit_chat(), "tools": self.tools_for([])}
        if kind == "tool_list":
            m = self.draw("modules")
            q, calls = self.ask(ASK_LIST, m), [("list_functions", {"module": m})]
            names = self.ix.listed[m]
            results, answer = [json.dumps(names)], self.pick(ANS_LIST, n=m, names=", ".join(names))
        elif kind == "tool_missing":
            while True:
                m, short = self.rng.choice(self.ix.modules), self.rng.choice(self.ix.docs)["name"].split(".")[-1]
                fake = f"{m}.{short}{self.rng.choice(['', 's', '_all', '2'])}"
                if fake not in self.ix.entries:
                    break
            q = self.ask(ASK_DOC, fake, noun="function")
            calls, results = [("lookup_doc", {"name": fake})], [f"No documentation found for {fake}."]
            answer = self.pick(ANS_MISSING, n=fake)
        elif kind == "tool_signature":
            e = self.draw("sigs")
            q, calls = self.ask(ASK_SIG, e["name"]), [("get_signature", {"name": e["name"]})]
            results, answer = [e["sig"]], self.pick(ANS_SIG, h=e["sig"], s=e["summary"])
        elif kind == "tool_parallel":
            e = self.draw("sigs")
            q = self.ask(ASK_BOTH, e["name"])
            calls = [("get_signature", {"name": e["name"]}), ("lookup_doc", {"name": e["name"]})]
            results = [e["sig"], _excerpt(e["doc"])]
            answer = f"`{e['sig']}` — {e['summary']}"
        else:  # tool_lookup
            e = self.draw("qa_docs")
            q, answer = self.ask_doc(e)
            calls, results = [("lookup_doc", {"name": e["name"]})], [_excerpt(e["doc"])]
        tool_calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": "", "tool_calls": tool_calls}]
        msgs += [{"role": "tool", "content": r} for r in results]
        msgs.append({"role": "assistant", "content": answer})
        if self.rng.random() < 0.08:
            msgs += self.chit_chat(SMALL_TALK[2])
        return {"messages": msgs, "tools": self.tools_for([n for n, _ in calls])}

    def chit_chat(self, pair: tuple[list[str], list[str]] | None = None) -> list[dict]:
        users, answers = pair or self.rng.choice(SMALL_TALK)
        return [{"role": "user", "content": self.rng.choice(users)},
                {"role": "assistant", "content": self.rng.choice(answers)}]


def check_conversation(tokenizer: Tokenizer, conv: dict) -> tuple[int, int]:
    """Render with the tokenizer's template, check that each assistant turn is one masked run and parses back to its
    tool calls and content; return (tokens, assistant tokens), raise ValueError on a mismatch."""
    enc = tokenizer.encode_chat(conv["messages"], tools=conv.get("tools"))
    runs = [[t for t, _ in g] for m, g in groupby(zip(enc.ids, enc.assistant_mask), key=lambda p: p[1]) if m]
    turns = [m for m in conv["messages"] if m["role"] == "assistant"]
    for run, turn in zip(runs, turns, strict=True):  # ValueError unless one masked run per assistant turn
        text = tokenizer.decode(run, skip_special_tokens=False).removesuffix("<|im_end|>")
        calls, content = parse_tool_calls(text, conv.get("tools"))
        want = [(c["function"]["name"], c["function"]["arguments"]) for c in turn.get("tool_calls", [])]
        if [(c.name, c.arguments) for c in calls] != want or content.strip() != turn["content"].strip():
            raise ValueError(f"assistant turn does not round-trip: {text!r} vs {turn}")
        if want and tokenizer.token_to_id("<|tool_call_start|>") not in run:
            raise ValueError("tool-call start token outside the assistant mask")
    return len(enc.ids), sum(enc.assistant_mask)


def build_chat_data(corpus_jsonl: str | Path, out_path: str | Path, n_qa: int = 12000, n_tool: int = 6000,
                    seed: int = 0, n_small: int | None = None, tokenizer_dir: str | Path | None = None) -> dict:
    """Write chat jsonl (`{"messages", "tools"?, "kind"}` lines) and its ~2 % held-out split; return counts per kind.

    `n_small` (small talk) defaults to 1/30 of the rest. With `tokenizer_dir` every conversation (train and held
    out) goes through `check_conversation` and token totals (tokens, assistant_tokens, max_tokens) join the stats."""
    rng, index = random.Random(seed), _Index(list(read_jsonl(corpus_jsonl)))
    if not index.qa_docs:
        raise ValueError(f"{corpus_jsonl}: no document with a usable summary")
    builder = _Builder(index, rng)
    kinds = ["small_talk"] * (max(20, (n_qa + n_tool) // 30) if n_small is None else n_small)
    for table, n in ((QA_KINDS, n_qa), (TOOL_KINDS, n_tool)):
        usable = {kind: weight for kind, (weight, pool) in table.items() if getattr(index, pool)}
        kinds += rng.choices(list(usable), weights=list(usable.values()), k=n)
    rng.shuffle(kinds)
    tok = Tokenizer.from_dir(tokenizer_dir) if tokenizer_dir is not None else None
    out, held = Path(out_path), heldout_path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    with out.open("w", encoding="utf-8") as f_train, held.open("w", encoding="utf-8") as f_held:
        for kind in kinds:
            conv = {"messages": builder.start() + builder.chit_chat()} if kind == "small_talk" else (
                builder.qa(kind) if kind.startswith("qa_") else builder.tool(kind))
            conv["kind"] = kind
            if tok is not None:
                n, a = check_conversation(tok, conv)
                totals.update(tokens=n, assistant_tokens=a, max_tokens=max(0, n - totals["max_tokens"]))
            line = json.dumps(conv, ensure_ascii=False)
            is_held = zlib.crc32(line.encode("utf-8")) % HELDOUT_MOD == 0
            (f_held if is_held else f_train).write(line + "\n")
            totals["heldout_conversations" if is_held else "conversations"] += 1
            counts[kind] += 1
    return {"conversations": 0, "heldout_conversations": 0, **totals, "kinds": dict(sorted(counts.items())),
            "path": str(out), "heldout_path": str(held)}
