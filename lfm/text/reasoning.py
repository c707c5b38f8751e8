"""Reasoning extraction: the `<think>…</think>` text a thinking model writes before its answer, split from the
answer, whole or as it streams (`lfm serve --reasoning-parser`).

Two rules, by parser name:
- "deepseek_r1" (vLLM's): everything before `</think>` is reasoning, whether or not the model wrote `<think>` (the
  template may have opened it); no `</think>` at all means the whole output is reasoning.
- "lfm2": LFM2.5 thinking models write `<think>` themselves and skip it when thinking is off
  (`chat_template_kwargs={"enable_thinking": false}`), so the output is reasoning only when it opens with `<think>`
  (leading whitespace allowed) or the prompt ended inside an open `<think>`; otherwise it is all content. Text before
  `</think>` is reasoning, an unterminated block is all reasoning, as with deepseek_r1.
Content after `</think>` is returned as written, as vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
PARSERS = ("lfm2", "deepseek_r1")


@dataclass
class ReasoningParser:
    """Feed text deltas, get (reasoning, content) deltas; nothing is emitted twice, nothing is lost at finish()."""

    name: str = "lfm2"
    prompt_open: bool = False  # the prompt ends inside an open <think> (the template started the block)
    state: str = "start"  # start -> reasoning -> content, or start -> content
    buf: str = ""
    entered: bool = False  # a reasoning block was opened (explicitly or by the rule)

    def __post_init__(self) -> None:
        if self.name not in PARSERS:
            raise ValueError(f"unknown reasoning parser {self.name!r} (choose from {', '.join(PARSERS)})")

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        reasoning = content = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK_START):
                self.buf, self.state, self.entered = head[len(THINK_START):], "reasoning", True
            elif THINK_START.startswith(head):  # empty or a prefix of <think>: wait for more text
                return "", ""
            else:
                implicit = self.name == "deepseek_r1" or self.prompt_open
                self.state = "reasoning" if implicit else "content"
                self.entered = implicit
        if self.state == "reasoning":
            at = self.buf.find(THINK_END)
            if at < 0:
                keep = _partial_suffix(self.buf, THINK_END)
                reasoning, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return reasoning, ""
            reasoning, self.buf, self.state = self.buf[:at], self.buf[at + len(THINK_END):], "content"
        if self.state == "content":
            content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """End of output: a held tail of an unterminated block is reasoning; held start text is content, unless
        the rule makes the whole output reasoning."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            return rest, ""
        if self.state == "start" and rest:
            head = rest.lstrip()
            if head.startswith(THINK_START) or self.name == "deepseek_r1" or self.prompt_open:
                self.entered = True
                return (head[len(THINK_START):] if head.startswith(THINK_START) else rest), ""
        return "", rest


def split_reasoning(text: str, name: str = "lfm2", prompt_open: bool = False) -> tuple[str | None, str]:
    """A finished output -> (reasoning or None when there was none, content)."""
    p = ReasoningParser(name, prompt_open)
    r1, c1 = p.feed(text)
    r2, c2 = p.finish()
    return (r1 + r2 if p.entered else None), c1 + c2


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
