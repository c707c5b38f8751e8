"""EBNF (xgrammar dialect) for LFM2's Pythonic tool-call list, generated from the tools' JSON schemas.

LFM2 writes `[get_weather(city="Paris", days=2)]`: arguments are Python literals (strings double-quoted, True / False /
None, lists, dicts). The grammar here accepts exactly the calls that are well formed and whose arguments validate
against the function's `parameters` schema: type (and type lists), enum, const, anyOf / oneOf, allOf (merged),
local $ref, properties / required / additionalProperties, items / prefixItems / minItems / maxItems, minLength /
maxLength. Scalars with numeric ranges, `pattern` or `format` are written the same in JSON and in Python, so their
rules come from xgrammar's own JSON-schema converter (renamed into this grammar). `multipleOf`, `uniqueItems` and
object `minProperties`-style keywords are not enforced. A tool whose name or argument names are not identifiers is
written in the JSON-object form `{"name": ..., "arguments": {...}}`, which `parse_tool_calls` accepts as well.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import xgrammar as xgr

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ARG = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Shared rules: Python literals that are also valid JSON where they can be (no single quotes, no `\/`).
_BASE = r'''
py_str ::= "\"" py_chr* "\""
py_chr ::= [^"\\\x00-\x1f\x7f] | "\\" ( ["\\bfnrt] | "u" py_hex py_hex py_hex py_hex )
py_hex ::= [0-9a-fA-F]
py_uint ::= "0" | [1-9] [0-9]*
py_int ::= "-"? py_uint
py_num ::= py_int ( "." [0-9]+ )? ( [eE] [+\-]? [0-9]+ )?
py_bool ::= "True" | "False"
py_any ::= py_str | py_num | py_bool | "None" | py_list | py_dict
py_list ::= "[" ( py_any ( ", " py_any )* )? "]"
py_dict ::= "{" ( py_str ": " py_any ( ", " py_str ": " py_any )* )? "}"
'''


class ToolSchemaError(ValueError):
    """A tool definition or schema the grammar cannot be built from (reported to the client as a 400)."""


def ebnf_literal(text: str) -> str:
    """`text` as an EBNF string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def py_literal(value: Any) -> str:
    """A JSON value written as the Python literal LFM2 uses in calls."""
    if value is True:
        return "True"
    if value is False:
        return "False"
    if value is None:
        return "None"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k), ensure_ascii=False)}: {py_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise ToolSchemaError(f"unsupported literal {value!r}")


@dataclass
class _Builder:
    """Accumulates rules; one instance per grammar so rule names never clash."""

    rules: dict[str, str] = field(default_factory=dict)
    memo: dict[str, str] = field(default_factory=dict)
    root_schema: dict = field(default_factory=dict)
    n: int = 0

    def new(self, body: str, hint: str = "r") -> str:
        self.n += 1
        name = f"{hint}_{self.n}"
        self.rules[name] = body
        return name

    # ------------------------------------------------------------------------------------------------ values
    def value(self, schema: Any, depth: int = 0) -> str:
        """Rule (or inline expression) matching the Python literals valid against `schema`."""
        if depth > 32:
            raise ToolSchemaError("schema nesting deeper than 32 levels")
        if schema is True or schema == {}:
            return "py_any"
        if schema is False:
            raise ToolSchemaError("a `false` schema admits no value")
        if not isinstance(schema, dict):
            raise ToolSchemaError(f"a schema must be an object, got {type(schema).__name__}")
        if "$ref" in schema:
            return self.ref(schema["$ref"], depth)
        key = json.dumps(schema, sort_keys=True)
        if key in self.memo:
            return self.memo[key]
        expr = self._value(schema, depth)
        name = self.new(expr, "v")
        self.memo[key] = name
        return name

    def ref(self, ref: Any, depth: int) -> str:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise ToolSchemaError(f"only local $ref ('#/...') is supported, got {ref!r}")
        key = "$ref:" + ref
        if key in self.memo:
            return self.memo[key]
        target = self._resolve(ref)
        seen = [ref]
        while isinstance(target, dict) and isinstance(target.get("$ref"), str):
            # a chain of refs that comes back to itself admits no value: the grammar would have an empty rule and
            # the call could not be constrained at all (xgrammar's JSON-schema converter rejects it too)
            if target["$ref"] in seen:
                raise ToolSchemaError(f"circular $ref: {' -> '.join(seen + [target['$ref']])} never reaches a schema")
            seen.append(target["$ref"])
            target = self._resolve(target["$ref"])
        self.n += 1
        name = f"ref_{self.n}"
        self.memo[key] = name  # before recursing: recursive schemas refer to themselves
        self.rules[name] = self.value(target, depth + 1)
        return name

    def _resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise ToolSchemaError(f"only local $ref ('#/...') is supported, got {ref!r}")
        target: Any = self.root_schema
        for part in ref[2:].split("/") if ref != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ToolSchemaError(f"$ref {ref!r} points nowhere")
            target = target[part]
        return target

    def _value(self, s: dict, depth: int) -> str:
        if "const" in s:
            return ebnf_literal(py_literal(s["const"]))
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise ToolSchemaError("enum must be a non-empty list")
            return " | ".join(ebnf_literal(py_literal(v)) for v in s["enum"])
        for key in ("anyOf", "oneOf"):
            if key in s:
                alts = s[key]
                if not isinstance(alts, list) or not alts:
                    raise ToolSchemaError(f"{key} must be a non-empty list")
                base = {k: v for k, v in s.items() if k != key}
                return " | ".join(self.value({**base, **a} if isinstance(a, dict) else a, depth + 1) for a in alts)
        if "allOf" in s:
            return self.value(_merge_all_of(s), depth + 1)
        types = s.get("type")
        if types is None:
            types = ("object" if "properties" in s else "array" if "items" in s or "prefixItems" in s
                     else "string" if "minLength" in s or "maxLength" in s else None)
        if types is None:
            return "py_any"
        if isinstance(types, list):
            if not types:
                raise ToolSchemaError("type list is empty")
            alts = [self._typed(t, s, depth) for t in types]
        else:
            alts = [self._typed(types, s, depth)]
        if s.get("nullable") is True:
            alts.append('"None"')
        return " | ".join(alts)

    def _typed(self, t: Any, s: dict, depth: int) -> str:
        ranged = any(k in s for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))
        if (t in ("integer", "number") and ranged) or (t == "string" and ("pattern" in s or "format" in s)):
            keep = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern", "format", "minLength",
                    "maxLength")
            return self.borrow({"type": t, **{k: v for k, v in s.items() if k in keep}})
        if t == "string":
            lo, hi = _bounds(s, "minLength", "maxLength")
            if lo == 0 and hi is None:
                return "py_str"
            return f'"\\"" py_chr{{{lo},{"" if hi is None else hi}}} "\\""'
        if t == "integer":
            return "py_int"
        if t == "number":
            return "py_num"
        if t == "boolean":
            return "py_bool"
        if t == "null":
            return '"None"'
        if t == "array":
            return self._array(s, depth)
        if t == "object":
            return self._object(s, depth)
        raise ToolSchemaError(f"unknown type {t!r}")

    def borrow(self, leaf: dict) -> str:
        """A scalar's rules from xgrammar's JSON-schema converter, renamed into this grammar."""
        try:
            text = str(xgr.Grammar.from_json_schema(json.dumps(leaf), any_whitespace=False))
        except Exception as e:
            raise ToolSchemaError(f"unsupported schema {json.dumps(leaf)}: {str(e).splitlines()[0][:200]}") from None
        rules = dict(_RULE.match(line).groups() for line in text.splitlines() if _RULE.match(line))
        self.n += 1
        prefix = f"x{self.n}_"
        todo, seen = ["root"], set()
        while todo:  # only the rules the scalar reaches, with lookahead assertions dropped (JSON-context only)
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            body = []
            for tok in _tokens(_drop_lookahead(rules[name])):
                if tok in rules:
                    todo.append(tok)
                    tok = prefix + tok
                body.append(tok)
            self.rules[prefix + name] = "".join(body)
        return prefix + "root"

    def _array(self, s: dict, depth: int) -> str:
        prefix = s.get("prefixItems")
        if isinstance(prefix, list) and prefix:
            items = [self.value(p, depth + 1) for p in prefix]
            return '"[" ' + ' ", " '.join(items) + ' "]"'
        item = self.value(s.get("items", True), depth + 1)
        lo, hi = _bounds(s, "minItems", "maxItems")
        if hi == 0:
            return '"[]"'
        more_lo, more_hi = max(lo - 1, 0), None if hi is None else hi - 1
        rep = f'( ", " {item} ){{{more_lo},{"" if more_hi is None else more_hi}}}'
        body = f"{item} {rep}"
        return f'"[" {body} "]"' if lo > 0 else f'"[" ( {body} )? "]"'

    def _object(self, s: dict, depth: int) -> str:
        props = s.get("properties")
        if not props:
            extra = s.get("additionalProperties", True)
            if extra is False:
                return '"{}"'
            val = self.value(extra, depth + 1) if isinstance(extra, dict) else "py_any"
            return f'"{{" ( py_str ": " {val} ( ", " py_str ": " {val} )* )? "}}"'
        items = self.members(s, depth, lambda k: ebnf_literal(json.dumps(k, ensure_ascii=False) + ": "))
        return f'"{{" {items} "}}"'

    def members(self, s: dict, depth: int, key_text) -> str:
        """Comma-separated properties in schema order; required ones mandatory, the others optional."""
        props = s.get("properties") or {}
        if not isinstance(props, dict):
            raise ToolSchemaError("properties must be an object")
        required = s.get("required") or []
        if not isinstance(required, list) or any(r not in props for r in required):
            raise ToolSchemaError("required lists a property that is not in properties")
        entries = [(f"{key_text(k)} {self.value(v, depth + 1)}", k in required) for k, v in props.items()]
        # first[i] / rest[i]: items i.. when nothing / something was written before (rest adds the comma)
        first, rest = '""', '""'
        for item, req in reversed(entries):
            new_first = f"{item} {rest}" if req else f"{item} {rest} | {first}"
            new_rest = f'", " {item} {rest}' if req else f'", " {item} {rest} | {rest}'
            first, rest = self.new(new_first, "m"), self.new(new_rest, "m")
        return first


