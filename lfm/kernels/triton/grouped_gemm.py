"""Grouped GEMM for MoE experts: rows sorted by expert, each group times its expert's matrix, one launch.

out[r] = x[r] @ w[e].T for the rows r of group e, where group e is rows offs[e-1] .. offs[e]-1 (offs = the groups'
cumulative ends, on the device, as `torch._grouped_mm` takes them). `w` is [E, N, K] (the experts' stacked
`gate_up_proj` or `down_proj`: K contiguous). The fallback where `torch._grouped_mm` does not run (torch < 2.8,
float16 / float32, GPUs before sm90): lfm.engine.grouped_moe picks it.

Program (m, n) computes one BLOCK_M x BLOCK_N tile. The m axis enumerates every group's row tiles one after another;
its length is cdiv(rows, BLOCK_M) + E, an upper bound known from shapes alone (each group adds at most one partial
tile), so the grid never waits for the counts and a launch can be captured in a CUDA graph. A program finds its group
by walking the E group ends (E <= 64: a few scalar loads); programs past the last tile store nothing.
GPU tuning left open: block sizes / num_warps / num_stages per shape, and a persistent-tile schedule.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_gemm(x, w, out, offs, N, K, E, stride_we, stride_wn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = 0
    tiles = 0
    group = -1
    row0 = 0
    row_end = 0
    for e in range(0, E):
        end = tl.load(offs + e).to(tl.int32)
        n_tiles = tl.cdiv(end - start, BLOCK_M)
        hit = (pid_m >= tiles) & (pid_m < tiles + n_tiles)
        group = tl.where(hit, e, group)
        row0 = tl.where(hit, start + (pid_m - tiles) * BLOCK_M, row0)
        row_end = tl.where(hit, end, row_end)
        tiles += n_tiles
        start = end
    rm = row0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm = rm < row_end  # a program past the last tile keeps row_end = 0: no rows
    nm = rn < N
    wg = w + tl.maximum(group, 0).to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = (k0 + rk) < K
        a = tl.load(x + rm.to(tl.int64)[:, None] * K + (k0 + rk)[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        b = tl.load(wg + rn.to(tl.int64)[None, :] * stride_wn + (k0 + rk)[:, None], mask=km[:, None] & nm[None, :],
                    other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    tl.store(out + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(out.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, block_m: int = 64, block_n: int = 64,
                 block_k: int = 32) -> torch.Tensor:
    """x [M, K] (rows grouped by expert), w [E, N, K], offs [E] int32 (cumulative group ends) -> [M, N] in x's dtype.
    Rows past offs[-1] are left undefined (none, when every row belongs to a group)."""
    M, K = x.shape
    E, N, K2 = w.shape
    if K2 != K or offs.shape != (E,):
        raise ValueError(f"grouped_gemm: x {tuple(x.shape)}, w {tuple(w.shape)}, offs {tuple(offs.shape)} do not fit")
    x, w = x.contiguous(), w.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    grid = (triton.cdiv(M, block_m) + E, triton.cdiv(N, block_n))
    _grouped_gemm[grid](x, w, out, offs, N, K, E, w.stride(0), w.stride(1), BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k, IEEE=x.dtype == torch.float32)
    return out
