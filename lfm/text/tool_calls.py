"""Parse LFM2 tool calls out of generated text.

The model writes `<|tool_call_start|>[get_weather(city="Paris", days=2)]<|tool_call_end|>` (a Python-style call
list, or a JSON list of {"name", "arguments"} objects when asked for JSON), possibly followed by text. Blocks are
read with the forgiving scanner of `lfm.text.pythonic`; this never raises on model output, keeps every complete call
of a truncated block, and otherwise leaves the raw text as content.

Decisions a caller must know:
- Positional arguments are stored under "arg0", "arg1", ... unless `tools` is given, in which case they take the
  name of the function's parameter at that position (JSON-schema `properties` order).
- After the calls are extracted, a bare `[f(...)]` in the content that repeats only already-extracted calls is an
  echo and is removed. Separate sentinel blocks are never deduplicated (two identical calls can be intended).
- With calls found, content is the non-empty, stripped text pieces around the blocks joined by "\n".
- Never drop a call. Liquid's own chat templates (llama.cpp's models/templates/ LFM2.5-Instruct, LFM2-8B-A1B) render
  assistant calls with single-quoted, unescaped strings, so a model trained on them writes `f(q='it's 5')`. When
  the strict reading fails, every reading that lets an inner `'` be a literal is tried: exactly one complete reading
  is taken; none or several leave the block as content (`ParsedToolCalls.unparsed` says which text that was).
- A block cut off by the end of generation (max_tokens) keeps its complete calls, and its last, incomplete call is
  returned with `partial=True` and the arguments generated so far as a JSON prefix, as OpenAI returns a call cut by
  `max_tokens` (finish_reason "length", `arguments` an unterminated JSON string); the control-token text is never
  handed back as content.
- `sentinels`: where the caller knows which `<|tool_call_start|>` / `<|tool_call_end|>` texts are real control
  tokens (their character offsets, see `sentinel_offsets`), only those count; the same characters spelled by ordinary
  tokens are plain text. Without it (a plain string), every occurrence counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lfm.text.pythonic import ToolCall, _ParseError, _Scanner, new_call_id

__all__ = ["TOOL_CALL_START", "TOOL_CALL_END", "ToolCall", "new_call_id", "ParsedToolCalls", "parse_tool_calls",
           "parse_tool_calls_detailed", "sentinel_offsets"]

TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"


def _parse_call_list(scanner: _Scanner, calls: list[ToolCall]) -> None:
    """Parse `[call, ...]` appending each complete call as soon as it is read (so truncation keeps them)."""
    scanner.expect("[")
    while True:
        scanner.skip_ws()
        if scanner.peek() == "]":
            scanner.pos += 1
            return
        calls.append(scanner.call())
        scanner.skip_ws()
        if scanner.peek() == ",":
            scanner.pos += 1
        elif scanner.peek() != "]":
            raise _ParseError(f"expected ',' or ']' at {scanner.pos}")


@dataclass
class _Block:
    calls: list[ToolCall]
    complete: bool  # the whole body was read
    rest: int  # where the unread text starts (len(body) when complete)


def _read(body: str, choices: list[bool] | None = None) -> tuple[_Block, _Scanner]:
    """Calls in one block body: lists, bare calls or JSON objects, in sequence."""
    calls: list[ToolCall] = []
    scanner = _Scanner(body, 0, choices)
    rest = 0
    try:
        while True:
            while scanner.pos < len(body) and (body[scanner.pos].isspace() or body[scanner.pos] in ",;"):
                scanner.pos += 1
            if scanner.pos >= len(body):
                return _Block(calls, True, len(body)), scanner
            rest = scanner.pos
            if scanner.peek() == "[":
                scanner.expect("[")
                while True:
                    scanner.skip_ws()
                    if scanner.peek() == "]":
                        scanner.pos += 1
                        break
                    calls.append(scanner.call())
                    rest = scanner.pos
                    scanner.skip_ws()
                    if scanner.peek() == ",":
                        scanner.pos += 1
                        rest = scanner.pos
                    elif scanner.peek() != "]":
                        raise _ParseError(f"expected ',' or ']' at {scanner.pos}")
            else:
                calls.append(scanner.call())
                rest = scanner.pos
    except (_ParseError, RecursionError):
        return _Block(calls, False, rest), scanner


_MAX_READINGS = 256  # lenient readings tried per block (each is one linear pass)


def _lenient(body: str, tools: list[dict] | None) -> list[ToolCall] | None:
    """The one complete reading of a block whose single-quoted strings hold unescaped `'`; None if there is no
    such reading or more than one (depth-first over the choice points, at most _MAX_READINGS passes). With
    `tools`, readings that call an unknown tool, pass an unknown argument or miss a required one are discarded
    first (`f(a='it's', b='x')` also reads as a="it's', b='x", which leaves out b)."""
    found: list[list[ToolCall]] = []
    todo: list[list[bool]] = [[]]
    tries = 0
    while todo and tries < _MAX_READINGS:
        prefix = todo.pop()
        tries += 1
        choices = list(prefix)
        block, _ = _read(body, choices)
        for k in range(len(choices) - 1, len(prefix) - 1, -1):  # choice points this pass met first: branch
            todo.append(choices[:k] + [True])
        if block.complete and block.calls and block.calls not in found and _fits(block.calls, tools):
            found.append(block.calls)
            if len(found) > 1:
                return None
    return found[0] if len(found) == 1 and not todo else None


def _fits(calls: list[ToolCall], tools: list[dict] | None) -> bool:
    """Whether every call names a given tool with known arguments and all required ones (True without tools)."""
    if not tools:
        return True
    schemas = {}
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            schemas[fn["name"]] = fn.get("parameters") or {}
    for call in calls:
        if call.name not in schemas:
            return False
        params = schemas[call.name] if isinstance(schemas[call.name], dict) else {}
        props = list(params.get("properties") or {})
        named = [props[int(k[3:])] if k.startswith("arg") and k[3:].isdigit() and int(k[3:]) < len(props) else k
                 for k in call.arguments]
        if props and any(k not in props for k in named):
            return False
        if any(r not in named for r in params.get("required") or []):
            return False
    return True


def _parse_block(body: str, truncated: bool, tools: list[dict] | None) -> _Block:
    """A block's calls: the strict reading, else the one lenient reading, else the complete calls before the
    failure (and, if the text ended inside the block, the call it was cut in, partial)."""
    block, scanner = _read(body)
    if block.complete:
        return block
    if "'" in body[block.rest:]:
        calls = _lenient(body, tools)
        if calls is not None:
            return _Block(calls, True, len(body))
    if truncated:
        cut = scanner.partial_call()
        if cut is not None:
            return _Block(block.calls + [cut], True, len(body))
    return block


def _name_positionals(calls: list[ToolCall], tools: list[dict] | None) -> None:
    """Rename argN to the schema's N-th parameter name where the tool is known."""
    if not tools:
        return
    params: dict[str, list[str]] = {}
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        props = (fn.get("parameters") or {}).get("properties") or {}
        if isinstance(fn.get("name"), str):
            params[fn["name"]] = list(props)
    for call in calls:
        names = params.get(call.name)
        if not names:
            continue
        renamed: dict[str, Any] = {}
        for key, value in call.arguments.items():
            if key.startswith("arg") and key[3:].isdigit() and int(key[3:]) < len(names):
                target = names[int(key[3:])]
                if target not in call.arguments:
                    key = target
            renamed[key] = value
        call.arguments = renamed


