"""A teacher's top-K log-probabilities, computed once and stored as safetensors shards that distillation streams.

Layout of a cache directory: `shard_NNNNN.safetensors` (tensors `indices` int32 [R, T, K] and `logprobs` float32
[R, T, K] for R consecutive training rows) and `cache.json` (K, temperature, seq_len, row count, rows per shard, the
teacher's name and a SHA-256 of the training rows). `cache.json` is written last, so a directory without it is an
unfinished cache and is rebuilt; the digest makes a cache refuse rows it was not built for (other data, other
seq_len, other tokenizer). Values are stored as computed (float32), so a read returns exactly what was written.
Rows are read one at a time through safetensors' lazy slices: training reads only the rows of its batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import Rows
from .distributed import World

META = "cache.json"


class TopKCacheError(ValueError):
    """A cache that does not fit the run (other data, K or temperature); the message says what differs."""


@dataclass
class CacheMeta:
    top_k: int
    temperature: float
    seq_len: int
    num_rows: int
    rows_per_shard: int
    rows_sha256: str
    teacher: str


def rows_digest(rows: Rows) -> str:
    h = hashlib.sha256()
    for a in (rows.tokens, rows.labels, rows.positions):
        h.update(np.ascontiguousarray(a, dtype=np.int32).tobytes())
    return h.hexdigest()


def teacher_topk(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, log-probabilities) of the K most likely tokens of softmax(logits / T), per position."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    vals, idx = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return idx, vals


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def build_cache(out: Path, rows: Rows, teacher_logits: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                meta: CacheMeta, world: World, batch_size: int, device: torch.device) -> None:
    """Collective: rank r writes shards r, r + size, ...; rank 0 writes cache.json once all are there."""
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-meta.num_rows // meta.rows_per_shard)
    for s in range(world.rank, n_shards, world.size):
        lo, hi = s * meta.rows_per_shard, min((s + 1) * meta.rows_per_shard, meta.num_rows)
        idx_parts, lp_parts = [], []
        for b0 in range(lo, hi, batch_size):
            b = {k: v.to(device) for k, v in rows.take(list(range(b0, min(b0 + batch_size, hi)))).items()}
            with torch.no_grad():
                i, v = teacher_topk(teacher_logits(b), meta.top_k, meta.temperature)
            idx_parts.append(i.to(torch.int32).cpu())
            lp_parts.append(v.cpu())
        tmp = out / (shard_name(s) + ".tmp")
        save_file({"indices": torch.cat(idx_parts).contiguous(), "logprobs": torch.cat(lp_parts).contiguous()}, tmp)
        os.replace(tmp, out / shard_name(s))
    world.barrier()
    if world.is_main:
        tmp = out / (META + ".tmp")
        tmp.write_text(json.dumps(asdict(meta), indent=1))
        os.replace(tmp, out / META)
    world.barrier()


class TopKCache:
    """Read side: `take(row_indices)` -> (indices long [B, T, K], log-probabilities float32 [B, T, K])."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        p = self.path / META
        if not p.is_file():
            raise TopKCacheError(f"{self.path}: not a finished top-K cache (no {META})")
        self.meta = CacheMeta(**json.loads(p.read_text()))
        self._open: dict[int, object] = {}

    def check(self, rows: Rows, top_k: int, temperature: float) -> None:
        m = self.meta
        if m.top_k != top_k or m.temperature != temperature:
            raise TopKCacheError(f"{self.path}: built with top_k={m.top_k}, temperature={m.temperature}; the run "
                                 f"asks top_k={top_k}, temperature={temperature} (use another distill.cache)")
        if m.num_rows != len(rows) or m.seq_len != rows.tokens.shape[1] or m.rows_sha256 != rows_digest(rows):
            raise TopKCacheError(f"{self.path}: built for other training rows (data, seq_len or tokenizer "
                                 "changed); use another distill.cache")

    def _shard(self, s: int):
        f = self._open.get(s)
        if f is None:
            if len(self._open) >= 8:
                self._open.clear()
            f = self._open[s] = safe_open(str(self.path / shard_name(s)), framework="pt")
        return f

    def take(self, row_indices: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx, lp = [], []
        for r in np.asarray(row_indices).tolist():
            s, j = divmod(int(r), self.meta.rows_per_shard)
            f = self._shard(s)
            idx.append(f.get_slice("indices")[j:j + 1])
            lp.append(f.get_slice("logprobs")[j:j + 1])
        return torch.cat(idx).long(), torch.cat(lp)
