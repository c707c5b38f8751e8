"""Demo-model data: stdlib corpus, tokenizer and chat data (format, determinism, splits, template round trips)."""

from __future__ import annotations

import ast
import json
from itertools import groupby
from pathlib import Path

import pytest

from lfm.text import SPECIAL_TOKENS, Tokenizer
from lfm.text.tool_calls import parse_tool_calls
from lfm.train.demo import prepare_demo_data
from lfm.train.demo.chat_data import TOOLS, check_conversation, summarize
from lfm.train.demo.corpus import compiled_documents, is_heldout, module_documents, read_jsonl

MAX_CHARS = 250_000
FILES = ["corpus.jsonl", "corpus.heldout.jsonl", "chat.jsonl", "chat.heldout.jsonl", "tokenizer/tokenizer.json",
         "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"]


def _prepare(out: Path) -> dict:
    return prepare_demo_data(out, max_chars=MAX_CHARS, vocab_size=1024, n_qa=240, n_tool=200)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_data")
    return out, _prepare(out)


@pytest.fixture(scope="module")
def tok(demo: tuple[Path, dict]) -> Tokenizer:
    return Tokenizer.from_dir(demo[0] / "tokenizer")


def test_module_documents_headers_from_ast() -> None:
    src = '''"""Toy module docstring for tests."""
import os
class Widget:
    """A widget that does things."""
    def __init__(self, size: int = 3, *, name="w"):
        """Make a widget of the given size."""
    def grow(self, by=1) -> int:
        """Grow the widget by some amount."""
    @property
    def area(self):
        """The area covered by the widget."""
    def _private(self):
        """Private methods are not documents."""
if os.name == "posix":
    async def fetch(url, timeout=None):
        """Fetch a URL asynchronously, with a timeout."""
def short():
    """Tiny."""
_inst = Widget()
grow = _inst.grow
'''
    docs = {d["name"]: d for d in module_documents("toy", ast.parse(src))}
    assert list(docs) == ["toy", "toy.Widget", "toy.Widget.grow", "toy.Widget.area", "toy.fetch", "toy.grow"]
    assert docs["toy"]["text"] == "module toy\n\nToy module docstring for tests."
    assert docs["toy.Widget"]["text"] == ("class toy.Widget(size: int=3, *, name='w')\n\n"
                                          "A widget that does things.\n\nMake a widget of the given size.")
    assert docs["toy.Widget.grow"]["text"].startswith("toy.Widget.grow(self, by=1) -> int\n\nGrow")
    assert docs["toy.Widget.area"]["kind"] == "property"
    assert docs["toy.fetch"]["text"].startswith("async toy.fetch(url, timeout=None)\n\n")
    assert docs["toy.grow"]["text"] == "toy.grow(by=1) -> int\n\nGrow the widget by some amount."  # random.choice


def test_compiled_modules_are_introspected() -> None:
    docs = {d["name"]: d for d in compiled_documents("math", "math")}
    assert docs["math.sqrt"]["text"].startswith("math.sqrt(x, /)\n\nReturn the square root of x.")
    assert docs["math"]["kind"] == "module"


def test_corpus_format_cap_and_heldout_split(demo: tuple[Path, dict]) -> None:
    out, stats = demo
    corpus = stats["corpus"]
    train = list(read_jsonl(out / "corpus.jsonl"))
    held = list(read_jsonl(out / "corpus.heldout.jsonl"))
    assert len(train) == corpus["documents"] > 500 and len(held) == corpus["heldout_documents"] > 0
    assert corpus["chars"] + corpus["heldout_chars"] <= MAX_CHARS
    assert sum(len(r["text"]) for r in train) == corpus["chars"]
    for row in train + held:
        header, sep, body = row["text"].partition("\n\n")
        assert sep and body.strip() and row["name"] in header
        assert row["kind"] in ("module", "class", "function", "method", "property", "topic")
    assert all(is_heldout(r["name"]) for r in held) and not any(is_heldout(r["name"]) for r in train)
    names = [r["name"] for r in train + held]
    assert len(set(names)) == len(names)
    dumps = next(r for r in train if r["kind"] == "function")
    assert dumps["text"].startswith(dumps["name"] + "(")


