"""`lfm chat`: the interactive loop (Ollama's `ollama run` shape: slash commands, Ctrl-C stops a reply, not the session).

`ChatSession` takes its input function and output streams as arguments, so tests drive it line by line without a
terminal. Slash commands never reach the model; an unknown one is an error line, as in Ollama.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

HELP = """commands:
  /help, /?            this list
  /bye, /exit          leave (Ctrl-D too)
  /clear, /reset       forget the conversation (the system prompt stays)
  /system [TEXT]       set the system prompt (empty: remove it) and forget the conversation
  /stats               tokens, speed and context used so far
  /save FILE           write the conversation (OpenAI-style messages) to a JSON file
  /load FILE           continue a conversation saved with /save
  /tool TEXT           answer the model's tool call with TEXT (with --tools)
  \"\"\"                  start / end a message of several lines
Ctrl-C stops a reply (the exchange is dropped) and returns to the prompt."""


@dataclass
class ReplyStats:
    """One reply: what `/stats` sums and the line printed under each reply."""

    prompt_tokens: int
    output_tokens: int
    first_token_s: float
    total_s: float

    @property
    def tokens_per_s(self) -> float:
        decode = self.total_s - self.first_token_s
        return (self.output_tokens - 1) / decode if self.output_tokens > 1 and decode > 0 else 0.0

    def line(self) -> str:
        return (f"[{self.output_tokens} tokens, {self.tokens_per_s:.1f} tok/s, first token {self.first_token_s:.2f} s, "
                f"context {self.prompt_tokens + self.output_tokens} tokens]")


@dataclass
class ChatSession:
    llm: Any  # lfm.LLM (typed loosely: this module is imported before torch is)
    sampling: Any  # lfm.SamplingParams
    system: str | None = None
    tools: list[dict] | None = None
    input_fn: Callable[[str], str] = input
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    history: list[dict] = field(default_factory=list)
    replies: list[ReplyStats] = field(default_factory=list)
    show_speed: bool = True

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Read lines until /bye or end of input; every error in one turn is one line, the session goes on."""
        while True:
            try:
                line = self._read_message()
            except EOFError:
                self.out.write("\n")
                return
            except KeyboardInterrupt:  # at the prompt: as Ollama, say how to leave instead of leaving
                self.note("\n(use /bye or Ctrl-D to leave)")
                continue
            if line is None or not line.strip():
                continue
            if line.lstrip().startswith("/"):
                if self.command(line.strip()) == "quit":
                    return
                continue
            self.turn({"role": "user", "content": line})

    def _read_message(self) -> str | None:
        line = self.input_fn(">>> ")
        if line.strip() != '"""' and not line.lstrip().startswith('"""'):
            return line
        parts = [line.lstrip()[3:]] if line.strip() != '"""' else []  # text after the opening quotes
        while True:
            nxt = self.input_fn("... ")
            if nxt.rstrip().endswith('"""'):
                parts.append(nxt.rstrip()[:-3])
                return "\n".join(p for p in parts).strip("\n")
            parts.append(nxt)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    # ---- slash commands ---------------------------------------------------------------------------------------
    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        name = name.lower()
        if name in ("/bye", "/exit", "/quit"):
            return "quit"
        if name in ("/help", "/?"):
            self.note(HELP)
        elif name in ("/clear", "/reset"):
            self.history = []
            self.note("(conversation cleared)")
        elif name == "/system":
            self.system = arg or None
            self.history = []
            self.note(f"(system prompt {'set' if self.system else 'removed'}; conversation cleared)")
        elif name == "/stats":
            self.note(self.stats_text())
        elif name == "/save":
            self.save(arg)
        elif name == "/load":
            self.load(arg)
        elif name == "/tool":
            if not arg:
                self.note("usage: /tool RESULT (the tool's output, sent back to the model)")
            else:
                self.turn({"role": "tool", "content": arg})
        else:
            self.note(f"unknown command {name}; /help lists the commands")
        return None

    def stats_text(self) -> str:
        if not self.replies:
            return "(no replies yet)"
        out = sum(r.output_tokens for r in self.replies)
        decode_s = sum(max(r.total_s - r.first_token_s, 0.0) for r in self.replies)
        decoded = sum(max(r.output_tokens - 1, 0) for r in self.replies)
        last = self.replies[-1]
        ctx = last.prompt_tokens + last.output_tokens
        return (f"{len(self.replies)} replies, {out} tokens generated, {decoded / decode_s if decode_s else 0:.1f} tok/s "
                f"decode, first token {sum(r.first_token_s for r in self.replies) / len(self.replies):.2f} s on "
                f"average; context {ctx} of {self.llm.max_model_len} tokens")

    def save(self, path: str) -> None:
        if not path:
            self.note("usage: /save FILE")
            return
        data = {"system": self.system, "tools": self.tools, "messages": self.history}
        p = Path(path).expanduser()
        tmp = p.with_name(p.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
            os.replace(tmp, p)  # never a half-written file
        except OSError as e:
            self.note(f"could not save to {p}: {e.strerror or e}")
            return
        self.note(f"(saved {len(self.history)} messages to {p})")

    def load(self, path: str) -> None:
        if not path:
            self.note("usage: /load FILE")
            return
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self.note(f"could not load {p}: {getattr(e, 'strerror', None) or e}")
            return
        if isinstance(data, list):  # a bare list of messages (OpenAI's shape) is welcome too
            data = {"messages": data}
        msgs = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and m.get("role") for m in msgs):
            self.note(f"could not load {p}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
            return
        system = data.get("system")
        if msgs and msgs[0].get("role") == "system":
            system, msgs = msgs[0].get("content"), msgs[1:]
        self.system, self.history = system, list(msgs)
        self.note(f"(loaded {len(msgs)} messages from {p}" + ("; system prompt set" if system else "") + ")")

    # ---- one exchange -----------------------------------------------------------------------------------------
    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def turn(self, message: dict) -> None:
        """Send one message and stream the reply. Ctrl-C stops the reply and drops the exchange; an error (say, the
        conversation no longer fits the context) is one line, and the message is dropped too."""
        from .text import parse_tool_calls

        self.history.append(message)
        outputs: list = []
        reply = ""
        t0 = time.perf_counter()
        first: float | None = None
        stream = self.llm.stream_chat(self.messages(), self.sampling, tools=self.tools, outputs=outputs)
        try:
            for delta in stream:
                if first is None:
                    first = time.perf_counter() - t0
                reply += delta
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            stream.close()  # aborts the request, freeing its cache
            self.history.pop()
            self.out.write("\n")
            self.note("(reply stopped; this exchange is not kept)")
            return
        except Exception as e:  # noqa: BLE001 - a bad template, an over-long conversation: this turn only
            stream.close()
            self.history.pop()
            self.note(f"error: {e}")
            return
        total = time.perf_counter() - t0
        self.out.write("\n")
        self.out.flush()
        out = outputs[0] if outputs else None
        if out is not None:
            self.replies.append(ReplyStats(len(out.prompt_token_ids), len(out.token_ids),
                                           first if first is not None else total, total))
            if self.show_speed:
                self.note(self.replies[-1].line())
        reply = reply.removesuffix("<|im_end|>")
        calls, content = parse_tool_calls(reply, self.tools, self._sentinels(out, reply))
        for c in calls:
            self.note(f"  [tool call] {c.name}({json.dumps(c.arguments)})")
        msg: dict = {"role": "assistant", "content": content if calls else reply}
        if calls:  # a mapping: the template writes it back in the model's own call syntax
            msg["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in calls]
        self.history.append(msg)


    def _sentinels(self, out: Any, reply: str) -> list[int] | None:
        """Offsets of the real tool-call control tokens in the reply (as LLM.chat finds them), so that text which
        merely spells `<|tool_call_start|>` stays text; None (trust the text) where the ids are unavailable."""
        from .text import TOOL_CALL_END, TOOL_CALL_START
        from .text.tool_calls import sentinel_offsets

        tok = getattr(self.llm, "tokenizer", None)
        if out is None or tok is None:
            return None
        skip = self.sampling.skip_special_tokens
        decode = lambda ids: tok.decode(ids, skip_special_tokens=skip)  # noqa: E731
        if decode(out.token_ids).removesuffix("<|im_end|>") != reply:  # stopped by a stop string: text was cut
            return None
        return sentinel_offsets(out.token_ids, tok.token_to_id(TOOL_CALL_START), tok.token_to_id(TOOL_CALL_END),
                                decode)


def sampling_for_tools(sampling: Any) -> Any:
    """With tools, the call sentinels stay in the text, so the call can be shown and parsed."""
    return dataclasses.replace(sampling, skip_special_tokens=False)


def enable_line_editing(history_file: Path | None) -> None:
    """readline for input(): arrows, Ctrl-R, and history kept across sessions (as Ollama's ~/.ollama/history).
    Only on a terminal; a missing readline (Windows) or an unwritable file only loses the feature."""
    if not sys.stdin.isatty():
        return
    try:
        import atexit
        import readline
    except ImportError:
        return
    if history_file is None:
        return
    try:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        if history_file.exists():
            readline.read_history_file(history_file)
        readline.set_history_length(1000)
        atexit.register(_write_history, readline, history_file)
    except OSError:
        pass


def _write_history(readline: Any, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass
