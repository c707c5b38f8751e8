"""What a running server holds (model, engine, grammar backend, metrics) and the request logic both endpoints share:
model-name check, context and budget checks, sampling parameters, and collecting a request's sequences."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.async_engine import AsyncEngine, EngineDead, EngineFull, EngineRequest, RequestStream
from ..engine.grammar import ConstraintSpec, GrammarBackend, SchemaBudget
from ..engine.llm import LLM
from ..engine.llm_engine import RequestDelta
from ..engine.sampling import SamplingParams
from ..engine.sequence import TokenLogprob
from ..text.reasoning import PARSERS as REASONING_PARSERS
from .errors import ApiError, bad_request
from .metrics import Metrics
from .protocol import _Sampling


@dataclass
class ServeConfig:
    model: str | None  # None: the built-in demo model
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    device: str = "cpu"
    max_num_seqs: int = 64
    max_model_len: int | None = None
    kv_cache_memory: int | None = None  # None: 4 GiB on CPU; on a GPU what gpu_memory_utilization leaves
    gpu_memory_utilization: float = 0.9
    max_waiting: int = 256
    max_num_batched_tokens: int = 512  # tokens per engine step: prefill chunks and decodes together
    block_size: int = 16
    enable_prefix_caching: bool = True
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    threads: int | None = None  # torch CPU threads (process-wide); None leaves torch's choice
    quantization: str | None = None  # "int8" / "int4": weight-only, quantized on load (CPU)
    kv_cache_dtype: str = "auto"  # "int8": quantized KV cache (CPU kernels)
    max_schema_bytes: int = 64 << 10  # largest tools / response_format schema compiled (JSON bytes)
    max_schema_nodes: int = 512  # ... and schema objects in it
    grammar_compile_timeout: float = 60.0  # seconds a request waits for its grammar before a 400
    reasoning_parser: str | None = None  # "lfm2" (or vLLM's "deepseek_r1" / "qwen3"): <think> text -> reasoning_content


@dataclass
class Choice:
    """Everything one sequence produced, collected for a non-streaming answer."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # asked for by echo + logprobs (completions)


