"""The serving engine without HTTP: continuous batching equals offline generation, a small KV pool, abort, the
tool-call grammar and the streaming tool-call splitter."""

from __future__ import annotations

import jsonschema
import pytest
import torch
import xgrammar as xgr

from lfm import LLM, SamplingParams
from lfm.engine.grammar import GrammarBackend
from lfm.engine.cache import PagedCache
from lfm.engine.llm_engine import EngineConfig, LLMEngine
from lfm.engine.tool_grammar import ToolSchemaError, tool_call_ebnf
from lfm.serve.tool_stream import ToolStreamParser
from lfm.text import parse_tool_calls

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def llm(checkpoints) -> LLM:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on shared cores: one thread is fastest
    yield LLM(str(checkpoints["dense"]), dtype="float32")
    torch.set_num_threads(before)


def _engine(llm: LLM, grammar: GrammarBackend | None = None, **kw) -> LLMEngine:
    return LLMEngine(llm.model, llm.tokenizer, llm.stop_ids(False), llm.stop_ids(True), EngineConfig(**kw), grammar)


Req = tuple  # (request id, prompt ids, SamplingParams, chat)


def _run(e: LLMEngine, reqs: list[Req], on_step=None) -> dict[str, tuple[list[int], str, str]]:
    out = {r[0]: ([], "", None) for r in reqs}
    for r in reqs:
        e.add_request(*r)
    while e.has_unfinished_requests():
        for d in e.step():
            ids, text, _ = out[d.request_id]
            out[d.request_id] = (ids + d.token_ids, text + d.text, d.finish_reason)
        if on_step:
            on_step(e)
    return out


PROMPTS = ["Once upon a time", "Hi", "The quick brown fox jumps over the lazy dog. " * 4, "a", "What is C. elegans?"]
PARAMS = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
          SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True),
          SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=3, max_tokens=15,
                         repetition_penalty=1.3, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=30, stop=["e"]),
          SamplingParams(temperature=0, max_tokens=9)]


def test_continuous_batching_equals_offline_generate(llm):
    """Chunked prefill mixed with decodes, a running set smaller than the load, requests joining mid-flight: the
    same tokens and text as LLM.generate (which runs them all at once)."""
    ref = llm.generate(PROMPTS, PARAMS)
    e = _engine(llm, max_num_batched_tokens=7, max_num_seqs=3, block_size=4)
    got = _run(e, [(str(i), llm.tokenizer.encode(p), sp) for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS))])
    for i, r in enumerate(ref):
        ids, text, reason = got[str(i)]
        assert ids == r.token_ids and text == r.text and reason == r.finish_reason
    bm = e.block_manager
    assert bm.num_used_blocks == 0 and not e.scheduler.running and not e.scheduler.waiting


def test_small_kv_pool_is_never_exceeded_and_all_finish(llm):
    per_block = PagedCache.block_bytes(llm.config, 4, llm.model.dtype, llm.model.dtype, False)
    e = _engine(llm, kv_cache_memory=22 * per_block, max_num_seqs=64, block_size=4, enable_prefix_caching=False)
    peak = []
    reqs = [(str(i), [1] + [40 + i] * 19, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
            for i in range(7)]
    got = _run(e, reqs, on_step=lambda e: peak.append((e.block_manager.num_used_blocks, e.num_running)))
    assert max(u for u, _ in peak) <= e.block_manager.num_blocks == 22
    assert max(n for _, n in peak) < 7  # not everyone fits at once: the rest queued (or were preempted)
    assert all(len(ids) == 16 for ids, _, _ in got.values())
    assert e.block_manager.num_used_blocks == 0


def test_abort_frees_blocks_and_slot_at_once(llm):
    e = _engine(llm)
    e.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    e.add_request("b", [1, 2, 3], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    e.step()
    bm = e.block_manager
    assert e.num_running == 2 and bm.num_used_blocks > 0
    assert e.abort_request("a") and e.num_running == 1
    assert e.abort_request("b") and bm.num_used_blocks == 0 and not e.has_unfinished_requests()
    assert len(bm.free_slots) == bm.num_slots
    assert not e.abort_request("zzz")


WEATHER_ARGS = {
    "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1},
    "unit": {"enum": ["c", "f"]}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    "opts": {"type": "object", "properties": {"x": {"type": ["number", "null"]}}, "required": ["x"]}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": WEATHER_ARGS, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get-time", "parameters": {"type": "object", "properties": {
        "tz": {"$ref": "#/$defs/tz"}}, "$defs": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}}}}]


