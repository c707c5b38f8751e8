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
    prompts = await asyncio.to_thread(_prompts, state, body.prompt)  # tokenizing a large prompt takes a while
    reqs, meta = [], []
    for k, (ids, text) in enumerate(prompts):
        max_tokens = state.max_tokens_for(body.max_tokens, len(ids))
        rs = state.engine_requests(body, ids, max_tokens, False, None, body.logprobs, "cmpl")
        reqs += rs
        meta += [(k, ids, text)] * len(rs)
    stream = state.submit(reqs)
    ids_all = [r.request_id for r in reqs]
    rid = ids_all[0].rsplit("-", 1)[0]
    created = int(time.time())
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    if body.stream:
        return state.sse(_stream(state, stream, ids_all, meta, rid, created, body, prompt_tokens), stream)
    choices = await state.collect(request, stream, ids_all)
    out = []
    for i, (c, (_, _, ptext)) in enumerate(zip(choices, meta)):
        text = (ptext if body.echo else "") + c.text
        lp = _logprobs_json(state, c.logprobs, len(ptext) if body.echo else 0) if body.logprobs is not None else None
        out.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                         "choices": out, "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in choices)),
                         "system_fingerprint": None})


def _logprobs_json(state: ServerState, records: list[TokenLogprob], offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for r in records:
        t = state.token_text(r.token_id)
        tokens.append(t)
        lps.append(r.logprob)
        tops.append({state.token_text(i): lp for i, lp in r.top} if r.top else None)
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def _stream(state: ServerState, stream, ids: list[str], meta: list, rid: str, created: int,
                  body: CompletionRequest, prompt_tokens: int) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    index = {r: i for i, r in enumerate(ids)}
    offsets = [len(m[2]) if body.echo else 0 for m in meta]
    completion = 0

    def chunk(i: int, text: str, reason: str | None, lp: dict | None) -> str:
        obj = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
               "system_fingerprint": None,
               "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}]}
        if include_usage:
            obj["usage"] = None
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    if body.echo:
        for i, (_, _, ptext) in enumerate(meta):
            yield chunk(i, ptext, None, None)
    async for d in stream:
        i = index[d.request_id]
        if d.error:
            yield f"data: {json.dumps(ApiError(500, d.error, None, 'generation_failed').body())}\n\n"
            state.engine.abort(stream)
            break
        completion += len(d.token_ids)
        lp = None
        if body.logprobs is not None and d.logprobs:
            lp = _logprobs_json(state, d.logprobs, offsets[i])
            offsets[i] += sum(len(t) for t in lp["tokens"])
        if d.text or lp or d.finish_reason is not None:
            yield chunk(i, d.text, d.finish_reason, lp)
    else:
        if include_usage:
            obj = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                   "choices": [], "usage": usage(prompt_tokens, completion)}
            yield f"data: {json.dumps(obj)}\n\n"
    yield "data: [DONE]\n\n"
