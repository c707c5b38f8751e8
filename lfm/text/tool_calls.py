"""Parse LFM2 tool calls out of generated text.

The model writes `<|tool_call_start|>[get_weather(city="Paris", days=2)]<|tool_call_end|>` (a Python-style call
list, or a JSON list of {"name", "arguments"} objects when asked for JSON), possibly followed by text. `ast.parse`
rejects real outputs such as `f(from="x")`, so this is a small hand-written, forgiving scanner: it never raises on
model output, keeps every complete call of a truncated block, and otherwise leaves the raw text as content.

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

import json
import uuid
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"

_CONSTANTS = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "0": "\0", "\\": "\\", "'": "'", '"': '"',
            "/": "/", "\n": ""}


@dataclass
class ToolCall:
    """One function call: its (possibly dotted) name and keyword arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    partial: bool = False  # cut off by the end of generation: `arguments` holds the complete ones only
    partial_json: str | None = field(default=None, compare=False)  # the JSON prefix of a partial call's arguments

    def to_openai(self, call_id: str | None = None) -> dict[str, Any]:
        """OpenAI chat-completions `tool_calls` entry; arguments become a JSON string as the API requires (for a
        partial call, the unterminated JSON generated so far, as OpenAI returns a call cut by max_tokens)."""
        args = self.partial_json if self.partial and self.partial_json is not None else json.dumps(
            self.arguments, ensure_ascii=False)
        return {"id": call_id or new_call_id(), "type": "function", "function": {"name": self.name, "arguments": args}}


