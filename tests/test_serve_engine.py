"""The serving engine without HTTP: continuous batching equals offline generation, memory budget, abort, the
tool-call grammar and the streaming tool-call splitter."""

from __future__ import annotations

import jsonschema
import pytest
import torch
import xgrammar as xgr

from lfm import LLM, SamplingParams
from lfm.engine.grammar import GrammarBackend
from lfm.engine.scheduler import EngineRequest, Scheduler
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


def _scheduler(llm: LLM, **kw) -> Scheduler:
    return Scheduler(llm.model, llm.tokenizer, llm.stop_ids(False), llm.stop_ids(True), **kw)


def _run(s: Scheduler, reqs: list[EngineRequest], on_step=None) -> dict[str, tuple[list[int], str, str]]:
    out = {r.request_id: ([], "", None) for r in reqs}
    for r in reqs:
        s.add(r)
    while s.has_work():
        for d in s.step():
            ids, text, _ = out[d.request_id]
            out[d.request_id] = (ids + d.token_ids, text + d.text, d.finish_reason)
        if on_step:
            on_step(s)
    return out


PROMPTS = ["Once upon a time", "Hi", "The quick brown fox jumps over the lazy dog. " * 4, "a", "What is C. elegans?"]
PARAMS = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
          SamplingParams(temperature=1.0, seed=5, max_tokens=20, ignore_eos=True),
          SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=3, max_tokens=15,
                         repetition_penalty=1.3, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=30, stop=["e"]),
          SamplingParams(temperature=0, max_tokens=9)]


def test_continuous_batching_equals_offline_generate(llm):
    """Chunked prefill, a running set smaller than the load, and requests joining mid-flight: same tokens as LLM."""
    ref = llm.generate(PROMPTS, PARAMS)
    s = _scheduler(llm, prefill_chunk=7, max_num_seqs=3)
    reqs = [EngineRequest(str(i), llm.tokenizer.encode(p), sp) for i, (p, sp) in enumerate(zip(PROMPTS, PARAMS))]
    got = _run(s, reqs)
    for i, r in enumerate(ref):
        ids, text, reason = got[str(i)]
        assert ids == r.token_ids and text == r.text and reason == r.finish_reason
    assert s.cache_used == 0 and not s.running and not s.waiting


def test_memory_budget_is_never_exceeded_and_all_finish(llm):
    s0 = _scheduler(llm)
    need = s0.cache_bytes(20, 16)
    s = _scheduler(llm, cache_budget=int(need * 2.5), max_num_seqs=64)
    peak = []
    reqs = [EngineRequest(str(i), [1] + [40 + i] * 19, SamplingParams(temperature=0, max_tokens=16,
                                                                                        ignore_eos=True))
            for i in range(7)]
    got = _run(s, reqs, on_step=lambda s: peak.append((s.cache_used, len(s.running))))
    assert max(u for u, _ in peak) <= s.cache_budget
    assert max(n for _, n in peak) == 2  # only two caches fit at once
    assert all(len(ids) == 16 for ids, _, _ in got.values())
    assert s.cache_used == 0


def test_abort_frees_the_slot_at_once(llm):
    s = _scheduler(llm)
    s.add(EngineRequest("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)))
    s.add(EngineRequest("b", [1, 2, 3], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)))
    s.step()
    assert s.num_running == 2 and s.cache_used > 0
    assert s.abort("a") and s.num_running == 1
    assert s.abort("b") and s.cache_used == 0 and not s.has_work()
    assert not s.abort("zzz")


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
    p = ToolStreamParser(None)  # unterminated block at the end: complete calls survive
    c1, f1 = p.feed('<|tool_call_start|>[f(a=1), g(b=')
    c2, f2 = p.finish()
    assert [c.name for c in f1 + f2] == ["f"] and "<|tool_call_start|>" not in c1


def test_constrained_generation_from_random_weights_always_parses(llm):
    """Required tool calls and JSON schemas complete and validate even from noise, within max_tokens."""
    g = GrammarBackend(llm.tokenizer, llm.config.vocab_size, sorted(llm.stop_ids(True)))
    s = _scheduler(llm, grammar=g)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
                                               "xs": {"type": "array", "items": {"type": "number"}}},
              "required": ["name", "n", "xs"], "additionalProperties": False}
    chat = llm.encode_chat([{"role": "user", "content": "go"}], TOOLS)
    reqs = []
    for seed in range(3):
        sp = SamplingParams(temperature=1.0, seed=seed, max_tokens=40)
        reqs.append(EngineRequest(f"t{seed}", chat, sp, True, g.spec_tools_required(g.tool_calls(TOOLS))))
        reqs.append(EngineRequest(f"j{seed}", chat, sp, True, g.spec_json(g.json_schema(schema))))
    import json
    for rid, (ids, text, reason) in _run(s, reqs).items():
        assert reason == "stop", (rid, text)
        if rid.startswith("t"):
            calls, _ = parse_tool_calls(text, TOOLS)
            assert calls, text
            for c in calls:
                params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == c.name)
                jsonschema.validate(c.arguments, params)
        else:
            jsonschema.validate(json.loads(text), schema)
