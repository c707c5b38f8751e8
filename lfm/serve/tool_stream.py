"""Streaming tool-call extraction: text deltas (and their token ids) in, content deltas and finished tool calls out.

Content flows through until a call block opens; the block is buffered until it closes and then parsed with
`parse_tool_calls` as a whole, so a client receives each call once, complete, with its arguments as a JSON string.
Text after the block is content again. A block still open when generation ends is parsed as cut off: its complete
calls survive and its last call comes back partial (as OpenAI does for a call cut by max_tokens), never as raw
control-token text.

Which `<|tool_call_start|>` / `<|tool_call_end|>` are real: with `decode` and the sentinel ids given (the server
always gives them), only the real control tokens open and close blocks, found from the token ids; the same
characters spelled by ordinary tokens are content. Their character offsets come from decoding the ids before each
one. Without ids (plain text), every occurrence counts and a tail that could begin a sentinel is held back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..text import TOOL_CALL_END, TOOL_CALL_START, ToolCall
from ..text.tool_calls import parse_tool_calls_detailed


@dataclass
class ToolStreamParser:
    tools: list[dict] | None = None
    decode: Callable[[list[int]], str] | None = None  # ids -> text, as the engine decodes this request
    start_id: int | None = None
    end_id: int | None = None
    buf: str = ""
    in_call: bool = False
    calls_emitted: int = 0
    unparsed: list[str] = field(default_factory=list)  # block text that came back as content (for a log line)
    _ids: list[int] = field(default_factory=list)
    _base: int = 0  # offset of buf[0] in the decoded output
    _shift: int = 0
    _marks: list[int] = field(default_factory=list)  # offsets of real sentinels not yet consumed, ascending

    @property
    def by_ids(self) -> bool:
        return self.decode is not None and self.start_id is not None and self.end_id is not None

    def feed(self, delta: str, token_ids: list[int] = (), shift: int = 0) -> tuple[str, list[ToolCall]]:
        """Add text (and the ids that produced it); return (content that is now final, calls that just closed).
        `shift`: how many characters of the decoded output come before the text this parser sees (a reasoning
        parser in front takes the `<think>` block off the start)."""
        if shift != self._shift:
            self._base += shift - self._shift
            self._shift = shift
        if self.by_ids:
            for t in token_ids:
                if t in (self.start_id, self.end_id):
                    self._marks.append(len(self.decode(self._ids)))
                self._ids.append(t)
        self.buf += delta
        content, calls = "", []
        while True:
            if not self.in_call:
                at = self._find(TOOL_CALL_START)
                if at < 0:
                    keep = (len(self.buf) - self._hold_from() if self.by_ids
                            else _partial_suffix(self.buf, TOOL_CALL_START))
                    content += self._drop_ends(self.buf[:len(self.buf) - keep])
                    self._advance(len(self.buf) - keep)
                    break
                content += self._drop_ends(self.buf[:at])
                self._advance(at + len(TOOL_CALL_START))
                self.in_call = True
            else:
                end = self._find(TOOL_CALL_END)
                if end < 0:
                    break
                body = self.buf[:end]
                self._advance(end + len(TOOL_CALL_END))
                self.in_call = False
                found, rest = self._parse(body, closed=True)
                calls += found
                content += rest
        self.calls_emitted += len(calls)
        return content, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of generation: release held text; parse an unterminated block."""
        if self.in_call:
            found, rest = self._parse(self.buf, closed=False)
            self.buf, self.in_call = "", False
            self.calls_emitted += len(found)
            return rest, found
        rest, self.buf = self._drop_ends(self.buf), ""
        return rest, []

    # ------------------------------------------------------------------------------------------- helpers
    def _find(self, marker: str) -> int:
        """Index in buf of the next sentinel `marker` that counts (a real token's, in id mode)."""
        if not self.by_ids:
            return self.buf.find(marker)
        other = TOOL_CALL_END if marker == TOOL_CALL_START else TOOL_CALL_START
        for off in self._marks:
            at = off - self._base
            if self.buf.startswith(marker, at):
                return at
            if not self.buf.startswith(other, at):
                return -1  # its text has not (all) arrived yet
            # the other sentinel: a stray end outside a block (dropped by _drop_ends), or a start inside one (text)
        return -1

    def _hold_from(self) -> int:
        """Where content must stop in id mode: the first real sentinel that is not an arrived stray end."""
        for off in self._marks:
            at = off - self._base
            if not self.buf.startswith(TOOL_CALL_END, at):
                return min(at, len(self.buf))
        return len(self.buf)

    def _drop_ends(self, text: str) -> str:
        """Content without stray (real) end sentinels; consumes their offsets."""
        if not self.by_ids:
            return text.replace(TOOL_CALL_END, "")
        out, pos = [], 0
        for off in list(self._marks):
            at = off - self._base
            if at + len(TOOL_CALL_END) > len(text) or not text.startswith(TOOL_CALL_END, at):
                break
            out.append(text[pos:at])
            pos = at + len(TOOL_CALL_END)
            self._marks.remove(off)
        out.append(text[pos:])
        return "".join(out)

    def _advance(self, n: int) -> None:
        """Drop the first n characters of buf (and the sentinel offsets inside them)."""
        self.buf = self.buf[n:]
        self._base += n
        self._marks = [m for m in self._marks if m >= self._base]

    def _parse(self, body: str, closed: bool) -> tuple[list[ToolCall], str]:
        block = TOOL_CALL_START + body + (TOOL_CALL_END if closed else "")
        real = [0, len(TOOL_CALL_START) + len(body)] if closed else [0]
        r = parse_tool_calls_detailed(block, self.tools, real)
        self.unparsed += r.unparsed
        return r.calls, r.content


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
