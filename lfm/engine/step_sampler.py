"""Sampling for one continuous-batching step: each row is a different request with its own state.

The offline `Sampler` is built once per batch; here the batch changes every step, so the per-request state (seeded
generator, penalty history, grammar constraint) lives in a `RowState` that travels with the sequence, and one call
samples whatever rows are ready. The maths is the offline sampler's (same penalty formula, same filters, one
multinomial draw per row from its own generator), so a seeded or greedy request gives the tokens `LLM.generate`
gives, whatever else shares the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .grammar import Constraint, GrammarBackend, apply_bitmask
from .sampling import Sampler, SamplingParams


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), best first


@dataclass(slots=True)
class RowState:
    """One sequence's sampling state."""

    params: SamplingParams
    vocab_size: int
    prompt_ids: list[int]
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's only; k: also the k best
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    constraint: Constraint | None = None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # [V] bool, prompt and output (repetition penalty)
    counts: torch.Tensor | None = None  # [V] float, output only (presence / frequency penalties)

    def __post_init__(self) -> None:
        p = self.params
        if not p.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            self.seen[torch.as_tensor(self.prompt_ids, dtype=torch.long)] = True
        if self.presence_penalty or self.frequency_penalty:
            self.counts = torch.zeros(self.vocab_size)

    def record(self, token: int, text: bytes = b"") -> None:
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        if self.constraint is not None:
            self.constraint.accept(token, text)


def sample_step(logits: torch.Tensor, rows: list[RowState], closing: list[bool],
                grammar: GrammarBackend | None) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [n, V] for n ready rows -> (next token per row, its logprob record or None).

    `closing[i]` asks row i, if grammar-constrained, to steer towards the end of its structure (near max_tokens).
    """
    logits = logits.float()
    n, V = logits.shape
    want_lp = [r.top_logprobs is not None for r in rows]
    raw_lp = torch.log_softmax(logits, -1) if any(want_lp) else None
    logits = logits.clone()
    for i, r in enumerate(rows):
        if r.logit_bias:
            ids = torch.tensor(list(r.logit_bias), dtype=torch.long)
            logits[i, ids] += torch.tensor(list(r.logit_bias.values()))
        if r.counts is not None:
            logits[i] -= r.frequency_penalty * r.counts + r.presence_penalty * (r.counts > 0).float()
        if r.seen is not None:
            pen = r.params.repetition_penalty
            row = logits[i]
            logits[i] = torch.where(r.seen, torch.where(row > 0, row / pen, row * pen), row)
        if r.constraint is not None and r.constraint.spec.banned:
            logits[i, list(r.constraint.spec.banned)] = float("-inf")

    forced: dict[int, int] = {}
    masked: list[int] = []
    bitmask = None
    for i, r in enumerate(rows):
        c = r.constraint
        if c is None:
            continue
        f = c.forced()
        if f is not None:
            forced[i] = f
            continue
        if grammar is not None and c.matcher is not None:
            if bitmask is None:
                bitmask = grammar.new_bitmask(n)
            if c.fill(bitmask, i):
                masked.append(i)
    if masked:
        apply_bitmask(logits, bitmask, masked, grammar.control)
        for i in masked:
            c = rows[i].constraint
            if closing[i]:
                forced[i] = grammar.closing_pick(torch.isfinite(logits[i]), c.in_string, c.head.end_ids)

    out = logits.argmax(-1)
    sampled = [i for i, r in enumerate(rows) if r.generator is not None and i not in forced]
    if sampled:
        sub = Sampler._filter(logits[sampled], [rows[i].params for i in sampled])
        probs = sub.softmax(-1)
        for j, i in enumerate(sampled):
            if not bool(torch.isfinite(sub[j]).any()):
                continue  # every token masked (cannot happen with a consistent grammar); keep the argmax
            out[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
    tokens = out.tolist()
    for i, t in forced.items():
        tokens[i] = t

    records: list[TokenLogprob | None] = []
    for i, r in enumerate(rows):
        if raw_lp is None or not want_lp[i]:
            records.append(None)
            continue
        rec = TokenLogprob(tokens[i], float(raw_lp[i, tokens[i]]))
        if r.top_logprobs:
            vals, idx = raw_lp[i].topk(min(r.top_logprobs, V))
            rec.top = list(zip(idx.tolist(), vals.tolist()))
        records.append(rec)
    vocab = grammar.token_bytes if grammar is not None else None
    for r, t in zip(rows, tokens):
        r.record(t, vocab[t] if vocab is not None and r.constraint is not None and t < len(vocab) else b"")
    return tokens, records
