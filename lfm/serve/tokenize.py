"""`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`: vLLM's tokenizer routes, same shapes.

lm-evaluation-harness's `local-completions` looks for `/tokenizer_info` and `/tokenize` before it would download a
tokenizer (its "remote" backend), then sends the ids to `/v1/completions`. A `prompt` is tokenized as vLLM's route and
transformers' tokenizer do it: a control-token string in the text becomes the control id (lm-eval finds the EOS id,
its perplexity prefix token, by tokenizing the EOS string). `/v1/completions` keeps such strings as text in a string
prompt, so for plain text both give the same ids, and a client that wants control ids sends ids. `messages` go
through the chat template exactly as `/v1/chat/completions` renders them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, model_validator

from .chat import _normalize_messages  # the chat route's own message forms
from .errors import ApiError, bad_request
from .state import ServerState


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeRequest: `prompt` (completion form) or `messages` (chat form)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: StrictBool | None = None  # default: True for a prompt (BOS), False for messages (vLLM's)
    add_generation_prompt: StrictBool = True
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[StrictInt]


def _tokenizer(state: ServerState):
    if state.tokenizer is None:
        raise ApiError(400, "this checkpoint has no tokenizer", "model")
    return state.tokenizer


async def tokenize(state: ServerState, body: TokenizeRequest) -> dict[str, Any]:
    if body.model is not None:
        state.check_model(body.model)
    tok = _tokenizer(state)
    if body.prompt is not None:
        add_bos = True if body.add_special_tokens is None else body.add_special_tokens
        enc = await asyncio.to_thread(tok.backend.encode, body.prompt, add_special_tokens=False)
        ids = list(enc.ids)
        if add_bos and tok.add_bos_token and tok.bos_token_id is not None:
            ids = [tok.bos_token_id, *ids]
    else:
        messages = _normalize_messages(body.messages or [])
        try:
            ids = await asyncio.to_thread(tok.apply_chat_template, messages, body.tools or None,
                                          body.add_generation_prompt, trust_assistant=False,
                                          **(body.chat_template_kwargs or {}))
        except Exception as e:  # template errors are the client's input
            raise bad_request(f"cannot apply the chat template: {e}", "messages") from None
        if body.add_special_tokens and tok.bos_token_id is not None and ids[:1] != [tok.bos_token_id]:
            ids = [tok.bos_token_id, *ids]
    return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len, "token_strs": None}


async def detokenize(state: ServerState, body: DetokenizeRequest) -> dict[str, Any]:
    if body.model is not None:
        state.check_model(body.model)
    tok = _tokenizer(state)
    state.check_token_ids(body.tokens, "tokens")
    return {"prompt": await asyncio.to_thread(tok.decode, body.tokens, False)}  # special tokens kept, as vLLM


def tokenizer_info(state: ServerState) -> dict[str, Any]:
    """vLLM's `/tokenizer_info`: the special tokens and chat template a client-side tokenizer needs."""
    tok = _tokenizer(state)
    return {"tokenizer_class": "lfm.text.Tokenizer", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "pad_token": tok.pad_token, "chat_template": tok.chat_template, "add_bos_token": tok.add_bos_token,
            "model_max_length": state.max_model_len}
