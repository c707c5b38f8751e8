"""A forgiving reader of LFM2's Pythonic tool-call syntax: `name(key=value, ...)` with Python-literal or JSON values.

`ast.parse` rejects real model outputs such as `f(from="x")`, so this is a small hand-written recursive-descent
scanner. It never raises anything but `_ParseError` (or RecursionError) on model output, and it keeps what a caller
needs when the text stops early: the call being read, its complete arguments and an unterminated string's text
(`partial_call`). In lenient mode it treats an unescaped `'` inside a single-quoted string as a choice point (close
here, or a literal apostrophe), decided by `choices`; `tool_calls` enumerates the readings.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

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
