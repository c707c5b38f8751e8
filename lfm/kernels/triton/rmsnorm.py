"""Fused RMSNorm with an optional residual add: y = w * norm(x + residual), returned with the sum (the residual stream
of spec section 3's pre-norm blocks: one pass over both operands instead of an add kernel and a norm).

Rounding follows `lfm.model.lfm2.RMSNorm`: the sum is rounded to the activation dtype, the statistics are float32, the
normalised row is rounded to the activation dtype before the (model-dtype) multiply by the weight.
GPU tuning left open: several rows per program for small hidden sizes, num_warps by hidden size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm(x, residual, w, out, sum_out, D, eps, HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    h = tl.load(x + r * D + d, mask=dm, other=0.0)
    if HAS_RES:
        h = (h + tl.load(residual + r * D + d, mask=dm, other=0.0)).to(x.dtype.element_ty)
        tl.store(sum_out + r * D + d, h, mask=dm)
    f = h.to(tl.float32)
    inv = tl.rsqrt(tl.sum(f * f, axis=0) / D + eps)
    n = (f * inv).to(x.dtype.element_ty)
    y = tl.load(w + d, mask=dm, other=0.0) * n
    tl.store(out + r * D + d, y.to(out.dtype.element_ty), mask=dm)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> weight * rmsnorm(x); with `residual` (shaped like x), (weight * rmsnorm(s), s) for
    s = x + residual. Inputs are never written."""
    D = x.shape[-1]
    xf = x.contiguous().view(-1, D)
    out = torch.empty_like(xf, dtype=torch.promote_types(x.dtype, weight.dtype))
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x "
                             f"{tuple(x.shape)} {x.dtype}")
        rf = residual.contiguous().view(-1, D)
        total = torch.empty_like(xf)
    else:
        rf = total = xf  # unused by the kernel
    if xf.shape[0]:
        _rmsnorm[(xf.shape[0],)](xf, rf, weight, out, total, D, eps, HAS_RES=residual is not None,
                                 BLOCK_D=triton.next_power_of_2(D))
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), total.view(x.shape)
