"""`SamplingParams` (vLLM's names and meanings) and a batched sampler where every row has its own parameters.

Rows are processed together on the logits tensor; only the final draw loops over rows, because each row owns a
seeded `torch.Generator` (same seed => same tokens, whatever else is in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the prompt or the output (as transformers)
    max_tokens: int | None = 16  # None = until a stop or the context is full
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before them
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the checkpoint's EOS
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 or a positive integer, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens > 0),
             f"max_tokens must be a positive integer, got {self.max_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Turns last-position logits [B, V] into next tokens [B] for a batch of rows with their own parameters."""

    def __init__(self, params: list[SamplingParams], prompts: list[list[int]], vocab_size: int, device: torch.device) -> None:
        self.params = list(params)
        self.device = device
        self.gens: list[torch.Generator | None] = []
        for p in self.params:
            if p.greedy:
                self.gens.append(None)
                continue
            g = torch.Generator(device=device)
            g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
            self.gens.append(g)
        self.penalty = torch.tensor([p.repetition_penalty for p in self.params], device=device)
        self.seen: torch.Tensor | None = None
        if any(p.repetition_penalty != 1.0 for p in self.params):
            self.seen = torch.zeros(len(self.params), vocab_size, dtype=torch.bool, device=device)
            for i, ids in enumerate(prompts):
                self.seen[i, torch.as_tensor(ids, dtype=torch.long, device=device)] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.seen is not None:
            pen = self.penalty[:, None]
            logits = torch.where(self.seen, torch.where(logits > 0, logits / pen, logits * pen), logits)
        out = logits.argmax(-1)
        rows = [i for i, g in enumerate(self.gens) if g is not None]
        if rows:
            sub = self._filter(logits[rows], [self.params[i] for i in rows])
            probs = sub.softmax(-1)
            for j, i in enumerate(rows):
                out[i] = torch.multinomial(probs[j], 1, generator=self.gens[i])[0]
        if self.seen is not None:
            self.seen[torch.arange(len(out), device=out.device), out] = True
        return out

    @staticmethod
    def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, then top-k, top-p and min-p masks (in transformers' order)."""
        dev = logits.device
        temp = torch.tensor([p.temperature for p in params], device=dev)[:, None]
        logits = logits / temp
        neg = torch.finfo(logits.dtype).min
        ks = [p.top_k for p in params]
        if any(ks):
            V = logits.shape[-1]
            k = torch.tensor([min(x, V) if x else V for x in ks], device=dev)
            kth = logits.sort(-1, descending=True).values.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, neg)
        top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
        if bool((top_p < 1).any()):
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the smallest prefix whose mass reaches top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), neg)
        min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
        if bool((min_p > 0).any()):
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, neg)
        return logits

    def select(self, rows: list[int]) -> None:
        """Keep the state of these rows only (finished rows leave the batch)."""
        self.params = [self.params[i] for i in rows]
        self.gens = [self.gens[i] for i in rows]
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.penalty = self.penalty[idx]
        if self.seen is not None:
            self.seen = self.seen[idx]
