"""The attention / conv backend: how one step's tokens read and write the paged cache, chosen by device.

`StepBatch` is what the model runner computes once per step (positions, slot mapping, block tables, conv slots,
cumulative sequence lengths, conv gather rows); a backend holds the cache and, for the step in flight, that batch:
it is the `StepContext` that `LfmForCausalLM.forward_step` calls. `TorchBackend` is plain PyTorch and runs on any
device (the reference, and the fallback); `CpuBackend` routes decode attention through `lfm.kernels`' paged kernel.
`TritonBackend` (lfm/engine/triton_backend.py, CUDA) replaces the KV write, decode attention and the short conv with
Triton kernels.

Flat batch layout: the sequences with one new token (decodes) come first, then prefill chunks; sequence s owns rows
query_start[s] .. query_start[s+1] and attends over its first context_lens[s] positions (cached ones, then new).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels as _kernels
from .cache import PagedCache

KEY_BLOCK = 2048  # cached keys per attention call of a prefill chunk (see prefill_attention): its memory bound
CONV_ROWS = 256  # rows per slice of the short conv's float32 arithmetic (prefill chunks; a decode step is one slice)


def _merge(acc: tuple[torch.Tensor, torch.Tensor] | None, o: torch.Tensor, lse: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two attention results over disjoint key sets -> the result over both, from their log-sum-exps (float32)."""
    if acc is None:
        return o.float(), lse
    ao, al = acc
    new = torch.logaddexp(al, lse)
    # in place: the same products and sum (same bits) with two fewer [heads, queries, head_dim] float32 temporaries
    return ao.mul_((al - new).exp()[..., None]).add_(o.float().mul_((lse - new).exp()[..., None])), new


@dataclass(slots=True)
class StepBatch:
    positions: torch.Tensor  # [N] long: each token's position in its sequence
    slot_mapping: torch.Tensor  # [N] long: block * block_size + offset where its K / V go
    query_start: list[int]  # [S + 1] cumulative new-token counts
    context_lens: list[int]  # [S] positions each sequence attends over after this step
    num_decodes: int  # the first num_decodes sequences have exactly one new token
    block_tables: torch.Tensor  # [num_decodes, max_blocks] int32 (padded with 0)
    decode_lens: torch.Tensor  # [num_decodes] int32 = context_lens[:num_decodes]
    prefill_blocks: list[torch.Tensor]  # per prefill sequence: its block ids (long), for gathers
    conv_slots: torch.Tensor  # [S] long
    conv_taps: torch.Tensor  # [N, L] rows of the step's conv input (states of all S sequences, then the N tokens)
    conv_state_rows: torch.Tensor  # [S, L-1]: the rows that become each sequence's new conv state
    snap_rows: torch.Tensor | None  # [K, L-1]: conv states to snapshot at block ends (prefix caching)
    snap_blocks: torch.Tensor | None  # [K] long: the blocks they belong to
    conv_zero: torch.Tensor | None  # [*] long: slots to clear before the step (fresh sequences)
    conv_restore: tuple[torch.Tensor, torch.Tensor] | None  # (slots, blocks): slots restored from snapshots


