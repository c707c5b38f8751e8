"""LFM2 attention's per-head RMSNorm on q and k followed by NeoX (rotate-half) RoPE, in one pass over each head.

Takes the step's cos / sin [N, head_dim] (what `lfm.model.lfm2.rope_cos_sin` computes once per step for every layer),
so the rotation's values are the model's own. Rounding follows the model: float32 statistics, the normalised head
rounded to the activation dtype and multiplied by the weight in that dtype, then x*cos + rotate_half(x)*sin with each
product rounded to the dtype (as the PyTorch expression rounds it).
GPU tuning left open: several heads per program, num_warps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_qknorm(x, w, cos, sin, out, heads, head_dim, half, eps, BLOCK_H: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK_H)
    m = i < half
    base = (n * heads + h) * head_dim
    dt = out.dtype.element_ty
    x1 = tl.load(x + base + i, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x + base + half + i, mask=m, other=0.0).to(tl.float32)
    inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / head_dim + eps)
    x1 = (tl.load(w + i, mask=m, other=0.0) * (x1 * inv).to(dt)).to(dt).to(tl.float32)
    x2 = (tl.load(w + half + i, mask=m, other=0.0) * (x2 * inv).to(dt)).to(dt).to(tl.float32)
    c1 = tl.load(cos + n * head_dim + i, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos + n * head_dim + half + i, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin + n * head_dim + i, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin + n * head_dim + half + i, mask=m, other=0.0).to(tl.float32)
    y1 = (x1 * c1).to(dt).to(tl.float32) + (-(x2 * s1).to(dt)).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(out + base + i, y1.to(dt), mask=m)
    tl.store(out + base + half + i, y2.to(dt), mask=m)


def rope_qknorm(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                ) -> torch.Tensor:
    """x [N, heads, head_dim] (q or k), weight [head_dim], cos / sin [N, head_dim] -> rope(rmsnorm(x) * weight)."""
    N, H, hd = x.shape
    if hd % 2 or cos.shape != (N, hd) or sin.shape != (N, hd):
        raise ValueError(f"cos / sin must be [{N}, {hd}] with an even head_dim")
    x = x.contiguous()
    out = torch.empty_like(x)
    if N:
        _rope_qknorm[(N, H)](x, weight, cos.contiguous(), sin.contiguous(), out, H, hd, hd // 2, eps,
                             BLOCK_H=triton.next_power_of_2(hd // 2))
    return out
