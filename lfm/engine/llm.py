"""`LLM`: the offline API (vLLM's names): `generate`, `chat`, `stream`, over one model and its tokenizer.

Every call adds its prompts to the one engine (`LLMEngine`: paged KV, conv slots, prefix caching, continuous
batching) and steps it until they finish: the same scheduler, runner and sampler the server runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..loading import load_model
from ..model.checkpoint import CheckpointError, resolve
from ..model.cpu_linear import use_cpu_kernels
from ..model.lfm2 import LfmForCausalLM
from ..model.quant import prepare as prepare_quantized
from ..model.quant import quantize_model
from ..text import TOOL_CALL_END, TOOL_CALL_START, Tokenizer, parse_tool_calls
from ..text.tool_calls import sentinel_offsets
from .llm_engine import EngineConfig, LLMEngine
from .memory import batch_defaults, default_kv_cache_memory
from .sampling import SamplingParams
from .sequence import RequestOutput

Prompt = str | list[int]
Message = dict[str, Any]
_ids = itertools.count()


def check_device(device: str | torch.device) -> None:
    """A clear error for a device this torch cannot use (instead of torch's assertion deep inside loading)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}: use cpu or cuda (cuda:N for one of several GPUs)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but this torch sees no CUDA GPU (a CPU build of torch, or no "
                         "driver): use --device cpu, or install a CUDA build of torch")


