"""Tool-call parsing: every hard case peers have dropped calls on, plus JSON, echoes and truncation."""

from __future__ import annotations

import json
import re

import pytest

from lfm.text import ToolCall, new_call_id, parse_tool_calls
from lfm.text.tool_calls import parse_tool_calls_detailed

S, E = "<|tool_call_start|>", "<|tool_call_end|>"

# (model output, expected calls as (name, arguments), expected content)
CASES = [
    pytest.param(
        f'{S}[get_weather(city="Paris", days=2), get_time(tz=\'UTC\')]{E}Checking...',
        [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"tz": "UTC"})], "Checking...", id="spec"),
    pytest.param(f"{S}[f(q='a]b)c,d')]{E}", [("f", {"q": "a]b)c,d"})], "", id="bracket-paren-comma-in-string"),
    pytest.param(f'{S}[f(q="line1\nline2", r="x\\ny")]{E}', [("f", {"q": "line1\nline2", "r": "x\ny"})], "",
                 id="newlines-in-string"),
    pytest.param(f"{S}[f(q='it\\'s', r=\"say \\\"hi\\\"\", t='tab\\there', u='\\u00e9\\\\')]{E}",
                 [("f", {"q": "it's", "r": 'say "hi"', "t": "tab\there", "u": "é\\"})], "", id="escapes"),
    pytest.param(f"{S}[f(a=-3, b=-2.5, c=1e3, d=-1.5E-2, e=0, f=+7, g=10.)]{E}",
                 [("f", {"a": -3, "b": -2.5, "c": 1000.0, "d": -0.015, "e": 0, "f": 7, "g": 10.0})], "",
                 id="numbers"),
    pytest.param(f"{S}[f(a=True, b=False, c=None, d=true, e=false, f=null)]{E}",
                 [("f", {"a": True, "b": False, "c": None, "d": True, "e": False, "f": None})], "", id="constants"),
    pytest.param(f"{S}[f(a=[1, [2, [3]]], b=(1, 'x'), c=(), d=(5,), e=[])]{E}",
                 [("f", {"a": [1, [2, [3]]], "b": [1, "x"], "c": [], "d": [5], "e": []})], "",
                 id="nested-lists-and-tuples"),
    pytest.param(f"{S}[f(opts={{'k': [1, {{\"deep\": None}}], 2: 'two', bare: 1}}, "
                 f"empty={{}})]{E}",
                 [("f", {"opts": {"k": [1, {"deep": None}], 2: "two", "bare": 1}, "empty": {}})], "", id="dicts"),
    pytest.param(f"{S}[api.v2.search(query='x')]{E}", [("api.v2.search", {"query": "x"})], "", id="dotted-name"),
    pytest.param(f"{S}[book(from='NYC', to='LA', class='economy', lambda=1, import=None)]{E}",
                 [("book", {"from": "NYC", "to": "LA", "class": "economy", "lambda": 1, "import": None})], "",
                 id="python-keyword-arg-names"),
    pytest.param(f"{S}\n  [\n  f(\n    a = 1 ,\n    b='x'\n  ) ,\n g( )\n ]  \n{E}\n\nDone.",
                 [("f", {"a": 1, "b": "x"}), ("g", {})], "Done.", id="whitespace-everywhere"),
    pytest.param(f"{S}[f(1, 'two', [3], k=4)]{E}", [("f", {"arg0": 1, "arg1": "two", "arg2": [3], "k": 4})], "",
                 id="positional-args"),
    pytest.param(f"{S}[f(a=1,), g(b=2,),]{E}", [("f", {"a": 1}), ("g", {"b": 2})], "", id="trailing-commas"),
    pytest.param(f"{S}get_weather(city='Oslo'){E}", [("get_weather", {"city": "Oslo"})], "", id="no-list-brackets"),
    pytest.param(f"{S}[get-weather(city='Oslo'), 天気(場所='東京')]{E}",
                 [("get-weather", {"city": "Oslo"}), ("天気", {"場所": "東京"})], "", id="hyphen-and-unicode-names"),
    pytest.param(f"Let me check.{S}[a()]{E}Then{S}[b(x=1)]{E}more.",
                 [("a", {}), ("b", {"x": 1})], "Let me check.\nThen\nmore.", id="multiple-blocks"),
    pytest.param(f'{S}[{{"name": "f", "arguments": {{"a": 1, "b": [true, null]}}}}]{E}',
                 [("f", {"a": 1, "b": [True, None]})], "", id="json-arguments"),
    pytest.param(f'{S}[{{"name": "f", "parameters": {{"a": "x"}}}}, {{"name": "g"}}]{E}',
                 [("f", {"a": "x"}), ("g", {})], "", id="json-parameters-key"),
    pytest.param(f'{S}[{{"name": "f", "arguments": "{{\\"a\\": 1, \\"s\\": \\"]\\"}}"}}]{E}',
                 [("f", {"a": 1, "s": "]"})], "", id="json-arguments-as-string"),
    pytest.param(f'{S}{{"type": "function", "function": {{"name": "f", "arguments": {{"a": 2}}}}}}{E}',
                 [("f", {"a": 2})], "", id="json-openai-object"),
    pytest.param(f'{S}[get_weather(city="Paris")]{E}[get_weather(city="Paris")]',
                 [("get_weather", {"city": "Paris"})], "", id="echo-dropped"),
    pytest.param(f'{S}[get_weather(city="Paris")]{E}I called [get_weather(city="Paris")] for you.',
                 [("get_weather", {"city": "Paris"})], "I called  for you.", id="echo-inside-text"),
    pytest.param(f'{S}[get_weather(city="Paris")]{E}Try [get_weather(city="Rome")] next?',
                 [("get_weather", {"city": "Paris"})], 'Try [get_weather(city="Rome")] next?',
                 id="different-call-is-not-an-echo"),
    # a call cut off by the end of generation comes back partial (see test_cut_off_call_is_partial)
    pytest.param(f"{S}[f(a=1), g(b='trunc", [("f", {"a": 1}), ("g", {})], "", id="truncated-keeps-complete-calls"),
    pytest.param(f"Sure. {S}[f(a=1)", [("f", {"a": 1})], "Sure.", id="truncated-no-close-bracket"),
    # never drop text silently: the part of a block that is not a call comes back as content
    pytest.param(f"{S}[f(a=1), @@garbage]{E}ok", [("f", {"a": 1})], "@@garbage]\nok", id="malformed-tail-keeps-calls"),
    pytest.param(f"{E}[f()]{S}[g()]{E}", [("g", {})], "[f()]", id="stray-end-sentinel"),
]


