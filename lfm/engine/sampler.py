"""The one sampler: logits of the sequences that are due -> their next tokens, each with its own parameters.

Rows are processed together on the logits' device; per-request state (a seeded generator, penalty counts, a grammar
constraint) lives in each `Sequence`, so a seeded request samples the same tokens whatever else shares the step, and
a preempted one resumes exactly. Order (as transformers / vLLM): logit bias, presence / frequency penalties,
repetition penalty, grammar mask, then temperature, top-k, top-p, min-p and one draw per row (the exponential race,
`exponential_draw`: a seeded request draws from its own generator). Log-probabilities are those of the raw model
distribution (as vLLM's default), or with `processed_logprobs` (vLLM's logprobs_mode="processed_logprobs") those
of the distribution a sampled row was drawn from (after penalties, temperature, top-k / top-p / min-p): what an RL
trainer's importance weights need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import kernels as _kernels
from .sampling import SamplingParams
from .sequence import Sequence, TokenLogprob

if TYPE_CHECKING:  # xgrammar (the `serve` extra) loads only with a grammar backend
    from .grammar import GrammarBackend


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (in transformers' order), per row."""
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
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), neg)
    min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, neg)
    return logits


def exponential_draw(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One draw per row from probs [n, V]: argmax(probs / E) with E ~ Exp(1) per entry picks token t with probability
    probs[t] (the exponential race; vLLM and gpt-fast sample this way), for every row at once, without the host
    waiting per row. A request with a seed draws its E from its own generator, so it samples the same tokens
    whatever shares the step; the others share one draw from the device's default generator."""
    e = torch.empty_like(probs).exponential_()
    for j, s in enumerate(seqs):
        if s.params.seed is not None:
            e[j].exponential_(generator=s.generator)
    return probs.div_(e).argmax(-1)


def logprob_record(lp: torch.Tensor, token: int, top: int) -> TokenLogprob:
    rec = TokenLogprob(token, float(lp[token]))
    if top:
        vals, idx = lp.topk(min(top, lp.shape[-1]))
        rec.top = list(zip(idx.tolist(), vals.tolist()))
    return rec


class Sampler:
    def __init__(self, grammar: GrammarBackend | None = None, processed_logprobs: bool = False) -> None:
        self.grammar = grammar
        self.processed_logprobs = processed_logprobs

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [n, V] for n sequences -> (next token per sequence, its logprob record or None). A row whose
        distribution is not a distribution (NaN logits, or parameters that overflow it) gets token -1: the engine
        ends that sequence alone with an error."""
        logits = logits.float()
        n, V = logits.shape
        for s in seqs:
            s.sampling_state(logits.device)
        want_lp = [s.params.logprobs is not None for s in seqs]
        if all(s.generator is None and s.seen is None and s.counts is None and s.constraint is None
               and not s.params.logit_bias for s in seqs):
            # greedy with nothing to apply (the common decode): one pass; max propagates NaN, so a NaN row shows.
            # Log-probabilities (the raw distribution's) only for the rows that ask, with the same log_softmax.
            fast = _kernels.row_max(logits)  # None off CPU or without the kernels
            vals, out = fast if fast is not None else logits.max(-1)  # ties: the first index, as argmax
            tokens = out.masked_fill(torch.isnan(vals), -1).tolist()  # the step's one wait for the device
            rows = [i for i in range(n) if want_lp[i] and tokens[i] >= 0]
            if not rows:
                return tokens, [None] * n
            lp = torch.log_softmax(logits if len(rows) == n else logits[rows], -1)
            records: list[TokenLogprob | None] = [None] * n
            for j, i in enumerate(rows):
                records[i] = logprob_record(lp[j], tokens[i], seqs[i].params.logprobs)
            return tokens, records
        raw_lp = torch.log_softmax(logits, -1) if any(want_lp) else None
        logits = self._penalize(logits.clone(), seqs)
        forced = self._constrain(logits, seqs)

        out = logits.argmax(-1)
        bad = torch.isnan(logits).any(-1)  # on the device: read back with the tokens, in the step's one wait
        # a NaN row is drawn from too (its own generator only): it ends with an error whatever it draws
        sampled = [i for i, s in enumerate(seqs) if s.generator is not None and i not in forced]
        lp_rows = {}
        if sampled:
            sub = filter_logits(logits[sampled], [seqs[i].params for i in sampled])
            probs = sub.softmax(-1)
            if self.processed_logprobs and raw_lp is not None:
                lp_rows = dict(zip(sampled, torch.log_softmax(sub, -1)))
            idx = torch.tensor(sampled, device=logits.device)
            bad[idx] |= ~torch.isfinite(probs).all(-1)
            out[idx] = exponential_draw(probs, [seqs[i] for i in sampled])
        tokens = out.masked_fill(bad, -1).tolist()  # the step's one wait for the device
        for i, t in forced.items():
            if tokens[i] >= 0:  # a broken row stays broken
                tokens[i] = t
        records = [logprob_record(lp_rows.get(i, raw_lp[i]), tokens[i], s.params.logprobs)
                   if want_lp[i] and tokens[i] >= 0 else None
                   for i, s in enumerate(seqs)]
        return tokens, records

    def token_bytes(self, seq: Sequence, token: int) -> bytes:
        """The bytes a constrained sequence's grammar advances by (empty when unconstrained)."""
        if seq.constraint is None or self.grammar is None:
            return b""
        vocab = self.grammar.token_bytes
        return vocab[token] if token < len(vocab) else b""

    @staticmethod
    def _penalize(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        for i, s in enumerate(seqs):
            p = s.params
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
            if s.counts is not None:
                logits[i] -= p.frequency_penalty * s.counts + p.presence_penalty * (s.counts > 0).float()
            if s.seen is not None:
                row, pen = logits[i], p.repetition_penalty
                logits[i] = torch.where(s.seen, torch.where(row > 0, row / pen, row * pen), row)
            if s.constraint is not None and s.constraint.spec.banned:
                logits[i, list(s.constraint.spec.banned)] = float("-inf")
        return logits

    def _constrain(self, logits: torch.Tensor, seqs: list[Sequence]) -> dict[int, int]:
        """Apply grammar masks in place; return the rows whose next token is forced."""
        forced: dict[int, int] = {}
        masked: list[int] = []
        bitmask = None
        g = self.grammar
        closing = {i: g.must_close(s.constraint, s.max_tokens - s.num_output_tokens) for i, s in enumerate(seqs)
                   if g is not None and s.constraint is not None and s.constraint.matcher is not None}
        for i, s in enumerate(seqs):
            c = s.constraint
            if c is None:
                continue
            f = c.forced()
            if f is not None:
                forced[i] = f
                continue
            if g is not None and c.matcher is not None:
                if bitmask is None:
                    bitmask = g.new_bitmask(len(seqs))
                if c.fill(bitmask, i):
                    masked.append(i)
        if masked:
            from .grammar import apply_bitmask

            apply_bitmask(logits, bitmask, masked, g.control)
            for i in masked:
                c = seqs[i].constraint
                if closing.get(i):
                    forced[i] = g.closing_pick(torch.isfinite(logits[i]), c.in_string, c.head.end_ids)
        return forced
