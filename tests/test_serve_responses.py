"""`/v1/responses` (OpenAI's Responses API) driven by the official `openai` client: text with instructions, a
function tool call and its output in the next turn, `text.format` json_schema, streaming events, and errors.

The route runs the chat path, so each answer is checked against `/v1/chat/completions` given the equivalent chat
messages (greedy): the conversion of `input` items to messages is what is under test. Shapes are OpenAI's
(openai-python's `Response`, `ResponseFunctionToolCall` and stream event types)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import BadRequestError, NotFoundError

from .serve_util import MODEL, openai_client, tiny_server

GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}
WEATHER = {"type": "function", "name": "get_weather", "description": "forecast", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CHAT_WEATHER = {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}


@pytest.fixture(scope="module")
def client(checkpoints):
    with tiny_server(checkpoints["dense"], max_model_len=1024) as s:
        yield openai_client(s)


def chat_text(client, messages, **kw) -> str:
    return client.chat.completions.create(model=MODEL, messages=messages, **GREEDY, **kw).choices[0].message.content


def test_text_with_instructions_equals_chat(client):
    r = client.responses.create(model=MODEL, input="Tell me about json.", instructions="Be brief.",
                                max_output_tokens=12, **GREEDY)
    ref = chat_text(client, [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Tell me about json."}], max_tokens=12)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == ref and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output[0].content[0].type == "output_text"
    assert r.usage.output_tokens <= 12 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # OpenAI: a response cut by max_output_tokens is "incomplete" with the reason
    if r.usage.output_tokens == 12:
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed"


def test_tool_call_then_tool_output_turn(client):
    user = {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}
    r = client.responses.create(model=MODEL, input=[user], tools=[WEATHER], tool_choice="required",
                                max_output_tokens=40, **GREEDY)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and r.status == "completed"
    call = calls[0]
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    # the next turn: the call as returned, and its output
    turn2 = [user, *[o.model_dump(exclude_none=True) for o in r.output],
             {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}]
    r2 = client.responses.create(model=MODEL, input=turn2, tools=[WEATHER], max_output_tokens=10, **GREEDY)
    ref = chat_text(client, [{"role": "user", "content": "Weather in Paris?"},
                             {"role": "assistant", "content": "", "tool_calls": [
                                 {"id": call.call_id, "type": "function",
                                  "function": {"name": call.name, "arguments": call.arguments}}]},
                             {"role": "tool", "tool_call_id": call.call_id, "name": call.name,
                              "content": "Sunny, 21 C"}], tools=[CHAT_WEATHER], max_tokens=10)
    text = "".join(c.text for o in r2.output if o.type == "message" for c in o.content)
    assert text == (ref or ""), r2.output


def test_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"], "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="Give a record.", max_output_tokens=60, temperature=1.0,
                                text={"format": {"type": "json_schema", "name": "rec", "schema": schema,
                                                 "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_streaming_events(client):
    kw = dict(model=MODEL, input="Hello there", max_output_tokens=8, **GREEDY)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == f"response.{whole.status}"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    done = [e for e in events if e.type == "response.output_text.done"]
    assert "".join(deltas) == whole.output_text == done[0].text
    order = [t for t in types if t.startswith("response.output_item") or t.startswith("response.content_part")]
    assert order == ["response.output_item.added", "response.content_part.added", "response.content_part.done",
                     "response.output_item.done"]
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens

    # a streamed tool call: added, arguments delta and done, item done; the final response holds it
    events = list(client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER],
                                          tool_choice="required", max_output_tokens=40, stream=True, **GREEDY))
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types and types[-1] == "response.completed"
    args_done = next(e for e in events if e.type == "response.function_call_arguments.done")
    item_done = next(e for e in events if e.type == "response.output_item.done" and e.item.type == "function_call")
    assert item_done.item.arguments == args_done.arguments and item_done.item.name == "get_weather"
    jsonschema.validate(json.loads(args_done.arguments), WEATHER["parameters"])
    assert [o.type for o in events[-1].response.output] == ["function_call"]


@pytest.mark.parametrize("kw,param", [
    (dict(input=[]), "input"),
    (dict(input=[{"type": "message", "role": "wizard", "content": "x"}]), "input[0]"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), "input[0]"),
    (dict(input=[{"type": "web_search_call"}]), "input[0]"),
    (dict(input="hi", tools=[{"type": "web_search"}]), "tools[0]"),
    (dict(input="hi", previous_response_id="resp_x"), "previous_response_id"),
    (dict(input="hi", text={"format": {"type": "xml"}}), "text.format"),
    (dict(input="hi", text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "strin"}}}),
     "text.format"),
    (dict(input="hi", tools=[{**WEATHER, "parameters": {"type": "object", "properties": {"a": {"type": 5}}}}]),
     "tools[0].parameters"),
    (dict(input="word " * 2000), "input"),
    (dict(input="hi", tools=[WEATHER], tool_choice={"type": "function", "name": "nope"}), "tool_choice"),
    (dict(input="hi", max_output_tokens=0), "max_output_tokens"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, kw, param):
    with pytest.raises(BadRequestError) as e:
        client.responses.create(model=MODEL, **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param and e.value.body["message"]
    with pytest.raises(NotFoundError):
        client.responses.create(model="gpt-4o", input="hi")
    assert client.responses.create(model=MODEL, input="ok?", max_output_tokens=2).status in ("completed",
                                                                                           "incomplete")
