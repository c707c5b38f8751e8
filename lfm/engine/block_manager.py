"""Paged KV bookkeeping: fixed-size blocks, a block table per sequence, one conv-state slot per running sequence,
and prefix caching (nano-vllm's block manager, plus what a hybrid model needs).

The tensors live in `cache.PagedCache`; this file only decides which block and which slot each sequence uses, so it
is plain Python, fast to reason about and to fuzz. A sequence takes blocks as it grows (nothing is reserved up front).

Prefix caching: when a block fills with computed tokens it gets a chained hash (hash of the previous block's hash
and its own token ids) and is registered; a new sequence whose leading full blocks hash the same shares them (a
reference count per block) and skips computing them. A conv layer's state cannot be rebuilt from KV, so the model
runner stores a snapshot of every conv layer's state at the end of each block that fills (vLLM's "align" mode), and
a hit lands only on a block boundary: the sequence's conv slot starts from the snapshot of its last hit block. A
block whose last user leaves stays cached (reference 0, "evictable") until its memory is needed, least recently
freed first; never-used blocks are handed out first, lowest id first, so the pool's pages are touched as it fills.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from .sequence import Sequence


def block_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_slots: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1 or num_slots < 1:
            raise ValueError("the cache needs at least one block and one conv slot")
        self.num_blocks, self.block_size, self.num_slots = num_blocks, block_size, num_slots
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks  # registered blocks only
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks  # to confirm a hash match
        self.cached: dict[int, int] = {}  # hash -> block
        self.clean: list[int] = list(range(num_blocks))  # free and unhashed (a heap: lowest id first)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, least recently freed first
        self.free_slots: list[int] = list(range(num_slots))  # a heap
        self.queried_tokens = 0  # prefix-cache statistics over admissions
        self.hit_tokens = 0

    # ---- state ----------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.clean) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- admission --------------------------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """(blocks, hashes) of the longest cached run of seq's leading full blocks, leaving at least one token to
        compute (its logits are the ones to sample)."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return [], []  # prompt log-probabilities need every prompt position computed (as in vLLM)
        bs, blocks, hashes, prev = self.block_size, [], [], None
        for k in range((len(seq) - 1) // bs):
            tokens = tuple(seq.token_ids[k * bs:(k + 1) * bs])
            h = block_hash(prev, tokens)
            b = self.cached.get(h)
            if b is None or self.tokens_of[b] != tokens:
                break
            blocks.append(b)
            hashes.append(h)
            prev = h
        return blocks, hashes

    def can_admit(self, hit: list[int], num_tokens: int, reserve: int = 0) -> bool:
        """Whether a waiting sequence whose cached prefix is `hit` can start computing `num_tokens` more, leaving
        `reserve` blocks free for the running sequences' growth, and whether a conv slot is free."""
        if not self.free_slots:
            return False
        need = self.blocks_for(len(hit) * self.block_size + num_tokens) - len(hit)
        reused = sum(1 for b in hit if self.ref[b] == 0)  # cached but free: taking them uses free blocks
        return need + reused + reserve <= self.num_free_blocks

    def admit(self, seq: Sequence, hit: list[int], hashes: list[int], num_tokens: int) -> None:
        """Give a waiting sequence its cached prefix, blocks for `num_tokens` more, and a conv slot."""
        assert not seq.block_table and seq.conv_slot < 0, "admitting a sequence that holds cache"
        for b in hit:
            if self.ref[b] == 0:
                del self.evictable[b]
            self.ref[b] += 1
        seq.block_table = list(hit)
        seq.block_hashes = list(hashes)
        seq.num_computed_tokens = len(hit) * self.block_size
        seq.conv_slot = heapq.heappop(self.free_slots)
        seq.conv_restore = hit[-1] if hit else -1
        if self.enable_prefix_caching and seq.params.prompt_logprobs is None and not seq.num_preemptions:
            self.queried_tokens += len(seq)  # first admissions only: a recomputed sequence would count twice
            self.hit_tokens += seq.num_computed_tokens
        self.grow(seq, num_tokens)

    # ---- growth -------------------------------------------------------------------------------------------------
    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(seq.num_computed_tokens + num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make seq's block table cover `num_tokens` more computed tokens."""
        need = self.blocks_for(seq.num_computed_tokens + num_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            raise RuntimeError("out of KV blocks (the scheduler should have preempted)")
        for _ in range(need):
            b = self._take()
            self.ref[b] = 1
            seq.block_table.append(b)

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        """After a step computed `num_tokens` of seq: count them, and register the blocks they filled."""
        seq.num_computed_tokens += num_tokens
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for k in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = tuple(seq.token_ids[k * bs:(k + 1) * bs])
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            b = seq.block_table[k]
            if h not in self.cached and self.hash_of[b] is None:  # a twin computed in the same step keeps its own
                self.cached[h], self.hash_of[b], self.tokens_of[b] = b, h, tokens

    def snapshot_blocks(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """(tokens computed so far, block) for every block that computing `num_tokens` more of seq fills: the
        model runner stores the conv state there, so a later prefix hit can start from it."""
        if not self.enable_prefix_caching:
            return []
        bs, c = self.block_size, seq.num_computed_tokens
        return [((k + 1) * bs, seq.block_table[k]) for k in range(c // bs, (c + num_tokens) // bs)]

    # ---- release ------------------------------------------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Give back seq's blocks (cached ones stay cached, tail first in eviction order) and its slot."""
        for b in reversed(seq.block_table):
            self.ref[b] -= 1
            assert self.ref[b] >= 0, "block freed twice"
            if self.ref[b] == 0:
                if self.hash_of[b] is not None:
                    self.evictable[b] = None
                else:
                    heapq.heappush(self.clean, b)
        if seq.conv_slot >= 0:
            heapq.heappush(self.free_slots, seq.conv_slot)
        seq.block_table, seq.block_hashes, seq.conv_slot, seq.conv_restore = [], [], -1, None
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (e.g. after the weights change). Refused (False) while any block is in use:
        running sequences would go on registering blocks computed with the old state (vLLM refuses too)."""
        if self.num_used_blocks:
            return False
        while self.evictable:
            heapq.heappush(self.clean, self._evict())
        return True

    def _take(self) -> int:
        if self.clean:
            return heapq.heappop(self.clean)
        return self._evict()

    def _evict(self) -> int:
        b, _ = self.evictable.popitem(last=False)
        del self.cached[self.hash_of[b]]
        self.hash_of[b] = self.tokens_of[b] = None
        return b

    def check(self, running: list[Sequence] = ()) -> None:
        """Invariants (tests): every block is referenced, clean or evictable, exactly once; refs = table entries."""
        refs = [0] * self.num_blocks
        for s in running:
            for b in s.block_table:
                refs[b] += 1
        assert refs == self.ref, "reference counts differ from the block tables"
        free = set(self.clean) | set(self.evictable)
        assert len(free) == len(self.clean) + len(self.evictable), "a block is free twice"
        assert all(self.ref[b] == 0 for b in free), "a free block is referenced"
        assert len(free) + sum(1 for r in self.ref if r) == self.num_blocks, "a block is lost"
        assert all(self.hash_of[b] is not None for b in self.evictable), "an evictable block has no hash"
        assert all(self.hash_of[b] == h for h, b in self.cached.items()), "hash table out of sync"
        slots = [s.conv_slot for s in running]
        assert len(set(slots)) == len(slots) and not set(slots) & set(self.free_slots), "a conv slot is shared"
        assert len(slots) + len(self.free_slots) == self.num_slots, "a conv slot is lost"
