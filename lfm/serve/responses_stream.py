"""Streaming `/v1/responses`: the chat route's chunks re-emitted as OpenAI's Responses events.

Order, as OpenAI sends them: `response.created`, `response.in_progress`; per output item `response.output_item.added`,
its deltas (`response.reasoning_text.delta`, `response.content_part.added` + `response.output_text.delta`, or
`response.function_call_arguments.delta`), their `.done` events and `response.output_item.done`; finally
`response.completed` (`response.incomplete` when max_output_tokens cut it short, `response.failed` on an engine
error). Every event carries `type` and an increasing `sequence_number`, in `event:` + `data:` SSE frames; no
`[DONE]` line (OpenAI sends none on this route). A tool call arrives whole from the chat parser, so its arguments
come as one delta.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from .responses import (ResponsesRequest, function_call_item, message_item, new_id, reasoning_item, response_object,
                        response_usage)
from .state import ServerState


async def response_events(state: ServerState, body: ResponsesRequest, rid: str, created: int,
                          chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    seq = 0
    output: list[dict[str, Any]] = []
    open_item: dict[str, Any] | None = None  # the reasoning or message item receiving deltas
    finish, usage = None, None

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        obj = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def close() -> list[str]:
        nonlocal open_item
        if open_item is None:
            return []
        item, open_item = open_item, None
        item["status"] = "completed"
        at = dict(item_id=item["id"], output_index=len(output), content_index=0)
        part = item["content"][0]
        if item["type"] == "reasoning":
            out = [event("response.reasoning_text.done", **at, text=part["text"])]
        else:
            out = [event("response.output_text.done", **at, text=part["text"], logprobs=[]),
                   event("response.content_part.done", **at, part=part)]
        output.append(item)
        return out + [event("response.output_item.done", output_index=len(output) - 1, item=item)]

    def open_(kind: str) -> list[str]:
        nonlocal open_item
        out = close() if open_item is not None and open_item["type"] != kind else []
        if open_item is not None:
            return out
        open_item = reasoning_item("", "in_progress") if kind == "reasoning" else message_item("", "in_progress")
        shown = {**open_item, "content": []}
        out.append(event("response.output_item.added", output_index=len(output), item=shown))
        if kind == "message":
            out.append(event("response.content_part.added", item_id=open_item["id"], output_index=len(output),
                             content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                    "logprobs": []}))
        return out

    def snapshot(status: str, u: dict | None = None) -> dict:
        return response_object(state, body, rid, created, list(output), status, u)

    yield event("response.created", response=snapshot("in_progress"))
    yield event("response.in_progress", response=snapshot("in_progress"))
    async for frame in chunks:
        if not frame.startswith("data: ") or frame.startswith("data: [DONE]"):
            continue
        obj = json.loads(frame[6:])
        if "error" in obj:
            failed = snapshot("failed")
            failed["error"] = {"code": obj["error"].get("code") or "server_error", "message": obj["error"]["message"]}
            yield event("response.failed", response=failed)
            return
        if obj.get("usage"):
            usage = obj["usage"]
        for ch in obj.get("choices", []):
            delta = ch.get("delta", {})
            if delta.get("reasoning_content"):
                for e in open_("reasoning"):
                    yield e
                open_item["content"][0]["text"] += delta["reasoning_content"]
                yield event("response.reasoning_text.delta", item_id=open_item["id"], output_index=len(output),
                            content_index=0, delta=delta["reasoning_content"])
            if delta.get("content"):
                for e in open_("message"):
                    yield e
                open_item["content"][0]["text"] += delta["content"]
                yield event("response.output_text.delta", item_id=open_item["id"], output_index=len(output),
                            content_index=0, delta=delta["content"], logprobs=[])
            for call in delta.get("tool_calls") or []:
                for e in close():
                    yield e
                fn = call["function"]
                item = function_call_item(call["id"], fn["name"], "", "in_progress", new_id("fc"))
                at = dict(item_id=item["id"], output_index=len(output))
                yield event("response.output_item.added", output_index=len(output), item=dict(item))
                yield event("response.function_call_arguments.delta", **at, delta=fn["arguments"])
                yield event("response.function_call_arguments.done", **at, arguments=fn["arguments"],
                            name=fn["name"])
                item.update(arguments=fn["arguments"], status="completed")
                output.append(item)
                yield event("response.output_item.done", output_index=len(output) - 1, item=item)
            if ch.get("finish_reason") is not None:
                finish = ch["finish_reason"]
    for e in close():
        yield e
    u = response_usage(usage["prompt_tokens"], usage["completion_tokens"]) if usage else None
    status = "incomplete" if finish == "length" else "completed"
    yield event(f"response.{status}", response=snapshot(status, u))
