"""The tokenizer of an LFM2/LFM2.5 checkpoint: `tokenizer.json` plus its config and chat template.

Built on the `tokenizers` library directly (fast, no transformers import at serving time). The one subtle duty is
prompt safety: control tokens the chat *template* writes become control ids, but the same strings inside user,
system or tool text, or tool definitions, are encoded as plain text, so a user cannot forge a turn boundary.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from lfm.text.chat_template import RenderedChat, render_chat_template

# Private-use markers wrapped around control-token text found in untrusted strings (same scheme as transformers'
# `sanitize_control_tokens`): the token text stays visible to template logic, and encoding drops the markers.
_MARK_OPEN = "\U000f0000"
_MARK_CLOSE = "\U000f0001"

# Special tokens that carry meaning in generated text and so survive `decode(skip_special_tokens=True)`:
# the tool parser needs the call sentinels even where a checkpoint flags them special.
# Thinking tags too: a checkpoint may mark `<think>` / `</think>` special, and the reasoning parser (and a reader of the
# raw output) must still see where thinking ends.
KEEP_ON_SKIP = ("<|tool_call_start|>", "<|tool_call_end|>", "<think>", "</think>")

# Roles whose content is model output; its control tokens are genuine (e.g. a tool-call block) and stay tokens.
_TRUSTED_ROLES = ("assistant",)


class TokenizerError(Exception):
    """A tokenizer directory is missing a file or holds an unusable one."""


@dataclass
class ChatEncoding:
    """Token ids of a rendered chat, with a 0/1 mask of the tokens inside `{% generation %}` blocks."""

    ids: list[int]
    assistant_mask: list[int]


def _token_content(value: Any) -> str | None:
    """Config token entries are strings or (older files) dicts with a "content" key."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode text and chats for one checkpoint."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        config: dict | None = None,
        chat_template: str | None = None,
        template_in_file: bool = False,
        special_tokens_map: dict | None = None,
    ) -> None:
        self._tk = tokenizer
        self.config: dict = dict(config or {})
        self._chat_template = chat_template
        self._template_in_file = template_in_file
        self._special_map = special_tokens_map
        # A second instance that never matches special tokens, for untrusted plain text.
        self._tk_plain = HFTokenizer.from_str(tokenizer.to_str())
        self._tk_plain.encode_special_tokens = True
        added = tokenizer.get_added_tokens_decoder()
        self._added: dict[int, Any] = dict(added)
        # encode_special_tokens still matches *non-special* added tokens: text containing one takes the slow path.
        self._nonspecial_re = _alternation(t.content for t in added.values() if not t.special and t.content)
        self._control_re = _alternation(t.content for t in added.values() if t.content and not t.content.isspace())
        marked = f"{_MARK_OPEN}({self._control_re.pattern}){_MARK_CLOSE}"
        self._marked_re = re.compile(f"{marked}|[{_MARK_OPEN}{_MARK_CLOSE}]")
        self._skip_ids = frozenset(i for i, t in added.items() if t.special and t.content not in KEEP_ON_SKIP)
        self.bos_token = self._config_token("bos_token")
        self.eos_token = self._config_token("eos_token")
        self.pad_token = self._config_token("pad_token")
        add_bos = self.config.get("add_bos_token")
        if add_bos is None:  # no explicit flag: follow the post-processor
            add_bos = self.bos_token_id is not None and tokenizer.encode("", add_special_tokens=True).ids[:1] == [
                self.bos_token_id]
        self.add_bos_token = bool(add_bos)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json and the chat template (chat_template.jinja wins)."""
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"missing tokenizer file: {tok_file}")
        try:
            tk = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust error text is long and unhelpful on its own
            raise TokenizerError(f"unreadable tokenizer file {tok_file}: {exc}") from exc
        config = _read_json(root / "tokenizer_config.json", required=False) or {}
        special_map = _read_json(root / "special_tokens_map.json", required=False)
        if special_map:
            for key in ("bos_token", "eos_token", "pad_token"):
                config.setdefault(key, special_map.get(key))
        jinja = root / "chat_template.jinja"
        template, in_file = config.get("chat_template"), False
        if jinja.is_file():
            template, in_file = jinja.read_text(encoding="utf-8"), True
        elif isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(tk, config, template, in_file, special_map)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the template to `path`."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(out / "tokenizer.json"))
        config = dict(self.config)
        if self._chat_template is not None and self._template_in_file:
            config.pop("chat_template", None)
            (out / "chat_template.jinja").write_text(self._chat_template, encoding="utf-8")
        elif self._chat_template is not None:
            config["chat_template"] = self._chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
        special_map = self._special_map or {k: getattr(self, k) for k in ("bos_token", "eos_token", "pad_token")}
        (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", "utf-8")
        return out

    def _config_token(self, key: str) -> str | None:
        return _token_content(self.config.get(key))

    # ------------------------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def im_end_id(self) -> int | None:
        return self.token_to_id("<|im_end|>")

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (matches special tokens when encoding)."""
        return self._tk

    def stop_token_ids(self) -> list[int]:
        """Ids that end a generation: eos, `<|im_end|>` and `<|endoftext|>`, those that exist, deduplicated."""
        ids = [self.eos_token_id, self.im_end_id, self.token_to_id("<|endoftext|>")]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def is_control(self, token_id: int) -> bool:
        """Whether the id is an added (control) token such as `<|im_end|>`."""
        return token_id in self._added

    # --------------------------------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Encode plain text; control-token strings in it stay text. `add_bos` defaults to `add_bos_token`."""
        ids = self._encode_plain(text)
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
        """`encode` for many texts at once (the Rust tokenizer's threads do the plain ones); for training data."""
        plain = [i for i, t in enumerate(texts) if t and not self._nonspecial_re.search(t)]
        out: list[list[int]] = [[] for _ in texts]
        for i, enc in zip(plain, self._tk_plain.encode_batch([texts[i] for i in plain], add_special_tokens=False)):
            out[i] = enc.ids
        done = set(plain)
        for i, t in enumerate(texts):
            if i not in done:
                out[i] = self._encode_plain(t)
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            out = [[self.bos_token_id, *ids] for ids in out]
        return out

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        if not self._nonspecial_re.search(text):
            return self._tk_plain.encode(text, add_special_tokens=False).ids
        # Slow path that bypasses the added vocabulary entirely: normalize, pre-tokenize, run the model per piece.
        tk = self._tk
        if tk.normalizer is not None:
            text = tk.normalizer.normalize_str(text)
        pieces = tk.pre_tokenizer.pre_tokenize_str(text) if tk.pre_tokenizer is not None else [(text, None)]
        return [token.id for piece, _ in pieces for token in tk.model.tokenize(piece)]

    def _encode_template_text(self, text: str) -> list[int]:
        """Encode template-written text, where control-token strings are real control tokens."""
        return self._tk.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decode ids; skipping drops special tokens except the tool-call sentinels (see KEEP_ON_SKIP)."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skip_ids]
        return self._tk.decode(list(ids), skip_special_tokens=False)

    def skips(self, token_id: int) -> bool:
        """Whether `decode(..., skip_special_tokens=True)` drops this id."""
        return token_id in self._skip_ids

    # ---------------------------------------------------------------------------------------------- chat
    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt string, exactly as transformers' `apply_chat_template(tokenize=False)` renders it."""
        return self._render(messages, tools, add_generation_prompt, False, kwargs).text

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, trust_assistant: bool = True,
                            **kwargs: Any) -> list[int]:
        """Render and tokenize a chat; only template-written control tokens become control ids.

        `trust_assistant=True` (training data, `LLM.chat`) keeps control tokens written in assistant turns' content as
        control ids (they are model output). A server passes False: there every string a client sends, assistant
        history included, is untrusted and stays text."""
        return self._encode_chat(messages, tools, add_generation_prompt, False, kwargs, trust_assistant).ids

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = False, **kwargs: Any) -> ChatEncoding:
        """Like `apply_chat_template`, also returning the `{% generation %}` (assistant) token mask for training."""
        return self._encode_chat(messages, tools, add_generation_prompt, True, kwargs)

    def _encode_chat(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
                     with_mask: bool, kwargs: dict, trust_assistant: bool = True) -> ChatEncoding:
        marked_messages = [self._mark_trusted(m) if trust_assistant and m.get("role") in _TRUSTED_ROLES
                           else self._mark(m) for m in messages]
        marked_tools = self._mark(tools) if tools is not None else None
        rendered = self._render(marked_messages, marked_tools, add_generation_prompt, with_mask, self._mark(kwargs))
        ids: list[int] = []
        starts: list[int] = []
        pos = 0
        for match in self._marked_re.finditer(rendered.text):
            self._encode_piece(rendered.text[pos:match.start()], pos, False, ids, starts)
            if match.group(1):  # a marked control token: text, not a control id
                self._encode_piece(match.group(1), match.start(1), True, ids, starts)
            pos = match.end()
        self._encode_piece(rendered.text[pos:], pos, False, ids, starts)
        if not with_mask:
            return ChatEncoding(ids, [])
        spans = rendered.generation_spans
        span_starts = [a for a, _ in spans]

        def inside(pos: int) -> int:
            k = bisect.bisect_right(span_starts, pos) - 1
            return int(k >= 0 and pos < spans[k][1])

        return ChatEncoding(ids, [inside(pos) for pos in starts])

    def _encode_piece(self, piece: str, offset: int, as_text: bool, ids: list[int], starts: list[int]) -> None:
        """Append a piece's ids, and each token's start character (in the marked text) to `starts`."""
        if not piece:
            return
        if as_text:
            new = self._encode_plain(piece)
            ids.extend(new)
            starts.extend([offset] * len(new))  # a marked token sits inside one message; its start suffices
            return
        enc = self._tk.encode(piece, add_special_tokens=False)
        ids.extend(enc.ids)
        starts.extend(offset + a for a, _ in enc.offsets)

    def _render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool,
                return_spans: bool, kwargs: dict) -> RenderedChat:
        if self._chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (no chat_template.jinja or config entry)")
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "pad_token": self.pad_token or "", **kwargs}
        return render_chat_template(self._chat_template, messages, tools, add_generation_prompt,
                                    return_spans=return_spans, **variables)

    def _mark_trusted(self, message: dict) -> dict:
        """An assistant turn: its content is model output (control tokens genuine), but its structured tool calls
        (names, argument keys and values) are data the template writes, and stay text."""
        if not isinstance(message, dict):
            return message
        return {k: self._mark(v) if k == "tool_calls" else v for k, v in message.items()}

    def _mark(self, obj: Any) -> Any:
        """Wrap control-token text in untrusted strings with markers (after removing any forged markers)."""
        if isinstance(obj, str):
            obj = obj.replace(_MARK_OPEN, "").replace(_MARK_CLOSE, "")
            return self._control_re.sub(lambda m: f"{_MARK_OPEN}{m.group()}{_MARK_CLOSE}", obj)
        if isinstance(obj, dict):  # keys too: a tool's property names are client text like any other
            return {self._mark(key) if isinstance(key, str) else key: self._mark(value) for key, value in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self._mark(value) for value in obj]
        return obj


def _read_json(path: Path, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise TokenizerError(f"missing tokenizer file: {path}")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"invalid JSON in {path}: {exc}") from exc


def _alternation(tokens: Any) -> re.Pattern:
    """A regex matching any of `tokens`, longest first (so a token wins over the tokens it contains)."""
    ordered = sorted(set(tokens), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered)) or "(?!)")  # (?!) never matches
