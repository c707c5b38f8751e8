"""The engine's cache memory: one pool of KV blocks per attention layer, conv-state slots, and conv snapshots.

Allocated once from a byte budget (as vLLM sizes its KV cache), so serving never allocates cache memory per request.
- KV: `k[layer]`, `v[layer]` = [num_blocks, kv_heads, block_size, head_dim]: one block holds `block_size` positions
  of every KV head, each head's keys contiguous (what the paged decode kernels read). int8 KV keeps one float32
  scale per key / value vector in `k_scale` / `v_scale` = [num_blocks, kv_heads, block_size].
- Conv: `conv` = [conv_layers, num_slots, L-1, hidden]: the last L-1 inputs of every conv layer for each running
  sequence (~40 KB a sequence for the 350M, whatever its length).
- Snapshots (prefix caching only): `conv_snap` = [conv_layers, num_blocks, L-1, hidden]: the conv state at the end of
  each filled block, so a prefix-cache hit restores it.
On CPU the pools are `torch.empty`: pages are touched only as blocks are first used (the block manager hands out the
lowest free ids first), so a large budget costs address space, not memory, until it is needed. Nothing ever reads a
position that was not written: attention reads each sequence's first `context_len` positions only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.config import LfmConfig

READ_CHUNK_BYTES = 2 << 20  # read_kv's float32 temporary per slice of blocks (part of a long prefill's peak RSS)


@dataclass(slots=True)
class PagedCache:
    k: dict[int, torch.Tensor]  # attention layer -> [num_blocks, kv_heads, block_size, head_dim]
    v: dict[int, torch.Tensor]
    conv: torch.Tensor  # [conv_layers, num_slots, L-1, hidden]
    conv_index: dict[int, int]  # conv layer -> its row in conv / conv_snap
    block_size: int
    num_blocks: int
    conv_snap: torch.Tensor | None = None  # [conv_layers, num_blocks, L-1, hidden]
    k_scale: dict[int, torch.Tensor] = field(default_factory=dict)  # int8 KV: [num_blocks, kv_heads, block_size]
    v_scale: dict[int, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def block_bytes(config: LfmConfig, block_size: int, dtype: torch.dtype, kv_dtype: torch.dtype,
                    prefix_caching: bool) -> int:
        """Bytes one block costs: its KV in every attention layer (+ scales), + its conv snapshot if caching."""
        c = config
        kv = 2 * len(c.attn_layers) * c.num_key_value_heads * block_size * c.head_size * kv_dtype.itemsize
        if kv_dtype == torch.int8:
            kv += 2 * len(c.attn_layers) * c.num_key_value_heads * block_size * 4
        snap = len(c.conv_layers) * (c.conv_L_cache - 1) * c.hidden_size * dtype.itemsize if prefix_caching else 0
        return kv + snap

    @classmethod
    def allocate(cls, config: LfmConfig, num_blocks: int, block_size: int, num_slots: int, dtype: torch.dtype,
                 device: torch.device | str, kv_dtype: torch.dtype | None = None,
                 prefix_caching: bool = True) -> PagedCache:
        c = config
        kv_dtype = kv_dtype or dtype
        if kv_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
            raise ValueError(f"KV cache dtype must be a float type or int8, got {kv_dtype}")
        shape = (num_blocks, c.num_key_value_heads, block_size, c.head_size)
        k = {i: torch.empty(shape, dtype=kv_dtype, device=device) for i in c.attn_layers}
        v = {i: torch.empty(shape, dtype=kv_dtype, device=device) for i in c.attn_layers}
        ks, vs = {}, {}
        if kv_dtype == torch.int8:
            ks = {i: torch.empty(shape[:3], dtype=torch.float32, device=device) for i in c.attn_layers}
            vs = {i: torch.empty(shape[:3], dtype=torch.float32, device=device) for i in c.attn_layers}
        L1, n_conv = c.conv_L_cache - 1, len(c.conv_layers)
        conv = torch.zeros(n_conv, num_slots, L1, c.hidden_size, dtype=dtype, device=device)
        snap = (torch.empty(n_conv, num_blocks, L1, c.hidden_size, dtype=dtype, device=device)
                if prefix_caching else None)
        return cls(k=k, v=v, conv=conv, conv_index={layer: j for j, layer in enumerate(c.conv_layers)},
                   block_size=block_size, num_blocks=num_blocks, conv_snap=snap, k_scale=ks, v_scale=vs)

    @property
    def quantized(self) -> bool:
        return bool(self.k_scale)

    def nbytes(self) -> int:
        ts = [*self.k.values(), *self.v.values(), *self.k_scale.values(), *self.v_scale.values(), self.conv]
        if self.conv_snap is not None:
            ts.append(self.conv_snap)
        return sum(t.numel() * t.element_size() for t in ts)

    def start_conv(self, slot: int, restore: int) -> None:
        """A sequence's first step: its conv slot zeroed (restore -1: nothing cached) or set to the snapshot of
        block `restore` (a prefix-cache hit)."""
        if restore == -1:
            self.conv[:, slot] = 0
        else:
            self.conv[:, slot] = self.conv_snap[:, restore]

    def write_kv(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k / v [N, kv_heads, head_dim] of N tokens at their slots (block * block_size + offset)."""
        blk, off = slot_mapping // self.block_size, slot_mapping % self.block_size
        if self.quantized:
            for buf, sc, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
                q, s = quantize_kv(x)
                buf[layer][blk, :, off] = q
                sc[layer][blk, :, off] = s
        else:
            self.k[layer][blk, :, off] = k.to(self.k[layer].dtype)
            self.v[layer][blk, :, off] = v.to(self.v[layer].dtype)

    def read_kv(self, layer: int, blocks: torch.Tensor, length: int, dtype: torch.dtype, start: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's keys and values at positions start..length-1 as [kv_heads, length - start, head_dim] in
        `dtype` (gathered from its blocks; int8 dequantized)."""
        out = []
        bs = self.block_size
        first = start // bs
        blocks = blocks[first:-(-length // bs)]
        length, skip = length - first * bs, start - first * bs
        for buf, sc in ((self.k, self.k_scale), (self.v, self.v_scale)):
            pool = buf[layer]
            res = torch.empty(pool.shape[1], blocks.numel() * bs, pool.shape[-1], dtype=dtype, device=pool.device)
            step = max(1, READ_CHUNK_BYTES // max(1, pool[0].numel() * 4))  # blocks per slice (float32 temporaries)
            for a in range(0, blocks.numel(), step):  # in slices: no whole-context float32 copy at long context
                ids = blocks[a:a + step]
                x = pool[ids]  # [nb, KV, bs, hd]
                if sc:
                    x = x.float().mul_(sc[layer][ids][..., None])
                dst = res[:, a * bs:(a + ids.numel()) * bs].view(res.shape[0], ids.numel(), bs, res.shape[-1])
                dst.copy_(x.transpose(0, 1))  # no reshaped float32 copy: converted once, straight into place
            out.append(res[:, skip:length])
        return out[0], out[1]


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., hd] -> int8 values and one float32 scale per vector (amax / 127), as the int8 cache stores them."""
    xf = x.float()
    s = xf.abs().amax(-1) / 127.0
    q = torch.where(s[..., None] > 0, xf / s[..., None], torch.zeros((), device=x.device)).round().clamp(-127, 127)
    return q.to(torch.int8), s
