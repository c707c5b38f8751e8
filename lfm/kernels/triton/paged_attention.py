"""Paged GQA decode attention with split-K: one query token per sequence over its cached blocks.

Layout = `PagedCache`'s: `k_cache`, `v_cache` [num_blocks, kv_heads, block_size, head_dim] (float, or int8 with
float32 scales [num_blocks, kv_heads, block_size]); `block_tables` [S, max_blocks] int32; `context_lens` [S].
Pass 1: program (sequence, kv head, split) covers its share of the sequence's blocks (each sequence divides its own
blocks over the launch's `num_splits`) and all query heads of that KV head at once (GQA: the keys are read once per
group), with an online softmax; it writes its partial output and its (max, sum). Pass 2 merges the splits of each
(sequence, head). Long contexts thus spread over many programs instead of one per sequence (the split-K /
"flash-decoding" idea). The grid depends on the batch size and `num_splits` only, never on the block table's width or
the context lengths (read on the device), so a launch can be captured once in a CUDA graph and replayed at any length.
GPU tuning left open: tl.dot for the group (needs >= 16 rows: pad the group), exp2 with a pre-scaled log2(e),
num_warps / num_stages, and skipping pass 2 when there is a single split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_split(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, part_o, part_m, part_l,
                  scale, H, KV, head_dim, table_stride, num_splits,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
                  QUANT: tl.constexpr):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    t = tl.arange(0, BLOCK_SIZE)
    gm = g < GROUP
    dm = d < head_dim
    heads = kvh * GROUP + g
    qv = tl.load(q + (s * H + heads)[:, None] * head_dim + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    qv = qv.to(tl.float32) * scale
    ctx = tl.load(context_lens + s).to(tl.int32)
    n_blocks = tl.cdiv(ctx, BLOCK_SIZE)
    per_split = tl.cdiv(n_blocks, num_splits)  # this sequence's blocks per split (late splits may get none)
    first = sp * per_split
    last = tl.minimum(first + per_split, n_blocks)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for b in range(first, last):
        blk = tl.load(block_tables + s * table_stride + b).to(tl.int64)
        pos = b * BLOCK_SIZE + t
        tm = pos < ctx
        row = (blk * KV + kvh) * BLOCK_SIZE + t
        off = row[:, None] * head_dim + d[None, :]
        m2 = tm[:, None] & dm[None, :]
        kb = tl.load(k_cache + off, mask=m2, other=0.0).to(tl.float32)
        vb = tl.load(v_cache + off, mask=m2, other=0.0).to(tl.float32)
        if QUANT:
            kb = kb * tl.load(k_scale + row, mask=tm, other=0.0)[:, None]
            vb = vb * tl.load(v_scale + row, mask=tm, other=0.0)[:, None]
        sc = tl.sum(qv[:, None, :] * kb[None, :, :], axis=2)  # [G, BLOCK_SIZE]
        sc = tl.where(tm[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], axis=1)
        m_i = m_new
    base = (s * H + heads) * num_splits + sp  # part_m / part_l [S, H, splits]; part_o [S, H, splits, D]
    tl.store(part_m + base, m_i, mask=gm)
    tl.store(part_l + base, l_i, mask=gm)
    tl.store(part_o + base[:, None] * head_dim + d[None, :], acc, mask=gm[:, None] & dm[None, :])


@triton.jit
def _decode_merge(part_o, part_m, part_l, out, H, head_dim, num_splits,
                  BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    jm = j < num_splits
    dm = d < head_dim
    base = (s * H + h) * num_splits
    m = tl.load(part_m + base + j, mask=jm, other=float("-inf"))
    ll = tl.load(part_l + base + j, mask=jm, other=0.0)
    mx = tl.max(m, axis=0)  # split 0 always holds position 0, so mx is finite
    w = tl.where(m > float("-inf"), tl.exp(m - mx), 0.0)
    o = tl.load(part_o + (base + j)[:, None] * head_dim + d[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
    num = tl.sum(o * w[:, None], axis=0)
    den = tl.sum(ll * w, axis=0)
    tl.store(out + (s * H + h) * head_dim + d, (num / den).to(out.dtype.element_ty), mask=dm)


def default_splits(num_seqs: int, kv_heads: int, table_width: int, target_programs: int = 1024,
                   max_splits: int = 32) -> int:
    """Splits per (sequence, KV head): enough programs to fill a GPU (an H100 has 132 SMs; ~1024 programs keep
    every one busy) when the batch is small, one split when the batch alone fills it; never more splits than the
    table has blocks. Host-side shapes only, so the choice is the same at capture and at every replay."""
    want = -(-target_programs // max(1, num_seqs * kv_heads))
    return max(1, min(want, max_splits, table_width))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           num_splits: int | None = None) -> torch.Tensor:
    """q [S, H, hd] (one token per sequence, keys already stored) -> [S, H, hd]. Every context_lens[s] >= 1.
    num_splits: programs per (sequence, KV head); default `default_splits` (from the batch shape only)."""
    S, H, hd = q.shape
    _, KV, bs, _ = k_cache.shape
    if H % KV:
        raise ValueError(f"{H} query heads do not group over {KV} KV heads")
    if bs & (bs - 1):
        raise ValueError(f"block size {bs} is not a power of two (the kernel loads one block as a tile)")
    out = torch.empty_like(q)
    if S == 0:
        return out
    quant = k_cache.dtype == torch.int8
    if quant and (k_scale is None or v_scale is None):
        raise ValueError("an int8 KV cache needs k_scale and v_scale")
    q, block_tables = q.contiguous(), block_tables.contiguous()
    if num_splits is None:
        num_splits = default_splits(S, KV, block_tables.shape[1])
    f32 = dict(device=q.device, dtype=torch.float32)
    part_o = torch.empty(S, H, num_splits, hd, **f32)
    part_m = torch.empty(S, H, num_splits, **f32)
    part_l = torch.empty(S, H, num_splits, **f32)
    G = H // KV
    BD = triton.next_power_of_2(hd)
    _decode_split[(S, KV, num_splits)](
        q, k_cache, v_cache, k_scale if quant else k_cache, v_scale if quant else v_cache, block_tables,
        context_lens, part_o, part_m, part_l, scale, H, KV, hd, block_tables.stride(0), num_splits, GROUP=G, BLOCK_G=triton.next_power_of_2(G), BLOCK_SIZE=bs, BLOCK_D=BD, QUANT=quant)
    _decode_merge[(S, H)](part_o, part_m, part_l, out, H, hd, num_splits,
                          BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_D=BD)
    return out
