"""`lfm chat`: slash commands, Ctrl-C, speed line, save / load, streaming text — driven through the chat loop's input
function (in process, a tiny random model) and once through a real pseudo-terminal (a real Ctrl-C)."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import time

import pytest

from lfm import LLM, SamplingParams
from lfm.chat_loop import ChatSession

from .engine_util import capture
from .test_text_detokenizer import _gpt2_unicode_to_byte


@pytest.fixture(scope="module")
def llm(checkpoints) -> LLM:
    return LLM(checkpoints["dense"])


class Writes(io.StringIO):
    """An output stream that keeps every write apart (each streamed delta), and can raise Ctrl-C at the n-th."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.interrupt_at = interrupt_at

    def write(self, s: str) -> int:
        self.parts.append(s)
        if self.interrupt_at is not None and len(self.parts) == self.interrupt_at:
            raise KeyboardInterrupt
        return super().write(s)


def session(llm: LLM, lines: list[str], **kw) -> tuple[ChatSession, Writes, io.StringIO]:
    feed = iter(lines)

    def input_fn(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out, err = kw.pop("out", Writes()), io.StringIO()
    s = ChatSession(llm, kw.pop("sampling", SamplingParams(temperature=0, max_tokens=6)), input_fn=input_fn,
                    out=out, err=err, **kw)
    return s, out, err


def test_slash_commands_never_reach_the_model(llm, monkeypatch):
    sent: list[list[dict]] = []
    real = llm.stream_chat
    monkeypatch.setattr(llm, "stream_chat", lambda msgs, *a, **k: (sent.append(msgs), real(msgs, *a, **k))[1])
    s, out, err = session(llm, ["/help", "/?", "/stats", "/nonsense", "hello", "/system Be brief.", "hi", "/bye",
                                "never read"])
    s.run()
    assert [m[-1]["content"] for m in sent] == ["hello", "hi"]  # only the two messages went to the model
    assert sent[1][0] == {"role": "system", "content": "Be brief."} and len(sent[1]) == 2  # /system cleared history
    e = err.getvalue()
    assert e.count("/save FILE") == 2 and "(no replies yet)" in e and "unknown command /nonsense" in e


def test_speed_line_and_stats(llm):
    s, out, err = session(llm, ["one", "two", "/stats"])
    s.run()
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("[")]
    assert len(lines) == 2 and all("tok/s" in ln and "first token" in ln for ln in lines)
    assert all(r.output_tokens == 6 for r in s.replies)  # max_tokens 6, greedy on a random model: never stops early
    assert s.replies[1].prompt_tokens > s.replies[0].prompt_tokens + 6  # the second turn carries the first
    assert f"2 replies, 12 tokens generated" in err.getvalue() and f"of {llm.max_model_len} tokens" in err.getvalue()
    quiet, _, err2 = session(llm, ["one"], show_speed=False)
    quiet.run()
    assert "tok/s" not in err2.getvalue()


def test_ctrl_c_stops_the_reply_not_the_session(llm):
    out = Writes(interrupt_at=3)  # Ctrl-C arrives while the third piece of the reply is being written
    s, out, err = session(llm, ["first", "second"], out=out, sampling=SamplingParams(temperature=0, max_tokens=50))
    s.run()  # returns at end of input, not at the interrupt
    assert "reply stopped" in err.getvalue()
    assert [m["content"] for m in s.history if m["role"] == "user"] == ["second"]  # the stopped exchange is dropped
    assert s.history[-1]["role"] == "assistant" and len(s.replies) == 1
    assert not llm.engine.has_unfinished_requests()  # the stopped request was aborted, its cache freed


def test_ctrl_c_at_the_prompt_says_how_to_leave(llm):
    calls = iter([KeyboardInterrupt, "/bye"])

    def input_fn(prompt: str) -> str:
        x = next(calls)
        if x is KeyboardInterrupt:
            raise KeyboardInterrupt
        return x

    err = io.StringIO()
    ChatSession(llm, SamplingParams(max_tokens=2), input_fn=input_fn, out=io.StringIO(), err=err).run()
    assert "/bye or Ctrl-D" in err.getvalue()


