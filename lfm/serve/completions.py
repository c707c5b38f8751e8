"""`POST /v1/completions`: the legacy text-completion endpoint (string, token-id and batched prompts, echo,
logprobs)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from ..engine.sequence import TokenLogprob
from .errors import ApiError, bad_request
from .protocol import CompletionRequest
from .state import ServerState, usage


def _prompts(state: ServerState, p: str | list) -> list[tuple[list[int], str]]:
    """Every prompt form -> [(token ids, text for echo)]."""
    if isinstance(p, str):
        forms: list = [p]
    elif p and isinstance(p[0], int):
        forms = [p]
    else:
        forms = list(p)
    out = []
    for k, f in enumerate(forms):
        param = "prompt" if len(forms) == 1 else f"prompt[{k}]"
        if isinstance(f, str):
            if state.tokenizer is None:
                raise bad_request("this checkpoint has no tokenizer: send token ids", param)
            state.check_text_fits(len(f), param)
            ids, text = state.tokenizer.encode(f), f
        else:
            ids = list(f)
            state.check_token_ids(ids, param)
            text = state.tokenizer.decode(ids) if state.tokenizer is not None else ""
        if not ids:
            raise bad_request("prompt is empty", param)
        out.append((ids, text))
    return out


async def completions(state: ServerState, request: Request, body: CompletionRequest):
    state.check_model(body.model)
    if body.suffix:
        raise bad_request("suffix is not supported by this model", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of other than n is not supported", "best_of")
    # max_tokens=0 with echo scores the prompt and generates nothing (vLLM accepts it; lm-eval's loglikelihood and
    # perplexity requests rely on it). As vLLM does, the engine still samples one token, which is dropped.
    score_only = body.echo and body.max_tokens == 0
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens must be at least 1 unless echo is true (then 0 only scores the prompt)",
                          "max_tokens", "invalid_value")
    # echo + logprobs: one entry per prompt token too (OpenAI's legacy completions and vLLM), so ask the engine for
    # the prompt's log-probabilities with the same number of alternatives
    prompt_lp = body.logprobs if body.echo and body.logprobs is not None else None
    prompts = await asyncio.to_thread(_prompts, state, body.prompt)  # tokenizing a large prompt takes a while
    reqs, meta = [], []
    for k, (ids, text) in enumerate(prompts):
        max_tokens = state.max_tokens_for(1 if score_only else body.max_tokens, len(ids))
        rs = state.engine_requests(body, ids, max_tokens, False, None, body.logprobs, "cmpl", prompt_lp)
        reqs += rs
        meta += [(k, ids, text)] * len(rs)
    stream = state.submit(reqs)
    ids_all = [r.request_id for r in reqs]
    rid = ids_all[0].rsplit("-", 1)[0]
    created = int(time.time())
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    if body.stream:
        gen = _stream(state, stream, ids_all, meta, rid, created, body, prompt_tokens, score_only)
        return state.sse(gen, stream)
    choices = await state.collect(request, stream, ids_all)
    out = []
    completion_tokens = 0
    for i, (c, (_, pids, ptext)) in enumerate(zip(choices, meta)):
        if score_only:
            c.text, c.token_ids, c.logprobs = "", [], []
        completion_tokens += len(c.token_ids)
        text = (ptext if body.echo else "") + c.text
        lp = None
        if body.logprobs is not None:
            lp = _logprobs_json(state, _echoed(pids, c.prompt_logprobs) if body.echo else [], 0, pids)
            _extend(lp, _logprobs_json(state, c.logprobs, _end_offset(lp)))
        out.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                         "choices": out, "usage": usage(prompt_tokens, completion_tokens),
                         "system_fingerprint": None})


def _echoed(prompt_ids: list[int], records: list[TokenLogprob | None] | None) -> list[TokenLogprob | None]:
    """The prompt's records, one per prompt token: None (no context) for the first, as OpenAI and vLLM report it."""
    records = list(records or [])
    if len(records) != len(prompt_ids):
        raise ApiError(500, "the engine returned no log-probabilities for the prompt", None, "generation_failed")
    return records


def _logprobs_json(state: ServerState, records: list[TokenLogprob | None], offset: int,
                   prompt_ids: list[int] | None = None) -> dict:
    """OpenAI's legacy logprobs object; a None record is the first prompt token (token text, null logprob)."""
    tokens, lps, tops, offsets = [], [], [], []
    for k, r in enumerate(records):
        tid = r.token_id if r is not None else (prompt_ids[k] if prompt_ids else None)
        t = state.token_text(tid) if tid is not None else ""
        tokens.append(t)
        lps.append(r.logprob if r is not None else None)
        tops.append({state.token_text(i): lp for i, lp in r.top} if r is not None and r.top else None)
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _end_offset(lp: dict) -> int:
    return (lp["text_offset"][-1] + len(lp["tokens"][-1])) if lp["tokens"] else 0


def _extend(lp: dict, more: dict) -> None:
    for key in lp:
        lp[key] += more[key]


async def _stream(state: ServerState, stream, ids: list[str], meta: list, rid: str, created: int,
                  body: CompletionRequest, prompt_tokens: int, score_only: bool) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    index = {r: i for i, r in enumerate(ids)}
    offsets = [0 for _ in meta]
    echoed = [not body.echo for _ in meta]
    completion = 0

    def chunk(i: int, text: str, reason: str | None, lp: dict | None) -> str:
        obj = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
               "system_fingerprint": None,
               "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}]}
        if include_usage:
            obj["usage"] = None
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async for d in stream:
        i = index[d.request_id]
        if d.error:
            yield f"data: {json.dumps(ApiError(500, d.error, None, 'generation_failed').body())}\n\n"
            state.engine.abort(stream)
            break
        if not echoed[i]:  # the prompt first, with its log-probabilities (they arrive with the first delta)
            echoed[i] = True
            _, pids, ptext = meta[i]
            lp = None
            if body.logprobs is not None:
                lp = _logprobs_json(state, _echoed(pids, d.prompt_logprobs), 0, pids)
                offsets[i] = _end_offset(lp)
            yield chunk(i, ptext, None, lp)
        if score_only:
            d.text, d.token_ids, d.logprobs = "", [], None
        completion += len(d.token_ids)
        lp = None
        if body.logprobs is not None and d.logprobs:
            lp = _logprobs_json(state, d.logprobs, offsets[i])
            offsets[i] = _end_offset(lp)
        if d.text or lp or d.finish_reason is not None:
            yield chunk(i, d.text, d.finish_reason, lp)
    else:
        if include_usage:
            obj = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                   "choices": [], "usage": usage(prompt_tokens, completion)}
            yield f"data: {json.dumps(obj)}\n\n"
    yield "data: [DONE]\n\n"
