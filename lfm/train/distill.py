"""Distillation (`data.task = "distill"`): the student learns the teacher's top-K next-token distribution.

Per trained position the teacher gives its K most likely tokens with their log-probabilities at temperature T
(online, from the teacher model, or streamed from a `topk_cache` built once). The student's distribution at the same
temperature is grouped the same way: the K teacher tokens, plus one bucket for all other tokens. The loss is the KL
divergence between those two (K + 1)-bucket distributions, times T^2 (Hinton et al.: gradients keep their scale
across temperatures), mixed with the data cross-entropy:

    loss = alpha * T^2 * KL(teacher_K+1 || student_K+1) + (1 - alpha) * CE(student, data)

The tail bucket is why the student is not pushed to put all its mass on K tokens: if the teacher leaves 5% outside
its top-K, the student is asked to leave 5% there too (a plain KL on renormalised top-K would ask for 0%). It is 0
exactly when the student matches the teacher on the K tokens and the tail, e.g. student = teacher.

Rows are the pretraining / SFT rows (packed documents, position restarts, IGNORE labels) and the teacher reads the
same position ids, so packed documents stay apart for both. Under FSDP2 the student is sharded as in pretraining;
the teacher runs whole on every rank, under no_grad (or is not loaded at all when a cache is used).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..model.checkpoint import load_model
from .config import TrainConfig, TrainConfigError
from .data import IGNORE
from .loop import Trainer
from .topk_cache import META, CacheMeta, TopKCache, build_cache, rows_digest, teacher_topk


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, t_idx: torch.Tensor, t_lp: torch.Tensor,
                 temperature: float = 1.0, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over the positions whose label is not IGNORE: (alpha * T^2 * KL + (1 - alpha) * CE, KL, CE).

    student_logits [..., V]; labels [...]; t_idx long / t_lp float [..., K]: the teacher's top-K ids and their
    log-probabilities at `temperature`."""
    V = student_logits.shape[-1]
    keep = labels.reshape(-1) != IGNORE
    logits = student_logits.reshape(-1, V)[keep].float()
    idx = t_idx.reshape(-1, t_idx.shape[-1])[keep]
    tlp = t_lp.reshape(-1, t_lp.shape[-1])[keep].float()
    s_lp = torch.log_softmax(logits / temperature, dim=-1)
    s_top = s_lp.gather(-1, idx)
    tiny = torch.finfo(torch.float32).tiny
    # tail buckets: 1 - (mass on the K tokens), in log space where that mass is close to 1
    t_rest = (1 - tlp.exp().sum(-1)).clamp(min=0)
    s_rest_log = torch.log((-torch.expm1(torch.logsumexp(s_top, -1))).clamp(min=tiny))
    kl_top = (tlp.exp() * (tlp - s_top)).sum(-1)
    kl_rest = torch.where(t_rest > 0, t_rest * (torch.log(t_rest.clamp(min=tiny)) - s_rest_log), 0.0)
    kl = (kl_top + kl_rest).sum()
    ce = F.cross_entropy(logits, labels.reshape(-1)[keep], reduction="sum") if alpha < 1 else kl.new_zeros(())
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl, ce


def load_teacher(name: str, dtype: torch.dtype, device: torch.device, student_vocab: int) -> torch.nn.Module:
    teacher = load_model(name, dtype=dtype).to(device).eval()
    teacher.requires_grad_(False)
    if teacher.config.vocab_size > student_vocab:
        raise TrainConfigError(f"distill.teacher {name}: vocabulary {teacher.config.vocab_size} is larger than the "
                               f"student's {student_vocab}; teacher and student must share a tokenizer")
    return teacher


class DistillTrainer(Trainer):
    """The pretraining / SFT loop with the distillation loss; everything else (resume, FSDP2, eval) is shared."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        super().__init__(cfg, resume=resume, progress=progress)
        d = cfg.distill
        self.teacher: torch.nn.Module | None = None
        self.cache: TopKCache | None = None
        if d.cache and self.stream is not None:
            raise TrainConfigError("distill.cache needs indexed rows: set data.streaming = false (or no cache)")
        dtype, dev = getattr(torch, cfg.model.dtype), self.world.device
        vocab = self.model.config.vocab_size
        if d.cache and not (Path(d.cache) / META).is_file():
            if not d.teacher:
                raise TrainConfigError(f"distill.cache {d.cache} is not built yet: give distill.teacher to build it")
            teacher = load_teacher(d.teacher, dtype, dev, vocab)
            meta = CacheMeta(d.top_k, d.temperature, cfg.data.seq_len, len(self.rows), d.rows_per_shard,
                             rows_digest(self.rows), d.teacher)
            t0 = time.perf_counter()
            build_cache(Path(d.cache), self.rows, lambda b: self._teacher_logits(teacher, b), meta, self.world,
                        cfg.batch_size, dev)
            if self.world.is_main:
                dt = time.perf_counter() - t0
                print(f"top-K cache {d.cache}: {len(self.rows)} rows in {dt:.1f} s "
                      f"({len(self.rows) * cfg.data.seq_len / max(dt, 1e-9):.0f} teacher tokens/s)", file=sys.stderr)
            del teacher
        if d.cache:
            self.cache = TopKCache(d.cache)
            self.cache.check(self.rows, d.top_k, d.temperature)
        else:
            self.teacher = load_teacher(d.teacher, dtype, dev, vocab)
        self._sums = torch.zeros(3)  # kl, ce, trained tokens of this step on this rank

    def _teacher_logits(self, teacher: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(b["input_ids"].device.type, dtype=torch.bfloat16,
                                             enabled=self.cfg.bf16_autocast):
            return teacher(b["input_ids"], position_ids=b["position_ids"])

    def _batch(self, micro: int) -> dict[str, torch.Tensor]:
        B, w = self.cfg.batch_size, self.world
        start = self.consumed + (micro * w.size + w.rank) * B
        if self.stream is not None:
            return {k: v.to(w.device) for k, v in self.stream.take_range(start, B).items()}
        rows = self.order.indices(start, B)
        b = self.rows.take(rows)
        b["row_ids"] = torch.from_numpy(rows)
        return {k: v.to(w.device) for k, v in b.items()}

    def topk(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.cfg.distill
        if self.cache is not None:
            idx, lp = self.cache.take(b["row_ids"].cpu().numpy())
            return idx.to(self.world.device), lp.to(self.world.device)
        return teacher_topk(self._teacher_logits(self.teacher, b), d.top_k, d.temperature)

    def loss_sum(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        d = self.cfg.distill
        t_idx, t_lp = self.topk(b)
        with torch.autocast(b["input_ids"].device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16_autocast):
            logits = self.model(b["input_ids"], position_ids=b["position_ids"])
        total, kl, ce = distill_loss(logits, b["labels"], t_idx, t_lp, d.temperature, d.alpha)
        self._sums += torch.stack([kl.detach().cpu(), ce.detach().cpu(),
                                   (b["labels"] != IGNORE).sum().cpu().float()])
        return total

    def train_step(self) -> dict[str, Any]:
        self._sums.zero_()
        rec = super().train_step()
        s = self.world.all_reduce(self._sums.clone().to(self.world.device)).cpu()
        n = max(float(s[2]), 1.0)
        rec["kl"] = float(s[0]) / n
        if self.cfg.distill.alpha < 1:
            rec["ce"] = float(s[1]) / n
        return rec
