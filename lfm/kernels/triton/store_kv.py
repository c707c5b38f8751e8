"""Store the step's new keys and values into the paged KV cache by slot mapping (optionally quantizing to int8).

Layout = `PagedCache`'s: `k_cache`, `v_cache` [num_blocks, kv_heads, block_size, head_dim]; token n goes to block
slot // block_size, offset slot % block_size (a negative slot = a padded row, skipped, as in vLLM). int8 caches keep one
float32 scale per vector (amax / 127) in `k_scale` / `v_scale` [num_blocks, kv_heads, block_size], with the same
round-half-to-even rounding as `lfm.engine.cache.quantize_kv`, so both paths store the same bytes.
GPU tuning left open: one program per (token, kv head) is simple; several heads per program may load faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 1.5 * 2**23: (y + _RNE) - _RNE rounds a float32 |y| < 2**22 to the nearest integer, ties to even (as torch.round)
_RNE = tl.constexpr(12582912.0)


@triton.jit
def _store_kv(k, v, k_cache, v_cache, k_scale, v_scale, slots, KV, block_size, head_dim,
              QUANT: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots + n).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, BLOCK_D)
        dm = d < head_dim
        src = (n * KV + h) * head_dim + d
        row = ((slot // block_size) * KV + h) * block_size + slot % block_size
        dst = row * head_dim + d
        xk = tl.load(k + src, mask=dm, other=0.0)
        xv = tl.load(v + src, mask=dm, other=0.0)
        if QUANT:
            xk = xk.to(tl.float32)
            xv = xv.to(tl.float32)
            sk = tl.max(tl.abs(xk), axis=0) / 127.0
            sv = tl.max(tl.abs(xv), axis=0) / 127.0
            qk = tl.where(sk > 0, tl.div_rn(xk, tl.where(sk > 0, sk, 1.0)), 0.0)
            qv = tl.where(sv > 0, tl.div_rn(xv, tl.where(sv > 0, sv, 1.0)), 0.0)
            qk = tl.minimum(tl.maximum((qk + _RNE) - _RNE, -127.0), 127.0)
            qv = tl.minimum(tl.maximum((qv + _RNE) - _RNE, -127.0), 127.0)
            tl.store(k_cache + dst, qk.to(tl.int8), mask=dm)
            tl.store(v_cache + dst, qv.to(tl.int8), mask=dm)
            tl.store(k_scale + row, sk)
            tl.store(v_scale + row, sv)
        else:
            tl.store(k_cache + dst, xk.to(k_cache.dtype.element_ty), mask=dm)
            tl.store(v_cache + dst, xv.to(v_cache.dtype.element_ty), mask=dm)

def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """k, v [N, kv_heads, head_dim] -> the caches at `slot_mapping` [N] (in place)."""
    N, KV, hd = k.shape
    if N == 0:
        return
    quant = k_cache.dtype == torch.int8
    if quant and (k_scale is None or v_scale is None):
        raise ValueError("an int8 KV cache needs k_scale and v_scale")
    k, v = k.contiguous(), v.contiguous()
    ks = k_scale if quant else k_cache  # unused placeholders when not quantizing
    vs = v_scale if quant else v_cache
    _store_kv[(N, KV)](k, v, k_cache, v_cache, ks, vs, slot_mapping, KV, k_cache.shape[2], hd,
                       QUANT=quant, BLOCK_D=triton.next_power_of_2(hd))
