"""`LLM`: the offline API (vLLM's names): `generate`, `chat`, `stream`, over one model and its tokenizer.

A batch of prompts is left-padded into one static cache and decoded together; a row that finishes leaves the batch
at once (its cache rows are dropped), so long and short requests do not pay for each other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.checkpoint import CheckpointError, load_model, resolve
from ..model.lfm2 import LfmForCausalLM
from ..model.cpu_linear import use_cpu_kernels
from ..model.quant import prepare as prepare_quantized
from ..model.quant import quantize_model
from ..text import IncrementalDetokenizer, Tokenizer, ToolCall, parse_tool_calls
from .sampling import Sampler, SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


@dataclass(slots=True)
class RequestOutput:
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated ids, including a final stop token
    finish_reason: str | None = None  # "stop" (stop token or string) or "length"
    prompt: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)  # chat only
    content: str | None = None  # chat only: the text outside tool-call blocks


class SeqState:
    """One request's progress: tokens, incremental text, and the stop rules."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int], max_new: int,
                 tok: Tokenizer | None, skip_special: bool) -> None:
        self.out = RequestOutput(prompt_token_ids=prompt_ids)
        self.params, self.stop_ids, self.max_new = params, stop_ids, max_new
        self.detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special) if tok is not None else None
        self.text = ""  # all text so far; `sent` chars of it were handed out
        self.sent = 0
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # text that may still turn into a stop string

    def push(self, t: int) -> str:
        """Add a token; return the text that is now final. Sets finish_reason when the request ends."""
        o = self.out
        o.token_ids.append(t)
        if t in self.stop_ids and not self.params.ignore_eos or t in self.params.stop_token_ids:
            o.finish_reason = "stop"
            return self._release(final=True)
        if self.detok is not None:
            self.text += self.detok.push(t)
            for s in self.params.stop:
                at = self.text.find(s, max(0, self.sent - len(s)))
                if at >= 0:
                    self.text = self.text[:at]
                    o.finish_reason = "stop"
                    return self._release(final=True)
        if len(o.token_ids) >= self.max_new:
            o.finish_reason = "length"
            return self._release(final=True)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        if final and self.detok is not None and self.out.finish_reason == "length":
            self.text += self.detok.flush()
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], end
        if final:
            self.out.text = self.text
        return delta


class LLM:
    """An LFM2 model ready to generate: `LLM("LiquidAI/LFM2.5-350M")`, a local directory, an in-memory model, or
    `LLM()`: the built-in demo model (offline)."""

    def __init__(self, model: str | Path | LfmForCausalLM | None = None, dtype: str | torch.dtype = "auto", device: str = "cpu",
                 tokenizer: str | Path | Tokenizer | None = None, max_model_len: int | None = None,
                 quantization: str | None = None, group_size: int = 64, kv_cache_dtype: str | None = None) -> None:
        self.path: Path | None = None
        if isinstance(model, LfmForCausalLM):
            self.model = model.eval()
        else:
            self.path = resolve(model)
            self.model = load_model(self.path, dtype=dtype, device=device)
        if quantization is not None:  # quantize on load: "int8" or "int4" (weight-only, CPU kernels)
            bits = {"int8": 8, "int4": 4}.get(quantization)
            if bits is None:
                raise ValueError(f"quantization must be 'int8' or 'int4', got {quantization!r}")
            quantize_model(self.model, bits, group_size)
            prepare_quantized(self.model)
        use_cpu_kernels(self.model)  # bfloat16 linears on CPUs without bfloat16 arithmetic
        if kv_cache_dtype not in (None, "auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' (the model's dtype) or 'int8', got {kv_cache_dtype!r}")
        self.model.kv_cache_dtype = torch.int8 if kv_cache_dtype == "int8" else None  # int8: half of bf16's bytes
        self.config = self.model.config
        tok_src = tokenizer if tokenizer is not None else self.path
        if isinstance(tok_src, Tokenizer):
            self.tokenizer: Tokenizer | None = tok_src
        elif tok_src is not None and str(tok_src).endswith(".gguf"):  # the tokenizer travels inside the file
            from ..gguf import load_gguf_tokenizer
            self.tokenizer = load_gguf_tokenizer(tok_src)
        elif tok_src is not None and Path(tok_src, "tokenizer.json").exists():
            self.tokenizer = Tokenizer.from_dir(tok_src)
        else:
            self.tokenizer = None  # token-id prompts still work
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.prefill_chunk = 2048  # prompt tokens per forward: bounds prefill activations at any prompt length
        self.generation_config = self._read_generation_config()

    # ---- public API -------------------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); one output per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self._encode(p) for p in prompts]
        outs = self._run(ids, self._params(sampling_params, len(ids)))
        for o, p in zip(outs, prompts):
            o.prompt = p if isinstance(p, str) else None
        return outs

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Text pieces of one completion as they are produced (never a broken UTF-8 character)."""
        params = self._params(sampling_params, 1)
        for _, delta in self._steps([self._encode(prompt)], params, chat=False):
            if delta:
                yield delta

    def chat(self, messages: list[Message] | list[list[Message]], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> RequestOutput | list[RequestOutput]:
        """Reply to a conversation (or a list of them) through the checkpoint's chat template; tool calls parsed."""
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else messages
        ids = [self.encode_chat(c, tools, add_generation_prompt, chat_template_kwargs) for c in convs]
        outs = self._run(ids, self._params(sampling_params, len(ids)), chat=True)
        for o in outs:
            o.tool_calls, o.content = parse_tool_calls(o.text)
        return outs[0] if single else outs

    def stream_chat(self, messages: list[Message], sampling_params: SamplingParams | None = None,
                    tools: list[dict] | None = None, chat_template_kwargs: dict[str, Any] | None = None) -> Iterator[str]:
        ids = self.encode_chat(messages, tools, True, chat_template_kwargs)
        for _, delta in self._steps([ids], self._params(sampling_params, 1), chat=True):
            if delta:
                yield delta

    def encode_chat(self, messages: list[Message], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        tok = self._need_tokenizer()
        return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                       **(chat_template_kwargs or {}))

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _run(self, prompts: list[list[int]], params: list[SamplingParams], chat: bool = False) -> list[RequestOutput]:
        seqs: dict[int, RequestOutput] = {}
        for i, _ in self._steps(prompts, params, chat, outputs=seqs):
            pass
        return [seqs[i] for i in range(len(prompts))]

    @torch.inference_mode()
    def _steps(self, prompts: list[list[int]], params: list[SamplingParams], chat: bool,
               outputs: dict[int, RequestOutput] | None = None) -> Iterator[tuple[int, str]]:
        """Yield (request index, new text) after every decoded token of every running request."""
        model, dev = self.model, self.model.device
        stop = self.stop_ids(chat)
        longest = max(len(p) for p in prompts)
        budget = self.max_model_len - longest
        if budget <= 0:
            raise ValueError(f"prompt of {longest} tokens leaves no room in the {self.max_model_len}-token context")
        seqs = []
        for p, sp in zip(prompts, params):
            max_new = min(sp.max_tokens or budget, budget)
            seqs.append(SeqState(p, sp, stop, max_new, self.tokenizer, skip_special=sp.skip_special_tokens))
            if outputs is not None:
                outputs[len(seqs) - 1] = seqs[-1].out
        B = len(prompts)
        ids = torch.full((B, longest), self.config.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(B, longest, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.as_tensor(p)
            mask[i, longest - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        cache = model.new_cache(B, longest + max(s.max_new for s in seqs))
        sampler = Sampler(params, prompts, self.config.vocab_size, dev)
        padded = not bool(mask.all())
        for a in range(0, longest, self.prefill_chunk):  # chunks bound activation memory (a 32K prompt, say)
            b = min(a + self.prefill_chunk, longest)
            logits = model(ids[:, a:b], cache, attention_mask=mask[:, a:b] if padded else None, logits_to_keep=1)[:, -1]
        active = list(range(B))
        while True:
            tokens = sampler(logits)
            keep = []
            for j, t in enumerate(tokens.tolist()):
                s = seqs[active[j]]
                delta = s.push(t)
                yield active[j], delta
                if s.out.finish_reason is None:
                    keep.append(j)
            if not keep:
                return
            if len(keep) < len(active):
                cache.select(keep)
                sampler.select(keep)
                active = [active[j] for j in keep]
                tokens = tokens[keep]
            logits = model(tokens[:, None], cache, logits_to_keep=1)[:, -1]

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass token ids, or LLM(..., tokenizer=DIR)")
        return self.tokenizer

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self._need_tokenizer().encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids

    def _params(self, sp: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if sp is None:
            sp = self.default_sampling_params()
        if isinstance(sp, SamplingParams):
            return [sp] * n
        sp = list(sp)
        if len(sp) != n:
            raise ValueError(f"{len(sp)} sampling params for {n} prompts")
        return sp

    def default_sampling_params(self) -> SamplingParams:
        """The checkpoint's generation_config.json sampling settings, where it has them (as vLLM does)."""
        g = self.generation_config
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        return SamplingParams(**{k: g[k] for k in keys if g.get(k) is not None})

    def _read_generation_config(self) -> dict[str, Any]:
        if self.path is not None and self.path.suffix == ".gguf":  # sampling defaults travel in the file's metadata
            from ..gguf.gguf_file import GGUFFile
            from ..gguf.reader import generation_defaults

            return generation_defaults(GGUFFile(self.path))
        if self.path is None or not (self.path / "generation_config.json").exists():
            return {}
        try:
            return json.loads((self.path / "generation_config.json").read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{self.path / 'generation_config.json'} is not valid JSON") from None

    def stop_ids(self, chat: bool) -> set[int]:
        ids: set[int] = set()
        for src in (self.generation_config.get("eos_token_id"), self.config.eos_token_id):
            if src is not None:
                ids.update(src if isinstance(src, list) else [src])
        if self.tokenizer is not None:
            if self.tokenizer.eos_token_id is not None:
                ids.add(self.tokenizer.eos_token_id)
            if chat and self.tokenizer.im_end_id is not None:
                ids.add(self.tokenizer.im_end_id)
        return ids
