"""A row -> what the model is asked: a prompt template over the row's fields, or the row's own chat messages.

Templates use Python's format syntax (`{text}`, `{meta[lang]}`; `{{` for a literal brace) so nothing new is learned;
`{schema}` and `{labels}` name the job's JSON schema and label list, to show the model what is wanted. With
`chat=True` (the default, as for an instruct model) the rendered text is the user turn of a conversation that goes
through the checkpoint's chat template; a row with a `messages` list and no template is used as the conversation.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any


class RowError(ValueError):
    """This row cannot be turned into a prompt (a missing field, a bad message list): reported in its `error`."""


@dataclass(slots=True)
class PromptTemplate:
    template: str | None = None  # None: the row's `messages` (chat) or `prompt` field
    chat: bool = True
    system: str | None = None
    schema: dict | None = None
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        if self.template is not None:
            try:
                list(string.Formatter().parse(self.template))
            except ValueError as e:
                raise ValueError(f"bad prompt template ({e}; write {{{{ and }}}} for literal braces)") from None

    def render(self, fields: dict[str, Any]) -> str | list[dict[str, Any]]:
        """The prompt text (chat=False) or the conversation (chat=True) for one row."""
        if self.template is None:
            msgs = fields.get("messages")
            if self.chat and isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs):
                return self._with_system(list(msgs))
            if isinstance(fields.get("prompt"), str):
                text = fields["prompt"]
            else:
                raise RowError("no --prompt given and the row has no 'messages' list or 'prompt' text")
        else:
            extra = {"schema": json.dumps(self.schema) if self.schema is not None else "",
                     "labels": ", ".join(self.labels or [])}
            try:
                text = self.template.format_map(_Fields({**extra, **fields}))
            except KeyError as e:
                raise RowError(f"the row has no field {e.args[0]!r} (the prompt template uses it)") from None
            except (IndexError, AttributeError, TypeError, ValueError) as e:
                raise RowError(f"the prompt template does not fit this row: {e}") from None
        if not text.strip():
            raise RowError("the prompt is empty for this row")
        return self._with_system([{"role": "user", "content": text}]) if self.chat else text

    def _with_system(self, msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.system and not (msgs and msgs[0].get("role") == "system"):
            return [{"role": "system", "content": self.system}, *msgs]
        return msgs


class _Fields(dict):
    """format_map's mapping: a null field is this row's error rather than the word 'None' in its prompt."""

    def __getitem__(self, key: str) -> Any:
        v = dict.__getitem__(self, key)
        if v is None:
            raise RowError(f"the field {key!r} is null in this row")
        return v
