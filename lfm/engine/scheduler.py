"""The scheduler: which sequences compute how many tokens in the next step (vLLM v1's rule, nano-vllm's shape).

Every sequence owes the model `len(tokens) - num_computed_tokens` tokens: a whole prompt at first, one token per
decode, everything again after a preemption. Each step has a token budget (`max_num_batched_tokens`):
1. running sequences first: decodes (1 token each), then unfinished prompts, oldest first, each the next chunk of
   whatever budget is left, so a long prompt never stalls running decodes and chunks of several prompts and the
   decodes share one forward;
2. then waiting sequences, first come first served, while the budget, the conv slots (`max_num_seqs`) and free KV
   blocks allow; a prefix-cache hit makes their first chunk start at the hit.
Blocks are taken as sequences grow. When a running sequence needs a block and none is free, the newest running
sequence is preempted (its blocks and slot are freed, it goes back to the front of the waiting queue, and it will be
recomputed from its tokens: its output is unchanged); nothing new is admitted in such a step.

Long prompts (more than `long_prefill_tokens`) are prefilled in chunks sized by a byte budget for the step's
activations (`long_prefill_chunk`), not by the token budget: at 32K tokens the KV cache already holds most of the
memory, and a 2,048-token chunk's feed-forward activations would add ~100 MiB to the peak for nothing (attention
dominates the time there, so smaller chunks cost little).
"""

from __future__ import annotations

from collections import deque

from ..model.config import LfmConfig
from .block_manager import BlockManager
from .model_runner import ScheduledSeq
from .sequence import Sequence, SequenceStatus


def long_prefill_chunk(config: LfmConfig, elem_bytes: int, budget_bytes: int, block_size: int, most: int) -> int:
    """Tokens per prefill chunk whose activations fit `budget_bytes`: per token ~2 feed-forward widths (the gate's
    and the up projection's outputs live together) + 4 hidden vectors, of `elem_bytes` each; whole blocks, at least
    one block, at most `most` tokens."""
    width = config.ff_dim if not config.is_moe or config.num_dense_layers else 0
    if config.is_moe:
        width = max(width, config.num_experts_per_tok * config.moe_intermediate_size)
    per_token = elem_bytes * (2 * width + 4 * config.hidden_size)
    return max(block_size, min(most, budget_bytes // per_token // block_size * block_size))


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill: tuple[int, int] | None = None) -> None:
        """long_prefill: (long_prefill_tokens, chunk): prompts longer than the first are prefilled `chunk` tokens
        at a time at most."""
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.bm = block_manager
        # more running sequences than tokens per step would leave some without a decode slot every step
        self.max_num_seqs = min(max_num_seqs, block_manager.num_slots, max_num_batched_tokens)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill = long_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        bm, budget = self.bm, self.max_num_batched_tokens
        out: dict[int, ScheduledSeq] = {}  # id(seq) -> its share of this step
        preempted = False
        bs, caching = bm.block_size, bm.enable_prefix_caching
        for seq in sorted(self.running, key=lambda s: len(s.token_ids) - s.num_computed_tokens > 1):  # decodes first
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted by an earlier one in this loop
            c, table = seq.num_computed_tokens, seq.block_table
            if len(seq.token_ids) - c == 1 and c < len(table) * bs:
                # the common step: a decode inside its last block (no block to take; at a 1,024-sequence decode
                # step this path is most of the host's time): what the general path below computes, inlined
                out[id(seq)] = ScheduledSeq(seq, 1, [(c + 1, table[c // bs])] if caching and (c + 1) % bs == 0 else [])
                budget -= 1
                continue
            n = min(len(seq) - seq.num_computed_tokens, budget, self._chunk(seq))
            while not bm.can_grow(seq, n):
                victim = self.running[-1]  # the newest yields
                self.preempt(victim)
                preempted = True
                gone = out.pop(id(victim), None)
                if gone is not None:
                    budget += gone.num_tokens
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out[id(seq)] = self._take(seq, n)
                budget -= n
        scheduled = list(out.values())
        if preempted:
            return scheduled
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit, hashes = bm.match_prefix(seq)
            n = min(len(seq) - len(hit) * bm.block_size, budget, self._chunk(seq))
            # keep one free block per running sequence, so admitting does not force an immediate preemption
            if not bm.can_admit(hit, n, reserve=len(self.running)):
                break
            self.waiting.popleft()
            bm.admit(seq, hit, hashes, 0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._take(seq, n))
            budget -= n
        return scheduled

    def _chunk(self, seq: Sequence) -> int:
        """The most tokens seq may compute in one step (its prefill chunk cap)."""
        lp = self.long_prefill
        return lp[1] if lp is not None and seq.num_prompt_tokens > lp[0] else self.max_num_batched_tokens

    def _take(self, seq: Sequence, n: int) -> ScheduledSeq:
        self.bm.grow(seq, n)
        return ScheduledSeq(seq, n, self.bm.snapshot_blocks(seq, n))

    def commit(self, scheduled: list[ScheduledSeq]) -> None:
        """After the step ran: the tokens are computed (and full blocks registered for prefix caching)."""
        for it in scheduled:
            if it.seq.status is SequenceStatus.RUNNING:
                self.bm.commit(it.seq, it.num_tokens)

    def preempt(self, seq: Sequence) -> None:
        """Free seq's cache and queue it first to be recomputed (by recompute: vLLM v1's only mode)."""
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """A finished or aborted sequence gives back its blocks and slot at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
