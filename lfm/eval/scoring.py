"""What every evaluation asks of the engine: log-likelihoods from prompt log-probabilities, rolling perplexity
windows, and batched generation with a progress bar. No lm-eval import, so the built-in tasks run without it;
`LfmLM` (lm-eval's interface) is a thin layer over this.

Requests are all submitted to the engine (`LLMEngine.add_request`), at most `batch_size` in flight (None: all; the
scheduler still runs at most max_num_seqs together), and the engine is stepped until they finish: its continuous
batching is the batching. Token conventions are lm-eval HFLM's (see lfm/eval/lm.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm import tqdm

from ..engine.llm import LLM
from ..engine.sampling import SamplingParams
from ..engine.sequence import RequestOutput

_ids = itertools.count()


def rolling_windows(ids: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows that score every token of `ids` once: the first max_length tokens
    after `prefix`, then blocks of up to max_length tokens each conditioned on the tokens before it so that a window
    is max_length + 1 tokens long (lm-eval's get_rolling_token_windows + make_disjoint_window, context_len=1)."""
    if not ids:
        return []
    out = [([prefix], ids[:max_length])]
    pos = max_length
    while pos < len(ids):
        end = min(pos + max_length, len(ids))
        out.append((ids[end - max_length - 1:pos], ids[pos:end]))
        pos = end
    return out


class Scorer:
    """Scoring and generation over one `LLM`, for lm-eval and the built-in tasks."""

    def __init__(self, llm: LLM, max_length: int | None = None, batch_size: int | None = None, seed: int = 0,
                 progress: bool = True) -> None:
        if llm.tokenizer is None:
            raise ValueError("evaluation needs a tokenizer: this checkpoint has no tokenizer.json")
        self.llm, self.tok = llm, llm.tokenizer
        # scoring feeds max_length + 1 tokens (HFLM's inputs plus the last token, whose log-probability the engine
        # reports as a prompt token) and the engine needs room for one generated token after them
        room = llm.max_model_len - 2
        self.max_length = min(int(max_length or room), room)
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first perplexity window are conditioned on: BOS (else EOS), as HFLM."""
        return self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Text -> ids as a transformers tokenizer does (control-token strings become control ids), BOS if asked."""
        ids = self.tok.backend.encode(text, add_special_tokens=False).ids
        return [self.tok.bos_token_id, *ids] if add_bos and self.tok.bos_token_id is not None else ids

    def run(self, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams], desc: str,
            chat: bool = False, progress: bool | None = None) -> list[RequestOutput]:
        """Every prompt through the engine, outputs in order; a request that fails raises (the rest are aborted)."""
        n = len(prompts)
        params = [params] * n if isinstance(params, SamplingParams) else list(params)
        eng, tag = self.llm.engine, f"eval{next(_ids)}"
        outs: list[RequestOutput | None] = [None] * n
        open_: dict[str, tuple[int, object]] = {}
        todo = iter(range(n))
        limit = self.batch_size or n
        bar = tqdm(total=n, desc=desc, disable=not (self.progress if progress is None else progress), leave=False)
        try:
            while True:
                while len(open_) < limit and (i := next(todo, None)) is not None:
                    rid = f"{tag}-{i}"
                    open_[rid] = (i, eng.add_request(rid, list(prompts[i]), params[i], chat))
                if not open_:
                    break
                if not eng.has_unfinished_requests():
                    raise RuntimeError("the engine stopped with requests unfinished")
                for d in eng.step():
                    if d.request_id in open_ and d.finish_reason is not None:
                        i, seq = open_.pop(d.request_id)
                        if d.finish_reason == "error":
                            raise RuntimeError(d.error or "generation failed")
                        outs[i] = seq.to_output()
                        bar.update(1)
        finally:
            for rid in open_:
                eng.abort_request(rid)
            bar.close()
        return outs  # type: ignore[return-value]

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "scoring",
                     progress: bool | None = None) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax) per pair. The
        last max_length + 1 tokens of context + continuation are fed (HFLM truncates from the left too)."""
        prompts, starts = [], []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("an empty continuation has no log-likelihood")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            if len(whole) - len(cont) < 1:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit in max_length {self.max_length}")
            prompts.append(whole)
            starts.append(len(whole) - len(cont))
        sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, seed=self.seed)
        results = []
        for out, start in zip(self.run(prompts, sp, desc, progress=progress), starts):
            recs = out.prompt_logprobs[start:]
            greedy = all(r.top and r.top[0][0] == r.token_id for r in recs)
            results.append((float(sum(r.logprob for r in recs)), bool(greedy)))
        return results

    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "loglikelihood",
                      progress: bool | None = None) -> list[tuple[float, bool]]:
        """lm-eval's loglikelihood on (context, continuation) strings: trailing context spaces join the
        continuation, the continuation's tokens are those of context + continuation after the context's."""
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests], desc, progress)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            cont = self.encode(continuation)
            return ([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id] else (cont[:1], cont[1:])
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str = "loglikelihood_rolling",
                              progress: bool | None = None) -> list[tuple[float, int]]:
        """(log-likelihood, tokens scored) of whole texts, every token scored once in rolling windows."""
        pairs, owner = [], []
        for n, text in enumerate(texts):
            for w in rolling_windows(self.encode(text), self.prefix_token_id, self.max_length):
                pairs.append(w)
                owner.append(n)
        totals, counts = [0.0] * len(texts), [0] * len(texts)
        for n, (ctx_cont, (ll, _)) in zip(owner, zip(pairs, self.score_tokens(pairs, desc, progress))):
            totals[n] += ll
            counts[n] += len(ctx_cont[1])
        return list(zip(totals, counts))
