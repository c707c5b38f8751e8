"""`LfmLM`: an lm-evaluation-harness model backend over the engine, registered as `lfm`.

`lm_eval.simple_evaluate(model=LfmLM("MODEL"), tasks=[...])`, or `model="lfm", model_args="pretrained=MODEL"` once
this module is imported. It follows lm-eval's HFLM conventions, so scores compare with `--model hf`: text is encoded
without BOS (control-token strings become control ids, as a transformers tokenizer does, which a chat-templated
prompt needs), an empty context is the BOS id, trailing spaces of a context move to the continuation, and perplexity
windows are lm-eval's rolling, disjoint windows of `max_length` tokens (HFLM's context_len=1). Scores come from the
engine's prompt log-probabilities (vLLM's `prompt_logprobs`), generations from the engine with `until` as stop
strings, greedy unless `do_sample`; all requests of a call go to the engine together (lfm/eval/scoring.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..engine.llm import LLM
from ..engine.sampling import SamplingParams
from .scoring import Scorer


@register_model("lfm")
class LfmLM(TemplateLM):
    """lm-eval's model interface over `lfm.LLM` (any checkpoint `LLM` loads; None: the built-in demo model)."""

    def __init__(self, pretrained: str | None = None, llm: LLM | None = None, dtype: str = "auto", device: str = "cpu",
                 batch_size: int | str | None = "auto", max_length: int | None = None, max_gen_toks: int = 256,
                 seed: int = 0, quantization: str | None = None, **engine_kwargs: Any) -> None:
        super().__init__()
        self.llm = llm if llm is not None else LLM(pretrained or None, dtype=dtype, device=device,
                                                   quantization=quantization, **engine_kwargs)
        # "auto" (lm-eval's word; also "auto:N"): every request to the engine at once, its scheduler batches them
        size = None if batch_size is None or str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(self.llm, max_length, size, int(seed))
        self.tok = self.scorer.tok
        self.name = str(pretrained or self.llm.path or "lfm")
        self.max_length = self.scorer.max_length
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._device = device
        random.seed(seed)
        torch.manual_seed(seed)

    # ---- tokens ------------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.prefix_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.scorer.encode(string, add_bos=bool(add_special_tokens))

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
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        out = self.scorer.score_tokens([(ctx, cont) for _, ctx, cont in requests], "loglikelihood", not disable_tqdm)
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        totals = [ll for ll, _ in self.scorer.loglikelihood_rolling(texts, progress=not disable_tqdm)]
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # ---- generation --------------------------------------------------------------------------------------------
    def sampling_params(self, gen_kwargs: dict[str, Any]) -> SamplingParams:
        """lm-eval's gen_kwargs (until, max_gen_toks, do_sample, temperature, top_p, top_k) -> SamplingParams.
        Greedy unless do_sample is true, as HFLM; the checkpoint's EOS ids stop generation as well as `until`."""
        kw = dict(gen_kwargs or {})
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(kw.get("max_gen_toks", kw.get("max_new_tokens", self.max_gen_toks)))
        sample = bool(kw.get("do_sample", False))
        temperature = float(kw.get("temperature", 1.0) or 0.0) if sample else 0.0
        return SamplingParams(temperature=temperature, top_p=float(kw.get("top_p", 1.0) or 1.0),
                              top_k=int(kw.get("top_k", 0) or 0), max_tokens=max_tokens,
                              stop=[s for s in until if s], seed=self.seed)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for req in requests:
            context, gen_kwargs = req.args
            sp = self.sampling_params(gen_kwargs)
            room = self.llm.max_model_len - sp.max_tokens
            if room < 1:
                raise ValueError(f"max_gen_toks {sp.max_tokens} leaves no room in the {self.llm.max_model_len}-token "
                                 "context")
            ids = self.tok_encode(context) or [self.prefix_token_id]
            prompts.append(ids[-room:])  # left-truncated, as HFLM does
            params.append(sp)
        texts = [o.text for o in self.scorer.run(prompts, params, "generate_until", progress=not disable_tqdm)]
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts
