"""Constrained decoding with xgrammar on CPU: JSON schemas, JSON objects and LFM2 tool calls.

`GrammarBackend` compiles grammars against our tokenizer once per server. A request's `ConstraintSpec` (shared by
its `n` choices) becomes one `Constraint` per sequence: a small program of phases that the sampler consults each step:

- `Force(id)`: exactly this token (the tool-call sentinels and the final `<|im_end|>` in tool_choice=required);
- `Match(grammar)`: xgrammar's token mask; the phase ends when the grammar accepts its end token;
- `Trigger(id, phases)`: free text until the model itself writes `id`, then `phases` run (the lazy grammar of
  tool_choice=auto: once `<|tool_call_start|>` appears, the call is constrained to the tools' schemas).

Termination: a random or confused model can wander inside a string forever. In a sequence's last 64 tokens of
budget, `must_close` plays a *closing policy* forward on a fork of the matcher (end token first, then closing quotes and
brackets, then commas and minimal values, else the longest allowed token) to count the tokens it needs; once that
nearly fills what is left, the row follows the policy for good, so the output still parses and validates. If even that
does not fit, the finish_reason is honestly "length". Raw control bytes are banned inside constrained phases.

Cost control: compiling grows faster than linearly with a schema's size (2,000 optional properties take minutes), so
a `SchemaBudget` (bytes of JSON and schema nodes, every tool of a request counted together) is checked before any
compilation and a schema over it is refused with the limit named. Compiled grammars are cached by their canonical
text, and compilations hold a lock per grammar, not one global lock: two requests with the same new schema compile
it once, while other schemas compile alongside (xgrammar releases the GIL while it compiles).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from ..text import Tokenizer
from .constraint import _NARROW, Constraint, ConstraintSpec, Force, Match, Trigger, invalid_utf8_inside, scan_quotes
from .tool_grammar import ToolSchemaError, tool_call_ebnf

__all__ = ["GrammarBackend", "GrammarError", "ConstraintSpec", "Constraint", "Force", "Match", "Trigger",
           "SchemaBudget", "schema_cost"]


class GrammarError(ValueError):
    """A schema or tool list that cannot be compiled (reported to the client as a 400)."""


@dataclass
class SchemaBudget:
    """The largest schema (all of a request's tools together) that will be compiled. The defaults compile in about
    a second on one core; `lfm serve --max-schema-bytes / --max-schema-nodes` change them."""

    max_bytes: int = 64 << 10
    max_nodes: int = 512  # schema objects: each property, item and branch schema counts one

    def check(self, schema: Any, what: str) -> None:
        size, nodes = schema_cost(schema)
        if size > self.max_bytes:
            raise GrammarError(f"{what} is {size} bytes of JSON; this server compiles at most {self.max_bytes} "
                               "(--max-schema-bytes)")
        if nodes > self.max_nodes:
            raise GrammarError(f"{what} has {nodes} schema nodes; this server compiles at most {self.max_nodes} "
                               "(--max-schema-nodes)")


def schema_cost(schema: Any) -> tuple[int, int]:
    """(bytes of compact JSON, number of JSON objects) of a schema, without recursion (schemas nest arbitrarily)."""
    try:
        size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace"))
    except (TypeError, ValueError, RecursionError):
        raise GrammarError("the schema is not plain JSON") from None
    nodes, todo = 0, [schema]
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            nodes += 1
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
    return size, nodes


class GrammarBackend:
    """Compiles grammars for one tokenizer and vocabulary; thread-safe (compilation runs off the event loop)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: list[int]) -> None:
        be = tokenizer.backend
        vocab = be.get_vocab(with_added_tokens=True)
        encoded = [""] * vocab_size
        specials = set()
        for text, i in vocab.items():
            if i < vocab_size:
                encoded[i] = text
        for i, added in be.get_added_tokens_decoder().items():
            if added.special and i < vocab_size:
                encoded[i] = ""  # a control token never spells grammar text; only forced or as an end token
                specials.add(i)
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(be.to_str())
        # Every matcher gets its end tokens explicitly (override_stop_tokens). The info's own stop list must not name
        # a blanked control token: xgrammar would then accept it anywhere as an empty string. So it names a plain
        # token, which the explicit override turns back into ordinary text.
        plain = next(i for i, t in enumerate(encoded) if t and i not in specials)
        self.info = xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size, stop_token_ids=[plain],
                                      add_prefix_space=meta["add_prefix_space"])
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self.vocab_size = vocab_size
        self.stop_ids = tuple(stop_ids)
        self.start_id = tokenizer.token_to_id("<|tool_call_start|>")
        self.end_id = tokenizer.token_to_id("<|tool_call_end|>")
        self.im_end_id = tokenizer.im_end_id
        self.token_bytes: list[bytes] = self.info.decoded_vocab  # what each id spells (b"" for control tokens)
        # Raw control bytes are never valid inside our grammars' strings (JSON forbids them; xgrammar's length-limited
        # string rule lets them through), and no whitespace is free with any_whitespace=False: banned in Match phases.
        self.control = torch.tensor([any(c < 0x20 for c in b) or invalid_utf8_inside(b)
                                     for b in self.token_bytes[:vocab_size]]
                                    + [False] * (vocab_size - len(self.token_bytes)))
        self.utf8_after = self._utf8_masks(vocab_size)
        lengths = [len(b) for b in self.token_bytes[:vocab_size]]
        self.token_len = torch.tensor(lengths + [0] * (vocab_size - len(lengths)))
        self.closing_score, self.closing_score_in_string = _closing_scores(self.token_bytes, vocab_size, specials)
        self._orders: dict[tuple, torch.Tensor] = {}
        self._by_len = torch.sort(-self.token_len, stable=True).indices  # the fallback: longest first, then by id
        self._by_len_ok = ~self.control[self._by_len]
        self.budget = SchemaBudget()
        self._locks: dict[str, threading.Lock] = {}  # one per grammar being compiled
        self._meta = threading.Lock()  # guards _locks and _cache (held for dictionary operations only)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.cache_size = 256

    def _utf8_masks(self, vocab_size: int) -> dict[int, torch.Tensor]:
        """For each narrow lead byte: bitmask words (xgrammar's layout) allowing every token except those whose
        first byte is a continuation byte outside the lead's range (e.g. 0xED then 0xA0..0xBF: a UTF-16 surrogate,
        which xgrammar accepts but no UTF-8 decoder does)."""
        words = (vocab_size + 31) // 32
        out = {}
        for lead, ok in _NARROW.items():
            bits = torch.ones(words * 32, dtype=torch.bool)
            for i, b in enumerate(self.token_bytes[:vocab_size]):
                if b and 0x80 <= b[0] < 0xC0 and b[0] not in ok:
                    bits[i] = False
            packed = (bits.view(words, 32).long() << torch.arange(32)).sum(1)
            out[lead] = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
        return out

    # ------------------------------------------------------------------------------------------- compile
    def _compiled(self, key: str, build: Callable[[], Any]) -> Any:
        """The grammar for `key`, compiled once: concurrent requests for the same key wait for one compilation,
        other keys do not wait at all."""
        with self._meta:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._meta:
                if key in self._cache:
                    return self._cache[key]
            try:
                grammar = build()
            finally:
                with self._meta:
                    self._locks.pop(key, None)
            with self._meta:
                self._cache[key] = grammar
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return grammar

    def json_schema(self, schema: dict) -> Any:
        if not isinstance(schema, dict):
            raise GrammarError("json_schema.schema must be a JSON object")
        self.budget.check(schema, "response_format's schema")
        text = json.dumps(schema, sort_keys=True)
        try:
            return self._compiled("json:" + text, lambda: self.compiler.compile_json_schema(
                text, any_whitespace=False, strict_mode=True))
        except Exception as e:  # xgrammar raises RuntimeError / ValueError with a readable message
            raise GrammarError(f"unsupported or invalid JSON schema: {_first_line(e)}") from None

    def json_object(self) -> Any:
        """Any JSON object (OpenAI's json_object mode), compact: no free whitespace for a model to wander in."""
        return self._compiled("json_object", lambda: self.compiler.compile_json_schema(
            '{"type": "object"}', any_whitespace=False, strict_mode=False))

    def tool_calls(self, tools: list[dict], parallel: bool = True) -> Any:
        self.budget.check(tools, "the tools' parameter schemas")
        try:
            ebnf = tool_call_ebnf(tools, parallel)
        except ToolSchemaError as e:
            raise GrammarError(str(e)) from None
        try:
            return self._compiled("ebnf:" + ebnf, lambda: self.compiler.compile_grammar(ebnf))
        except Exception as e:
            raise GrammarError(f"cannot build a grammar for these tools: {_first_line(e)}") from None

    def regex(self, pattern: str) -> Any:
        try:
            return self._compiled("regex:" + pattern, lambda: self.compiler.compile_regex(pattern))
        except Exception as e:
            raise GrammarError(f"unsupported or invalid regex: {_first_line(e)}") from None

    def ebnf(self, grammar: str) -> Any:
        try:
            return self._compiled("ebnf:" + grammar, lambda: self.compiler.compile_grammar(grammar))
        except Exception as e:
            raise GrammarError(f"invalid grammar (EBNF, root ::= ...): {_first_line(e)}") from None

    def choice(self, choices: list[str]) -> Any:
        """Exactly one of the strings: an EBNF alternation of literals (JSON escapes are xgrammar's string escapes)."""
        return self.ebnf("root ::= " + " | ".join(json.dumps(c) for c in choices))

    # ------------------------------------------------------------------------------------------- specs
    def spec_structured(self, so: Any) -> ConstraintSpec:
        """A `StructuredOutputsParams` (json / regex / choice / grammar / json_object) as a one-phase spec."""
        if so.json is not None:
            g = self.json_schema(so.json)
        elif so.regex is not None:
            g = self.regex(so.regex)
        elif so.choice is not None:
            g = self.choice(so.choice)
        elif so.grammar is not None:
            g = self.ebnf(so.grammar)
        else:
            g = self.json_object()
        return self.spec_json(g)

    def spec_json(self, grammar: Any) -> ConstraintSpec:
        return ConstraintSpec((Match(grammar, self.stop_ids, self.utf8_after),))

    def spec_tools_required(self, grammar: Any) -> ConstraintSpec:
        """`<|tool_call_start|>` [calls] `<|tool_call_end|>` `<|im_end|>`: always one well-formed call block."""
        self._need_sentinels()
        tail = (Force(self.im_end_id),) if self.im_end_id is not None else ()
        return ConstraintSpec((Force(self.start_id), Match(grammar, (self.end_id,), self.utf8_after), *tail))

    def spec_tools_auto(self, grammar: Any) -> ConstraintSpec:
        """Free text; a call block the model opens is constrained to the tools' schemas (lazy grammar)."""
        self._need_sentinels()
        return ConstraintSpec((Trigger(self.start_id, (Match(grammar, (self.end_id,), self.utf8_after),)),))

    def spec_no_tools(self) -> ConstraintSpec:
        """tool_choice=none: the call sentinel is never sampled."""
        return ConstraintSpec(banned=tuple(i for i in (self.start_id,) if i is not None))

    def _need_sentinels(self) -> None:
        if self.start_id is None or self.end_id is None:
            raise GrammarError("this tokenizer has no <|tool_call_start|>/<|tool_call_end|> tokens")

    def new_bitmask(self, rows: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(rows, self.vocab_size)

    # ------------------------------------------------------------------------------------------- closing mode
    def closing_pick(self, allowed: torch.Tensor, in_string: bool, end_ids: tuple[int, ...]) -> int:
        """Among allowed tokens (bool [V]), the one that ends the structure soonest; else
        the longest allowed one (then the grammar usually dictates the text, e.g. a required key: fewest tokens)."""
        score = (self.closing_score_in_string if in_string else self.closing_score).clone()
        for t in end_ids:
            if 0 <= t < score.numel():
                score[t] = 100.0
        score = score.masked_fill(~allowed, -1.0)
        best = int(score.argmax())
        if score[best] > 0:
            return best
        return int(self.token_len.masked_fill(~allowed, -1).argmax())

    def allowed(self, matcher: Any) -> torch.Tensor:
        bm = self.new_bitmask(1)
        matcher.fill_next_token_bitmask(bm, 0)
        bits = (bm[0, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.flatten()[: self.vocab_size].bool() & ~self.control

    def _closing_order(self, in_string: bool, end_ids: tuple[int, ...]) -> torch.Tensor:
        """The ids closing_pick would prefer, best first (score descending, then id: argmax's tie order)."""
        key = (in_string, end_ids)
        order = self._orders.get(key)
        if order is None:
            score = (self.closing_score_in_string if in_string else self.closing_score).clone()
            for t in end_ids:
                if 0 <= t < score.numel():
                    score[t] = 100.0
            ids = torch.nonzero((score > 0) & ~self.control).flatten()
            order = self._orders[key] = ids[torch.sort(-score[ids], stable=True).indices]
        return order

    def simulated_pick(self, matcher: Any, in_string: bool, end_ids: tuple[int, ...]) -> int:
        """closing_pick(allowed(matcher), ...) without unpacking the whole vocabulary: test the few closing tokens
        in preference order, then the tokens by length (the policy's fallback). Same token, a fraction of the work
        on a 65K vocabulary (the simulation runs it once per simulated token)."""
        bm = self.new_bitmask(1)
        matcher.fill_next_token_bitmask(bm, 0)
        head = 1024  # the fallback in two parts: the longest tokens usually decide, the rest rarely needs a look
        for ids, ok in ((self._closing_order(in_string, end_ids), None), (self._by_len[:head], self._by_len_ok[:head]),
                        (self._by_len[head:], self._by_len_ok[head:])):
            bits = ((bm[0, ids >> 5] >> (ids & 31)) & 1).bool()
            if ok is not None:
                bits &= ok
            if bits.any():
                return int(ids[int(bits.to(torch.uint8).argmax())])
        return 0  # nothing allowed: what closing_pick's argmax over all -1 returns

    def tokens_to_close(self, c: Constraint, limit: int) -> int:
        """How many tokens the closing policy needs from here to finish the current Match phase (> limit: too many)."""
        m = c.matcher.fork()
        end_ids = c.head.end_ids
        in_string, escaped = c.in_string, c.escaped
        for n in range(1, limit + 1):
            t = self.simulated_pick(m, in_string, end_ids)
            if not m.accept_token(t):
                return limit + 1
            if m.is_terminated():
                return n
            in_string, escaped = scan_quotes(self.token_bytes[t], in_string, escaped)
        return limit + 1

    def must_close(self, c: Constraint, left: int) -> bool:
        """Whether a constrained sequence with `left` tokens of budget must steer to its end now (sticky).
        Checked by simulation in the last 64 tokens (every 4th step until the last 16), with a margin of 4."""
        if c.matcher is None or c.failed:
            return False
        if not c.closing and left <= 64 and (left <= 16 or left % 4 == 0):
            c.closing = self.tokens_to_close(c, left) + 4 >= left
        return c.closing


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], control: torch.Tensor) -> None:
    """Mask disallowed tokens (and raw control bytes) to -inf in logits[rows] (float32, in place)."""
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
    idx = torch.as_tensor(rows, dtype=torch.long)
    logits[idx] = logits[idx].masked_fill(control, float("-inf"))


def _closing_scores(decoded: list[bytes], vocab_size: int, specials: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """How strongly each token moves a structured output towards its end (0 = not at all): one table for the
    position outside any string, one for inside a string (where only a closing quote helps)."""
    out, inside = torch.zeros(vocab_size), torch.zeros(vocab_size)
    for i, b in enumerate(decoded[:vocab_size]):
        if i in specials or not b:
            continue
        t = b.decode("utf-8", "replace")
        if t.startswith('"') and all(c in "}])" for c in t[1:]):
            inside[i] = 10 + len(t)
        t = t.strip(" ")
        if t and all(c in "}])" for c in t):
            out[i] = 10 + len(t)
        elif t == ",":
            out[i] = 7  # allowed only where no closer is: the next required member must come
        elif t in ("[]", "{}", '""', "()"):
            out[i] = 6
        elif t in ("0", "None", "null", "False", "false"):
            out[i] = 5
        elif t == '"':
            out[i] = 4
    return out, inside


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