@pytest.mark.parametrize("text,ok", [
    ('[get_weather(city="Paris")]', True),
    ('[get_weather(city="Paris", days=2, unit="f", tags=["a", "b"], opts={"x": None})]', True),
    ('[{"name": "get-time", "arguments": {"tz": "UTC"}}, get_weather(city="")]', True),
    ('[get_weather(days=2)]', False),  # required argument missing
    ('[get_weather(city="P", unit="k")]', False),  # not in the enum
    ('[get_weather(city="Paris", days=-1)]', False),  # minimum 1 => no sign
    ('[get_weather(city="a very long city name")]', False),  # maxLength
    ('[get_weather(city="P", opts={"x": true})]', False),  # JSON literal where Python is expected
    ('[nope(city="P")]', False),
])
def test_tool_call_grammar_accepts_exactly_valid_calls(text, ok):
    info = xgr.TokenizerInfo([bytes([i]) if 32 <= i < 127 else b"" for i in range(128)], xgr.VocabType.RAW)
    g = xgr.GrammarCompiler(info).compile_grammar(tool_call_ebnf(TOOLS))
    m = xgr.GrammarMatcher(g)
    assert (m.accept_string(text) and m.is_completed()) == ok
    if ok:
        calls, _ = parse_tool_calls(f"<|tool_call_start|>{text}<|tool_call_end|>", TOOLS)
        for c in calls:
            params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == c.name)
            jsonschema.validate(c.arguments, params)


@pytest.mark.parametrize("tools", [[{"type": "function"}], [{"type": "function", "function": {"name": "a b"}}],
                                   [{"type": "function", "function": {"name": "f", "parameters": {
                                       "type": "object", "properties": {"x": {"$ref": "http://x"}}}}}]])
def test_bad_tools_are_refused(tools):
    with pytest.raises(ToolSchemaError):
        tool_call_ebnf(tools)


def test_streaming_tool_splitter_handles_split_sentinels_and_trailing_text():
    text = 'Let me check.<|tool_call_start|>[get_weather(city="Par]is")]<|tool_call_end|>Done.'
    p = ToolStreamParser(TOOLS)
    content, calls = "", []
    for k in range(0, len(text), 3):  # sentinels arrive in pieces
        c, found = p.feed(text[k:k + 3])
        content, calls = content + c, calls + found
    c, found = p.finish()
    content, calls = content + c, calls + found
    assert content == "Let me check.Done."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Par]is"})]
    p = ToolStreamParser(None)  # unterminated block at the end: complete calls survive, the cut one is partial
    c1, f1 = p.feed('<|tool_call_start|>[f(a=1), g(b=')
    c2, f2 = p.finish()
    assert [(c.name, c.partial) for c in f1 + f2] == [("f", False), ("g", True)]
    assert "<|tool_call_start|>" not in c1 + c2


def test_constrained_generation_from_random_weights_always_parses(llm):
    """Required tool calls and JSON schemas complete and validate even from noise, within max_tokens."""
    g = GrammarBackend(llm.tokenizer, llm.config.vocab_size, sorted(llm.stop_ids(True)))
    e = _engine(llm, grammar=g)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
                                               "xs": {"type": "array", "items": {"type": "number"}}},
              "required": ["name", "n", "xs"], "additionalProperties": False}
    chat = llm.encode_chat([{"role": "user", "content": "go"}], TOOLS)
    reqs = []
    for seed in range(3):
        tools = g.spec_tools_required(g.tool_calls(TOOLS))
        reqs.append((f"t{seed}", chat, SamplingParams(temperature=1.0, seed=seed, max_tokens=40, constraint=tools), True))
        reqs.append((f"j{seed}", chat, SamplingParams(temperature=1.0, seed=seed, max_tokens=40,
                                                      constraint=g.spec_json(g.json_schema(schema))), True))
    import json
    for rid, (ids, text, reason) in _run(e, reqs).items():
        assert reason == "stop", (rid, text)
        if rid.startswith("t"):
            calls, _ = parse_tool_calls(text, TOOLS)
            assert calls, text
            for c in calls:
                params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == c.name)
                jsonschema.validate(c.arguments, params)
        else:
            jsonschema.validate(json.loads(text), schema)
