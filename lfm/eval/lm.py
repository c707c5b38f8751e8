"""`LfmLM`: an lm-evaluation-harness model backend over the engine, registered as `lfm`.

`lm_eval.simple_evaluate(model=LfmLM("MODEL"), tasks=[...])`, or `model="lfm", model_args="pretrained=MODEL"` once
this module is imported. It follows lm-eval's HFLM conventions, so scores compare with `--model hf`: text is encoded
without BOS (control-token strings become control ids, as a transformers tokenizer does, which a chat-templated
prompt needs), an empty context is the BOS id, trailing spaces of a context move to the continuation, and perplexity
windows are lm-eval's rolling, disjoint windows of `max_length` tokens. Scores come from the engine's prompt
log-probabilities (vLLM's `prompt_logprobs`), generations from the engine with `until` as stop strings; every request
of a call is submitted at once in batches of `batch_size` ("auto": the engine's max_num_seqs) and the engine's
continuous batching runs them together.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..engine.llm import LLM
from ..engine.sampling import SamplingParams


@register_model("lfm")
class LfmLM(TemplateLM):
    """lm-eval's model interface over `lfm.LLM` (any checkpoint `LLM` loads; None: the built-in demo model)."""

    def __init__(self, pretrained: str | None = None, llm: LLM | None = None, dtype: str = "auto", device: str = "cpu",
                 batch_size: int | str = "auto", max_length: int | None = None, max_gen_toks: int = 256,
                 seed: int = 0, quantization: str | None = None, **engine_kwargs: Any) -> None:
        super().__init__()
        self.llm = llm if llm is not None else LLM(pretrained or None, dtype=dtype, device=device,
                                                   quantization=quantization, **engine_kwargs)
        if self.llm.tokenizer is None:
            raise ValueError("lm-eval needs a tokenizer: this checkpoint has no tokenizer.json")
        self.tok = self.llm.tokenizer
        self.name = str(pretrained or self.llm.path or "lfm")
        # scoring feeds max_length + 1 tokens (HFLM's inputs plus the last token, whose log-probability the engine
        # reports as a prompt token) and the engine needs room for one generated token after them
        room = self.llm.max_model_len - 2
        self.max_length = min(int(max_length or room), room)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        if batch_size in ("auto", None):
            self.batch_size = self.llm.engine.config.max_num_seqs
        else:
            self.batch_size = int(str(batch_size).split(":")[0])  # lm-eval's "auto:N" form: the N is ignored
        self._device = device
        random.seed(seed)
        torch.manual_seed(seed)

    # ---- tokens ------------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and every perplexity window) is conditioned on: BOS, as HFLM uses it."""
        return self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        ids = self.tok.backend.encode(string, add_special_tokens=False).ids
        if add_special_tokens and self.tok.bos_token_id is not None:
            ids = [self.tok.bos_token_id, *ids]
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    # ---- chat (simple_evaluate(apply_chat_template=True)) --------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- scoring -----------------------------------------------------------------------------------------------
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]], desc: str = "scoring",
                     disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether each continuation token is the argmax), for token pairs.

        The last `max_length` tokens of context + continuation are fed (HFLM truncates from the left too); the
        engine's prompt log-probabilities give log p of every fed token after the first."""
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
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(prompts), desc=desc, disable=disable_tqdm)
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i:i + self.batch_size]
            for out, start in zip(self.llm.generate(chunk, sp), starts[i:i + len(chunk)]):
                recs = out.prompt_logprobs[start:]
                ll = sum(r.logprob for r in recs)
                greedy = all(r.top and r.top[0][0] == r.token_id for r in recs)
                results.append((float(ll), bool(greedy)))
            bar.update(len(chunk))
        bar.close()
        return results

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        out = self.score_tokens([(ctx, cont) for _, ctx, cont in requests], "loglikelihood", disable_tqdm)
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity): each text's tokens in disjoint windows of max_length, the
        first conditioned on the prefix token, each next one on the max_length tokens before its last token
        (lm-eval's rolling windows with HFLM's context_len=1: every token scored once)."""
        pairs, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            for w in map(make_disjoint_window, windows):
                pairs.append(w)
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self.score_tokens(pairs, "loglikelihood_rolling", disable_tqdm)):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    # ---- generation --------------------------------------------------------------------------------------------
    def sampling_params(self, gen_kwargs: dict[str, Any]) -> SamplingParams:
        """lm-eval's gen_kwargs (until, max_gen_toks, do_sample, temperature, top_p, top_k) -> SamplingParams.
        Greedy unless do_sample is true, as HFLM; the EOS ids stop generation as well as `until`."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks)))
        sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if sample else 0.0) or 0.0)
        if not sample:
            temperature = 0.0
        return SamplingParams(temperature=temperature, top_p=float(kw.pop("top_p", 1.0) or 1.0),
                              top_k=int(kw.pop("top_k", 0) or 0), max_tokens=max_tokens,
                              stop=[s for s in until if s], seed=self.seed)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for req in requests:
            context, gen_kwargs = req.args
            sp = self.sampling_params(gen_kwargs)
            ids = self.tok_encode(context) or [self.prefix_token_id]
            room = self.max_length - sp.max_tokens
            if room < 1:
                raise ValueError(f"max_gen_toks {sp.max_tokens} leaves no room in max_length {self.max_length}")
            prompts.append(ids[-room:])  # left-truncated, as HFLM does
            params.append(sp)
        texts: list[str] = []
        bar = tqdm(total=len(prompts), desc="generate_until", disable=disable_tqdm)
        for i in range(0, len(prompts), self.batch_size):
            outs = self.llm.generate(prompts[i:i + self.batch_size], params[i:i + self.batch_size])
            texts += [o.text for o in outs]
            bar.update(len(outs))
        bar.close()
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts
