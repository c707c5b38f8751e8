"""Streaming detokenization: turn one new token id at a time into the new text it completes.

Byte-level BPE tokens can end in the middle of a UTF-8 character (an emoji is often 2-3 tokens), so decoding each
token alone yields U+FFFD garbage. As vLLM does, we decode only a short window of recent ids: `prefix_offset`
starts the window (context for decoders that look back), `read_offset` is where emitted text ends, and new text is
released only once the window no longer ends in an incomplete character. Cost per token is bounded by the window.
"""

from __future__ import annotations

from lfm.text.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Tokens held back before we look for a cut that is final even though the text ends in U+FFFD (invalid bytes or a
# genuine U+FFFD character, which never "complete"). An incomplete UTF-8 prefix spans at most 3 bytes/tokens.
_HOLD_LIMIT = 6
_MAX_CHAR_TOKENS = 3


class IncrementalDetokenizer:
    """Feed ids with `push`; the concatenation of all returned deltas plus `flush()` equals `decode(all_ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # kept ids (skipped specials never enter: they decode to nothing)
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # everything emitted so far

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it makes final (possibly empty)."""
        if self.skip_special_tokens and self.tokenizer.skips(token_id):
            return ""
        self._ids.append(token_id)
        end = len(self._ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, end)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            return self._emit(new_text[len(prefix_text):], end)
        if end - self._read_offset > _HOLD_LIMIT:
            return self._release_final_prefix(prefix_text)
        return ""

    def _emit(self, delta: str, new_read: int) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = new_read
        self.text += delta
        return delta

    def _release_final_prefix(self, prefix_text: str) -> str:
        """Emit up to the latest cut whose text can no longer change, however later tokens continue."""
        end = len(self._ids)
        tail = self._decode(self._prefix_offset, end)
        for cut in range(end - _MAX_CHAR_TOKENS, self._read_offset, -1):
            head = self._decode(self._prefix_offset, cut)
            # With >= 3 tokens after the cut, any multi-byte character open at the cut has already been completed
            # or broken, so if decoding in two parts agrees with decoding in one the head is final.
            if head + self._decode(cut, end) == tail and len(head) >= len(prefix_text):
                return self._emit(head[len(prefix_text):], cut)
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (incomplete characters decode as U+FFFD)."""
        end = len(self._ids)
        if self._read_offset == end:
            return ""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, end)
        return self._emit(new_text[len(prefix_text):], end)