class LLM:
    """An LFM2 model ready to generate: `LLM("LiquidAI/LFM2.5-350M")`, a local directory, an in-memory model, or
    `LLM()`: the built-in demo model (offline)."""

    def __init__(self, model: str | Path | LfmForCausalLM | None = None, dtype: str | torch.dtype = "auto", device: str = "cpu",
                 tokenizer: str | Path | Tokenizer | None = None, max_model_len: int | None = None,
                 quantization: str | None = None, group_size: int = 64, kv_cache_dtype: str | None = None,
                 enable_prefix_caching: bool = True, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None,
                 kv_cache_memory: int | None = None, block_size: int = 16, enforce_eager: bool = False,
                 gpu_memory_utilization: float = 0.9) -> None:
        """Engine settings as vLLM names them: max_num_seqs (sequences decoded together), max_num_batched_tokens
        (tokens per step: bounds prefill activations at any prompt length; both default to 256 and 2,048 on CPU, to
        vLLM's on a GPU: memory.batch_defaults), kv_cache_memory (bytes of KV blocks;
        default 4 GiB on CPU, touched only as used; on a GPU what gpu_memory_utilization of its memory leaves
        after the weights and a measured step: lfm/engine/memory.py), block_size, enable_prefix_caching (on by
        default, as in vLLM), enforce_eager (no CUDA graphs for decode steps on a GPU)."""
        self.path: Path | None = None
        check_device(device)
        if isinstance(model, LfmForCausalLM):
            self.model = model.eval()
        else:
            self.path = resolve(model)
            self.model = load_model(self.path, dtype=dtype, device=device)
        if quantization is not None:  # quantize on load: "int8" or "int4" (weight-only, CPU kernels)
            bits = {"int8": 8, "int4": 4}.get(quantization)
            if bits is None:
                raise ValueError(f"quantization must be 'int8' or 'int4', got {quantization!r}")
            if self.model.device.type != "cpu":
                raise ValueError(f"{quantization} weight-only quantization runs on the CPU kernels; on "
                                 f"{self.model.device.type} serve the model in bfloat16")
            quantize_model(self.model, bits, group_size)
            prepare_quantized(self.model)
        if self.path is not None and quantization is None and self.model.device.type == "cuda":
            self.model.fuse_projections()  # q/k/v and w1/w3 as one GEMM each (not for a caller's module: it may train)
        use_cpu_kernels(self.model)  # bfloat16 linears on lfm.kernels where faster (decode rows; every row without native bf16)
        if kv_cache_dtype not in (None, "auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' (the model's dtype) or 'int8', got {kv_cache_dtype!r}")
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
        self.generation_config = self._read_generation_config()
        seqs, tokens = batch_defaults(self.model.device, server=False)
        max_num_seqs = max_num_seqs if max_num_seqs is not None else seqs
        max_num_batched_tokens = max_num_batched_tokens if max_num_batched_tokens is not None else tokens
        if kv_cache_memory is None:
            kv_cache_memory = default_kv_cache_memory(self.model, gpu_memory_utilization, max_num_seqs,
                                                      max_num_batched_tokens)
        cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           kv_cache_memory=kv_cache_memory, block_size=block_size,
                           enable_prefix_caching=enable_prefix_caching,
                           kv_cache_dtype=torch.int8 if kv_cache_dtype == "int8" else None, max_model_len=max_model_len,
                           enforce_eager=enforce_eager)
        self.engine = LLMEngine(self.model, self.tokenizer, self.stop_ids(False), self.stop_ids(True), cfg)
        self._mailbox: dict[str, list] = {}  # deltas one open call stepped for another (interleaved streams)
        self._compiled: dict[str, Any] = {}  # structured-output specs by their canonical JSON (compiled once)
        self.max_model_len = self.engine.max_model_len

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
        for _, delta in self._steps([self._encode(prompt)], params, False):
            if delta:
                yield delta

    def chat(self, messages: list[Message] | list[list[Message]], sampling_params: SamplingParams | None = None,
             tools: list[dict] | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> RequestOutput | list[RequestOutput]:
        """Reply to a conversation (or a list of them) through the checkpoint's chat template; tool calls parsed."""
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else messages
        ids = [self.encode_chat(c, tools, add_generation_prompt, chat_template_kwargs) for c in convs]
        params = self._params(sampling_params, len(ids))
        outs = self._run(ids, params, chat=True)
        tk = self.tokenizer
        start, end = tk.token_to_id(TOOL_CALL_START), tk.token_to_id(TOOL_CALL_END)
        for o, p in zip(outs, params):
            # calls open and close only at the real control tokens, not at text that merely spells them
            marks = sentinel_offsets(o.token_ids, start, end,
                                     lambda i, skip=p.skip_special_tokens: tk.decode(i, skip_special_tokens=skip))
            o.tool_calls, o.content = parse_tool_calls(o.text, tools, marks)
        return outs[0] if single else outs

    def stream_chat(self, messages: list[Message], sampling_params: SamplingParams | None = None,
                    tools: list[dict] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                    outputs: list[RequestOutput] | None = None) -> Iterator[str]:
        """Text pieces of one chat reply as they are produced. `outputs`, when given, receives the RequestOutput
        (token ids, finish reason) once the stream ends, is closed or fails: what `lfm chat` counts tokens/s from."""
        ids = self.encode_chat(messages, tools, True, chat_template_kwargs)
        rid = f"llm-{next(_ids)}"
        done: dict[str, RequestOutput] = {}
        steps = self._steps([ids], self._params(sampling_params, 1), True, [rid], done)
        try:
            for _, delta in steps:
                if delta:
                    yield delta
        finally:
            steps.close()  # aborts the request now, not when the generator is collected
            if outputs is not None and rid in done:
                outputs.append(done[rid])

    @property
    def grammar(self) -> Any:
        """The xgrammar backend for structured output over this tokenizer (built at first use; None without one)."""
        if self.engine.sampler.grammar is None and self.tokenizer is not None:
            from .grammar import GrammarBackend

            self.engine.sampler.grammar = GrammarBackend(self.tokenizer, self.config.vocab_size,
                                                         sorted(self.stop_ids(True)))
        return self.engine.sampler.grammar

    def encode_chat(self, messages: list[Message], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        tok = self._need_tokenizer()
        return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                       **(chat_template_kwargs or {}))

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _run(self, prompts: list[list[int]], params: list[SamplingParams], chat: bool = False) -> list[RequestOutput]:
        outs: dict[str, RequestOutput] = {}
        rids = [f"llm-{next(_ids)}" for _ in prompts]
        for _ in self._steps(prompts, params, chat, rids, outs):
            pass
        return [outs[r] for r in rids]

    def _steps(self, prompts: list[list[int]], params: list[SamplingParams], chat: bool, rids: list[str] | None = None,
               outputs: dict[str, RequestOutput] | None = None) -> Iterator[tuple[int, str]]:
        """Add the prompts to the engine and step it; yield (prompt index, new text) as tokens arrive. Requests
        left unfinished (the caller stopped iterating, or an error) are aborted, so their cache is freed."""
        eng = self.engine
        rids = rids or [f"llm-{next(_ids)}" for _ in prompts]
        index = {r: i for i, r in enumerate(rids)}
        seqs = []
        try:
            for r, p, sp in zip(rids, prompts, params):
                seqs.append(eng.add_request(r, p, sp, chat))
            open_ = set(rids)
            while open_:
                mine = [d for r in rids for d in self._mailbox.pop(r, [])]  # stepped by another open call
                if not mine:
                    if not eng.has_unfinished_requests():
                        raise RuntimeError("the engine stopped with requests unfinished")
                    for d in eng.step():
                        if d.request_id in index:
                            mine.append(d)
                        else:  # another open call's (a stream being read, say): keep it for that call
                            self._mailbox.setdefault(d.request_id, []).append(d)
                for d in mine:
                    if d.finish_reason == "error":
                        raise RuntimeError(d.error or "generation failed")
                    if d.finish_reason is not None:
                        open_.discard(d.request_id)
                    yield index[d.request_id], d.text
        finally:
            for r in rids:
                eng.abort_request(r)
                self._mailbox.pop(r, None)
            if outputs is not None:
                for r, s in zip(rids, seqs):
                    outputs[r] = s.to_output()

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
            return [self.with_constraint(sp)] * n
        sp = list(sp)
        if len(sp) != n:
            raise ValueError(f"{len(sp)} sampling params for {n} prompts")
        return [self.with_constraint(p) for p in sp]

    def with_constraint(self, sp: SamplingParams) -> SamplingParams:
        """`sp` with its structured_outputs (JSON schema, regex, choice, grammar) compiled into the engine's
        `constraint` (xgrammar; cached per distinct value). Raises ValueError for one that does not compile."""
        so = sp.structured_outputs
        if so is None or sp.constraint is not None:
            return sp
        key = json.dumps({k: getattr(so, k) for k in so.kinds()}, sort_keys=True)
        spec = self._compiled.get(key)
        if spec is None:
            g = self.grammar
            if g is None:
                raise ValueError("structured output needs a tokenizer (this checkpoint has no tokenizer.json)")
            spec = self._compiled[key] = g.spec_structured(so)
        return dataclasses.replace(sp, constraint=spec)

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
