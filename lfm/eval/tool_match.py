"""Tool-call scoring by AST matching, as the Berkeley Function Calling Leaderboard (BFCL) checks "AST" categories:
plain functions of the model's text (or parsed calls), so evaluation and RL rewards score calls the same way.

A reference answer is a list of calls `{"name": ..., "arguments": {param: [acceptable values]}}` (BFCL's
possible-answer form); an empty list means no call is needed (BFCL's "irrelevance": the model must not call).
As in BFCL's ast_checker: the name must match; every parameter the schema marks required must be present; a parameter
the schema does not define fails; a present value must equal one of the acceptable ones (strings compared after
BFCL's standardisation: spaces and `,./-_*^` removed, lower case, `'` -> `"`; an int is accepted for a number); a
parameter may be left out only when `""` is among its acceptable values. Several calls match in any order, one to one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..text.tool_calls import TOOL_CALL_END, TOOL_CALL_START, ToolCall, parse_tool_calls


def standardize(value: str) -> str:
    return re.sub(r"[ ,./\-_*^]", "", value).lower().replace("'", '"')


@dataclass
class ToolCallScore:
    """One response against its reference. `correct` is the score; the rest say where it went wrong."""

    parsed: bool  # every tool-call block is complete (closed by its end sentinel) and parses
    called: bool  # at least one call was made
    name_ok: bool  # the called names are the expected ones (as a multiset); for no-call-needed: no call
    correct: bool  # names and arguments all match (or: no call, when none is needed)
    reason: str = ""  # why not, in a few words ("" when correct)


def _schema(tools: list[dict] | None, name: str) -> dict | None:
    for t in tools or []:
        fn = t.get("function", t)
        if fn.get("name") == name:
            return fn.get("parameters") or {"type": "object", "properties": {}}
    return None


def _value_ok(value: Any, acceptable: list[Any]) -> bool:
    for want in acceptable:
        if want == "" and value != "":
            continue  # "" marks the parameter optional; it is not itself a value to match
        if isinstance(want, str) and isinstance(value, str):
            if standardize(value) == standardize(want):
                return True
        elif isinstance(want, bool) or isinstance(value, bool):
            if type(want) is type(value) and want == value:
                return True
        elif isinstance(want, (int, float)) and isinstance(value, (int, float)):
            if float(value) == float(want):
                return True
        elif isinstance(want, list) and isinstance(value, list):
            if len(want) == len(value) and all(_value_ok(v, [w]) for v, w in zip(value, want)):
                return True
        elif isinstance(want, dict) and isinstance(value, dict):
            if want.keys() == value.keys() and all(_value_ok(value[k], [want[k]]) for k in want):
                return True
    return False


def match_call(call: ToolCall | dict, expected: dict, tools: list[dict] | None = None) -> str:
    """"" when `call` matches the expected call, else the reason it does not."""
    name, args = (call.name, call.arguments) if isinstance(call, ToolCall) else (call["name"], call.get("arguments", {}))
    if name != expected["name"]:
        return f"wrong function: {name} (expected {expected['name']})"
    schema = _schema(tools, name)
    want: dict[str, list] = expected.get("arguments", {})
    props = (schema or {}).get("properties", want)
    required = (schema or {}).get("required", [k for k, v in want.items() if "" not in v])
    for k in args:
        if k not in props:
            return f"unexpected argument {k!r}"
    for k in required:
        if k not in args:
            return f"missing required argument {k!r}"
    for k, acceptable in want.items():
        if k not in args:
            if "" not in acceptable:
                return f"missing argument {k!r}"
        elif not _value_ok(args[k], acceptable):
            return f"wrong value for {k!r}: {args[k]!r}"
    for k in args:
        if k not in want:
            return f"argument {k!r} not in the reference"
    return ""


def score_tool_calls(output: str | list[ToolCall], expected: list[dict], tools: list[dict] | None = None) -> ToolCallScore:
    """Score a response (its raw text, sentinels kept, or its parsed calls) against the reference calls."""
    if isinstance(output, str):
        calls, _ = parse_tool_calls(output, tools)
        # strict, as BFCL's AST parse: a call block must be complete (the lenient parser also reads a block cut
        # off before its end sentinel, which a client may want, but an evaluation counts as malformed)
        opened = output.count(TOOL_CALL_START)
        parsed = opened == 0 or (bool(calls) and output.count(TOOL_CALL_END) >= opened)
    else:
        calls, parsed = list(output), True
    if not parsed:
        return ToolCallScore(False, True, False, False, "the tool call does not parse")
    if not expected:
        ok = not calls
        return ToolCallScore(True, bool(calls), ok, ok, "" if ok else "called a tool when none was needed")
    if not calls:
        return ToolCallScore(True, False, False, False, "no tool call")
    names_ok = sorted(c.name if isinstance(c, ToolCall) else c["name"] for c in calls) == sorted(e["name"] for e in expected)
    if len(calls) != len(expected):
        return ToolCallScore(True, True, names_ok, False, f"{len(calls)} calls, expected {len(expected)}")
    left = list(range(len(calls)))
    first_reason = ""
    for e in expected:  # one to one, any order
        for i in left:
            reason = match_call(calls[i], e, tools)
            if not reason:
                left.remove(i)
                break
            first_reason = first_reason or reason
        else:
            return ToolCallScore(True, True, names_ok, False, first_reason or f"no call matches {e['name']}")
    return ToolCallScore(True, True, True, True)


def tool_call_reward(output: str | list[ToolCall], expected: list[dict], tools: list[dict] | None = None) -> float:
    """A graded reward in [0, 1] for RL: 1 correct, 0.5 right function(s) with wrong arguments, 0 otherwise."""
    s = score_tool_calls(output, expected, tools)
    return 1.0 if s.correct else 0.5 if s.name_ok and s.called else 0.0
