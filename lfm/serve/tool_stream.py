"""Streaming tool-call extraction: text deltas in, content deltas and finished tool calls out.

Content flows through until `<|tool_call_start|>` (a tail that could be the start of the sentinel is held back);
the call block is buffered until `<|tool_call_end|>` and then parsed with `parse_tool_calls` as a whole, so a client
receives each call once, complete, with its arguments as a JSON string. Text after the block is content again. A
block still open when generation ends is parsed as truncated (its complete calls survive), as the offline parser does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..text import TOOL_CALL_END, TOOL_CALL_START, ToolCall, parse_tool_calls


@dataclass
class ToolStreamParser:
    tools: list[dict] | None = None
    buf: str = ""
    in_call: bool = False
    calls_emitted: int = 0
    saw_content: bool = field(default=False)

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """Add text; return (content that is now final, calls that just closed)."""
        self.buf += delta
        content, calls = "", []
        while True:
            if not self.in_call:
                at = self.buf.find(TOOL_CALL_START)
                if at < 0:
                    keep = _partial_suffix(self.buf, TOOL_CALL_START)
                    content += self.buf[:len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                content += self.buf[:at]
                self.buf = self.buf[at + len(TOOL_CALL_START):]
                self.in_call = True
            else:
                end = self.buf.find(TOOL_CALL_END)
                if end < 0:
                    break
                body, self.buf = self.buf[:end], self.buf[end + len(TOOL_CALL_END):]
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
        rest, self.buf = self.buf, ""
        return rest, []

    def _parse(self, body: str, closed: bool) -> tuple[list[ToolCall], str]:
        block = TOOL_CALL_START + body + (TOOL_CALL_END if closed else "")
        calls, content = parse_tool_calls(block, self.tools)
        if not calls:
            return [], block  # unusable block: the raw text stays content, as in the non-streaming answer
        return calls, content


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