def _strip_echoes(text: str, calls: list[ToolCall]) -> str:
    """Remove bare `[f(...)]` lists in `text` that only repeat calls already extracted."""
    pos = 0
    while (start := text.find("[", pos)) != -1:
        found: list[ToolCall] = []
        scanner = _Scanner(text, start)
        try:
            _parse_call_list(scanner, found)
        except (_ParseError, RecursionError):
            pos = start + 1
            continue
        if found and all(call in calls for call in found):
            text = text[:start] + text[scanner.pos:]
            pos = start
        else:
            pos = scanner.pos
    return text


@dataclass
class ParsedToolCalls:
    """What `parse_tool_calls_detailed` found: the calls, the content, and the text of call blocks that could not
    be read (returned as content; a server should say so, e.g. in its log)."""

    calls: list[ToolCall]
    content: str
    unparsed: list[str] = field(default_factory=list)


def sentinel_offsets(token_ids: list[int], start_id: int | None, end_id: int | None,
                     decode: Callable[[list[int]], str]) -> list[int]:
    """Character offsets, in `decode(token_ids)`, of the real `<|tool_call_start|>` / `<|tool_call_end|>` tokens
    (so that the same characters spelled by ordinary tokens stay text)."""
    marks = {start_id, end_id} - {None}
    return [len(decode(token_ids[:k])) for k, t in enumerate(token_ids) if t in marks]


def parse_tool_calls(text: str, tools: list[dict] | None = None,
                     sentinels: list[int] | None = None) -> tuple[list[ToolCall], str]:
    """Split model output into (tool calls, remaining content). Never raises on model output."""
    r = parse_tool_calls_detailed(text, tools, sentinels)
    return r.calls, r.content


def parse_tool_calls_detailed(text: str, tools: list[dict] | None = None,
                              sentinels: list[int] | None = None) -> ParsedToolCalls:
    """`parse_tool_calls`, also saying which call blocks could not be read (see the module notes)."""
    real = None if sentinels is None else set(sentinels)

    def find(marker: str, pos: int) -> int:
        at = text.find(marker, pos)
        while real is not None and at != -1 and at not in real:
            at = text.find(marker, at + 1)
        return at

    def drop_ends(a: int, b: int) -> str:
        """text[a:b] without (real) end sentinels."""
        out, pos = [], a
        while (at := find(TOOL_CALL_END, pos)) != -1 and at < b:
            out.append(text[pos:at])
            pos = at + len(TOOL_CALL_END)
        out.append(text[pos:b])
        return "".join(out)

    if find(TOOL_CALL_START, 0) == -1:
        return ParsedToolCalls([], text)
    calls: list[ToolCall] = []
    pieces: list[str] = []
    unparsed: list[str] = []
    pos = 0
    while (start := find(TOOL_CALL_START, pos)) != -1:
        body_start = start + len(TOOL_CALL_START)
        end = find(TOOL_CALL_END, body_start)
        body = text[body_start:] if end == -1 else text[body_start:end]
        block = _parse_block(body, end == -1, tools)
        pieces.append(drop_ends(pos, start))
        calls.extend(block.calls)
        if not block.complete:
            if not block.calls and end != -1:  # nothing usable in a closed block: the raw block is content
                raw = text[start:end + len(TOOL_CALL_END)]
            else:  # the unread rest (or a cut-off block's text) without control-token text
                raw = body[block.rest:] if block.calls else body
            if raw.strip():
                pieces.append(raw)
                unparsed.append(raw)
        if end == -1:
            pos = len(text)
            break
        pos = end + len(TOOL_CALL_END)
    pieces.append(drop_ends(pos, len(text)))
    if not calls:  # the text as it was, less control-token text of cut-off blocks and stray end sentinels
        return ParsedToolCalls([], "".join(pieces), unparsed)
    content = "\n".join(p.strip() for p in (_strip_echoes(p, calls) for p in pieces) if p.strip())
    _name_positionals(calls, tools)
    return ParsedToolCalls(calls, content, unparsed)
