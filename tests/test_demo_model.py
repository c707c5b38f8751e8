"""The demo model that ships in the repository: it is the default everywhere a model can be named, it loads in lfm
and in transformers, and it shows real (small) behaviour — chat format, a stop at <|im_end|>, parseable tool calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from lfm import LLM, SamplingParams
from lfm.model.checkpoint import DEMO_MODEL, load_model
from lfm.text.tool_calls import parse_tool_calls

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TOOLS = json.loads((Path(__file__).parent.parent / "examples" / "tools.json").read_text())  # what `lfm chat --tools` uses
GREEDY = SamplingParams(max_tokens=96, temperature=0.0)


@pytest.fixture(scope="module")
def llm() -> LLM:
    torch.set_num_threads(1)
    return LLM()  # no model named: the built-in demo


def test_ships_small_with_its_record():
    files = {p.name: p.stat().st_size for p in DEMO_MODEL.iterdir()}
    assert sum(files.values()) <= 15 * 2**20, files
    for name in ("config.json", "model.safetensors", "tokenizer.json", "card.json", "pretrain-metrics.jsonl",
                 "sft-metrics.jsonl", "pretrain-loss.png", "sft-loss.png", "pretrain.toml", "sft.toml"):
        assert name in files, name
    card = json.loads((DEMO_MODEL / "card.json").read_text())
    assert card["total_minutes"] <= 90  # the one-command build fits the budget it promises
    assert 1 < card["heldout_corpus_perplexity"] < 200


def test_chats_in_format_and_stops_at_im_end(llm):
    for question in ("Hi! Who are you?", "What does json.dumps do?", "Explain os.path.join."):
        out = llm.chat([{"role": "user", "content": question}], GREEDY)
        assert out.finish_reason == "stop", (question, out.text)
        assert out.token_ids[-1] == llm.tokenizer.token_to_id("<|im_end|>")
        assert out.text.strip() and "<|im_start|>" not in out.text


def test_emits_a_parseable_tool_call_when_given_tools(llm):
    hits = 0
    for name in ("os.path.join", "json.dumps", "re.compile"):
        msgs = [{"role": "user", "content": f"Look up the documentation of {name}."}]
        out = llm.chat(msgs, GREEDY, tools=TOOLS)
        raw = llm.tokenizer.decode(out.token_ids, skip_special_tokens=False)
        calls, _ = parse_tool_calls(raw)
        if calls and calls[0].name == "lookup_doc" and isinstance(calls[0].arguments.get("name"), str):
            hits += 1
            assert out.tool_calls and out.tool_calls[0].name == "lookup_doc"
    assert hits >= 2, "the demo model should call lookup_doc when asked to look something up"


def test_transformers_loads_the_demo_and_agrees():
    from transformers import AutoModelForCausalLM

    ours = load_model(DEMO_MODEL, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    x = torch.randint(14, ours.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_cli_defaults_to_the_demo_offline():
    r = subprocess.run([sys.executable, "-m", "lfm.cli", "generate", "The json module", "--max-tokens", "16",
                        "--temperature", "0"], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    r = subprocess.run([sys.executable, "-m", "lfm.cli", "chat", "--max-tokens", "48", "--temperature", "0"],
                       input="Hello\n", capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_server_defaults_to_the_demo():
    from lfm.serve import ServeConfig, ServerState, ServerThread

    with ServerThread(ServerState(ServeConfig(model=None, threads=1))) as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list().data] == ["lfm-demo"]
        r = c.chat.completions.create(model="lfm-demo", messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                      max_tokens=48)
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content
        r = c.chat.completions.create(model="lfm-demo", temperature=0, max_tokens=64, tools=TOOLS,
                                      messages=[{"role": "user", "content": "Look up the documentation of json.dumps."}])
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "lookup_doc" and "name" in json.loads(call.function.arguments)
