"""A request's constraint as the sampler runs it: `ConstraintSpec` (phases + banned tokens, shared by a request's
`n` choices) and `Constraint` (one sequence's progress through it), the phases `Force` / `Match` / `Trigger`
(see `lfm.engine.grammar` for what each does and how grammars are compiled), and the UTF-8 and quote scanning the
phases need."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import xgrammar as xgr


@dataclass(frozen=True, slots=True)
class Force:
    token_id: int


@dataclass(frozen=True, slots=True)
class Match:
    grammar: Any  # xgr.CompiledGrammar
    end_ids: tuple[int, ...]  # tokens that close the phase once the grammar is complete
    utf8: Any = None  # GrammarBackend.utf8_after: lead byte -> bitmask words of tokens that may not follow it


@dataclass(frozen=True, slots=True)
class Trigger:
    token_id: int
    then: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class ConstraintSpec:
    """What a request asks for: phases to run, and token ids that may never be sampled."""

    phases: tuple[Any, ...] = ()
    banned: tuple[int, ...] = ()

    def start(self) -> Constraint:
        return Constraint(self)


@dataclass(slots=True)
class Constraint:
    """One sequence's progress through its spec; also tracks whether the constrained text is inside a string."""

    spec: ConstraintSpec
    todo: list[Any] = field(default_factory=list)
    matcher: Any = None  # xgr.GrammarMatcher of the current Match phase
    failed: bool = False
    in_string: bool = False  # inside a double-quoted literal of the current Match phase (for closing mode)
    escaped: bool = False
    closing: bool = False  # sticky: this Match phase now steers to its end (see GrammarBackend.must_close)
    lead: int | None = None  # the text so far ends with this UTF-8 lead byte whose next byte has a narrow range

    def __post_init__(self) -> None:
        self.todo = list(self.spec.phases)
        self._enter()

    def _enter(self) -> None:
        self.matcher = None
        self.in_string = self.escaped = self.closing = False
        self.lead = None
        if self.todo and isinstance(self.todo[0], Match):
            m = self.todo[0]
            self.matcher = xgr.GrammarMatcher(m.grammar, override_stop_tokens=list(m.end_ids))

    @property
    def head(self) -> Any:
        return self.todo[0] if self.todo and not self.failed else None

    def forced(self) -> int | None:
        h = self.head
        return h.token_id if isinstance(h, Force) else None

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write this step's allowed tokens into bitmask[row]; False when the step is unconstrained."""
        if self.matcher is None or self.failed:
            return False
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.lead is not None and self.head.utf8 is not None:  # xgrammar lets surrogates / overlongs through
            bitmask[row] &= self.head.utf8[self.lead]
        return True

    def accept(self, token: int, text: bytes = b"") -> None:
        h = self.head
        if h is None:
            return
        if isinstance(h, Force):
            self.todo.pop(0)
            self._enter()
        elif isinstance(h, Match):
            if not self.matcher.accept_token(token):
                self.failed = True  # cannot happen when the mask was applied; never block generation on it
                return
            self._scan(text)
            if self.matcher.is_terminated():
                self.todo.pop(0)
                self._enter()
        elif isinstance(h, Trigger) and token == h.token_id:
            self.todo[0:0] = list(h.then)  # the trigger stays armed after the call closes
            self._enter()

    def _scan(self, text: bytes) -> None:
        self.in_string, self.escaped = scan_quotes(text, self.in_string, self.escaped)
        if text:
            self.lead = text[-1] if text[-1] in _NARROW else None


# UTF-8 lead bytes whose second byte has a narrower range than 0x80-0xBF (RFC 3629: no overlongs, no surrogates,
# nothing above U+10FFFF); bytes that never occur in UTF-8 at all.
_NARROW = {0xE0: range(0xA0, 0xC0), 0xED: range(0x80, 0xA0), 0xF0: range(0x90, 0xC0), 0xF4: range(0x80, 0x90)}
_NEVER = {0xC0, 0xC1, *range(0xF5, 0x100)}


def invalid_utf8_inside(b: bytes) -> bool:
    """Whether a token's bytes contain something no valid UTF-8 text contains (checked within the token)."""
    return any(c in _NEVER or (c in _NARROW and i + 1 < len(b) and b[i + 1] not in _NARROW[c]) for i, c in enumerate(b))


def scan_quotes(text: bytes, in_string: bool, escaped: bool) -> tuple[bool, bool]:
    """Track double-quoted literals (our grammars quote only with `"` and escape with a backslash)."""
    for c in text:
        if escaped:
            escaped = False
        elif in_string and c == 0x5C:
            escaped = True
        elif c == 0x22:
            in_string = not in_string
    return in_string, escaped
