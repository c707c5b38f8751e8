"""Tool calls and structured output through the server, from random weights: whatever the model wants, a forced call
is a well-formed call to a given tool with schema-valid arguments, and a JSON schema's output validates."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from openai import OpenAI

from lfm.serve import ServeConfig, ServerState, ServerThread

MODEL = "tiny"
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "forecast", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1},
                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}, "exact": {"type": "boolean"}}, "required": ["tz"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Servers here run torch on one thread (tiny matrices, shared cores); the process setting is restored after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def client(checkpoints):
    cfg = ServeConfig(model=str(checkpoints["dense"]), served_model_name=MODEL, dtype="float32", threads=1)
    with ServerThread(ServerState(cfg)) as s:
        yield OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _valid_calls(calls, names: set[str]) -> None:
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_choice_always_returns_a_valid_call(client, seed):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="required", seed=seed,
                                       temperature=1.0, max_tokens=60)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    _valid_calls(c.message.tool_calls, {"get_weather", "get_time"})


def test_named_tool_choice_calls_that_tool_once(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, seed=3, temperature=1.0,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=40)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1
    _valid_calls(calls, {"get_time"})


def test_streamed_tool_calls_and_the_lazy_grammar_in_auto_mode(client):
    # logit_bias makes the random model open a call block by itself (tool_choice auto); from there the lazy
    # grammar must keep the call valid, and streaming must deliver it as tool_call deltas
    start = 10  # <|tool_call_start|>
    stream = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, seed=5, temperature=1.0,
                                            max_tokens=60, stream=True, logit_bias={str(start): 100})
    chunks = list(stream)
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and all(d.function.arguments is not None for d in deltas)
    for d in deltas:
        assert d.function.name in SCHEMAS and d.id.startswith("call_")
        jsonschema.validate(json.loads(d.function.arguments), SCHEMAS[d.function.name])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] in (
        ["tool_calls"], ["length"])
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "<|tool_call_end|>" not in content  # closed blocks went out as tool_calls (the bias may reopen one)


def test_tool_choice_none_never_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice="none", max_tokens=20,
                                       temperature=1.0, seed=0, logit_bias={"10": 100})
    assert not r.choices[0].message.tool_calls and "<|tool_call_start|>" not in (r.choices[0].message.content or "")


def test_tool_history_round_trip(client):
    msgs = MSGS + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                           "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
    "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"kind": {"type": "string"}},
                                          "required": ["kind"], "additionalProperties": False}]}},
    "required": ["name", "age", "tags", "pet"], "additionalProperties": False}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_json_schema_output_validates_from_random_weights(client, seed):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a person"}], seed=seed,
                                       temperature=1.0, max_tokens=48, response_format={
                                           "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA,
                                                                                  "strict": True}})
    c = r.choices[0]
    assert c.finish_reason == "stop", c.message.content
    jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_json_object_mode_parses_and_streams(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "json please"}], temperature=1.0, seed=4,
              max_tokens=40, response_format={"type": "json_object"})
    r = client.chat.completions.create(**kw)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(stream=True, **kw)
                   if ch.choices)
    assert text == r.choices[0].message.content
