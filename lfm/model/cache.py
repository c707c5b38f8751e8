"""The hybrid cache: a fixed-size conv state per conv layer and a static KV buffer per attention layer.

Allocated once for a batch and a maximum length (as gpt-fast does), so decoding never reallocates. All rows share
one write position `pos`: prompts of different lengths are left-padded, and `key_mask` remembers which slots are
padding so attention skips them. `next_pos` is each row's next RoPE position (a padded row starts at 0 at its first
real token, which is what makes a padded batch give every row exactly the logits it gets alone).
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @classmethod
    def allocate(cls, config: LfmConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> HybridCache:
        c = config
        conv = {i: torch.zeros(batch, c.hidden_size, c.conv_L_cache - 1, dtype=dtype, device=device) for i in c.conv_layers}
        shape = (batch, c.num_key_value_heads, max_len, c.head_size)
        k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in c.attn_layers}
        v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in c.attn_layers}
        return cls(conv=conv, k=k, v=v, max_len=max_len)

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
        return sum(t.numel() * t.element_size() for d in (self.conv, self.k, self.v) for t in d.values())

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these batch rows (finished sequences leave the batch without a copy of the others' history)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=next(iter((self.conv or self.k).values())).device)
        for d in (self.conv, self.k, self.v):
            for i in d:
                d[i] = d[i].index_select(0, idx)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, idx)
        if self.next_pos is not None:
            self.next_pos = self.next_pos.index_select(0, idx)