def new_call_id() -> str:
    """A fresh OpenAI-style call id ("call_" + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


class _ParseError(Exception):
    pass


class _Scanner:
    """Recursive-descent reader over Python-literal / JSON syntax with call expressions."""

    def __init__(self, text: str, pos: int = 0, choices: list[bool] | None = None) -> None:
        self.text = text
        self.pos = pos
        # lenient mode (choices not None): inside a single-quoted string, a `'` followed by a delimiter is a choice
        # point (close here, or a literal apostrophe); choices[k] decides the k-th one, then False (literal) is
        # assumed and recorded. A `'` not followed by a delimiter is always literal.
        self.choices = choices
        self.decided = 0
        # progress of the call being read, for a call cut off by the end of the text
        self.call_name: str | None = None
        self.call_args: dict[str, Any] | None = None
        self.call_key: str | None = None
        self.open_string: str | None = None  # an unterminated string's text so far
        self.open_string_at = -1  # where that string starts
        self.value_at = -1  # where the current argument's value starts

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def expect(self, char: str) -> None:
        self.skip_ws()
        if self.peek() != char:
            raise _ParseError(f"expected {char!r} at {self.pos}")
        self.pos += 1

    def name(self, dotted: bool) -> str:
        """An identifier (unicode letters, digits, _ and -), optionally with dots: `a.b.c`, `get-weather`."""
        start = self.pos
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c.isalnum() or c == "_" or (self.pos > start and (c == "-" or (dotted and c == "."))):
                self.pos += 1
            else:
                break
        if self.pos == start or self.text[start].isdigit():
            raise _ParseError(f"expected a name at {start}")
        return self.text[start:self.pos]

    # --------------------------------------------------------------------------------------------- values
    def value(self) -> Any:
        self.skip_ws()
        c = self.peek()
        if not c:
            raise _ParseError("unexpected end of input")
        if c in "\"'":
            return self.string()
        if c == "[":
            return self.sequence("[", "]")
        if c == "(":
            return self.sequence("(", ")")
        if c == "{":
            return self.mapping()
        if c.isdigit() or c in "-+.":
            return self.number()
        if c.isalpha() or c == "_":
            word = self.name(dotted=True)
            self.skip_ws()
            if self.peek() == "(":  # a nested call used as a value: keep it structured
                name, args = word, self.call_arguments()
                return {"name": name, "arguments": args}
            return _CONSTANTS.get(word, word)  # unknown bare words are kept as strings
        raise _ParseError(f"unexpected {c!r} at {self.pos}")

    def string(self) -> str:
        quote = self.text[self.pos]
        triple = self.text.startswith(quote * 3, self.pos)
        self.pos += 3 if triple else 1
        out: list[str] = []
        self.open_string, self.open_string_at = "", self.pos - (3 if triple else 1)
        while True:
            if self.pos >= len(self.text):
                raise _ParseError("unterminated string")
            c = self.text[self.pos]
            if c == "\\":
                self.pos += 1
                if self.pos >= len(self.text):
                    self.open_string = "".join(out)
                out.append(self._escape())
                continue
            if c == quote and (not triple or self.text.startswith(quote * 3, self.pos)):
                if quote == "'" and not triple and self.choices is not None and not self._closes():
                    out.append(c)
                    self.pos += 1
                    continue
                self.pos += 3 if triple else 1
                self.open_string = None
                return "".join(out)
            out.append(c)
            self.pos += 1
            if self.pos >= len(self.text):
                self.open_string = "".join(out)

    def _closes(self) -> bool:
        """Lenient mode, at a `'` inside a single-quoted string: does it close the string?"""
        after = self.pos + 1
        while after < len(self.text) and self.text[after] in " \t":
            after += 1
        if after < len(self.text) and self.text[after] not in ",)]}:\n":
            return False  # `it's`: only a literal reading continues
        assert self.choices is not None
        if self.decided < len(self.choices):
            pick = self.choices[self.decided]
        else:
            pick = False
            self.choices.append(pick)
        self.decided += 1
        return pick

    def _escape(self) -> str:
        if self.pos >= len(self.text):
            raise _ParseError("unterminated escape")
        c = self.text[self.pos]
        self.pos += 1
        if c in _ESCAPES:
            return _ESCAPES[c]
        width = {"x": 2, "u": 4, "U": 8}.get(c)
        if width:
            digits = self.text[self.pos:self.pos + width]
            try:
                code = int(digits, 16) if len(digits) == width else -1
                if code < 0:
                    raise ValueError
                char = chr(code)
            except ValueError:
                return "\\" + c  # not a valid escape: keep it literally, as Python does for unknown escapes
            self.pos += width
            if c == "u" and 0xD800 <= code < 0xDC00 and self.text.startswith("\\u", self.pos):  # JSON surrogate pair
                low = self.text[self.pos + 2:self.pos + 6]
                try:
                    low_code = int(low, 16)
                except ValueError:
                    return char
                if 0xDC00 <= low_code < 0xE000:
                    self.pos += 6
                    return chr(0x10000 + ((code - 0xD800) << 10) + (low_code - 0xDC00))
            return char
        return "\\" + c

    def number(self) -> int | float:
        start = self.pos
        if self.peek() in "+-":
            self.pos += 1
        while self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] in "._"):
            if self.text[self.pos] in "eE" and self.text[self.pos + 1:self.pos + 2] in ("+", "-"):
                self.pos += 1  # exponent sign
            self.pos += 1
        token = self.text[start:self.pos]
        try:
            return int(token, 0) if token.lstrip("+-")[:2].lower() in ("0x", "0o", "0b") else int(token)
        except ValueError:
            pass
        try:
            return float(token)
        except ValueError:
            if token.lstrip("+-") in ("inf", "nan"):
                return float(token)
            raise _ParseError(f"bad number {token!r}") from None

    def sequence(self, open_: str, close: str) -> list[Any]:
        """Lists and tuples (tuples become lists); trailing commas allowed."""
        self.expect(open_)
        items: list[Any] = []
        while True:
            self.skip_ws()
            if self.peek() == close:
                self.pos += 1
                return items
            items.append(self.value())
            self.skip_ws()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != close:
                raise _ParseError(f"expected ',' or {close!r} at {self.pos}")

    def mapping(self) -> dict[Any, Any] | list[Any]:
        """Dicts with string, number or bare-word keys; a brace set `{1, 2}` becomes a list."""
        self.expect("{")
        result: dict[Any, Any] = {}
        items: list[Any] = []
        while True:
            self.skip_ws()
            if self.peek() == "}":
                self.pos += 1
                return items if items and not result else result
            key = self.value()
            self.skip_ws()
            if self.peek() == ":":
                self.pos += 1
                result[key if isinstance(key, (str, int, float, bool)) or key is None else str(key)] = self.value()
            else:
                items.append(key)
            self.skip_ws()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "}":
                raise _ParseError(f"expected ',' or '}}' at {self.pos}")

    # ---------------------------------------------------------------------------------------------- calls
    def call_arguments(self) -> dict[str, Any]:
        """`(a=1, b="x", 3)`: keywords by name (Python keywords such as `from` included), positionals as argN."""
        self.expect("(")
        args: dict[str, Any] = {}
        self.call_args, self.call_key = args, None
        index = 0
        while True:
            self.skip_ws()
            if self.peek() == ")":
                self.pos += 1
                return args
            start = self.pos
            key = None
            if self.peek().isalpha() or self.peek() == "_":
                word = self.name(dotted=False)
                self.skip_ws()
                if self.peek() and self.peek() in "=:" and self.text[self.pos:self.pos + 2] != "==":
                    self.pos += 1
                    key = word
                else:
                    self.pos = start
            if key is None:
                key, index = f"arg{index}", index + 1
            self.call_key = key
            self.skip_ws()
            self.value_at = self.pos
            args[key] = self.value()
            self.call_key = None
            self.skip_ws()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != ")":
                raise _ParseError(f"expected ',' or ')' at {self.pos}")

    def call(self) -> ToolCall:
        self.skip_ws()
        if self.peek() == "{":
            return _call_from_json(self.mapping())
        self.call_name, self.call_args = None, None
        name = self.name(dotted=True)
        self.call_name = name
        args = self.call_arguments()
        self.call_name = self.call_args = None
        return ToolCall(name, args)

    def partial_call(self) -> ToolCall | None:
        """The call this scanner was reading when the text ended (None if not even its `(` was read)."""
        if self.call_name is None or self.call_args is None:
            return None
        done = dict(self.call_args)
        if self.call_key is not None:
            done.pop(self.call_key, None)
        prefix = json.dumps(done, ensure_ascii=False)[:-1]
        if self.call_key is not None and self.open_string is not None and self.open_string_at == self.value_at:
            prefix += (", " if done else "") + json.dumps(self.call_key, ensure_ascii=False) + ": "
            prefix += json.dumps(self.open_string, ensure_ascii=False)[:-1]
        return ToolCall(self.call_name, done, partial=True, partial_json=prefix)


def _call_from_json(obj: Any) -> ToolCall:
    """{"name", "arguments"|"parameters"} (arguments possibly a JSON string), or OpenAI {"function": {...}}."""
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = obj["function"]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise _ParseError("JSON tool call without a name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise _ParseError("arguments string is not JSON") from exc
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _ParseError("arguments are not an object")
    return ToolCall(obj["name"], args)


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
