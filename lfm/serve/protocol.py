"""Request bodies of the OpenAI API we serve, as pydantic models: types and ranges checked at the door.

Field names and limits follow OpenAI's reference; vLLM's sampling extensions (top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids, skip_special_tokens, chat_template_kwargs) are accepted too, e.g. through the client's
`extra_body`. Unknown fields are ignored, as vLLM does.

Every check here turns a value that would otherwise fail later (in the tokenizer, the sampler or the engine thread)
into a 400 naming the field: strings must be valid Unicode (a lone surrogate `"\\ud800"` cannot be encoded),
numbers finite, seeds int64 (OpenAI documents seed as an int64; torch rejects more), temperatures and repetition
penalties inside the range float32 logits survive (1 / 1e-42 overflows: vLLM clamps temperatures below 0.01, we
refuse what would overflow rather than change the request), logit_bias keys plain decimal token ids.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationInfo, field_validator,
                      model_validator)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Smallest non-zero temperature / repetition penalty: logits (|x| < 1e4 in practice) divided by it stay far inside
# float32's range (3.4e38); below it a row turns into inf - inf = NaN.
MIN_TEMPERATURE = 1e-6
PENALTY_RANGE = (1e-6, 1e6)
_TOKEN_ID = re.compile(r"-?[0-9]{1,12}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    n: StrictInt = Field(1, ge=1, le=16)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: StrictInt | None = Field(None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=1024)
    skip_special_tokens: StrictBool = True

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        where = lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where or 'the body'} is not valid Unicode (it holds a lone surrogate such as "
                             "\"\\ud800\"); send UTF-8 text")
        return data

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # OpenAI and vLLM answer 400 to stream_options on a non-streaming request
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}: smaller values "
                             "overflow the logits")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition(cls, v: float | None) -> float | None:
        lo, hi = PENALTY_RANGE
        if v is not None and not lo <= v <= hi:
            raise ValueError(f"repetition_penalty must be in [{lo:g}, {hi:g}] (1 = off): values outside overflow "
                             "the logits")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            if not _TOKEN_ID.fullmatch(k):
                raise ValueError(f"logit_bias keys must be token ids (decimal integers), got {k[:40]!r}")
            if not -100 <= b <= 100:
                raise ValueError("logit_bias values must be in [-100, 100]")
        return v


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, le=INT64_MAX)
    max_completion_tokens: StrictInt | None = Field(None, le=INT64_MAX)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool = True
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, m in enumerate(msgs):
            role = m.get("role")
            if role not in ("system", "developer", "user", "assistant", "tool"):
                raise ValueError(f"messages[{i}].role must be system, developer, user, assistant or tool, got {role!r}")
            content = m.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise ValueError(f"messages[{i}].content must be a string or a list of content parts")
            if isinstance(content, list):
                for part in content:
                    if (not isinstance(part, dict) or part.get("type") != "text"
                            or not isinstance(part.get("text"), str)):
                        raise ValueError(f"messages[{i}].content: only text parts are supported")
            if content is None and role != "assistant":
                raise ValueError(f"messages[{i}].content is required for role {role!r}")
        return msgs


class CompletionRequest(_Sampling):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt | None = Field(16, le=INT64_MAX)
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v


def lone_surrogate(data: Any, path: str = "") -> str | None:
    """The path of the first string (value or key) holding a lone UTF-16 surrogate, or None. Iterative: bodies
    nest as deep as the JSON parser allows."""
    todo: list[tuple[str, Any]] = [(path, data)]
    while todo:
        where, v = todo.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return where
        elif isinstance(v, dict):
            for k, x in v.items():
                sub = f"{where}.{k}" if where else str(k)
                if isinstance(k, str) and not k.isascii():
                    try:
                        k.encode("utf-8")
                    except UnicodeEncodeError:
                        return where or "a key"
                todo.append((sub, x))
        elif isinstance(v, list):
            todo.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
    return None
