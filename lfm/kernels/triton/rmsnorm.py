"""Fused RMSNorm with an optional residual add: y = w * norm(x + residual), and the sum written back for the next
block (the pre-norm residual stream of spec section 3, one read of each operand instead of three kernels).

Rounding follows `lfm.model.lfm2.RMSNorm`: the sum is rounded to the activation dtype, the statistics are float32, the
normalised row is rounded to the activation dtype before the (model-dtype) multiply by the weight.
GPU tuning left open: several rows per program for small hidden sizes, num_warps by hidden size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm(x, residual, w, out, D, eps, HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    h = tl.load(x + r * D + d, mask=dm, other=0.0)
    if HAS_RES:
        h = (h + tl.load(residual + r * D + d, mask=dm, other=0.0)).to(x.dtype.element_ty)
        tl.store(residual + r * D + d, h, mask=dm)
    f = h.to(tl.float32)
    inv = tl.rsqrt(tl.sum(f * f, axis=0) / D + eps)
    n = (f * inv).to(x.dtype.element_ty)
    y = tl.load(w + d, mask=dm, other=0.0) * n
    tl.store(out + r * D + d, y.to(out.dtype.element_ty), mask=dm)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor:
    """x [..., D] -> weight * rmsnorm(x (+ residual)). With `residual`, it is overwritten by x + residual."""
    D = x.shape[-1]
    xf = x.contiguous().view(-1, D)
    out = torch.empty_like(xf, dtype=torch.promote_types(x.dtype, weight.dtype))
    if residual is not None and (not residual.is_contiguous() or residual.shape != x.shape):
        raise ValueError("residual must be contiguous and shaped like x")
    if xf.shape[0]:
        _rmsnorm[(xf.shape[0],)](xf, residual if residual is not None else xf, weight, out, D, eps,
                                 HAS_RES=residual is not None, BLOCK_D=triton.next_power_of_2(D))
    return out.view(x.shape)