@pytest.mark.parametrize(("text", "calls", "content"), CASES)
def test_parse(text: str, calls: list[tuple[str, dict]], content: str) -> None:
    got_calls, got_content = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert got_content == content


@pytest.mark.parametrize("text", [
    f"{S}[f(a=1 b=2)]{E}after",
    f"{S}not a call at all{E}",
    f"{S}[{{\"arguments\": {{}}}}]{E}",
    f"{S}[f(a=" + "[" * 5000 + "]" * 5000 + ")]" + E,
])
def test_unusable_blocks_leave_raw_text(text: str) -> None:
    assert parse_tool_calls(text) == ([], text)


@pytest.mark.parametrize("text", ["", "Plain answer.", "A list [f(x=1)] without sentinels", E + " only end"])
def test_text_without_call(text: str) -> None:
    assert parse_tool_calls(text) == ([], text)


def test_positional_args_named_from_tool_schema() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
    calls, _ = parse_tool_calls(f"{S}[f('Paris', 3), g(1)]{E}", tools=tools)
    assert calls == [ToolCall("f", {"city": "Paris", "days": 3}), ToolCall("g", {"arg0": 1})]


def test_to_openai_and_ids() -> None:
    call = ToolCall("get_weather", {"city": "Zürich", "days": 2})
    out = call.to_openai("call_1")
    assert out == {"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "days": 2}'}}
    assert json.loads(out["function"]["arguments"]) == call.arguments
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    assert call.to_openai()["id"].startswith("call_")


def test_round_trip_through_template_rendering() -> None:
    """What our templates write for an assistant `tool_calls` message parses back to the same calls."""
    from lfm.text import TEMPLATES, render_chat_template

    args = {"from": "a]b", "n": -1.5, "flags": [True, None], "opts": {"k": "v\n"}}
    msg = {"role": "assistant", "content": "ok", "tool_calls": [{"function": {"name": "x.y", "arguments": args}}]}
    text = render_chat_template(TEMPLATES["lfm2"], [msg]).text
    body = text.split("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
    assert parse_tool_calls(body) == ([ToolCall("x.y", args)], "ok")


@pytest.mark.parametrize(("text", "content", "unparsed"), [
    (f"Sure. {S}", "Sure. ", []),
    (f"{S}" + "[" * 5000, "[" * 5000, ["[" * 5000]),
    (f"Hm {S}[get_wea", "Hm [get_wea", ["[get_wea"]),
])
def test_cut_off_block_never_returns_control_text(text: str, content: str, unparsed: list[str]) -> None:
    r = parse_tool_calls_detailed(text)
    assert (r.calls, r.content, r.unparsed) == ([], content, unparsed)
    assert S not in r.content


def test_cut_off_call_is_partial() -> None:
    """OpenAI answers a call cut by max_tokens with finish_reason "length" and the arguments generated so far (an
    unterminated JSON string); the complete arguments stay readable in `arguments`."""
    calls, content = parse_tool_calls(f"Sure. {S}[f(a=1), g(n=2, b='it\\'s trun")
    assert content == "Sure." and calls[0] == ToolCall("f", {"a": 1})
    g = calls[1]
    assert (g.name, g.arguments, g.partial) == ("g", {"n": 2}, True)
    assert g.to_openai("call_1")["function"]["arguments"] == '{"n": 2, "b": "it\'s trun'
    calls, _ = parse_tool_calls(f"{S}[f(a=")
    assert calls[0].partial and calls[0].to_openai()["function"]["arguments"] == "{"
    calls, _ = parse_tool_calls(f"{S}[f(a=[1, 'x")
    assert calls[0].to_openai()["function"]["arguments"] == "{"  # a nested string is not the argument's value


LFM_TEMPLATE_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}, "required": ["q"]}}}]