def test_save_then_load_continues_the_conversation(llm, tmp_path):
    f = tmp_path / "conv.json"
    s, _, err = session(llm, ["/system Be brief.", "hello", f"/save {f}"])
    s.run()
    data = json.loads(f.read_text())
    assert data["system"] == "Be brief." and [m["role"] for m in data["messages"]] == ["user", "assistant"]
    t, _, err2 = session(llm, [f"/load {f}", "and then?"])
    t.run()
    assert t.system == "Be brief." and [m["content"] for m in t.history if m["role"] == "user"] == ["hello", "and then?"]
    assert "loaded 2 messages" in err2.getvalue()
    # OpenAI's shape (a bare list, system first) loads too; a broken file is one line and changes nothing
    g = tmp_path / "list.json"
    g.write_text(json.dumps([{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]))
    (tmp_path / "bad.json").write_text("{not json")
    u, _, err3 = session(llm, [f"/load {g}", f"/load {tmp_path / 'bad.json'}", f"/load {tmp_path / 'none.json'}",
                               f"/save {tmp_path / 'no-dir' / 'x.json'}"])
    u.run()
    assert u.system == "S" and u.history == [{"role": "user", "content": "u"}]
    assert err3.getvalue().count("could not load") == 2 and "could not save" in err3.getvalue()
    assert not (tmp_path / "no-dir").exists()


def test_multiline_message(llm, monkeypatch):
    sent: list[str] = []
    real = llm.stream_chat
    monkeypatch.setattr(llm, "stream_chat", lambda msgs, *a, **k: (sent.append(msgs[-1]["content"]),
                                                                    real(msgs, *a, **k))[1])
    s, _, _ = session(llm, ['"""first line', "second line", 'third"""'])
    s.run()
    assert sent == ["first line\nsecond line\nthird"]


def test_a_character_split_across_tokens_streams_whole(llm):
    """The streamed reply never shows U+FFFD for a character whose bytes arrive in several tokens (the engine's
    detokenizer holds incomplete UTF-8 back): 'Dé€' forced as single-byte tokens through `lfm chat`'s loop."""
    tok = llm.tokenizer
    to_byte = _gpt2_unicode_to_byte()
    byte_id = {to_byte[tok.id_to_token(i)]: i for i in range(tok.vocab_size)
               if tok.id_to_token(i) and len(tok.id_to_token(i)) == 1 and tok.id_to_token(i) in to_byte}
    script = [byte_id[b] for b in "Dé€!".encode()] + [tok.im_end_id]
    capture(llm, force=lambda tokens, n: script[len(tokens) - n] if len(tokens) - n < len(script) else None)
    s, out, _ = session(llm, ["hi"], sampling=SamplingParams(temperature=0, max_tokens=20))
    s.run()
    deltas = [p for p in out.parts if p != "\n"]
    assert "".join(deltas) == "Dé€!" and not any("\ufffd" in d for d in deltas)
    assert len(deltas) >= 3  # streamed piece by piece, each piece whole characters
    assert s.history[-1] == {"role": "assistant", "content": "Dé€!"}


def test_tool_call_is_parsed_and_kept_in_history(llm, tmp_path):
    tok = llm.tokenizer
    call = tok.encode('[lookup_doc(name="os.path.join")]', add_bos=False)
    script = [tok.token_to_id("<|tool_call_start|>"), *call, tok.token_to_id("<|tool_call_end|>"), tok.im_end_id]
    capture(llm, force=lambda tokens, n: script[len(tokens) - n] if len(tokens) - n < len(script) else None)
    tools = json.loads((__import__("pathlib").Path(__file__).parent.parent / "examples" / "tools.json").read_text())
    from lfm.chat_loop import sampling_for_tools

    s, out, err = session(llm, ["Look up os.path.join"], tools=tools,
                          sampling=sampling_for_tools(SamplingParams(temperature=0, max_tokens=40)))
    s.run()
    assert '[tool call] lookup_doc({"name": "os.path.join"})' in err.getvalue()
    assert s.history[-1]["tool_calls"][0]["function"] == {"name": "lookup_doc", "arguments": {"name": "os.path.join"}}


def _controlling_tty() -> None:
    """In the child: a new session whose controlling terminal is the pty on fd 0, so ^C typed there is SIGINT."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_real_ctrl_c_in_a_terminal(checkpoints, tmp_path):
    """A real terminal: the tty turns ^C into SIGINT; the reply stops, the prompt comes back, and the session goes
    on until /bye (exit status 0). Greedy decoding of the random model does not stop by itself within the test."""
    master, slave = os.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "dumb"}
    p = subprocess.Popen([sys.executable, "-m", "lfm.cli", "chat", str(checkpoints["dense"]), "--max-tokens",
                          "100000", "--temperature", "0", "--no-history"], stdin=slave, stdout=slave, stderr=slave,
                         env=env, preexec_fn=_controlling_tty)
    os.close(slave)
    seen = b""

    def read_until(cond, timeout: float = 120) -> None:
        nonlocal seen
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, f"timed out; the terminal showed {seen[-400:]!r}"
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    return

    try:
        read_until(lambda: b">>> " in seen)
        os.write(master, b"hello\n")
        start = len(seen)
        read_until(lambda: len(seen) - start > 100)  # the reply is streaming
        os.write(master, b"\x03")  # Ctrl-C, as typed
        read_until(lambda: b"reply stopped" in seen)
        read_until(lambda: b">>> " in seen[seen.index(b"reply stopped"):])  # the prompt is back
        os.write(master, b"/bye\n")
        assert p.wait(timeout=60) == 0, seen[-400:]
        assert b"Traceback" not in seen
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