def test_deterministic(demo: tuple[Path, dict], tmp_path: Path) -> None:
    out, stats = demo
    again = _prepare(tmp_path)
    assert again["chat"]["kinds"] == stats["chat"]["kinds"]
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_tokenizer_specials_and_round_trip(demo: tuple[Path, dict], tok: Tokenizer) -> None:
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (0, 1, 7, 1024)
    assert demo[1]["tokenizer"]["tokens_per_char"] < 0.5
    for row in list(read_jsonl(demo[0] / "corpus.heldout.jsonl"))[:20]:
        ids = tok.encode(row["text"])
        assert ids[0] == 1 and tok.decode(ids) == row["text"]


def test_tokenizer_matches_transformers(demo: tuple[Path, dict], tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(demo[0] / "tokenizer"))
    texts = [r["text"] for r in list(read_jsonl(demo[0] / "corpus.heldout.jsonl"))[:10]]
    for text in texts + ["What does `json.dumps` do?", "Café 東京 😀\n\tx = 1"]:
        assert hf(text)["input_ids"] == tok.encode(text)
    conv = next(c for c in read_jsonl(demo[0] / "chat.jsonl") if c["kind"] == "tool_lookup")
    rendered = hf.apply_chat_template(conv["messages"], tools=conv["tools"], tokenize=False)
    assert rendered == tok.render_chat(conv["messages"], tools=conv["tools"], add_generation_prompt=False)


def test_summarize() -> None:
    assert summarize("dumps(obj) -> str\n\nSerialize obj. Then more.\n\nDetails.") == "Serialize obj. Then more."
    long = "First sentence here. " + "x" * 400 + "."
    assert summarize(long) == "First sentence here."
    assert summarize(">>> f()\n1") is None and summarize("Usage:\n\n  f()") is None


def test_chat_data_renders_masks_and_tool_calls_round_trip(demo: tuple[Path, dict], tok: Tokenizer) -> None:
    out, stats = demo
    chat = stats["chat"]
    train = list(read_jsonl(out / "chat.jsonl"))
    held = list(read_jsonl(out / "chat.heldout.jsonl"))
    assert len(train) == chat["conversations"] and len(held) == chat["heldout_conversations"]
    assert sum(chat["kinds"].values()) == len(train) + len(held)
    assert {"qa_doc", "qa_signature", "tool_lookup", "tool_direct", "small_talk"} <= set(chat["kinds"])
    train_lines = {json.dumps(c) for c in train}
    assert not any(json.dumps(c) in train_lines for c in held)
    tool_ids = {tok.token_to_id("<|tool_call_start|>"), tok.token_to_id("<|tool_call_end|>")}
    calls_seen = 0
    for conv in train + held:
        n, n_assistant = check_conversation(tok, conv)
        enc = tok.encode_chat(conv["messages"], tools=conv.get("tools"))
        assert 0 < n_assistant == sum(enc.assistant_mask) < n == len(enc.ids)
        tools = conv.get("tools")
        if tools is not None:
            assert all(t in TOOLS.values() for t in tools)
        masked = [[t for t, _ in g] for m, g in groupby(zip(enc.ids, enc.assistant_mask), key=lambda p: p[1]) if m]
        turns = [m for m in conv["messages"] if m["role"] == "assistant"]
        for run, turn in zip(masked, turns, strict=True):
            if not turn.get("tool_calls"):
                assert not tool_ids & set(run)
                continue
            assert run[0] == 10 and tool_ids <= set(run)  # the call block is the start of the masked turn
            calls, content = parse_tool_calls(tok.decode(run), tools)
            want = [(c["function"]["name"], c["function"]["arguments"]) for c in turn["tool_calls"]]
            assert [(c.name, c.arguments) for c in calls] == want and content == ""
            assert all(name in {t["function"]["name"] for t in tools} for name, _ in want)
            calls_seen += 1
    assert calls_seen > 50
