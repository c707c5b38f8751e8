"""`lfm serve --reasoning-parser`: `<think>` text comes back as `reasoning_content` (message and stream deltas, vLLM's
field), never in `content`; `chat_template_kwargs` reach the template (thinking on / off); no parser, no change.

The model's output is scripted (tests/engine_util.py forces the tokens), so the split is checked on known text,
and the tiny tokenizer spells `</think>` in 7 tokens, so streaming sees the closing tag split across deltas."""

from __future__ import annotations

import shutil

import pytest
import torch
from openai import OpenAI

from lfm import LLM
from lfm.serve import ServeConfig, ServerState, ServerThread
from lfm.text.reasoning import ReasoningParser, split_reasoning

from .engine_util import capture, scripted

MODEL = "tiny"
MSGS = [{"role": "user", "content": "Say hello."}]
# Thinking switch in the style of LFM2.5-Thinking / Qwen3 templates: the generation prompt opens <think> unless
# enable_thinking is false
TEMPLATE = ('{{- bos_token -}}{%- for m in messages -%}{{- "<|im_start|>" + m.role + "\\n" + m.content + '
            '"<|im_end|>\\n" -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- "<|im_start|>assistant\\n" -}}'
            '{%- if enable_thinking is not defined or enable_thinking -%}{{- "<think>" -}}{%- endif -%}{%- endif -%}')


@pytest.fixture(scope="module")
def thinking_dir(checkpoints, tmp_path_factory):
    d = tmp_path_factory.mktemp("thinking") / "ckpt"
    shutil.copytree(checkpoints["dense"], d)
    (d / "chat_template.jinja").write_text(TEMPLATE)
    return d


def serve(path, parser: str | None, scripts: dict[str, tuple[dict, str]]):
    """A server whose model writes scripts[name][1] after the chat prompt of MSGS with template kwargs [0]."""
    llm = LLM(str(path), dtype="float32")
    tok = llm.tokenizer
    force = {tuple(tok.apply_chat_template(MSGS, add_generation_prompt=True, **kw)):
             tok.encode(text, add_bos=False) + [tok.im_end_id] for kw, text in scripts.values()}
    capture(llm, force=scripted(force))
    cfg = ServeConfig(model=str(path), served_model_name=MODEL, threads=1, reasoning_parser=parser)
    return ServerThread(ServerState(cfg, llm=llm))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_parser_splits_reasoning_whole_and_streamed_at_every_cut():
    text = "<think>I should greet.</think>\n\nHello!"
    for name in ("lfm2", "deepseek_r1"):
        assert split_reasoning(text, name) == ("I should greet.", "\n\nHello!")
        for cut in range(len(text) + 1):
            for cut2 in range(cut, len(text) + 1):
                p = ReasoningParser(name)
                parts = [p.feed(text[:cut]), p.feed(text[cut:cut2]), p.feed(text[cut2:]), p.finish()]
                assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == split_reasoning(text, name)
    # no </think>: vLLM's deepseek_r1 calls everything reasoning; lfm2 only when the output (or prompt) opened it
    assert split_reasoning("Hello!", "deepseek_r1") == ("Hello!", "")
    assert split_reasoning("Hello!", "lfm2") == (None, "Hello!")
    assert split_reasoning("still thinking", "lfm2", prompt_open=True) == ("still thinking", "")
    assert split_reasoning("<think>cut short", "lfm2") == ("cut short", "")


def test_reasoning_content_in_message_and_stream_deltas(thinking_dir):
    scripts = {"on": ({}, "I should greet.</think>Hello!"), "off": ({"enable_thinking": False}, "Hello!")}
    with serve(thinking_dir, "lfm2", scripts) as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        # thinking on: the template opened <think>, so the text before </think> is reasoning
        m = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40).choices[0].message
        assert m.reasoning_content == "I should greet." and m.content == "Hello!"
        chunks = list(c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40, stream=True))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        reasoning = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
        content = "".join(d.content or "" for d in deltas)
        assert "".join(reasoning) == "I should greet." and content == "Hello!" and len(reasoning) > 1
        assert not any("think>" in (d.content or "") + (getattr(d, "reasoning_content", None) or "")
                       for d in deltas)
        # thinking off through chat_template_kwargs: another prompt, another script, all content
        off = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert off.choices[0].message.content == "Hello!"
        assert getattr(off.choices[0].message, "reasoning_content", None) is None
        assert off.usage.prompt_tokens < c.chat.completions.create(model=MODEL, messages=MSGS,
                                                                   max_tokens=40).usage.prompt_tokens
        # the Responses API returns the reasoning as a reasoning item before the message
        r = c.responses.create(model=MODEL, input=MSGS[0]["content"], max_output_tokens=40)
        assert [o.type for o in r.output] == ["reasoning", "message"] and r.output_text == "Hello!"
        assert r.output[0].content[0].text == "I should greet."
        events = list(c.responses.create(model=MODEL, input=MSGS[0]["content"], max_output_tokens=40, stream=True))
        rdelta = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        tdelta = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert rdelta == "I should greet." and tdelta == "Hello!"
        assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["reasoning", "message"]


def test_forced_output_is_never_reasoning(checkpoints):
    """deepseek_r1 calls an output without </think> reasoning; a grammar-forced one (JSON, a required call) cannot
    think, so it stays content."""
    cfg = ServeConfig(model=str(checkpoints["dense"]), served_model_name=MODEL, threads=1,
                      reasoning_parser="deepseek_r1")
    with ServerThread(ServerState(cfg)) as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        m = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=30, seed=0,
                                      response_format={"type": "json_object"}).choices[0].message
        assert m.content and getattr(m, "reasoning_content", None) is None
        free = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, seed=0).choices[0].message
        assert free.reasoning_content and not free.content  # random weights write no </think>: all reasoning


def test_without_the_flag_nothing_changes(thinking_dir):
    with serve(thinking_dir, None, {"on": ({}, "I should greet.</think>Hello!")}) as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        m = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40).choices[0].message
        assert m.content == "I should greet.</think>Hello!" and getattr(m, "reasoning_content", None) is None


def test_unknown_parser_is_refused(checkpoints):
    with pytest.raises(ValueError, match="reasoning parser"):
        ServerState(ServeConfig(model=str(checkpoints["dense"]), reasoning_parser="nope"))
