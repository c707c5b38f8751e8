"""`POST /v1/chat/completions`: prompt through the checkpoint's chat template, tools and structured output through the
grammar engine, OpenAI's response and chunk shapes (tool calls parsed, in streaming too)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
from fastapi import Request
from fastapi.responses import JSONResponse

from ..engine.grammar import ConstraintSpec, GrammarError
from ..engine.tool_grammar import ToolSchemaError, function_of
from ..text import new_call_id
from ..text.reasoning import THINK_END, THINK_START, ReasoningParser, split_reasoning
from ..text.tool_calls import parse_tool_calls_detailed, sentinel_offsets
from .errors import ApiError, bad_request
from .protocol import ChatCompletionRequest
from .state import Choice, ServerState, usage
from .tool_stream import ToolStreamParser

log = logging.getLogger("lfm.serve")


async def chat_completions(state: ServerState, request: Request, body: ChatCompletionRequest):
    state.check_model(body.model)
    if state.tokenizer is None or state.grammar is None:
        raise ApiError(400, "this checkpoint has no tokenizer, so it cannot chat", "model")
    # schema checks, rendering and tokenizing take time proportional to the body (up to --max-body-bytes): off the
    # event loop, so /health and every other stream keep answering
    tools, choice, prompt = await asyncio.to_thread(_prepare, state, body)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = state.max_tokens_for(limit, len(prompt), param)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    top = (body.top_logprobs or 0) if body.logprobs else None
    spec = await state.compile(_constraint, state, body, tools, choice)
    reqs = state.engine_requests(body, prompt, max_tokens, True, spec, top, "chatcmpl")
    parse_tools = bool(tools) and choice != "none"
    stream = state.submit(reqs)
    ids = [r.request_id for r in reqs]
    rid = ids[0].rsplit("-", 1)[0]
    created = int(time.time())
    # output forced by a grammar from its first token (a required call, a JSON format) cannot hold <think>
    forced = isinstance(choice, dict) or choice == "required" or (body.response_format or {}).get("type") in (
        "json_object", "json_schema")
    think = None if forced else reasoning_mode(state, prompt)
    if body.stream:
        gen = _stream(state, stream, ids, rid, created, body, tools if parse_tools else None, len(prompt), think)
        return state.sse(gen, stream)
    choices = await state.collect(request, stream, ids)
    out = [_choice_json(state, i, c, tools if parse_tools else None, top is not None, think,
                        body.skip_special_tokens)
           for i, c in enumerate(choices)]
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                         "choices": out, "usage": usage(len(prompt), sum(len(c.token_ids) for c in choices)),
                         "system_fingerprint": None})


# ------------------------------------------------------------------------------------------------ request checks
def _prepare(state: ServerState, body: ChatCompletionRequest) -> tuple[list[dict], str | dict, list[int]]:
    if body.tools:
        try:
            state.grammar.budget.check(body.tools, "the tools' parameter schemas")
        except GrammarError as e:
            raise bad_request(str(e), "tools", "schema_too_large") from None
    tools = _check_tools(body.tools)
    choice = _tool_choice(body.tool_choice, tools)
    messages = _normalize_messages(body.messages)
    state.check_text_fits(sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str)), "messages")
    try:
        prompt = state.tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                                     trust_assistant=False, **(body.chat_template_kwargs or {}))
    except Exception as e:  # template errors, raise_exception(), missing template: the client's input
        raise bad_request(f"cannot apply the chat template: {e}", "messages") from None
    return tools, choice, prompt


def _check_tools(tools: list[dict] | None) -> list[dict]:
    for i, t in enumerate(tools or []):
        try:
            fn = function_of(t)
            jsonschema.validators.validator_for(fn["parameters"]).check_schema(fn["parameters"])
        except ToolSchemaError as e:
            raise bad_request(f"tools[{i}]: {e}", f"tools[{i}]", "invalid_tool") from None
        except jsonschema.SchemaError as e:
            raise bad_request(f"tools[{i}].function.parameters is not a valid JSON schema: {e.message}",
                              f"tools[{i}].function.parameters", "invalid_tool") from None
        except RecursionError:
            raise bad_request(f"tools[{i}]: schema nests too deeply", f"tools[{i}]", "invalid_tool") from None
    names = [t["function"]["name"] for t in tools or []]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", "tools", "invalid_tool")
    return list(tools or [])


def _tool_choice(tc: str | dict | None, tools: list[dict]) -> str | dict:
    if tc is None:
        return "auto" if tools else "none"
    if isinstance(tc, dict):
        fn = tc.get("function") if tc.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise bad_request('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                              '{"name": ...}}', "tool_choice")
        if name not in {t["function"]["name"] for t in tools}:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return {"name": name}
    if tc == "required" and not tools:
        raise bad_request('tool_choice "required" needs at least one tool', "tool_choice")
    return tc


def _constraint(state: ServerState, body: ChatCompletionRequest, tools: list[dict],
                choice: str | dict) -> ConstraintSpec | None:
    """The grammar program for this request (compiled off the event loop: schemas can take milliseconds)."""
    g = state.grammar
    try:
        if isinstance(choice, dict):
            named = [t for t in tools if t["function"]["name"] == choice["name"]]
            return g.spec_tools_required(g.tool_calls(named, parallel=False))
        if choice == "required":
            return g.spec_tools_required(g.tool_calls(tools, parallel=body.parallel_tool_calls))
        fmt = _response_format(g, body.response_format)
        if fmt is not None:
            return fmt
        if choice == "auto" and tools:
            return g.spec_tools_auto(g.tool_calls(tools, parallel=body.parallel_tool_calls))
        if tools:
            return g.spec_no_tools()
        return None
    except GrammarError as e:
        raise bad_request(str(e), "tools" if tools and choice != "none" else "response_format",
                          "invalid_schema") from None


def _response_format(g: Any, rf: dict | None) -> ConstraintSpec | None:
    if rf is None or rf.get("type") == "text":
        return None
    kind = rf.get("type")
    if kind == "json_object":
        return g.spec_json(g.json_object())
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise bad_request("response_format.json_schema must be {name, schema, strict}", "response_format")
        schema = js.get("schema", {})
        g.budget.check(schema, "response_format's schema")  # before validating it: that takes time too
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise bad_request(f"response_format.json_schema.schema is not a valid JSON schema: {e.message}",
                              "response_format", "invalid_schema") from None
        except RecursionError:
            raise bad_request("response_format schema nests too deeply", "response_format", "invalid_schema") from None
        return g.spec_json(g.json_schema(schema))
    raise bad_request('response_format.type must be "text", "json_object" or "json_schema"', "response_format")


def _normalize_messages(msgs: list[dict]) -> list[dict]:
    """OpenAI message forms -> what chat templates expect (text parts joined, tool-call arguments as objects)."""
    out = []
    for i, m in enumerate(msgs):
        m = dict(m)
        if m["role"] == "developer":
            m["role"] = "system"
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p["text"] for p in m["content"])
        if m.get("content") is None:
            m["content"] = ""
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise bad_request(f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls")
            fixed = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad_request(f"messages[{i}].tool_calls entries need function.name",
                                      f"messages[{i}].tool_calls")
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except json.JSONDecodeError:
                        pass  # the template writes the string as it is
                fixed.append({**c, "function": {**fn, "arguments": args}})
            m["tool_calls"] = fixed
        out.append(m)
    return out


def reasoning_mode(state: ServerState, prompt: list[int]) -> tuple[str, bool] | None:
    """(parser name, whether the prompt ends inside an open <think>) with --reasoning-parser, else None."""
    name = state.cfg.reasoning_parser
    if not name:
        return None
    tail = state.tokenizer.decode(prompt[-32:], skip_special_tokens=False)
    return name, tail.rfind(THINK_START) > tail.rfind(THINK_END)


# ------------------------------------------------------------------------------------------------ responses
def _logprobs_json(state: ServerState, records: list) -> dict:
    def entry(tid: int, lp: float) -> dict:
        return {"token": state.token_text(tid), "logprob": lp, "bytes": state.token_bytes(tid)}

    return {"content": [{**entry(r.token_id, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top]}
                        for r in records]}


def _decoder(state: ServerState, skip_special_tokens: bool):
    return lambda ids: state.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _choice_json(state: ServerState, i: int, c: Choice, tools: list[dict] | None, logprobs: bool,
                 think: tuple[str, bool] | None = None, skip_special_tokens: bool = True) -> dict:
    text = c.text
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if think is not None:  # vLLM's field: the <think> text, kept out of content (None when there was none)
        msg["reasoning_content"], text = split_reasoning(c.text, *think)
        msg["content"] = text
    reason = c.finish_reason
    if tools is not None:
        # only real control tokens open and close calls (text that spells them is content); content is a suffix
        # of the output (after any reasoning), so the tokens' offsets shift by what came before it
        g = state.grammar
        cut = len(c.text) - len(text)
        marks = [m - cut for m in sentinel_offsets(c.token_ids, g.start_id, g.end_id,
                                                   _decoder(state, skip_special_tokens)) if m >= cut]
        parsed = parse_tool_calls_detailed(text, tools, marks)
        calls, content = parsed.calls, parsed.content
        msg["content"] = content  # without the control text of a block cut off before its call had a name
        if parsed.unparsed:
            log.warning("a tool-call block could not be read as calls; returned as content: %.200r", parsed.unparsed)
        if calls:
            msg["content"] = content or None
            msg["tool_calls"] = [call.to_openai(new_call_id()) for call in calls]
            reason = "tool_calls" if reason == "stop" else reason
    return {"index": i, "message": msg, "logprobs": _logprobs_json(state, c.logprobs) if logprobs else None,
            "finish_reason": reason}


async def _stream(state: ServerState, stream, ids: list[str], rid: str, created: int, body: ChatCompletionRequest,
                  tools: list[dict] | None, prompt_tokens: int,
                  think: tuple[str, bool] | None = None) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    index = {r: i for i, r in enumerate(ids)}
    g = state.grammar
    parsers = [ToolStreamParser(tools, _decoder(state, body.skip_special_tokens), g.start_id, g.end_id)
               if tools is not None else None for _ in ids]
    thinkers = [ReasoningParser(*think) if think is not None else None for _ in ids]
    fed = [[0, 0] for _ in ids]  # characters of output / of content so far, per choice (to place the sentinels)
    completion = 0

    def chunk(i: int, delta: dict, reason: str | None = None, logprobs: dict | None = None) -> str:
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
               "system_fingerprint": None,
               "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
        if include_usage:
            obj["usage"] = None
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        for i in range(len(ids)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for d in stream:
            i = index[d.request_id]
            if d.error:
                err = ApiError(500, d.error, None, "generation_failed").body()
                yield f"data: {json.dumps(err)}\n\n"
                state.engine.abort(stream)
                break
            completion += len(d.token_ids)
            p = parsers[i]
            text, reasoning = d.text, ""
            if thinkers[i] is not None:  # <think> text goes out as delta.reasoning_content (vLLM's field)
                reasoning, text = thinkers[i].feed(d.text)
                if d.finish_reason is not None:
                    more_r, more_c = thinkers[i].finish()
                    reasoning, text = reasoning + more_r, text + more_c
                if reasoning:
                    yield chunk(i, {"reasoning_content": reasoning})
            fed[i][0] += len(d.text)
            fed[i][1] += len(text)
            # content is the output after its reasoning: it starts this many characters into the output
            shift = fed[i][0] - fed[i][1] - (len(thinkers[i].buf) if thinkers[i] is not None else 0)
            content, calls = p.feed(text, d.token_ids, shift) if p is not None else (text, [])
            if d.finish_reason is not None and p is not None:
                more, late = p.finish()
                content, calls = content + more, calls + late
            lp = _logprobs_json(state, d.logprobs) if d.logprobs else None
            if content or lp:
                yield chunk(i, {"content": content}, logprobs=lp)
            if calls:
                first = p.calls_emitted - len(calls)
                deltas = [{"index": first + k, **c.to_openai(new_call_id())} for k, c in enumerate(calls)]
                yield chunk(i, {"tool_calls": deltas})
            if d.finish_reason is not None:
                reason = d.finish_reason
                if p is not None and p.calls_emitted and reason == "stop":
                    reason = "tool_calls"
                yield chunk(i, {}, reason)
        else:
            if include_usage:
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                       "choices": [], "usage": usage(prompt_tokens, completion)}
                yield f"data: {json.dumps(obj)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not stream.finished:
            state.engine.abort(stream)
