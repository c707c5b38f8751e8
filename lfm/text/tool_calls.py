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
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
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

    def to_openai(self, call_id: str | None = None) -> dict[str, Any]:
        """OpenAI chat-completions `tool_calls` entry; arguments become a JSON string as the API requires."""
        return {
            "id": call_id or new_call_id(),
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


def new_call_id() -> str:
    """A fresh OpenAI-style call id ("call_" + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


class _ParseError(Exception):
    pass


class _Scanner:
    """Recursive-descent reader over Python-literal / JSON syntax with call expressions."""

    def __init__(self, text: str, pos: int = 0) -> None:
        self.text = text
        self.pos = pos

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
        while True:
            if self.pos >= len(self.text):
                raise _ParseError("unterminated string")
            c = self.text[self.pos]
            if c == "\\":
                self.pos += 1
                out.append(self._escape())
                continue
            if c == quote and (not triple or self.text.startswith(quote * 3, self.pos)):
                self.pos += 3 if triple else 1
                return "".join(out)
            out.append(c)
            self.pos += 1

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
            args[key] = self.value()
            self.skip_ws()
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != ")":
                raise _ParseError(f"expected ',' or ')' at {self.pos}")

    def call(self) -> ToolCall:
        self.skip_ws()
        if self.peek() == "{":
            return _call_from_json(self.mapping())
        name = self.name(dotted=True)
        return ToolCall(name, self.call_arguments())


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


def _parse_block(body: str) -> tuple[list[ToolCall], bool]:
    """Calls in one block body: lists, bare calls or JSON objects, in sequence. Returns (calls, fully parsed)."""
    calls: list[ToolCall] = []
    scanner = _Scanner(body)
    try:
        while True:
            while scanner.pos < len(body) and (body[scanner.pos].isspace() or body[scanner.pos] in ",;"):
                scanner.pos += 1
            if scanner.pos >= len(body):
                return calls, True
            if scanner.peek() == "[":
                _parse_call_list(scanner, calls)
            else:
                calls.append(scanner.call())
    except (_ParseError, RecursionError):
        return calls, False


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


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> tuple[list[ToolCall], str]:
    """Split model output into (tool calls, remaining content). Never raises on model output."""
    if TOOL_CALL_START not in text:
        return [], text
    calls: list[ToolCall] = []
    pieces: list[str] = []
    pos = 0
    while (start := text.find(TOOL_CALL_START, pos)) != -1:
        body_start = start + len(TOOL_CALL_START)
        end = text.find(TOOL_CALL_END, body_start)
        body = text[body_start:] if end == -1 else text[body_start:end]
        found, _ = _parse_block(body)
        pieces.append(text[pos:start].replace(TOOL_CALL_END, ""))
        if found:
            calls.extend(found)
        else:  # nothing usable: leave the raw block as content
            pieces.append(text[start:] if end == -1 else text[start:end + len(TOOL_CALL_END)])
        if end == -1:
            pos = len(text)
            break
        pos = end + len(TOOL_CALL_END)
    pieces.append(text[pos:].replace(TOOL_CALL_END, ""))
    if not calls:
        return [], text
    content = "\n".join(p.strip() for p in (_strip_echoes(p, calls) for p in pieces) if p.strip())
    _name_positionals(calls, tools)
    return calls, content
