"""One `Sequence` per generated completion: its tokens, where its cache lives, its sampling state and its text.

Everything the engine knows about a request is here (nano-vllm's shape): the token ids (prompt, then output), how
many of them the model has already seen (`num_computed_tokens`), the block table of its paged KV and its conv-state
slot, the per-request sampling state (seeded generator, penalty counts, grammar constraint), the log-probabilities
asked for, and the incremental text with the stop rules. A preempted sequence keeps all of it except its cache, so
recomputing it gives the very tokens it would have given.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..text import IncrementalDetokenizer, Tokenizer, ToolCall
from .sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), best first


@dataclass(slots=True)
class RequestOutput:
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated ids, including a final stop token
    finish_reason: str | None = None  # "stop" (stop token or string) or "length"
    prompt: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)  # chat only
    content: str | None = None  # chat only: the text outside tool-call blocks
    logprobs: list[TokenLogprob] | None = None  # SamplingParams.logprobs: one per generated token
    prompt_logprobs: list[TokenLogprob | None] | None = None  # SamplingParams.prompt_logprobs: None for the first


class Sequence:
    """A prompt being completed. `token_ids` = prompt + output; the last one is the next input of the model."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int],
                 max_tokens: int, tokenizer: Tokenizer | None, vocab_size: int) -> None:
        self.request_id = request_id
        self.params = params
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.max_tokens = max_tokens  # the request's max_tokens, or what the context has room for
        self.status = SequenceStatus.WAITING
        self.arrival = time.monotonic()
        # cache: the block manager fills these while the sequence runs, and empties them on preemption / finish
        self.num_computed_tokens = 0  # tokens whose KV and conv state are in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks (prefix caching)
        self.conv_slot = -1
        self.conv_restore: int | None = None  # set at admission: -1 = start from zeros, b = from block b's snapshot
        self.num_preemptions = 0
        # sampling state (travels with the sequence, so a recomputed sequence samples as it would have)
        self.generator: torch.Generator | None = None
        self.seen: torch.Tensor | None = None  # [V] bool: prompt and output (repetition penalty)
        self.counts: torch.Tensor | None = None  # [V] float: output only (presence / frequency penalty)
        self.constraint: Any = params.constraint.start() if params.constraint is not None else None
        self._vocab_size = vocab_size
        # output
        self.output_logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_ids = stop_ids
        self.detok = (IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
                      if tokenizer is not None else None)
        self.text = ""  # all text so far; `sent` chars of it were handed out
        self.sent = 0
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # text that may still become a stop string

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={len(self)}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def sampling_state(self, device: torch.device) -> None:
        """Create the generator and penalty tensors on the logits' device (once, at the first sample)."""
        p = self.params
        if self.generator is None and not p.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        if self.seen is None and p.repetition_penalty != 1.0:
            self.seen = torch.zeros(self._vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.as_tensor(self.token_ids, dtype=torch.long, device=device)] = True
        if self.counts is None and (p.presence_penalty or p.frequency_penalty):
            self.counts = torch.zeros(self._vocab_size, device=device)
            if self.num_output_tokens:
                self.counts.index_add_(0, torch.as_tensor(self.output_ids, device=device),
                                       torch.ones(self.num_output_tokens, device=device))

    # ---- output text and stop rules -----------------------------------------------------------------------
    def append(self, token: int, token_bytes: bytes = b"") -> str:
        """Add a sampled token; return the text that is now final. Sets finish_reason when the request ends."""
        self.token_ids.append(token)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        if self.constraint is not None:
            self.constraint.accept(token, token_bytes)
        p = self.params
        if token in self.stop_ids and not p.ignore_eos or token in p.stop_token_ids:
            self.finish_reason = "stop"
            return self._release(final=True)
        if self.detok is not None:
            self.text += self.detok.push(token)
            for s in p.stop:
                at = self.text.find(s, max(0, self.sent - len(s)))
                if at >= 0:
                    self.text = self.text[:at]
                    self.finish_reason = "stop"
                    return self._release(final=True)
        if len(self.token_ids) - self.num_prompt_tokens >= self.max_tokens:
            self.finish_reason = "length"
            return self._release(final=True)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        if self.detok is None:  # token ids only (no tokenizer): there is never text to hand out
            return ""
        if final and self.detok is not None and self.finish_reason == "length":
            self.text += self.detok.flush()
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def to_output(self) -> RequestOutput:
        return RequestOutput(prompt_token_ids=self.token_ids[:self.num_prompt_tokens], text=self.text,
                             token_ids=self.output_ids, finish_reason=self.finish_reason,
                             logprobs=self.output_logprobs, prompt_logprobs=self.prompt_logprobs)