_RULE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*) ::= (.*)$")
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|[A-Za-z_][A-Za-z0-9_]*|.', re.S)


def _tokens(body: str) -> list[str]:
    """EBNF body -> string literals, character classes, identifiers and single characters."""
    return _TOKEN.findall(body)


def _drop_lookahead(body: str) -> str:
    """Remove `(= ...)` lookahead assertions (balanced), skipping over literals and classes."""
    toks = _tokens(body)
    out, i = [], 0
    while i < len(toks):
        if toks[i] == "(" and i + 1 < len(toks) and toks[i + 1] == "=":
            depth, i = 1, i + 2
            while i < len(toks) and depth:
                depth += {"(": 1, ")": -1}.get(toks[i], 0)
                i += 1
            continue
        out.append(toks[i])
        i += 1
    return "".join(out)


def _bounds(s: dict, lo_key: str, hi_key: str) -> tuple[int, int | None]:
    lo, hi = s.get(lo_key, 0), s.get(hi_key)
    if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
        raise ToolSchemaError(f"bad {lo_key}/{hi_key}")
    return lo, hi


def _merge_all_of(s: dict) -> dict:
    out = {k: v for k, v in s.items() if k != "allOf"}
    for part in s["allOf"] if isinstance(s["allOf"], list) else []:
        if not isinstance(part, dict):
            continue
        for k, v in part.items():
            if k == "properties":
                out["properties"] = {**out.get("properties", {}), **v}
            elif k == "required":
                out["required"] = list(dict.fromkeys([*out.get("required", []), *v]))
            else:
                out.setdefault(k, v)
    return out