@pytest.mark.parametrize(("body", "args"), [
    # What Liquid's templates in llama.cpp's models/templates/ (LFM2.5-Instruct, LFM2-8B-A1B, LFM2.5-8B-A1B) write
    # for an assistant call (render_tool_calls: arg_name + "=" + "'" + value + "'", joined by ", "; read at
    # ggml-org/llama.cpp 6f4e9f5, models/templates/LFM2.5-8B-A1B.jinja): the value's own quotes are not escaped.
    ("[f(q='it's 5')]", {"q": "it's 5"}),
    ("[f(q='it's 5', n=3)]", {"q": "it's 5", "n": 3}),
    ("[f(q='rock 'n' roll')]", {"q": "rock 'n' roll"}),
    ("[f(n=2, q='l'amour')]", {"n": 2, "q": "l'amour"}),
])
def test_unescaped_single_quotes_are_recovered(body: str, args: dict) -> None:
    calls, content = parse_tool_calls(f"{S}{body}{E}", LFM_TEMPLATE_TOOLS)
    assert calls == [ToolCall("f", args)]
    assert content == ""


def test_ambiguous_unescaped_quotes_come_back_as_content() -> None:
    """`f(q='a', n='b')` with quotes inside could be q="a', n='b" too; without tools both readings are complete, so
    the block is not guessed at: it is returned as content and reported in `unparsed`."""
    text = f"{S}[f(q='it's', r='x')]{E}"
    r = parse_tool_calls_detailed(text)
    assert r.calls == [] and r.content == text and r.unparsed == [text]
    # with the tool's schema only one reading passes both arguments
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}, "r": {"type": "string"}}, "required": ["q", "r"]}}}]
    assert parse_tool_calls(text, tools)[0] == [ToolCall("f", {"q": "it's", "r": "x"})]
    # two calls whose strings could swallow each other: f(n=1, q="don't'), f(q='ok") is a complete reading too
    two = f"{S}[f(n=1, q='don't'), f(q='ok')]{E}"
    assert parse_tool_calls_detailed(two, LFM_TEMPLATE_TOOLS).unparsed == [two]


def test_only_real_sentinels_count() -> None:
    """`sentinels` names where the real control tokens are; the same characters spelled by ordinary tokens are
    plain text (no call is made of them), also inside a real block's string."""
    spelled = f"look: {S}[f(a=1)]{E} "
    real_block = f"{S}[g(s='{E}')]{E}"
    text = spelled + real_block
    at = len(spelled)
    calls, content = parse_tool_calls(text, sentinels=[at, len(text) - len(E)])
    assert calls == [ToolCall("g", {"s": E})] and content == spelled.strip()
    assert parse_tool_calls(spelled, sentinels=[]) == ([], spelled)
    # without sentinels (plain strings) every occurrence counts
    assert [c.name for c in parse_tool_calls(spelled)[0]] == ["f"]
