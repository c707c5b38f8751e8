"""The demo model at its default settings (its generation_config.json) calls the README's tool, through `lfm chat`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lfm import LLM
from lfm.chat_loop import ChatSession, sampling_for_tools
from lfm.model.checkpoint import DEMO_MODEL

ROOT = Path(__file__).resolve().parent.parent
README_PROMPT = "Look up the documentation of os.path.join."


@pytest.fixture(scope="module")
def demo() -> LLM:
    return LLM("demo")


def test_demo_ships_sampling_defaults(demo):
    """Liquid's LFM2.5 cards recommend low temperature, nucleus sampling and a light repetition penalty; the demo's
    own values come from benchmarks/demo_sampling.py (temperature 1, the engine's default, talks nonsense)."""
    gen = json.loads((DEMO_MODEL / "generation_config.json").read_text())
    sp = demo.default_sampling_params()
    assert 0 < sp.temperature <= 0.5 and sp.top_p < 1 and 1 < sp.repetition_penalty <= 1.1
    assert (sp.temperature, sp.top_p, sp.repetition_penalty) == (gen["temperature"], gen["top_p"],
                                                                  gen["repetition_penalty"])
    assert gen["do_sample"] is True  # transformers samples with these too (it ignores them when do_sample is off)


@pytest.mark.parametrize("seed", range(5))
def test_readme_tool_example_at_default_settings(demo, seed):
    import dataclasses

    tools = json.loads((ROOT / "examples" / "tools.json").read_text())
    sp = dataclasses.replace(sampling_for_tools(demo.default_sampling_params()), max_tokens=256, seed=seed)
    feed = iter([README_PROMPT])
    err = io.StringIO()

    def input_fn(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    s = ChatSession(demo, sp, tools=tools, input_fn=input_fn, out=io.StringIO(), err=err)
    s.run()
    assert '[tool call] lookup_doc({"name": "os.path.join"})' in err.getvalue()


def test_lfm_chat_tools_command_at_defaults():
    """The README's command as typed (no sampling flags; a seed only to make the run repeatable)."""
    p = subprocess.run([sys.executable, "-m", "lfm.cli", "chat", "--tools", str(ROOT / "examples" / "tools.json"),
                        "--seed", "0", "--no-history"], input=README_PROMPT + "\n", capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert '[tool call] lookup_doc({"name": "os.path.join"})' in p.stderr
    assert "demo: lfm2, 6M parameters, bfloat16, context 4,096 tokens; sampling: temperature 0.3" in p.stderr
