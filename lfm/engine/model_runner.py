"""The model runner: one scheduled step -> one flat batch -> one forward -> logits for the rows that need them.

It owns the cache pools and the backend (chosen by device). A step's sequences each bring `num_tokens` new tokens
(a decode brings 1, a prefill chunk many); the runner lays them out flat (decodes first), computes positions, the
slot of each token's K / V, block tables, conv slots and the conv gather rows, and runs
`LfmForCausalLM.forward_step` once for all of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import kernels as _kernels
from ..model.lfm2 import LfmForCausalLM
from .backend import StepBatch, TorchBackend, make_backend
from .cache import PagedCache
from .cpu_decode import FusedDecode
from .cuda_graph import DecodeGraphs
from .sequence import Sequence

log = logging.getLogger("lfm.engine")


TRIM_AFTER_PROMPT = 4096  # prompt tokens from which the end of a prefill returns freed heap memory to the OS
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim, _libc.mallopt
        except (OSError, AttributeError):
            _libc = False
    return _libc


def trim_heap() -> None:
    """glibc's malloc_trim(0): free pages malloc keeps after big temporaries are released (no-op elsewhere)."""
    if lib := _glibc():
        lib.malloc_trim(0)


def fix_mmap_threshold(nbytes: int = 256 << 10) -> None:
    """Allocations from `nbytes` up always get their own mapping, returned to the OS when freed. glibc raises this
    threshold as big blocks are freed (up to 32 MiB), after which a long prefill's temporaries, a little larger at
    every chunk as the context grows, come from the heap and stay there: 32K tokens of prefill left ~1 GiB behind."""
    if lib := _glibc():
        lib.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD (setting it also turns glibc's dynamic adjustment off)


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed this step
    snapshots: list[tuple[int, int]] = field(default_factory=list)  # (tokens computed, block): conv snapshots

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token (so its logits give the next one)."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq)


@dataclass(slots=True)
class StepOutput:
    logits: torch.Tensor  # [M, V] float32
    sample_row: dict[int, int]  # index in the scheduled list -> its row of logits to sample from (in list order)
    prompt_rows: dict[int, tuple[int, int]]  # index -> (first row, count): logits at every new token (prompt logprobs)


class ModelRunner:
    def __init__(self, model: LfmForCausalLM, cache: PagedCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device
        c = model.config
        self.L1 = c.conv_L_cache - 1
        self.backend: TorchBackend = make_backend(self.device, cache, c.num_attention_heads, c.head_size)
        # CPU: steps of single-token decodes run as one fused C++ call where the model allows (cpu_decode.py)
        self.fused: FusedDecode | None = FusedDecode.build(model, cache) if self.device.type == "cpu" else None
        if self.device.type == "cpu":
            fix_mmap_threshold()
        self.long_prompt_tokens: int | None = None  # set by the engine: prompts above it prefill in low_memory()
        self.graphs: DecodeGraphs | None = None  # decode steps through static buffers / CUDA graphs (cuda_graph.py)

    def enable_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True) -> bool:
        """Decode steps from CUDA graphs (capture=False: the same static-buffer path, eager; tests on CPU). Needs
        the cache's scratch block and slot (LLMEngine allocates them). An MoE model qualifies only when the
        backend groups its experts without a host sync (`moe_experts`, as TritonBackend). Returns whether the
        path is on."""
        from ..model.lfm2 import MoE

        why = None
        if capture and not self.backend.graph_capturable:  # e.g. CUDA without triton: the portable backend
            why = "CUDA graphs need the Triton backend (the `gpu` extra: triton; block size a power of two)"
        elif any(isinstance(m, MoE) for m in self.model.modules()) and not hasattr(self.backend, "moe_experts"):
            why = "this backend runs MoE experts with a host loop, which a CUDA graph cannot hold"
        if why:
            log.warning("decode steps run eagerly: %s", why)
            return False
        try:
            self.graphs = DecodeGraphs(self.model, self.backend, self.cache, max_num_seqs, max_model_len, capture)
        except RuntimeError as e:  # a capture the driver refused: serve eagerly (slower) rather than not at all
            if not capture:
                raise
            self.graphs = None
            log.warning("CUDA graph capture failed, decode steps run eagerly: %s", (str(e).splitlines() or [""])[0])
            return False
        return True

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, StepBatch]:
        bs, L1, dev = self.cache.block_size, self.L1, self.device
        S = len(scheduled)
        ids: list[int] = []
        pos: list[int] = []  # decodes' (one token each: plain ints are cheapest)
        slots: list[int] = []
        pos_parts: list[np.ndarray] = []  # prefill chunks' (thousands of tokens a step: numpy, not a Python loop)
        slot_parts: list[np.ndarray] = []
        qs, lens = [0], []
        for it in scheduled:
            s, n = it.seq, it.num_tokens
            c0 = s.num_computed_tokens
            ids += s.token_ids[c0:c0 + n]
            table = s.block_table
            if n == 1:
                pos.append(c0)
                slots.append(table[c0 // bs] * bs + c0 % bs)
            else:
                p = np.arange(c0, c0 + n)
                b0 = c0 // bs
                blocks = np.asarray(table[b0:(c0 + n - 1) // bs + 1], dtype=np.int64)
                pos_parts.append(p)
                slot_parts.append(blocks[p // bs - b0] * bs + p % bs)
            qs.append(qs[-1] + n)
            lens.append(c0 + n)
        nd = 0
        while nd < S and scheduled[nd].num_tokens == 1:
            nd += 1
        mb = max((len(it.seq.block_table) for it in scheduled[:nd]), default=0)
        tables_np = np.zeros((nd, max(mb, 1)), dtype=np.int32)
        for i, it in enumerate(scheduled[:nd]):
            tables_np[i, :len(it.seq.block_table)] = it.seq.block_table
        tables = torch.from_numpy(tables_np)
        pos_np = np.concatenate([np.asarray(pos, dtype=np.int64), *pos_parts])
        slots_np = np.concatenate([np.asarray(slots, dtype=np.int64), *slot_parts])
        prefill_blocks = [torch.tensor(it.seq.block_table[:-(-(lens[nd + j]) // bs)], dtype=torch.long, device=dev)
                          for j, it in enumerate(scheduled[nd:])]

        # conv gather rows: the S states' L-1 rows come first, then the N new inputs
        N = qs[-1]
        qs_t = torch.tensor(qs)
        n_t = qs_t[1:] - qs_t[:-1]
        seq_of = torch.repeat_interleave(torch.arange(S), n_t)
        t = torch.arange(N)
        local = t - qs_t[:-1][seq_of]
        base = S * L1

        def rows(s: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:  # rel: position relative to the chunk start
            return torch.where(rel >= 0, base + qs_t[:-1][s] + rel, s * L1 + L1 + rel)

        j = torch.arange(L1 + 1)
        taps = rows(seq_of[:, None], local[:, None] - L1 + j[None])
        sidx = torch.arange(S)
        state_rows = rows(sidx[:, None], n_t[:, None] - L1 + j[None, :L1])
        snap_s, snap_end, snap_b = [], [], []
        for i, it in enumerate(scheduled):
            for done, blk in it.snapshots:
                snap_s.append(i)
                snap_end.append(done - it.seq.num_computed_tokens)
                snap_b.append(blk)
        snap_rows = snap_blocks = None
        if snap_s:
            snap_rows = rows(torch.tensor(snap_s)[:, None], torch.tensor(snap_end)[:, None] - L1 + j[None, :L1])
            snap_blocks = torch.tensor(snap_b)
        zero = [it.seq.conv_slot for it in scheduled if it.seq.conv_restore == -1]
        restore = [(it.seq.conv_slot, it.seq.conv_restore) for it in scheduled
                   if it.seq.conv_restore is not None and it.seq.conv_restore >= 0]
        for it in scheduled:
            it.seq.conv_restore = None  # done once, by this step
        to = lambda x: None if x is None else x.to(dev)  # noqa: E731
        batch = StepBatch(
            positions=torch.from_numpy(pos_np).to(dev), slot_mapping=torch.from_numpy(slots_np).to(dev),
            query_start=qs, context_lens=lens, num_decodes=nd, block_tables=tables.to(dev),
            decode_lens=torch.tensor(lens[:nd], dtype=torch.int32, device=dev), prefill_blocks=prefill_blocks,
            conv_slots=torch.tensor([it.seq.conv_slot for it in scheduled], device=dev), conv_taps=taps.to(dev),
            conv_state_rows=state_rows.to(dev), snap_rows=to(snap_rows), snap_blocks=to(snap_blocks),
            conv_zero=torch.tensor(zero, device=dev) if zero else None,
            conv_restore=(torch.tensor([r[0] for r in restore], device=dev),
                          torch.tensor([r[1] for r in restore], device=dev)) if restore else None)
        return torch.from_numpy(np.fromiter(ids, dtype=np.int64, count=len(ids))).to(dev), batch

    @torch.inference_mode()
    def run_fused(self, scheduled: list[ScheduledSeq]) -> StepOutput:
        """A step of single-token decodes through the fused CPU step (same cache, same results as `forward_step`)."""
        bs, c = self.cache.block_size, self.cache
        ids, pos, slots, conv_slots, snaps, tables = [], [], [], [], [], []
        for it in scheduled:
            s = it.seq
            p = s.num_computed_tokens
            ids.append(s.token_ids[p])
            pos.append(p)
            slots.append(s.block_table[p // bs] * bs + p % bs)
            conv_slots.append(s.conv_slot)
            snaps.append(it.snapshots[-1][1] if it.snapshots else -1)  # the state after this token ends a block
            tables.append(s.block_table)
            if s.conv_restore is not None:  # a sequence's first step (one uncached prompt token left)
                c.start_conv(s.conv_slot, s.conv_restore)
                s.conv_restore = None
        logits = self.fused.step(ids, pos, slots, conv_slots, snaps, tables)
        return StepOutput(logits, {i: i for i in range(len(scheduled))}, {})

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> StepOutput:
        """Run one step. `scheduled` must list sequences with one new token first (the scheduler's order is kept
        by sorting here); the returned indices refer to the sorted order, which is also written back."""
        scheduled.sort(key=lambda it: it.num_tokens != 1)  # stable: decodes first
        decode_only = all(it.num_tokens == 1 and not (it.seq.params.prompt_logprobs is not None
                                                      and it.seq.num_computed_tokens < it.seq.num_prompt_tokens)
                          for it in scheduled)
        if decode_only and self.graphs is not None and len(scheduled) <= self.graphs.sizes[-1]:
            return StepOutput(self.graphs.run(scheduled), {i: i for i in range(len(scheduled))}, {})
        if decode_only and self.fused is not None and self.fused.applies(len(scheduled)):
            return self.run_fused(scheduled)
        ids, batch = self.prepare(scheduled)
        keep: list[int] = []
        sample_row: dict[int, int] = {}
        prompt_rows: dict[int, tuple[int, int]] = {}
        for i, it in enumerate(scheduled):
            a, e = batch.query_start[i], batch.query_start[i + 1]
            if it.seq.params.prompt_logprobs is not None and it.seq.num_computed_tokens < it.seq.num_prompt_tokens:
                prompt_rows[i] = (len(keep), e - a)
                keep.extend(range(a, e))
                if it.samples:
                    sample_row[i] = len(keep) - 1
            elif it.samples:
                sample_row[i] = len(keep)
                keep.append(e - 1)
        self.backend.begin(batch)
        long = self.long_prompt_tokens is not None and self.device.type == "cpu" and any(
            it.seq.num_prompt_tokens > self.long_prompt_tokens and it.seq.num_computed_tokens < it.seq.num_prompt_tokens
            for it in scheduled)
        try:  # a long prompt's prefill: no dequantized weight copies (bounded memory at long context)
            with _kernels.low_memory(long):
                logits = self.model.forward_step(ids, self.backend,
                                                 torch.tensor(keep, dtype=torch.long, device=self.device))
        finally:
            self.backend.batch = None
        if self.device.type == "cpu" and any(it.samples and it.seq.num_prompt_tokens >= TRIM_AFTER_PROMPT
                                             and it.seq.num_computed_tokens < it.seq.num_prompt_tokens
                                             for it in scheduled):
            trim_heap()  # a long prefill ended: its chunks' activations go back to the OS, not kept by malloc
        return StepOutput(logits.float(), sample_row, prompt_rows)
