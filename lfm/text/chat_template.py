"""Render a checkpoint's Jinja chat template exactly as `transformers` does, without importing it.

Checkpoints ship their own template, and the prompt a model sees must match the one it was trained on byte for
byte, so we reproduce transformers' environment: an immutable sandbox (templates are untrusted code), trim_blocks
and lstrip_blocks, the loopcontrols extension, a `tojson` that does not HTML-escape, `raise_exception`,
`strftime_now`, and the `{% generation %}` block that marks assistant text for training masks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Private-use characters that bracket each `{% generation %}` block while spans are being tracked.
_GEN_OPEN = "\U000f0102"
_GEN_CLOSE = "\U000f0103"
_GEN_MARKS_RE = re.compile(f"[{_GEN_OPEN}{_GEN_CLOSE}]")
_TRACK_VAR = "lfm_track_generation"

# Names a message's reasoning arrives under; templates read `reasoning_content` (gpt-oss style ones `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(Exception):
    """A chat template failed to compile or render (including its own `raise_exception`)."""


@dataclass
class RenderedChat:
    """Rendered prompt text plus the [start, end) character spans of its `{% generation %}` blocks."""

    text: str
    generation_spans: list[tuple[int, int]] = field(default_factory=list)


class _GenerationExtension(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transparent, or bracketed by markers when tracking spans."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_block")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    @jinja2.pass_context
    def _render_block(self, context: jinja2.runtime.Context, caller: Any) -> str:
        body = caller()
        if context.get(_TRACK_VAR):
            return f"{_GEN_OPEN}{body}{_GEN_CLOSE}"
        return body


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, as transformers does, to keep CPython internals out."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a template once; the cache key is the source text."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationExtension, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = lambda *a, **k: dict(*a, **k)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc} (line {exc.lineno})") from exc


def has_generation_blocks(source: str) -> bool:
    """Whether the template marks assistant text with `{% generation %}` (needed for assistant masks)."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


def _plain(value: Any, strip: re.Pattern | None) -> Any:
    """Deep-copy inputs as plain JSON-like data (the caller's objects stay untouched); drop marker chars."""
    if isinstance(value, str):
        return strip.sub("", value) if strip is not None else str(value)
    if isinstance(value, dict):
        return {k: _plain(v, strip) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, strip) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, strip) for v in value)
    return value


def _prepare_messages(messages: list[dict], strip: re.Pattern | None) -> list[dict]:
    """Drop None-valued keys (as transformers does) and alias reasoning fields under every name templates read."""
    prepared = []
    for message in messages:
        if not isinstance(message, dict):
            raise ChatTemplateError(f"chat messages must be dicts, got {type(message).__name__}")
        msg = {k: _plain(v, strip) for k, v in message.items() if v is not None}
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        prepared.append(msg)
    return prepared


def render_chat_template(
    template: str,
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    bos_token: str = "",
    eos_token: str = "",
    return_spans: bool = False,
    **kwargs: Any,
) -> RenderedChat:
    """Render `messages` (and OpenAI-style or bare-function `tools`) with a chat template.

    `kwargs` become template variables (e.g. `date_string`, `enable_thinking`), overriding bos/eos like
    transformers' special-token variables. With `return_spans`, `generation_spans` holds the character spans of
    every `{% generation %}` block in the returned text.
    """
    compiled = compile_template(template)
    strip = _GEN_MARKS_RE if return_spans else None
    variables: dict[str, Any] = {"bos_token": bos_token, "eos_token": eos_token}
    variables.update(_plain(kwargs, strip))
    variables.update(
        messages=_prepare_messages(list(messages), strip),
        tools=_plain(list(tools), strip) if tools is not None else None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
    )
    variables[_TRACK_VAR] = return_spans
    try:
        text = compiled.render(**variables)
    except ChatTemplateError:
        raise
    except Exception as exc:  # sandbox violations, undefined names, type errors inside the template
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
    if not return_spans:
        return RenderedChat(text)
    return _extract_spans(text)


def _extract_spans(marked: str) -> RenderedChat:
    """Remove the generation markers from `marked`, recording where each bracketed block lands."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    opened: int | None = None
    pos = 0
    for match in _GEN_MARKS_RE.finditer(marked):
        piece = marked[pos : match.start()]
        out.append(piece)
        length += len(piece)
        pos = match.end()
        if match.group() == _GEN_OPEN:
            opened = length
        elif opened is not None:
            if length > opened:
                spans.append((opened, length))
            opened = None
    out.append(marked[pos:])
    return RenderedChat("".join(out), spans)
