"""The CPU backend's fused decode step: a step whose sequences all bring one new token runs as one C++ call.

`LfmForCausalLM.forward_step` is the engine's general forward (prefill chunks, mixed batches, any device). For the
steps that dominate edge use — every running sequence decoding one token — its ~300 small PyTorch ops and an OpenMP
fork/join per kernel cost a third of a 350M int4 token on a 2-core CPU. `FusedDecode` hands those steps to
`lfm.kernels`' `DecodePlan` (lfm/kernels/decode.cpp): every layer in one parallel region over preallocated buffers,
the same GEMV kernels, the same paged cache and conv slots, the same rounding points (see decode.cpp's header).

`FusedDecode.build` returns None — and the model runner keeps the general path — wherever the plan does not apply:
kernels unavailable or `LFM_FUSED_DECODE=0`, a float32 model without quantization, a MoE model with float32
activations or unquantized experts, biases on the projections, LoRA / other wrapped linears. MoE layers (router,
top-k, the chosen experts' int4 / int8 GEMVs, the weighted sum) run inside the same step. The model is read, never changed: the plan holds its tensors.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import kernels as _kernels
from ..model.lfm2 import LfmForCausalLM, MLP, MoE
from ..model.quant import Int4Linear, Int8Linear, QuantExperts
from .cache import PagedCache

# rows (sequences) per fused step: beyond it the kernels' per-row cost grows and the general path (which on CPUs
# with native bfloat16 switches to dequantized weights + oneDNN at kernels.DEQUANT_ROWS rows) is as good
MAX_ROWS = 64
assert MAX_ROWS < _kernels.AMX_EXPERT_MIN_ROWS <= _kernels.AMX_DEQUANT_ROWS  # see kernels.AMX_EXPERT_MIN_ROWS


def _linear(plan, m: nn.Module, dtype: torch.dtype) -> int | None:
    """Register one projection with the plan; None if the plan cannot run it."""
    if isinstance(m, Int4Linear):
        if m.scales.dtype != dtype:
            return None
        return plan.add_linear(1, m.qweight, m.scales, m.zeros, m.group_size)
    if isinstance(m, Int8Linear):
        if m.scales.dtype != dtype:
            return None
        e = torch.empty(0)
        return plan.add_linear(0, m.weight, m.scales, e, 0)
    if isinstance(m, nn.Linear) and type(m).__name__ in ("Linear", "Bf16Linear") and m.bias is None \
            and m.weight.dtype == torch.bfloat16 and dtype == torch.bfloat16 and m.weight.is_contiguous():
        e = torch.empty(0)
        return plan.add_linear(2, m.weight.detach(), e, e, 0)
    return None


_lanes: int | None = None


def sum_lanes() -> int:
    """The vector width (8 or 16 floats) of ATen's float32 sum kernel on this CPU and torch build: the fused step sums
    RMSNorm statistics in the same order (decode.cpp, aten_sum). Measured once against torch.sum."""
    global _lanes
    if _lanes is None:
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(n, generator=g) * 3 for n in (64, 256, 1024, 2048, 4608) for _ in range(4)]
        _lanes = 8
        for w in (8, 16):
            if all(_emulated_sum(x.pow(2), w) == x.pow(2).sum().item() for x in xs):
                _lanes = w
                break
    return _lanes


def _emulated_sum(x: torch.Tensor, w: int) -> float:
    """aten_sum's order in Python float32 arithmetic (numpy), to pick the width."""
    import numpy as np

    f32, v = np.float32, x.numpy().astype(np.float32)
    n = len(v)
    nv = n // w
    size = nv // 4
    lp = max(4, (0 if size <= 1 else (size - 1).bit_length()) // 4)
    step, mask = 1 << lp, (1 << lp) - 1
    acc = np.zeros((4, 4, w), np.float32)
    vec = lambda e: v[e * w:(e + 1) * w]  # noqa: E731
    i = 0
    while i + step <= size:
        for j in range(step):
            for k in range(4):
                acc[0, k] += vec((i + j) * 4 + k)
        i += step
        for lv in range(1, 4):
            for k in range(4):
                acc[lv, k] += acc[lv - 1, k]
                acc[lv - 1, k] = 0
            if i & (mask << (lv * lp)):
                break
    for i in range(i, size):
        for k in range(4):
            acc[0, k] += vec(i * 4 + k)
    for lv in range(1, 4):
        for k in range(4):
            acc[0, k] += acc[lv, k]
    for e in range(size * 4, nv):
        acc[0, 0] += vec(e)
    for k in range(1, 4):
        acc[0, 0] += acc[0, k]
    fin = f32(0)
    for e in range(nv * w, n):
        fin = f32(fin + v[e])
    for lane in range(w):
        fin = f32(fin + acc[0, 0, lane])
    return float(fin)


def _add_moe(plan, f: MoE, norm: torch.Tensor, lin) -> bool:
    """Register a MoE feed-forward: the router and every expert's two matrices (views into the stacks, not copies).
    Quantized experts only (QuantExperts); False where the plan cannot run it."""
    ex = f.experts
    if not isinstance(ex, QuantExperts):
        return False
    gate = lin(f.gate)
    if gate is None:
        return False
    ids: list[list[int]] = [[], []]
    for j, st in enumerate((ex.gate_up, ex.down)):
        for e in range(ex.num_experts):
            if st.bits == 4:
                ids[j].append(plan.add_linear(1, st.qweight[e], st.scales[e], st.zeros[e], st.group_size))
            else:
                ids[j].append(plan.add_linear(0, st.weight[e], st.scales[e], torch.empty(0), 0))
    bias = f.expert_bias if f.expert_bias is not None else torch.empty(0)
    plan.add_moe(norm, gate, ids[0], ids[1], bias.float(), f.k, bool(f.norm_topk), float(f.scale))
    return True


class FusedDecode:
    """One model's fused decode step over the engine's cache."""

    def __init__(self, plan, model: LfmForCausalLM, cache: PagedCache, max_rows: int) -> None:
        self.plan, self.model, self.cache, self.max_rows = plan, model, cache, max_rows

    @classmethod
    def build(cls, model: LfmForCausalLM, cache: PagedCache) -> FusedDecode | None:
        if os.environ.get("LFM_FUSED_DECODE", "1") == "0" or model.device.type != "cpu":
            return None
        ext = _kernels.extension()
        if ext is None or not hasattr(ext, "DecodePlan"):
            return None
        c, dtype = model.config, model.dtype
        if dtype not in (torch.float32, torch.bfloat16) or cache.conv.dtype != dtype:
            return None
        if c.conv_bias or (c.is_moe and dtype != torch.bfloat16):  # MoE: bfloat16 activations only
            return None
        kv = next(iter(cache.k.values()), None)
        if kv is not None and kv.dtype not in (torch.float32, torch.bfloat16, torch.int8):
            return None
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_size, 2, dtype=torch.float) / c.head_size))
        snap = cache.conv_snap if cache.conv_snap is not None else torch.empty(0, dtype=dtype)
        plan = ext.DecodePlan(c.hidden_size, c.norm_eps, dtype == torch.bfloat16, _kernels.INT4_ACT_BITS == 16,
                              inv_freq, cache.conv, snap, c.vocab_size, sum_lanes())
        kinds: set[str] = set()

        def lin(m: nn.Module) -> int | None:
            kinds.add(type(m).__name__)
            return _linear(plan, m, dtype)

        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                if not isinstance(layer.feed_forward, (MLP, MoE)):
                    return None
                if layer.is_attn:
                    a = layer.self_attn
                    ids = [lin(a.q_proj), lin(a.k_proj), lin(a.v_proj), lin(a.out_proj)]
                    if None in ids:
                        return None
                    ks, vs = cache.k_scale.get(i), cache.v_scale.get(i)
                    e = torch.empty(0)
                    plan.add_attn(layer.operator_norm.weight.detach(), ids[0], ids[1], ids[2],
                                  a.q_layernorm.weight.detach(), a.k_layernorm.weight.detach(), ids[3], a.nh, a.nkv,
                                  a.hd, cache.k[i], cache.v[i], e if ks is None else ks, e if vs is None else vs)
                else:
                    cv = layer.conv
                    ids = [lin(cv.in_proj), lin(cv.out_proj)]
                    if None in ids:
                        return None
                    plan.add_conv(layer.operator_norm.weight.detach(), ids[0], cv.conv.weight.detach()[:, 0],
                                  torch.empty(0), ids[1], cache.conv_index[i])
                f = layer.feed_forward
                if isinstance(f, MoE):
                    if not _add_moe(plan, f, layer.ffn_norm.weight.detach(), lin):
                        return None
                    continue
                ids = [lin(f.w1), lin(f.w3), lin(f.w2)]
                if None in ids:
                    return None
                plan.add_mlp(layer.ffn_norm.weight.detach(), *ids)
            head = lin(model.lm_head)
            if head is None:
                return None
            plan.set_head(model.model.embedding_norm.weight.detach(), head)
            if dtype == torch.bfloat16:  # SiLU / sigmoid of all 65,536 bfloat16 values, as the general path rounds
                allv = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
                plan.set_silu_table(torch.nn.functional.silu(allv).float().contiguous())
                plan.set_sigmoid_table(allv.sigmoid().float().contiguous())
        rows = MAX_ROWS
        amx = dtype == torch.bfloat16 and _kernels.amx()
        if amx:  # int4 projections of AMX_MIN_ROWS+ rows: the AMX kernel, as in the general path
            plan.set_amx_min_rows(_kernels.AMX_MIN_ROWS)
        if dtype == torch.bfloat16 and _kernels.native_bf16() and not (amx and kinds == {"Int4Linear"}):
            rows = _kernels.DEQUANT_ROWS - 1  # from there the general path's dequantized bf16 matmuls win
        return cls(plan, model, cache, rows)

    def applies(self, num_seqs: int) -> bool:
        return 0 < num_seqs <= self.max_rows and _kernels.extension() is not None

    @torch.inference_mode()
    def step(self, ids: list[int], positions: list[int], slots: list[int], conv_slots: list[int],
             snap_blocks: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One decode token for each of B sequences: logits [B, vocab] float32. tables: each sequence's block
        table; positions[b] + 1 positions are attended (the new one included)."""
        B = len(ids)
        mb = max(len(t) for t in tables)
        bt = torch.zeros(B, mb, dtype=torch.int32)
        for b, t in enumerate(tables):
            bt[b, :len(t)] = torch.tensor(t, dtype=torch.int32)
        x = self.model.model.embed_tokens(torch.tensor(ids)).contiguous()
        lens = torch.tensor([p + 1 for p in positions], dtype=torch.int32)
        logits = self.plan.step(x, torch.tensor(positions), torch.tensor(slots), torch.tensor(conv_slots),
                                torch.tensor(snap_blocks), bt, lens)
        # a view of the plan's reused buffer: always hand back a tensor of our own
        return logits.float() if logits.dtype != torch.float32 else logits.clone()

    def timings(self) -> dict[str, float]:
        """Seconds inside the fused steps so far: GEMVs (weights streamed), attention, the rest; and the step count."""
        g, a, o, n = self.plan.timings()
        return {"gemv_s": g, "attention_s": a, "other_s": o, "steps": int(n)}

    def reset_timings(self) -> None:
        self.plan.reset_timings()