class ServerState:
    def __init__(self, cfg: ServeConfig, llm: LLM | None = None) -> None:
        self.cfg = cfg
        if cfg.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"unknown reasoning parser {cfg.reasoning_parser!r} (choose from "
                             f"{', '.join(REASONING_PARSERS)})")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if llm is None:
            llm = LLM(cfg.model, dtype=cfg.dtype, device=cfg.device, max_model_len=cfg.max_model_len,
                      quantization=cfg.quantization, kv_cache_dtype=cfg.kv_cache_dtype, max_num_seqs=cfg.max_num_seqs,
                      max_num_batched_tokens=cfg.max_num_batched_tokens, kv_cache_memory=cfg.kv_cache_memory,
                      block_size=cfg.block_size, enable_prefix_caching=cfg.enable_prefix_caching,
                      gpu_memory_utilization=cfg.gpu_memory_utilization)
        self.llm = llm
        self.grammar: GrammarBackend | None = llm.grammar
        self._longest_token = 1  # bytes: a text longer than max_model_len * this cannot fit, without tokenizing it
        if self.grammar is not None:
            self.grammar.budget = SchemaBudget(cfg.max_schema_bytes, cfg.max_schema_nodes)
            self._longest_token = max(len(b) for b in self.grammar.token_bytes) or 1
        # grammars compile here, not in the event loop's default pool (which tokenizes): a slow schema occupies one
        # of these two workers, and its request stops waiting after grammar_compile_timeout
        self._compile_pool = ThreadPoolExecutor(2, thread_name_prefix="lfm-grammar")
        self.tokenizer = self.llm.tokenizer
        self.model_name = cfg.served_model_name or cfg.model or "lfm-demo"
        self.max_model_len = self.llm.max_model_len
        self.created = int(time.time())
        self.chat_stops = self.llm.stop_ids(True)
        eng = self.llm.engine
        self.metrics = Metrics(eng)
        self.engine = AsyncEngine(eng, cfg.max_waiting, self.metrics.observer())
        self.defaults = self.llm.default_sampling_params()

    # --------------------------------------------------------------------------------------------- checks
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"The model '{name}' does not exist (this server serves '{self.model_name}')",
                           "model", "model_not_found")

    def max_tokens_for(self, requested: int | None, prompt_len: int, param: str = "max_tokens") -> int:
        """Validate the prompt length and max_tokens against the context and the cache budget."""
        if requested is not None and requested <= 0:
            raise bad_request(f"{param} must be at least 1, got {requested}", param, "invalid_value")
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                              f"{prompt_len} tokens, which leaves no room to generate.", "messages",
                              "context_length_exceeded")
        if requested is None:
            return room
        if requested > room:
            raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                              f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                              f"for the completion). Please reduce the prompt or {param}.", param,
                              "context_length_exceeded")
        return requested

    def check_text_fits(self, chars: int, param: str) -> None:
        """Refuse, before tokenizing it, a text so long that it cannot fit the context whatever its tokens (each
        token covers at most `_longest_token` bytes): a 4 MB prompt is answered at once, not after its encoding."""
        if self.tokenizer is not None and chars > self.max_model_len * self._longest_token:
            raise bad_request(f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                              f"{chars} characters, which is more than that many tokens can hold.", param,
                              "context_length_exceeded")

    async def compile(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a grammar compilation in the compile pool; give up waiting after grammar_compile_timeout."""
        fut = asyncio.get_running_loop().run_in_executor(self._compile_pool, fn, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.cfg.grammar_compile_timeout)
        except asyncio.TimeoutError:
            raise bad_request(f"the schema did not compile within {self.cfg.grammar_compile_timeout:g} s "
                              "(--grammar-compile-timeout); simplify it", None, "schema_too_complex") from None

    def check_token_ids(self, ids: list[int], param: str) -> None:
        V = self.llm.config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{V - 1})", param, "invalid_value")

    # --------------------------------------------------------------------------------------------- requests
    def sampling(self, req: _Sampling, max_tokens: int, index: int, constraint: ConstraintSpec | None = None,
                 logprobs: int | None = None, logit_bias: dict[int, float] | None = None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        """The request's fields over the checkpoint's generation_config defaults (vLLM's rule)."""
        d = self.defaults
        pick = lambda v, default: default if v is None else v  # noqa: E731
        seed = None if req.seed is None else req.seed + index
        if req.stop_token_ids:
            self.check_token_ids(req.stop_token_ids, "stop_token_ids")
        try:
            return SamplingParams(temperature=pick(req.temperature, d.temperature), top_p=pick(req.top_p, d.top_p),
                                  top_k=pick(req.top_k, d.top_k), min_p=pick(req.min_p, d.min_p),
                                  repetition_penalty=pick(req.repetition_penalty, d.repetition_penalty),
                                  max_tokens=max_tokens, seed=seed, stop=list(req.stop or []),
                                  stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                                  skip_special_tokens=req.skip_special_tokens, presence_penalty=req.presence_penalty,
                                  frequency_penalty=req.frequency_penalty, logit_bias=logit_bias, logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs, constraint=constraint)
        except ValueError as e:
            raise bad_request(str(e)) from None

    def engine_requests(self, req: _Sampling, prompt_ids: list[int], max_tokens: int, chat: bool,
                        constraint: ConstraintSpec | None, top_logprobs: int | None,
                        prefix: str, prompt_logprobs: int | None = None) -> list[EngineRequest]:
        bias = None
        if req.logit_bias:
            bias = {int(k): float(v) for k, v in req.logit_bias.items()}
            self.check_token_ids(list(bias), "logit_bias")
        rid = f"{prefix}-{uuid.uuid4().hex[:16]}"
        return [EngineRequest(f"{rid}-{i}", prompt_ids,
                              self.sampling(req, max_tokens, i, constraint, top_logprobs, bias, prompt_logprobs),
                              chat)
                for i in range(req.n)]

    def submit(self, reqs: list[EngineRequest]) -> RequestStream:
        try:
            return self.engine.submit(reqs)
        except EngineFull as e:
            raise ApiError(429, str(e), None, "rate_limit_exceeded") from None
        except EngineDead as e:
            raise ApiError(503, str(e), None, "engine_unavailable") from None

    async def collect(self, request: Request, stream: RequestStream, ids: list[str]) -> list[Choice]:
        """Wait for every sequence to finish; abort them all if the client disconnects first."""
        index = {rid: i for i, rid in enumerate(ids)}
        choices = [Choice() for _ in ids]

        async def gather() -> None:
            async for d in stream:
                c = choices[index[d.request_id]]
                _absorb(c, d)

        task = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                self.engine.abort(stream)
        if not task.done() or task.cancelled():
            raise ApiError(499, "client closed the request")
        if task.exception() is not None:
            self.engine.abort(stream)  # one choice failed: the others stop too
            raise task.exception()
        return choices

    def sse(self, gen: AsyncIterator[str], stream: RequestStream) -> StreamingResponse:
        """A server-sent-events response that aborts the request however the response ends (even unstarted)."""
        engine = self.engine

        class _Sse(StreamingResponse):
            async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    if not stream.finished:
                        engine.abort(stream)

        return _Sse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --------------------------------------------------------------------------------------------- tokens
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)

    def token_bytes(self, token_id: int) -> list[int]:
        if self.grammar is not None:
            vocab = self.grammar.token_bytes
            if 0 <= token_id < len(vocab) and vocab[token_id]:
                return list(vocab[token_id])
        return list(self.token_text(token_id).encode("utf-8"))


def _absorb(c: Choice, d: RequestDelta) -> None:
    c.text += d.text
    c.token_ids += d.token_ids
    if d.logprobs:
        c.logprobs += d.logprobs
    if d.prompt_logprobs is not None:
        c.prompt_logprobs = d.prompt_logprobs
    c.prompt_tokens = d.prompt_tokens or c.prompt_tokens
    if d.finish_reason is not None:
        c.finish_reason = d.finish_reason
        if d.error:
            raise ApiError(500, d.error, None, "generation_failed")


async def wait_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the ASGI server reports http.disconnect)."""
    while True:
        msg = await request.receive()
        if msg.get("type") == "http.disconnect":
            return


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
