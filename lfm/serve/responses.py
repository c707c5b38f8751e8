"""`POST /v1/responses`: OpenAI's Responses API (the OpenAI Agents SDK's default model class) over the chat path.

A request is converted to a chat request — `instructions` and `input` items become chat messages (a
`function_call` item an assistant tool call, a `function_call_output` item a tool message), flat function tools the
chat form, `text.format` a `response_format`, `max_output_tokens` `max_tokens` — and runs through
`/v1/chat/completions`' code, so templates, constrained tool calls, JSON schemas, reasoning and errors behave the
same. The chat answer is turned back into Response output items (`reasoning`, `message`, `function_call`); streaming
is `responses_stream.py`. Nothing is stored: `previous_response_id` is refused, send the whole conversation.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from .chat import chat_completions
from .errors import ApiError, bad_request
from .protocol import ChatCompletionRequest
from .state import ServerState


class ResponsesRequest(BaseModel):
    """The fields of OpenAI's `responses.create` this server honours; others (store, metadata, ...) are accepted."""

    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = True
    text: dict[str, Any] | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: StrictBool = False
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    # vLLM extensions, as on the chat route
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: StrictInt | None = None
    chat_template_kwargs: dict[str, Any] | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------------------------ request
def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or input_text / output_text parts (other kinds are not supported)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts", where)
    out = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{k}]: only input_text / output_text parts are supported (got "
                              f"{kind!r})", where)
        out.append(part["text"])
    return "".join(out)


def input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """instructions + input -> chat messages (consecutive function_call items share one assistant message)."""
    msgs: list[dict[str, Any]] = []
    if body.instructions:
        msgs.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        msgs.append({"role": "user", "content": body.input})
        return msgs
    if not body.input:
        raise bad_request("input must not be empty", "input")
    names: dict[str, str] = {}
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"{where}.role must be user, assistant, system or developer, got {role!r}", where)
            msgs.append({"role": role, "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            name, args, call_id = item.get("name"), item.get("arguments", "{}"), item.get("call_id")
            if not isinstance(name, str) or not isinstance(args, str) or not isinstance(call_id, str):
                raise bad_request(f"{where}: a function_call item needs string call_id, name and arguments", where)
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            names[call_id] = name
            last = msgs[-1] if msgs else None
            if last is not None and last["role"] == "assistant":  # text and calls of one turn: one message
                last.setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise bad_request(f"{where}: a function_call_output item needs a string call_id", where)
            text = output if isinstance(output, str) else _text_of(output, where)
            msg = {"role": "tool", "tool_call_id": call_id, "content": text}
            if call_id in names:
                msg["name"] = names[call_id]
            msgs.append(msg)
        elif kind == "reasoning":
            continue  # earlier reasoning is not shown to the model again (templates drop it too)
        else:
            raise bad_request(f"{where}: input items of type {kind!r} are not supported (message, function_call, "
                              "function_call_output, reasoning)", where)
    return msgs


def _chat_tools(tools: list[dict] | None) -> list[dict] | None:
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("name"), str):
            raise bad_request(f'tools[{i}]: only function tools ({{"type": "function", "name": ...}}) are supported',
                              f"tools[{i}]", "invalid_tool")
        # the client's key order is kept: templates print the tool list as JSON
        fn = {k: v for k, v in t.items() if k in ("name", "description", "parameters") and v is not None}
        fn.setdefault("parameters", {"type": "object", "properties": {}})
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(tc: str | dict | None) -> str | dict | None:
    if isinstance(tc, dict):
        if tc.get("type") != "function" or not isinstance(tc.get("name"), str):
            raise bad_request('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
                              "tool_choice")
        return {"type": "function", "function": {"name": tc["name"]}}
    return tc


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("text.format must be an object", "text.format")
    if fmt.get("type") == "json_schema":
        js = {"name": fmt.get("name", "output"), "schema": fmt.get("schema", {}), "strict": fmt.get("strict")}
        return {"type": "json_schema", "json_schema": js}
    return {"type": fmt.get("type")}


def chat_request(body: ResponsesRequest, stream: bool) -> ChatCompletionRequest:
    if body.previous_response_id is not None:
        raise bad_request("previous_response_id is not supported: this server stores no responses; send the whole "
                          "conversation in input", "previous_response_id")
    fields = {"model": body.model, "messages": input_messages(body), "tools": _chat_tools(body.tools),
              "tool_choice": _chat_tool_choice(body.tool_choice), "parallel_tool_calls": body.parallel_tool_calls,
              "response_format": _response_format(body.text), "max_tokens": body.max_output_tokens,
              "temperature": body.temperature, "top_p": body.top_p, "stream": stream, "top_k": body.top_k,
              "min_p": body.min_p, "repetition_penalty": body.repetition_penalty, "seed": body.seed,
              "chat_template_kwargs": body.chat_template_kwargs}
    if stream:
        fields["stream_options"] = {"include_usage": True}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        raise bad_request(f"{responses_param(loc)}: {err.get('msg', 'invalid value')}", responses_param(loc)) from None


def responses_param(param: str | None) -> str | None:
    """A chat request's field name in an error -> the Responses request's name for it."""
    if not param:
        return None
    for chat, ours in (("messages", "input"), ("max_tokens", "max_output_tokens"), ("response_format", "text.format")):
        if param == chat or param.startswith(chat + ".") or param.startswith(chat + "["):
            return ours + param[len(chat):] if chat != "messages" else ours
    return param.replace(".function.", ".")  # tools[i].function.parameters -> tools[i].parameters


# ------------------------------------------------------------------------------------------------ response
def response_object(state: ServerState, body: ResponsesRequest, rid: str, created: int, output: list[dict],
                    status: str, usage: dict | None) -> dict[str, Any]:
    fmt = (body.text or {}).get("format") or {"type": "text"}
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": state.model_name,
            "output": output, "error": None, "incomplete_details": incomplete, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "metadata": body.metadata or {},
            "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": None,
            "temperature": body.temperature, "top_p": body.top_p, "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [], "text": {"format": fmt}, "truncation": "disabled", "store": False,
            "usage": usage, "user": body.user}


def response_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


def reasoning_item(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or new_id("rs"), "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or new_id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def function_call_item(call_id: str, name: str, arguments: str, status: str = "completed",
                       item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or new_id("fc"), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


async def responses(state: ServerState, request: Request, body: ResponsesRequest):
    state.check_model(body.model)
    chat_body = chat_request(body, body.stream)
    rid, created = new_id("resp"), int(time.time())
    try:
        answer = await chat_completions(state, request, chat_body)
    except ApiError as e:
        e.param = responses_param(e.param)
        raise
    if body.stream:
        from .responses_stream import response_events

        answer.body_iterator = response_events(state, body, rid, created, answer.body_iterator)
        return answer  # the chat route's SSE response: it still aborts the request however the stream ends
    chat = json.loads(answer.body)
    choice = chat["choices"][0]
    msg = choice["message"]
    output = []
    if msg.get("reasoning_content"):
        output.append(reasoning_item(msg["reasoning_content"]))
    if msg.get("content"):
        output.append(message_item(msg["content"]))
    for call in msg.get("tool_calls") or []:
        output.append(function_call_item(call["id"], call["function"]["name"], call["function"]["arguments"]))
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    u = chat["usage"]
    return JSONResponse(response_object(state, body, rid, created, output, status,
                                        response_usage(u["prompt_tokens"], u["completion_tokens"])))
