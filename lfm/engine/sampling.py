"""`SamplingParams`: every way to ask for tokens, offline (`LLM`) or over HTTP, with vLLM's names and meanings.

One object per request carries the sampling filters, the penalties, logit bias, log-probabilities (of the output and
of the prompt) and a structured-output constraint, so the server and `LLM` ask the engine for anything the same way.

Structured output offline uses vLLM's current public name: `SamplingParams(structured_outputs=StructuredOutputsParams(
json=schema))` (vLLM >= 0.12 replaced `guided_decoding` / `guided_json` with it), with the simple spellings
`json_schema=`, `regex=`, `choice=` and `grammar=` accepted as shortcuts. `LLM` compiles them (xgrammar) into the
engine's `constraint`, once per distinct value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class StructuredOutputsParams:
    """vLLM's `StructuredOutputsParams`: exactly one of a JSON schema, a regular expression, a list of choices, an
    EBNF grammar (xgrammar's / GBNF dialect, `root ::= ...`) or `json_object=True` (any JSON object)."""

    json: dict | str | None = None  # a JSON schema (dict or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, str):
            import json as _json

            try:
                self.json = _json.loads(self.json)
            except ValueError:
                raise ValueError("structured_outputs.json must be a JSON schema (a dict or its JSON text)") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError("structured_outputs.json must be a JSON schema object")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)
        if self.regex is not None and not (isinstance(self.regex, str) and self.regex):
            raise ValueError("structured_outputs.regex must be a non-empty string")
        if self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar.strip()):
            raise ValueError("structured_outputs.grammar must be a non-empty EBNF string")
        kinds = self.kinds()
        if len(kinds) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, choice, grammar, json_object; got "
                             + (", ".join(kinds) or "none"))

    def kinds(self) -> list[str]:
        return [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None] + \
            (["json_object"] if self.json_object else [])


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the prompt or the output (as transformers)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    max_tokens: int | None = 16  # None = until a stop or the context is full
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before them
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the checkpoint's EOS
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the k most likely
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's (first: None), plus the k best
    constraint: Any = None  # a grammar.ConstraintSpec (tool calls, JSON schema) that masks every step
    structured_outputs: StructuredOutputsParams | dict | None = None  # vLLM's name; LLM compiles it into `constraint`
    json_schema: dict | str | None = None  # shortcut: structured_outputs=StructuredOutputsParams(json=...)
    regex: str | None = None  # shortcut for StructuredOutputsParams(regex=...)
    choice: list[str] | None = None  # shortcut for StructuredOutputsParams(choice=...)
    grammar: str | None = None  # shortcut for StructuredOutputsParams(grammar=...)

    def __post_init__(self) -> None:
        self._merge_structured()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        checks = [
            (finite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 or a positive integer, got {self.top_k}"),
            (finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (finite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens > 0),
             f"max_tokens must be a positive integer, got {self.max_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
             f"logprobs must be a non-negative integer, got {self.logprobs}"),
            (self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
             f"prompt_logprobs must be a non-negative integer, got {self.prompt_logprobs}"),
            (all(finite(v) for v in (self.logit_bias or {}).values()), "logit_bias values must be finite numbers"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}

    def _merge_structured(self) -> None:
        so = self.structured_outputs
        if isinstance(so, dict):
            unknown = set(so) - {"json", "regex", "choice", "grammar", "json_object"}
            if unknown:
                raise ValueError(f"structured_outputs has unknown field(s): {', '.join(sorted(unknown))}")
            so = StructuredOutputsParams(**so)
        short = {k: v for k, v in (("json", self.json_schema), ("regex", self.regex), ("choice", self.choice),
                                   ("grammar", self.grammar)) if v is not None}
        if short:
            made = StructuredOutputsParams(**short)
            if so is not None and so != made:
                raise ValueError("give structured output either as structured_outputs or as json_schema / regex / "
                                 "choice / grammar, not both")
            so = made
        self.structured_outputs = so

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
