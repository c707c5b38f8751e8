"""The CUDA backend: the step's cache writes, decode attention and short conv through lfm.kernels.triton.

It subclasses `TorchBackend` and keeps its layouts and its prefill attention (PyTorch SDPA over each prefill chunk;
flash-attn / FlexAttention could be optional fast paths later). What changes:
- K / V of every new token go to the paged cache in one `store_kv` launch (int8 quantized in the kernel).
- Decode attention is the split-K paged kernel over the block tables (no gather of whole sequences).
- The short conv is one varlen launch that reads and writes each sequence's conv slot, and `gated_short_conv`
  (used by `ShortConv.forward_step` when the backend offers it) also fuses `B*x` before and `C*` after the conv.
- The model's optional hooks `add_rms_norm` (residual add + RMSNorm) and `qk_norm_rope` (per-head norm + RoPE) are
  one kernel each; `moe_experts` runs an MoE layer's experts as two grouped GEMMs (grouped_moe.py).
`make_backend` picks it for CUDA devices when triton imports. On CPU tensors it works only under Triton's interpreter
(`TRITON_INTERPRET=1` set before triton is imported), which is how tests check it end to end without a GPU.
"""

from __future__ import annotations

import torch

from ..kernels.triton import grouped_gemm, paged_decode_attention, rms_norm, rope_qknorm, short_conv, store_kv
from ..model.lfm2 import Experts, RMSNorm
from .backend import StepBatch, TorchBackend
from .grouped_moe import grouped_experts, grouped_mm_supported


class TritonBackend(TorchBackend):
    """Triton kernels for the cache-touching ops; `TorchBackend` for the rest (prefill attention, begin)."""

    graph_capturable = True  # decode reads each sequence's own blocks only; no host sync anywhere in the step

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        c = self.cache
        store_kv(k, v, c.k[layer], c.v[layer], self.batch.slot_mapping, c.k_scale.get(layer), c.v_scale.get(layer))

    def decode_attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        b, c = self.batch, self.cache
        return paged_decode_attention(q, c.k[layer], c.v[layer], b.block_tables, b.decode_lens, self.scale,
                                      c.k_scale.get(layer), c.v_scale.get(layer))

    def bind(self, batch: StepBatch, query_start: torch.Tensor | None = None) -> None:
        super().bind(batch)  # query_start on the device once per step, shared by every conv layer
        self._qs = query_start if query_start is not None else torch.tensor(
            batch.query_start, dtype=torch.int32, device=batch.conv_slots.device)

    def _snapshot(self, layer: int, bx: torch.Tensor | None = None, bcx: torch.Tensor | None = None) -> None:
        """Prefix caching: the conv states at block ends inside this chunk, taken before the kernel moves the slots
        on. Snapshot rows index [the S old states' rows, then the chunk's conv inputs] (as TorchBackend.short_conv
        gathers them); the inputs B*x are formed for those rows only when the conv is fused (bcx = B, C, x)."""
        b, c = self.batch, self.cache
        conv = c.conv[c.conv_index[layer]]
        K, L1 = b.snap_rows.shape
        if L1 == 0:  # a kernel-1 conv keeps no state
            return
        flat = b.snap_rows.reshape(-1)
        base = b.conv_slots.shape[0] * L1
        at = (flat - base).clamp(min=0)
        if bcx is not None:
            D = bcx.shape[1] // 3
            u = (bcx[at, :D] * bcx[at, 2 * D:]).to(conv.dtype)
        else:
            u = bx[at].to(conv.dtype)
        if base:
            states = conv[b.conv_slots].flatten(0, 1)
            u = torch.where((flat >= base)[:, None], u, states[flat.clamp(max=base - 1)])
        c.conv_snap[c.conv_index[layer]][b.snap_blocks] = u.view(K, L1, -1)

    def short_conv(self, layer: int, bx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, c = self.batch, self.cache
        if b.snap_rows is not None:
            self._snapshot(layer, bx=bx)
        return short_conv(bx, weight, bias, c.conv[c.conv_index[layer]], self._qs, b.conv_slots)

    def gated_short_conv(self, layer: int, bcx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                         ) -> torch.Tensor:
        """bcx = in_proj output [N, 3D] (B, C, x) -> C * conv(B * x), the conv state updated: one launch."""
        b, c = self.batch, self.cache
        if b.snap_rows is not None:
            self._snapshot(layer, bcx=bcx)
        return short_conv(bcx, weight, bias, c.conv[c.conv_index[layer]], self._qs, b.conv_slots, gated=True)

    # ---- hooks the model uses when present (lfm.model.lfm2: Block / Attention.forward_step) ------------------------
    def add_rms_norm(self, h: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(h + residual), h + residual); without a residual, (norm(h), h)."""
        if residual is None:
            return rms_norm(h, norm.weight, norm.eps), h
        return rms_norm(h, norm.weight, norm.eps, residual)

    def moe_experts(self, experts: Experts, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """An MoE layer's experts as two grouped GEMMs (grouped_moe.py): torch._grouped_mm where it runs for these
        weights, else the Triton grouped GEMM; experts of another kind (quantized) keep their own forward."""
        if not isinstance(experts, Experts):
            return experts(x, idx, weight)
        if grouped_mm_supported(x.dtype, x.device):
            return grouped_experts(experts, x, idx, weight)
        return grouped_experts(experts, x, idx, weight, mm=grouped_gemm)

    def qk_norm_rope(self, x: torch.Tensor, norm: RMSNorm, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """rope(norm(x)) for x [N, heads, head_dim] (q or k), with the step's cos / sin [N, head_dim]."""
        return rope_qknorm(x, norm.weight, rope[0], rope[1], norm.eps)
