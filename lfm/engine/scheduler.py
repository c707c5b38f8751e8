"""Continuous batching: a waiting queue and a running set, one model step at a time (nano-vllm's shape).

Each step (1) admits waiting requests, oldest first, while the running set has room and their caches fit the memory
budget; (2) prefills new prompts in chunks of at most `prefill_chunk` tokens in total, so running decodes stall for
one chunk at most; (3) runs one `decode_many` over every sequence that has a token to feed; (4) samples every
sequence that has fresh logits, with its own parameters, and reports the new text. Finished and aborted sequences
leave at once and give their cache back.

Each sequence owns a batch-1 `HybridCache` sized `prompt + max_tokens` when admitted: memory is reserved up front,
so an admitted request can always finish and the process never over-commits. Not thread-safe: one thread (the
engine's) calls everything here.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..model.cache import HybridCache
from ..model.lfm2 import LfmForCausalLM
from ..text import Tokenizer
from .grammar import ConstraintSpec, GrammarBackend
from .llm import SeqState
from .sampling import SamplingParams
from .step_sampler import RowState, TokenLogprob, sample_step


@dataclass(slots=True)
class EngineRequest:
    """One sequence to generate (a request with n choices is n of these)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # max_tokens must be set
    chat: bool = False  # chat requests also stop at <|im_end|>
    constraint: ConstraintSpec | None = None
    top_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    arrival: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class RequestDelta:
    """What one step produced for one request: new final text and tokens, and how it ended if it did."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class _Running:
    """A sequence in the running set."""

    __slots__ = ("req", "seq", "cache", "done_prompt", "logits", "next_token", "row", "nbytes")

    def __init__(self, req: EngineRequest, seq: SeqState, cache: HybridCache, row: RowState, nbytes: int) -> None:
        self.req, self.seq, self.cache, self.row, self.nbytes = req, seq, cache, row, nbytes
        self.done_prompt = 0
        self.logits: torch.Tensor | None = None  # [V] pending sample
        self.next_token: int | None = None  # sampled, not yet fed to the model


class Scheduler:
    def __init__(self, model: LfmForCausalLM, tokenizer: Tokenizer | None, stop_ids_text: set[int],
                 stop_ids_chat: set[int], *, max_num_seqs: int = 64, cache_budget: int = 4 << 30,
                 prefill_chunk: int = 256, max_model_len: int | None = None,
                 grammar: GrammarBackend | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_text, self.stop_chat = set(stop_ids_text), set(stop_ids_chat)
        self.max_num_seqs = max_num_seqs
        self.cache_budget = cache_budget
        self.prefill_chunk = max(1, prefill_chunk)
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.grammar = grammar
        self.vocab_size = model.config.vocab_size
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[_Running] = []
        self.cache_used = 0
        one, two = model.new_cache(1, 1).nbytes(), model.new_cache(1, 2).nbytes()
        self._per_token, self._per_seq = two - one, one - (two - one)

    # ----------------------------------------------------------------------------------------------- queue
    def cache_bytes(self, prompt_len: int, max_tokens: int) -> int:
        """Bytes of the cache a sequence reserves (conv state + KV for every position it may reach)."""
        return self._per_seq + self._per_token * (prompt_len + max_tokens)

    def max_tokens_that_fit(self, prompt_len: int) -> int:
        """The most new tokens a lone sequence could reserve within the budget (for a default max_tokens)."""
        return max(0, (self.cache_budget - self._per_seq) // max(1, self._per_token) - prompt_len)

    def add(self, req: EngineRequest) -> None:
        if req.params.max_tokens is None:
            raise ValueError("EngineRequest.params.max_tokens must be set")
        self.waiting.append(req)

    def abort(self, request_id: str) -> bool:
        for r in self.waiting:
            if r.request_id == request_id:
                self.waiting.remove(r)
                return True
        for s in self.running:
            if s.req.request_id == request_id:
                self._free(s)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ----------------------------------------------------------------------------------------------- step
    @torch.inference_mode()
    def step(self) -> list[RequestDelta]:
        out: list[RequestDelta] = []
        self._admit(out)
        self._prefill(out)
        self._decode(out)
        self._sample(out)
        return out

    def fail_all(self, message: str) -> list[RequestDelta]:
        """After an unexpected error: end every request with an error, free everything, keep serving."""
        out = [RequestDelta(s.req.request_id, finish_reason="error", error=message) for s in self.running]
        out += [RequestDelta(r.request_id, finish_reason="error", error=message) for r in self.waiting]
        for s in list(self.running):
            self._free(s)
        self.waiting.clear()
        return out

    def _admit(self, out: list[RequestDelta]) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            need = self.cache_bytes(len(req.prompt_ids), req.params.max_tokens)
            if self.cache_used + need > self.cache_budget and self.running:
                return  # wait for memory; a lone request that exceeds the budget was refused at the door
            self.waiting.popleft()
            try:
                cache = self.model.new_cache(1, len(req.prompt_ids) + req.params.max_tokens)
                row = RowState(req.params, self.vocab_size, req.prompt_ids, req.top_logprobs, req.presence_penalty,
                               req.frequency_penalty, req.logit_bias,
                               req.constraint.start() if req.constraint is not None else None)
            except (RuntimeError, MemoryError, ValueError) as e:
                out.append(RequestDelta(req.request_id, finish_reason="error", error=f"cannot start: {e}"))
                continue
            stops = self.stop_chat if req.chat else self.stop_text
            seq = SeqState(req.prompt_ids, req.params, stops, req.params.max_tokens, self.tokenizer,
                       skip_special=req.params.skip_special_tokens)
            self.running.append(_Running(req, seq, cache, row, need))
            self.cache_used += need

    def _prefill(self, out: list[RequestDelta]) -> None:
        budget = self.prefill_chunk
        for s in list(self.running):
            p = s.req.prompt_ids
            if s.done_prompt >= len(p):
                continue
            n = min(len(p) - s.done_prompt, budget)
            ids = torch.tensor([p[s.done_prompt:s.done_prompt + n]], dtype=torch.long, device=self.model.device)
            try:
                logits = self.model(ids, s.cache, logits_to_keep=1)[0, -1]
            except (RuntimeError, ValueError) as e:
                out.append(self._end(s, "error", f"prefill failed: {e}"))
                continue
            s.done_prompt += n
            budget -= n
            if s.done_prompt == len(p):
                s.logits = logits
            if budget <= 0:
                return

    def _decode(self, out: list[RequestDelta]) -> None:
        batch = [s for s in self.running if s.next_token is not None]
        if not batch:
            return
        tokens = torch.tensor([s.next_token for s in batch], dtype=torch.long, device=self.model.device)
        logits = self.model.decode_many(tokens, [s.cache for s in batch])
        for i, s in enumerate(batch):
            s.next_token = None
            s.logits = logits[i]

    def _sample(self, out: list[RequestDelta]) -> None:
        ready = [s for s in self.running if s.logits is not None]
        if not ready:
            return
        logits = torch.stack([s.logits for s in ready])
        closing = [self._closing(s) for s in ready]
        tokens, records = sample_step(logits, [s.row for s in ready], closing, self.grammar)
        for s, t, rec in zip(ready, tokens, records):
            s.logits = None
            text = s.seq.push(t)
            o = s.seq.out
            d = RequestDelta(s.req.request_id, text, [t], [rec] if rec is not None else None, o.finish_reason,
                             len(s.req.prompt_ids), len(o.token_ids))
            out.append(d)
            if o.finish_reason is not None:
                self._free(s)
            else:
                s.next_token = t

    def _closing(self, s: _Running) -> bool:
        """Whether a constrained sequence must now steer to the end of its structure to fit in max_tokens."""
        c = s.row.constraint
        if c is None or c.matcher is None or self.grammar is None:
            return False
        return self.grammar.must_close(c, s.req.params.max_tokens - len(s.seq.out.token_ids))

    def _end(self, s: _Running, reason: str, error: str | None = None) -> RequestDelta:
        self._free(s)
        return RequestDelta(s.req.request_id, finish_reason=reason, error=error, prompt_tokens=len(s.req.prompt_ids),
                            completion_tokens=len(s.seq.out.token_ids))

    def _free(self, s: _Running) -> None:
        if s in self.running:
            self.running.remove(s)
            self.cache_used -= s.nbytes
        s.cache = None  # type: ignore[assignment]  # the KV memory goes back now, not at garbage collection
        s.logits = None
