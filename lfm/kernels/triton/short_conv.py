"""LFM2's causal depthwise short conv over packed sequences, starting from and updating each sequence's conv slot.

Layout = `PagedCache`'s: `conv_state` [num_slots, L-1, D] (one conv layer's rows of `PagedCache.conv`) holds the last
L-1 conv inputs of each sequence. The packed batch is varlen: sequence s owns rows query_start[s]..query_start[s+1]
of the input and reads only its own slot `conv_slots[s]`, so packed sequences never see each other's inputs.
Token t's output = bias + sum_j w[:, j] * u[t - (L-1) + j], where u at a negative index comes from the state.
Math in float32, rounded once to the output dtype (what `TorchBackend.short_conv` and the model do).

`gated=True` is the whole decode-step operator: the input is the in_proj output [N, 3D] = (B, C, x) and the kernel
computes u = B * x (rounded to the activation dtype, as the model does), the conv, and returns C * z: one launch
instead of three element-wise ops and the conv. Prefill and decode share the kernel (a decode is a length-1 sequence).
GPU tuning left open: BLOCK_D / num_warps, keeping the L-1 window in registers instead of re-reading it per token,
and splitting long prefill sequences over time (a sequence is walked by one program per channel block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_u(x, t, row_stride, D, d, dm, GATED: tl.constexpr):
    if GATED:
        b = tl.load(x + t * row_stride + d, mask=dm, other=0.0)
        xt = tl.load(x + t * row_stride + 2 * D + d, mask=dm, other=0.0)
        return (b * xt).to(x.dtype.element_ty)
    else:
        return tl.load(x + t * row_stride + d, mask=dm, other=0.0)


@triton.jit
def _short_conv(x, w, bias, state, out, query_start, conv_slots, D, row_stride,
                L: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    a = tl.load(query_start + s)
    n = tl.load(query_start + s + 1) - a
    slot = tl.load(conv_slots + s).to(tl.int64)
    st = state + slot * (L - 1) * D
    for i in range(0, n):
        z = tl.zeros([BLOCK_D], tl.float32)
        if HAS_BIAS:
            z += tl.load(bias + d, mask=dm, other=0.0).to(tl.float32)
        for j in tl.static_range(L):
            r = i - (L - 1) + j  # index of the tap's input relative to the chunk start
            if r >= 0:
                u = _load_u(x, a + r, row_stride, D, d, dm, GATED).to(tl.float32)
            else:
                u = tl.load(st + ((L - 1) + r) * D + d, mask=dm, other=0.0).to(tl.float32)
            z += u * tl.load(w + d * L + j, mask=dm, other=0.0).to(tl.float32)
        if GATED:
            c = tl.load(x + (a + i) * row_stride + D + d, mask=dm, other=0.0)
            y = (c * z.to(out.dtype.element_ty)).to(out.dtype.element_ty)
        else:
            y = z.to(out.dtype.element_ty)
        tl.store(out + (a + i) * D + d, y, mask=dm)
    # the new state = the last L-1 inputs; row k reads old row k + n (> k) when it is still in the state,
    # so writing the rows in ascending order never overwrites a row that is still to be read
    for k in tl.static_range(L - 1):
        r = n - (L - 1) + k
        if r >= 0:
            u = _load_u(x, a + r, row_stride, D, d, dm, GATED).to(state.dtype.element_ty)
        else:
            u = tl.load(st + ((L - 1) + r) * D + d, mask=dm, other=0.0)
        tl.store(st + k * D + d, u, mask=dm)


def short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor,
               query_start: torch.Tensor, conv_slots: torch.Tensor, gated: bool = False,
               block_d: int = 64) -> torch.Tensor:
    """x [N, D] (or [N, 3D] = B, C, x when gated), weight [D, L], conv_state [slots, L-1, D] (updated in place),
    query_start [S + 1] int, conv_slots [S] -> [N, D]: the conv output (C * conv output when gated)."""
    N = x.shape[0]
    D, L = weight.shape
    if x.shape[1] != (3 * D if gated else D):
        raise ValueError(f"input width {x.shape[1]} does not match {D} channels (gated={gated})")
    if conv_state.shape[1:] != (L - 1, D):
        raise ValueError(f"conv state {tuple(conv_state.shape)} does not hold {L - 1} x {D} per slot")
    x = x.contiguous()
    out = torch.empty(N, D, dtype=x.dtype, device=x.device)
    S = conv_slots.shape[0]
    if S == 0:
        return out
    _short_conv[(S, triton.cdiv(D, block_d))](
        x, weight.contiguous(), bias if bias is not None else weight, conv_state, out, query_start, conv_slots,
        D, x.stride(0), L=L, GATED=gated, HAS_BIAS=bias is not None, BLOCK_D=block_d)
    return out
