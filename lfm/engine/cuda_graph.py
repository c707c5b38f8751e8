"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured once, fed through static buffers.

A decode step (every sequence brings one token) launches hundreds of small kernels; at serving batch sizes on a GPU
the launches, not the math, set the step time. So the whole `forward_step` of a decode batch is captured once per
bucket (1, 2, 4, 8, then every 16 up to 256, then every 32: vLLM / nano-vllm's scheme) and replayed: a step copies
its token ids, positions, KV slots, block tables, context lengths and conv slots into static device buffers, replays
the smallest bucket that holds it, and reads the first S rows of the static logits.

Padding rows (S < bucket) must not touch real state: they write their K / V to a scratch block and their conv state
to a scratch slot, both allocated past what the block manager hands out (`LLMEngine`: one extra block, one extra
slot), and attend over one position of the scratch block. Everything the kernels need per step lives in device
memory (no shapes or lengths from the host change between replays: the paged attention grid depends on the bucket
only), and nothing inside the forward synchronises with the host; an MoE model qualifies only through the backend's
grouped expert GEMM (`moe_experts`: no per-expert host loop).

Work outside the graph, per step: a first decode of a sequence zeroes / restores its conv slot, and a token that
ends a block snapshots its conv state for prefix caching (after the replay; the slot then holds that state).
`capture=False` runs the same static-buffer path eagerly: how CPU tests check the padding and the bookkeeping.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..model.lfm2 import LfmForCausalLM
from .backend import StepBatch, TorchBackend
from .cache import PagedCache

log = logging.getLogger("lfm.engine")


def buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, 16, 32, ... 256, 288, 320, ...; the last one holds max_num_seqs."""
    out = [1, 2, 4, 8] + list(range(16, 257, 16))
    while out[-1] < max_num_seqs:
        out.append(out[-1] + 32)
    return [b for b in out if b < max_num_seqs] + [next(b for b in out if b >= max_num_seqs)]


@dataclass(slots=True)
class _Row:
    """What a row of the static block table holds, so an unchanged row is not rewritten. A sequence's block table
    only grows by appends and is a new list after a preemption (BlockManager), so (the list, its length) names
    the content; the list is held, so its identity cannot be reused by another."""
    table: list[int] | None = None
    num_blocks: int = 0


class DecodeGraphs:
    def __init__(self, model: LfmForCausalLM, backend: TorchBackend, cache: PagedCache, max_num_seqs: int,
                 max_model_len: int, capture: bool) -> None:
        self.model, self.backend, self.cache = model, backend, cache
        self.sizes = buckets(max_num_seqs)
        B, bs, dev = self.sizes[-1], cache.block_size, model.device
        self.max_blocks = -(-max_model_len // bs)
        self.scratch_block = cache.num_blocks - 1  # past the block manager's blocks (LLMEngine allocates one more)
        self.scratch_slot = cache.conv.shape[1] - 1  # likewise one conv slot more than max_num_seqs
        L1 = model.config.conv_L_cache - 1
        pin = dev.type == "cuda"
        # host mirrors (pinned on CUDA: asynchronous copies) and their device twins; rows past a step's S are padding
        self.h_long = torch.zeros(4, B, dtype=torch.long, pin_memory=pin)  # ids, positions, KV slots, conv slots
        self.h_lens = torch.ones(B, dtype=torch.int32, pin_memory=pin)
        self.h_tables = torch.full((B, self.max_blocks), self.scratch_block, dtype=torch.int32, pin_memory=pin)
        self._pad(0, B)
        self.d_long = self.h_long.to(dev)
        self.d_lens, self.d_tables = self.h_lens.to(dev), self.h_tables.to(dev)
        self.d_qs = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.rows = [_Row() for _ in range(B)]
        self.batches = {b: self._static_batch(b, L1) for b in self.sizes}
        self.steps = self.replays = 0  # decode steps through this path, and how many replayed a graph (benchmarks)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: torch.Tensor | None = None  # [B, vocab]: every graph copies its logits here (one buffer, not
        # one per bucket: ~2 GiB at 1,024 sequences and a 64K vocabulary)
        if capture:
            self.capture()

    def _pad(self, a: int, e: int) -> None:
        """Host rows a..e-1 become padding: token 0 at position 0, K / V into the scratch block, the scratch slot."""
        self.h_long[:, a:e] = 0
        self.h_long[2, a:e] = self.scratch_block * self.cache.block_size
        self.h_long[3, a:e] = self.scratch_slot
        self.h_lens[a:e] = 1

    def _static_batch(self, b: int, L1: int) -> StepBatch:
        """The bucket's batch: views of the static buffers, and the decode's conv gather rows (a function of b)."""
        dev = self.d_long.device
        s = torch.arange(b, device=dev)
        j = torch.arange(L1 + 1, device=dev)
        # rows = [b states of L1 rows, then the b new inputs]: tap j of token s is state row j, the last tap its input
        taps = torch.where(j[None] < L1, s[:, None] * L1 + j[None], b * L1 + s[:, None])
        state_rows = torch.where(j[None, :L1] + 1 < L1, s[:, None] * L1 + 1 + j[None, :L1], b * L1 + s[:, None])
        return StepBatch(positions=self.d_long[1, :b], slot_mapping=self.d_long[2, :b], query_start=list(range(b + 1)),
                         context_lens=[1] * b, num_decodes=b, block_tables=self.d_tables[:b],
                         decode_lens=self.d_lens[:b], prefill_blocks=[], conv_slots=self.d_long[3, :b],
                         conv_taps=taps, conv_state_rows=state_rows, snap_rows=None, snap_blocks=None,
                         conv_zero=None, conv_restore=None)

    def _forward(self, b: int) -> torch.Tensor:
        self.backend.bind(self.batches[b], self.d_qs[:b + 1])
        try:
            return self.model.forward_step(self.d_long[0, :b], self.backend)
        finally:
            self.backend.batch = None

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.sizes if b >= n), None)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (later graphs reuse its memory pool). Each runs once eagerly before
        its capture (Triton compiles and autotunes on first launch, which capture does not allow). The padding
        rows only touch scratch memory, so capturing at startup changes no cache state that matters."""
        t0 = time.perf_counter()
        self.logits = torch.empty(self.sizes[-1], self.model.config.vocab_size, dtype=self.model.dtype,
                                  device=self.d_long.device)
        pool = None
        for b in reversed(self.sizes):
            self._forward(b)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits[:b].copy_(self._forward(b))
            pool = g.pool() if pool is None else pool
            self.graphs[b] = g
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s", len(self.sizes), self.sizes[-1],
                 time.perf_counter() - t0)

    def run(self, scheduled: list) -> torch.Tensor:
        """A decode step of S <= the largest bucket sequences -> logits [S, vocab] (float32)."""
        S = len(scheduled)
        b = self.bucket(S)
        c, bs = self.cache, self.cache.block_size
        ids, pos, slots, conv_slots = [], [], [], []
        tables, lens = self.h_tables.numpy(), self.h_lens.numpy()
        mb = 1
        for i, it in enumerate(scheduled):
            s = it.seq
            p = s.num_computed_tokens
            bt = s.block_table
            ids.append(s.token_ids[p])
            pos.append(p)
            slots.append(bt[p // bs] * bs + p % bs)
            conv_slots.append(s.conv_slot)
            row = self.rows[i]
            if row.table is not bt or row.num_blocks != len(bt):
                tables[i, :len(bt)] = bt
                row.table, row.num_blocks = bt, len(bt)
            if len(bt) > mb:
                mb = len(bt)
            if s.conv_restore is not None:  # a sequence's first step (one uncached prompt token left)
                c.start_conv(s.conv_slot, s.conv_restore)
                s.conv_restore = None
        hl = self.h_long.numpy()  # numpy views of the host mirrors: a list goes in without torch.tensor's cost
        hl[0, :S], hl[1, :S], hl[2, :S], hl[3, :S] = ids, pos, slots, conv_slots
        lens[:S] = hl[1, :S] + 1
        self._pad(S, b)
        for row in self.rows[S:b]:
            row.table = None
        tables[S:b, 0] = self.scratch_block
        self.d_long[:, :b].copy_(self.h_long[:, :b], non_blocking=True)
        self.d_lens[:b].copy_(self.h_lens[:b], non_blocking=True)
        self.d_tables[:b, :mb].copy_(self.h_tables[:b, :mb], non_blocking=True)
        self.steps += 1
        if b in self.graphs:
            self.replays += 1
            self.graphs[b].replay()
            out = self.logits[:S]
        else:
            out = self._forward(b)[:S]
        logits = out.clone() if out.dtype == torch.float32 else out.float()  # the next replay reuses the buffer
        snaps = [(it.seq.conv_slot, it.snapshots[-1][1]) for it in scheduled if it.snapshots]
        if snaps:  # these tokens ended a block: their slots now hold those blocks' conv states (one gather)
            slots_t, blocks_t = torch.tensor(snaps, device=c.conv.device).T
            c.conv_snap[:, blocks_t] = c.conv[:, slots_t]
        return logits