class TorchBackend:
    """Paged attention and the short conv in PyTorch ops (any device)."""

    # whether CUDA graphs may capture its decode step: this one's decode attention gathers the whole block table
    # (a graph's static table is max_model_len wide), so no
    graph_capturable = False

    def __init__(self, cache: PagedCache, num_heads: int, head_dim: int) -> None:
        self.cache = cache
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = head_dim ** -0.5
        self.batch: StepBatch | None = None

    @property
    def positions(self) -> torch.Tensor:
        return self.batch.positions

    def bind(self, batch: StepBatch, query_start: torch.Tensor | None = None) -> None:
        """Point the backend at the step's batch (the cache's bookkeeping already done). CUDA graphs bind static
        batches once at capture; `query_start` is then a static device copy of batch.query_start."""
        self.batch = batch

    def begin(self, batch: StepBatch) -> None:
        """Start a step: fresh sequences' conv slots are zeroed, prefix-cache hits restore their snapshot."""
        self.bind(batch)
        c = self.cache
        if batch.conv_zero is not None:
            c.conv[:, batch.conv_zero] = 0
        if batch.conv_restore is not None:
            slots, blocks = batch.conv_restore
            c.conv[:, slots] = c.conv_snap[:, blocks]

    # ---- attention ------------------------------------------------------------------------------------------
    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b = self.batch
        self.write_kv(layer, k, v)
        nd = b.num_decodes
        if nd == len(b.context_lens):
            return self.decode_attention(layer, q)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self.decode_attention(layer, q[:nd])
        for j, s in enumerate(range(nd, len(b.context_lens))):
            a, e = b.query_start[s], b.query_start[s + 1]
            out[a:e] = self.prefill_attention(layer, q[a:e], k[a:e], v[a:e], b.context_lens[s], b.prefill_blocks[j])
        return out

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new keys and values at their slots."""
        self.cache.write_kv(layer, self.batch.slot_mapping, k, v)

    def prefill_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int,
                          blocks: torch.Tensor) -> torch.Tensor:
        """One sequence's chunk: q [n, H, hd] at positions context_len - n .. context_len - 1."""
        n, H, hd = q.shape
        start = context_len - n
        if start == 0:  # nothing cached: the chunk's keys are all there is (as the cache holds them, when int8)
            if self.cache.quantized:
                kk, vv = self.cache.read_kv(layer, blocks, context_len, q.dtype)
            else:
                kk, vv = k.transpose(0, 1), v.transpose(0, 1)
            o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk[None], vv[None], is_causal=n > 1,
                                               enable_gqa=H != kk.shape[0])
            return o[0].transpose(0, 1)
        # After cached positions: the cached keys in blocks of KEY_BLOCK (every one visible to every query: no
        # mask; a KV head's G query heads go in as G x more queries of that head, so K / V are not expanded), then
        # the chunk's own keys causally; the partial results are merged by their log-sum-exp (flash attention's own
        # bookkeeping). Memory is one key block and the chunk, at any context length: no whole-context K / V copy
        # and no [queries, context] mask.
        if q.device.type != "cpu":
            return self._prefill_masked(layer, q, context_len, blocks)
        KV = self.cache.k[layer].shape[1]
        G = H // KV
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        qg = q.reshape(n, KV, G, hd).permute(1, 2, 0, 3).reshape(1, KV, G * n, hd)
        acc: tuple[torch.Tensor, torch.Tensor] | None = None
        for k0 in range(0, start, KEY_BLOCK):
            kb, vb = self.cache.read_kv(layer, blocks, min(start, k0 + KEY_BLOCK), q.dtype, start=k0)
            acc = _merge(acc, *flash(qg, kb[None], vb[None], 0.0, False))
        if self.cache.quantized:  # the chunk's keys as the cache holds them (int8), like every other read
            kc, vc = self.cache.read_kv(layer, blocks, context_len, q.dtype, start=start)
        else:
            kc, vc = k.transpose(0, 1), v.transpose(0, 1)
        if G > 1:
            kc, vc = kc.repeat_interleave(G, dim=0), vc.repeat_interleave(G, dim=0)
        o, lse = flash(q.transpose(0, 1)[None], kc[None], vc[None], 0.0, n > 1)  # [1, H, n, hd], top-left causal
        o, lse = _merge(acc, o.reshape(1, KV, G * n, hd), lse.reshape(1, KV, G * n))
        return o.to(q.dtype).view(KV, G, n, hd).permute(2, 0, 1, 3).reshape(n, H, hd)

    def _prefill_masked(self, layer: int, q: torch.Tensor, context_len: int, blocks: torch.Tensor) -> torch.Tensor:
        """The portable form (any device): the whole context's keys and a causal mask, in query blocks."""
        n, H, hd = q.shape
        start = context_len - n
        kk, vv = self.cache.read_kv(layer, blocks, context_len, q.dtype)
        qb = max(16, min(n, (16 << 20) // (4 * context_len)))
        out = torch.empty_like(q)
        keys = torch.arange(context_len, device=q.device)
        for a in range(0, n, qb):
            e = min(n, a + qb)
            mask = keys[None] <= torch.arange(start + a, start + e, device=q.device)[:, None]
            o = F.scaled_dot_product_attention(q[a:e].transpose(0, 1)[None], kk[None], vv[None], attn_mask=mask,
                                               enable_gqa=H != kk.shape[0])
            out[a:e] = o[0].transpose(0, 1)
        return out

    def decode_attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """One query per sequence over its blocks (keys already written): [S, H, hd]. Gathers every sequence's
        blocks, padded to the longest (the portable path; device backends replace it with a kernel)."""
        b, c = self.batch, self.cache
        S, H, hd = q.shape
        tables = b.block_tables.long()
        out = []
        for buf, sc in ((c.k, c.k_scale), (c.v, c.v_scale)):
            x = buf[layer][tables]  # [S, mb, KV, bs, hd]
            if sc:
                x = x.float() * sc[layer][tables][..., None]
            x = x.permute(0, 2, 1, 3, 4).reshape(S, x.shape[2], -1, hd).to(q.dtype)
            out.append(x)
        kk, vv = out
        KV, Lmax = kk.shape[1], kk.shape[2]
        valid = torch.arange(Lmax, device=q.device)[None] < b.decode_lens.to(q.device).long()[:, None]  # [S, Lmax]
        keep = valid[:, None, :, None]
        kk = kk.masked_fill(~keep, 0)  # unwritten positions hold arbitrary bits (the pool is torch.empty)
        vv = vv.masked_fill(~keep, 0)
        # a KV head's query heads as its queries (SDPA's GQA path is far slower for one query on CPU)
        o = F.scaled_dot_product_attention(q.view(S, KV, H // KV, hd), kk, vv, attn_mask=valid[:, None, None, :])
        return o.reshape(S, H, hd)

    # ---- short convolution ----------------------------------------------------------------------------------------
    def short_conv(self, layer: int, bx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Each sequence's causal conv, from its slot's state: rows = [the S states' L-1 columns, the N inputs];
        tap j of token t reads row conv_taps[t, j]. Accumulated in float32 and rounded once (the reference's bits)."""
        b, c = self.batch, self.cache
        conv = c.conv[c.conv_index[layer]]  # [slots, L-1, D]
        rows = torch.cat([conv[b.conv_slots].flatten(0, 1), bx.to(conv.dtype)])
        w = weight.float()
        bf = bias.float() if bias is not None else None
        out = torch.empty_like(bx)
        for a in range(0, bx.shape[0], CONV_ROWS):  # in row slices: float32 temporaries of CONV_ROWS rows at most
            taps = b.conv_taps[a:a + CONV_ROWS]
            z = rows[taps[:, 0]].float() * w[:, 0]
            for j in range(1, w.shape[1]):
                z = z + rows[taps[:, j]].float() * w[:, j]
            if bf is not None:
                z = z + bf
            out[a:a + CONV_ROWS] = z
        conv[b.conv_slots] = rows[b.conv_state_rows]
        if b.snap_rows is not None:
            c.conv_snap[c.conv_index[layer]][b.snap_blocks] = rows[b.snap_rows]
        return out


class CpuBackend(TorchBackend):
    """CPU: decode attention through lfm.kernels' paged kernel (float32 math on 16-bit or int8 blocks)."""

    def decode_attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        b, c = self.batch, self.cache
        o = _kernels.paged_decode_attention(q.contiguous(), c.k[layer], c.v[layer], c.k_scale.get(layer),
                                            c.v_scale.get(layer), b.block_tables, b.decode_lens, self.scale)
        return o if o is not None else super().decode_attention(layer, q)


def make_backend(device: torch.device, cache: PagedCache, num_heads: int, head_dim: int) -> TorchBackend:
    if device.type == "cpu":
        return CpuBackend(cache, num_heads, head_dim)
    if device.type == "cuda" and cache.block_size & (cache.block_size - 1) == 0:  # Triton tiles: powers of two
        try:
            from .triton_backend import TritonBackend
        except ImportError:  # triton not installed (the `gpu` extra): the portable path still serves
            return TorchBackend(cache, num_heads, head_dim)
        return TritonBackend(cache, num_heads, head_dim)
    return TorchBackend(cache, num_heads, head_dim)
