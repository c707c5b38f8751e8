"""`LLMEngine`: the one engine. `LLM`, the server's engine thread, batch jobs and RL rollouts all drive this.

add_request() queues a sequence; step() schedules (scheduler + block manager), runs one forward over every scheduled
token (model runner + device backend), samples the sequences that are due (the one sampler), applies stop rules and
returns what each request produced as `RequestDelta`s. abort_request() frees a sequence's blocks and slot at once.
Not thread-safe: one thread calls everything (the server's engine thread, or `LLM` itself).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..model.lfm2 import LfmForCausalLM
from ..text import Tokenizer
from .block_manager import BlockManager
from .cache import PagedCache
from .model_runner import ModelRunner, ScheduledSeq
from .sampler import Sampler, logprob_record
from .sampling import SamplingParams
from .scheduler import Scheduler, long_prefill_chunk
from .sequence import Sequence, TokenLogprob

if TYPE_CHECKING:  # xgrammar (the `serve` extra) loads only when a request asks for structured output
    from .grammar import GrammarBackend

log = logging.getLogger("lfm.engine")


@dataclass(slots=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences running at once (= conv-state slots)
    max_num_batched_tokens: int = 2048  # tokens per step (prefill chunks + decodes)
    kv_cache_memory: int = 4 << 30  # bytes of KV blocks (+ conv snapshots); CPU pages are touched only when used
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype; torch.int8: quantized blocks
    max_model_len: int | None = None  # None: the model's, capped by what the cache can hold
    logprobs_mode: str = "raw_logprobs"  # vLLM's: or "processed_logprobs" (after temperature / filters; RL)
    # prompts longer than long_prefill_tokens are prefilled in chunks whose activations fit long_prefill_chunk_bytes
    # (scheduler.long_prefill_chunk): bounded memory at long context on CPU; 0 turns it off (never on a GPU)
    long_prefill_tokens: int = 8192
    long_prefill_chunk_bytes: int = 24 << 20
    enforce_eager: bool = False  # vLLM's name: True = no CUDA graphs for decode steps (CUDA only; CPU never captures)


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
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first delta, when asked for


class LLMEngine:
    def __init__(self, model: LfmForCausalLM, tokenizer: Tokenizer | None, stop_ids_text: set[int],
                 stop_ids_chat: set[int], config: EngineConfig | None = None,
                 grammar: GrammarBackend | None = None) -> None:
        cfg = self.config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        self.stop_text, self.stop_chat = set(stop_ids_text), set(stop_ids_chat)
        mc = model.config
        bs = cfg.block_size
        per_block = PagedCache.block_bytes(mc, bs, model.dtype, cfg.kv_cache_dtype or model.dtype,
                                           cfg.enable_prefix_caching)
        want_len = cfg.max_model_len or mc.max_position_embeddings
        num_blocks = max(1, cfg.kv_cache_memory // max(1, per_block))
        # more could never be used: every sequence at full length, + the one free block per running sequence the
        # scheduler keeps in reserve when it admits (so max_num_seqs full-length sequences are admitted, not fewer)
        num_blocks = min(num_blocks, cfg.max_num_seqs * (-(-want_len // bs) + 1) + 1)
        self.max_model_len = min(want_len, num_blocks * bs)
        if self.max_model_len < want_len:
            log.warning("the KV cache memory holds %d tokens: max_model_len lowered from %d", self.max_model_len,
                        want_len)
        # one block and one conv slot more than the block manager hands out: padding rows of a CUDA-graph decode
        # step write there (cuda_graph.py), never into a sequence's cache
        self.cache = PagedCache.allocate(mc, num_blocks + 1, bs, cfg.max_num_seqs + 1, model.dtype, model.device,
                                         cfg.kv_cache_dtype, cfg.enable_prefix_caching)
        self.block_manager = BlockManager(num_blocks, bs, cfg.max_num_seqs, cfg.enable_prefix_caching)
        long = None
        if cfg.long_prefill_tokens > 0 and model.device.type == "cpu":  # a GPU's activations are not the memory
            # that grows with context (its KV pool is allocated up front): full-budget chunks prefill faster there
            elem = torch.empty((), dtype=model.dtype).element_size()
            long = (cfg.long_prefill_tokens, long_prefill_chunk(mc, elem, cfg.long_prefill_chunk_bytes, bs,
                                                               cfg.max_num_batched_tokens))
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, long)
        self.runner = ModelRunner(model, self.cache)
        self.runner.long_prompt_tokens = long[0] if long is not None else None
        if model.device.type == "cuda" and not cfg.enforce_eager:
            self.runner.enable_decode_graphs(cfg.max_num_seqs, self.max_model_len)  # warns when it cannot
        self.sampler = Sampler(grammar, processed_logprobs=cfg.logprobs_mode == "processed_logprobs")
        self.seqs: dict[str, Sequence] = {}
        self.steps = 0

    # ---- requests -------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, chat: bool = False) -> Sequence:
        """Queue one sequence. Raises ValueError for an empty prompt, unknown token ids, or no room to generate."""
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already running")
        V = self.model.config.vocab_size
        if not prompt_ids:
            raise ValueError("prompt is empty")
        bad = [t for t in [*prompt_ids, *(params.logit_bias or {})] if not 0 <= t < V]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{V - 1})")
        room = self.max_model_len - len(prompt_ids)
        if room <= 0:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the {self.max_model_len}-token context")
        max_tokens = min(params.max_tokens or room, room)
        seq = Sequence(request_id, prompt_ids, params, self.stop_chat if chat else self.stop_text, max_tokens,
                       self.tokenizer, V)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        result = self.runner.run(scheduled)
        self.scheduler.commit(scheduled)
        self.steps += 1
        out: list[RequestDelta] = []
        for i, (first, count) in result.prompt_rows.items():
            self._prompt_logprobs(scheduled[i], result.logits, first, count)
        if not result.sample_row:
            return out
        seqs = [scheduled[i].seq for i in result.sample_row]  # the runner lists them in scheduled order
        rows = list(result.sample_row.values())
        if rows == list(range(result.logits.shape[0])):  # every row, in order (decode steps): no gather copy
            logits = result.logits
        else:
            logits = result.logits[torch.tensor(rows, device=result.logits.device)]
        try:
            tokens, records = self.sampler(logits, seqs)
        except Exception as e:  # noqa: BLE001  these sequences cannot go on; the others are untouched
            log.exception("sampling failed")
            return out + [self._end(s, "error", f"sampling failed: {type(e).__name__}: {e}") for s in seqs]
        token_bytes = self.sampler.token_bytes
        for s, t, rec in zip(seqs, tokens, records):
            if t < 0:
                out.append(self._end(s, "error", "sampling failed: the logits or the sampling parameters produced "
                                                 "NaN / inf probabilities"))
                continue
            first = len(s.token_ids) == s.num_prompt_tokens
            text = s.append(t, token_bytes(s, t) if s.constraint is not None else b"")
            if rec is not None:
                s.output_logprobs.append(rec)
            d = RequestDelta(s.request_id, text, [t], [rec] if rec is not None else None, s.finish_reason,
                             s.num_prompt_tokens, s.num_output_tokens,
                             prompt_logprobs=s.prompt_logprobs if first else None)
            out.append(d)
            if s.finish_reason is not None:
                self.scheduler.finish(s)
                self.seqs.pop(s.request_id, None)
        return out

    @torch.inference_mode()
    def score(self, prompt_ids: list[int], chunk_size: int | None = None) -> torch.Tensor:
        """Logits [T, vocab] at every position of one prompt, computed through the paged cache in chunks of
        `chunk_size` tokens (1: one token per forward, exactly the decode path; default: the step budget).
        For quality checks and benchmarks; it runs alone, so call it only while no request is in flight."""
        if self.has_unfinished_requests():
            raise RuntimeError("score() runs alone: the engine has requests in flight")
        chunk = max(1, chunk_size or self.config.max_num_batched_tokens)
        seq = self.add_request("__score__", prompt_ids, SamplingParams(max_tokens=1, prompt_logprobs=0))
        self.scheduler.waiting.remove(seq)
        bm = self.block_manager
        try:
            bm.admit(seq, [], [], 0)
            out = []
            while seq.num_computed_tokens < len(seq):
                n = min(chunk, len(seq) - seq.num_computed_tokens)
                if not bm.can_grow(seq, n):
                    raise RuntimeError("the KV cache is too small for this prompt")
                bm.grow(seq, n)
                it = ScheduledSeq(seq, n, bm.snapshot_blocks(seq, n))
                res = self.runner.run([it])
                row, k = res.prompt_rows[0]
                out.append(res.logits[row:row + k])
                bm.commit(seq, n)
            return torch.cat(out)
        finally:
            bm.free(seq)
            self.seqs.pop(seq.request_id, None)

    def _prompt_logprobs(self, it: ScheduledSeq, logits: torch.Tensor, row: int, n: int) -> None:
        """Log-probabilities of prompt tokens c+1 .. c+n (the chunk's logits predict the token after each)."""
        s = it.seq
        c = s.num_computed_tokens - it.num_tokens  # commit() already counted this step
        lp = torch.log_softmax(logits[row:row + n], -1)
        for j in range(n):
            p = c + j + 1
            if p == len(s.prompt_logprobs) and p < s.num_prompt_tokens:  # a recomputed (preempted) prompt: once
                s.prompt_logprobs.append(logprob_record(lp[j], s.token_ids[p], s.params.prompt_logprobs))

    def _end(self, s: Sequence, reason: str, error: str | None = None) -> RequestDelta:
        self.scheduler.finish(s)
        self.seqs.pop(s.request_id, None)
        s.finish_reason = reason
        return RequestDelta(s.request_id, finish_reason=reason, error=error, prompt_tokens=s.num_prompt_tokens,
                            completion_tokens=s.num_output_tokens)

    def fail_all(self, message: str) -> list[RequestDelta]:
        """After an unexpected error: end every request with an error, free everything, keep serving."""
        return [self._end(s, "error", message) for s in list(self.seqs.values())]

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {"num_running": self.num_running, "num_waiting": self.num_waiting,
                "blocks_used": bm.num_used_blocks, "blocks_free": bm.num_free_blocks, "blocks_total": bm.num_blocks,
                "prefix_cache_hit_rate": bm.hit_rate, "prefix_cache_queried_tokens": bm.queried_tokens,
                "prefix_cache_hit_tokens": bm.hit_tokens, "num_preemptions": self.scheduler.num_preemptions}