def function_of(tool: Any) -> dict:
    """The `function` object of an OpenAI tool entry, checked."""
    if (not isinstance(tool, dict) or tool.get("type", "function") != "function"
            or not isinstance(tool.get("function"), dict)):
        raise ToolSchemaError("each tool must be {\"type\": \"function\", \"function\": {...}}")
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise ToolSchemaError(f"function name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise ToolSchemaError(f"parameters of {name!r} must be a JSON schema object")
    return {"name": name, "parameters": params}


def tool_call_ebnf(tools: list[dict], parallel: bool = True) -> str:
    """Grammar for the text between `<|tool_call_start|>` and `<|tool_call_end|>`: a list of one or more calls."""
    if not tools:
        raise ToolSchemaError("no tools to call")
    b = _Builder()
    calls = []
    for tool in tools:
        fn = function_of(tool)
        params = fn["parameters"]
        if params.get("type", "object") != "object":
            raise ToolSchemaError(f"parameters of {fn['name']!r} must have type object")
        b.root_schema = params
        b.memo = {k: v for k, v in b.memo.items() if not k.startswith("$ref:")}  # refs are per tool
        props = params.get("properties") or {}
        if _IDENT.match(fn["name"]) and all(isinstance(k, str) and _ARG.match(k) for k in props):
            args = b.members(params, 0, lambda k: ebnf_literal(k + "="))
            calls.append(b.new(f'{ebnf_literal(fn["name"] + "(")} {args} ")"', "call"))
        else:
            head = ebnf_literal('{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": ')
            calls.append(b.new(f'{head} {b._object(params, 0)} "}}"', "call"))
    one = " | ".join(calls)
    root = f'"[" ( {one} ) ( ", " ( {one} ) )* "]"' if parallel else f'"[" ( {one} ) "]"'
    lines = [f"root ::= {root}"] + [f"{k} ::= {v}" for k, v in b.rules.items()]
    return "\n".join(lines) + "\n" + _BASE
