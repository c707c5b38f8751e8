"""The hybrid cache: a fixed-size conv state per conv layer and a static KV buffer per attention layer.

Allocated once for a batch and a maximum length (as gpt-fast does), so decoding never reallocates. All rows share
one write position `pos`: prompts of different lengths are left-padded, and `key_mask` remembers which slots are
padding so attention skips them. `next_pos` is each row's next RoPE position (a padded row starts at 0 at its first
real token, which is what makes a padded batch give every row exactly the logits it gets alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import LfmConfig


@dataclass(slots=True)
class HybridCache:
    conv: dict[int, torch.Tensor]  # layer -> [B, hidden, L-1]: the last L-1 columns of the conv input
    k: dict[int, torch.Tensor]  # layer -> [B, kv_heads, max_len, head_dim]
    v: dict[int, torch.Tensor]
    max_len: int
    pos: int = 0  # slots filled so far (same for every row)
    key_mask: torch.Tensor | None = None  # [B, max_len] bool; None while no row has padding
    next_pos: torch.Tensor | None = None  # [B] long; None while rows are aligned (positions = slot index)
    # int8 KV (kv_dtype=torch.int8): one float32 scale per key / value vector of a head, layer -> [B, kv_heads, max_len]
    k_scale: dict[int, torch.Tensor] = field(default_factory=dict)
    v_scale: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def allocate(cls, config: LfmConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", kv_dtype: torch.dtype | None = None) -> HybridCache:
        """kv_dtype: the KV buffers' dtype (default: the model's); torch.int8 stores them quantized (half of bf16)."""
        c = config
        conv = {i: torch.zeros(batch, c.hidden_size, c.conv_L_cache - 1, dtype=dtype, device=device) for i in c.conv_layers}
        shape = (batch, c.num_key_value_heads, max_len, c.head_size)
        kv_dtype = kv_dtype or dtype
        k = {i: torch.zeros(shape, dtype=kv_dtype, device=device) for i in c.attn_layers}
        v = {i: torch.zeros(shape, dtype=kv_dtype, device=device) for i in c.attn_layers}
        ks, vs = {}, {}
        if kv_dtype == torch.int8:
            ks = {i: torch.zeros(shape[:3], dtype=torch.float32, device=device) for i in c.attn_layers}
            vs = {i: torch.zeros(shape[:3], dtype=torch.float32, device=device) for i in c.attn_layers}
        elif kv_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"KV cache dtype must be the model's, a float type or int8, got {kv_dtype}")
        return cls(conv=conv, k=k, v=v, max_len=max_len, k_scale=ks, v_scale=vs)

    @property
    def quantized(self) -> bool:
        return bool(self.k_scale)

    def write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k / v [B, KV, T, hd] of attention layer i at slots start..start+T."""
        T = k.shape[2]
        for buf, sc, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if sc:
                q, s = quantize_kv(x)
                buf[i][:, :, start:start + T] = q
                sc[i][:, :, start:start + T] = s
            else:
                buf[i][:, :, start:start + T] = x

    def read(self, i: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots 0..end of layer i in `dtype` (views, or dequantized copies for int8)."""
        if not self.quantized:
            return self.k[i][:, :, :end], self.v[i][:, :, :end]
        return tuple(  # type: ignore[return-value]
            (buf[i][:, :, :end].float() * sc[i][:, :, :end, None]).to(dtype)
            for buf, sc in ((self.k, self.k_scale), (self.v, self.v_scale)))

    @property
    def batch_size(self) -> int:
        t = next(iter(self.conv.values()), None)
        if t is None:
            t = next(iter(self.k.values()))
        return t.shape[0]

    def reset(self) -> None:
        for t in self.conv.values():
            t.zero_()
        self.pos, self.key_mask, self.next_pos = 0, None, None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self._buffers() for t in d.values())

    def _buffers(self) -> tuple[dict[int, torch.Tensor], ...]:
        return self.conv, self.k, self.v, self.k_scale, self.v_scale

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these batch rows (finished sequences leave the batch without a copy of the others' history)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=next(iter((self.conv or self.k).values())).device)
        for d in self._buffers():
            for i in d:
                d[i] = d[i].index_select(0, idx)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, idx)
        if self.next_pos is not None:
            self.next_pos = self.next_pos.index_select(0, idx)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., hd] -> int8 values and one float32 scale per vector (amax / 127; what lfm.kernels' decode writes)."""
    xf = x.float()
    s = xf.abs().amax(-1) / 127.0
    q = torch.where(s[..., None] > 0, xf / s[..., None], torch.zeros((), device=x.device)).round().clamp(-127, 127)
    return q.to(torch.int8), s
