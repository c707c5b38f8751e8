"""Verifiable rewards for GRPO: a function of (completion text, prompt record) -> float, usually in [0, 1].

The prompt record is the jsonl line the prompt came from, so a reward reads its own reference there:

    {"prompt": "...", "answer": "42"}                          exact: the stripped completion equals `answer`
    {"prompt": "...", "answer_regex": "\\b42\\b"}             regex: the pattern is found in the completion
    {"messages": [...], "schema": {...}, "fields": {...}}     json_schema: the completion is JSON valid under `schema`
                                                              (0.5), and holds `fields` (the other 0.5, by share)
    {"messages": [...], "tools": [...], "tool_calls": [...]}  tool_call: the LFM2 tool calls parsed from the
                                                              completion equal the reference calls (names 0.5,
                                                              names and arguments 1.0)

    {"prompt": "...", "instructions": [{"id": ..., "kwargs": {...}}]}
                                                              instructions: the share of IFEval-kind instructions
                                                              followed (`lfm.eval.checks`, the same checks as
                                                              `lfm eval`'s ifeval-lite task)

Anything else is `module:function` (an importable function with the same signature). A missing reference is a
clear error naming the record, not a silent 0. `json_schema` and `tool_call` here grade a little differently from
`lfm.eval.json_match.json_reward` / `lfm.eval.tool_match.tool_call_reward` (BFCL-style argument matching); both are
plain functions of the text, and one could replace the other by name.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from typing import Any

from ..text.tool_calls import parse_tool_calls

RewardFn = Callable[[str, dict[str, Any]], float]


class RewardError(ValueError):
    """A reward that cannot be computed for a record (its reference is missing or malformed)."""


def _need(record: dict[str, Any], key: str, reward: str) -> Any:
    if key not in record:
        raise RewardError(f"reward {reward!r} needs a {key!r} field in every prompt record: {str(record)[:80]!r}")
    return record[key]


def exact(completion: str, record: dict[str, Any]) -> float:
    return float(completion.strip() == str(_need(record, "answer", "exact")).strip())


def regex(completion: str, record: dict[str, Any]) -> float:
    pattern = _need(record, "answer_regex", "regex")
    try:
        return float(re.search(pattern, completion) is not None)
    except re.error as e:
        raise RewardError(f"reward 'regex': bad answer_regex {pattern!r} ({e})") from None


def _json_value(text: str) -> Any:
    """The JSON value the completion is, allowing a ```json fence around it; raises ValueError otherwise."""
    t = text.strip()
    m = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", t, re.S)
    return json.loads(m.group(1) if m else t)


def json_schema(completion: str, record: dict[str, Any]) -> float:
    import jsonschema

    schema = record.get("schema", {"type": "object"})
    try:
        value = _json_value(completion)
    except ValueError:
        return 0.0
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return 0.0
    except jsonschema.SchemaError as e:
        raise RewardError(f"reward 'json_schema': the record's schema is not valid ({e.message})") from None
    fields = record.get("fields")
    if not fields:
        return 1.0
    if not isinstance(value, dict):
        return 0.5
    return 0.5 + 0.5 * sum(value.get(k) == v for k, v in fields.items()) / len(fields)


def _norm_call(c: Any) -> tuple[str, str]:
    if isinstance(c, dict):
        fn = c.get("function", c)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            args = json.loads(args)
        return fn["name"], json.dumps(args, sort_keys=True)
    return c.name, json.dumps(c.arguments, sort_keys=True)


def tool_call(completion: str, record: dict[str, Any]) -> float:
    ref = sorted(_norm_call(c) for c in _need(record, "tool_calls", "tool_call"))
    calls, _ = parse_tool_calls(completion, record.get("tools"))
    got = sorted(_norm_call(c) for c in calls)
    if got == ref:
        return 1.0
    return 0.5 if sorted(n for n, _ in got) == sorted(n for n, _ in ref) and got else 0.0


def instructions(completion: str, record: dict[str, Any]) -> float:
    from ..eval.checks import instruction_reward  # plain functions of text: no engine, no lm-eval import

    inst = _need(record, "instructions", "instructions")
    try:
        return instruction_reward(completion, inst)
    except (KeyError, TypeError, ValueError) as e:
        raise RewardError(f"reward 'instructions': bad instruction list {str(inst)[:80]!r} ({e})") from None


BUILTIN: dict[str, RewardFn] = {"exact": exact, "regex": regex, "json_schema": json_schema, "tool_call": tool_call,
                                "instructions": instructions}


def register(name: str, fn: RewardFn) -> None:
    BUILTIN[name] = fn


def load_reward(spec: str) -> RewardFn:
    """A built-in name or `module:function`."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    mod, sep, fn = spec.partition(":")
    if not sep:
        raise RewardError(f"unknown reward {spec!r}: use one of {sorted(BUILTIN)} or module:function")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"reward {spec!r}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(f):
        raise RewardError(f"reward {spec!r} is not a function")
    return f


def combined(specs: list[str], weights: list[float] | None = None) -> RewardFn:
    fns = [load_reward(s) for s in specs]
    ws = list(weights) if weights else [1.0] * len(fns)

    def reward(completion: str, record: dict[str, Any]) -> float:
        return sum(w * float(f(completion, record)) for f, w in zip(fns, ws))
    return reward
