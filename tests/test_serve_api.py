"""`lfm serve` over real HTTP on loopback, driven by the official `openai` client: shapes, sampling options,
streaming, and every error case answered with an OpenAI error body."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
from openai import OpenAI

from lfm import LLM, SamplingParams
from lfm.serve import ServeConfig, ServerState, ServerThread

MODEL = "tiny"
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Servers here run torch on one thread (tiny matrices, shared cores); the process setting is restored after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(checkpoints):
    cfg = ServeConfig(model=str(checkpoints["dense"]), served_model_name=MODEL, dtype="float32", max_model_len=512,
                      max_body_bytes=64 << 10, threads=1)
    with ServerThread(ServerState(cfg)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def raw(server, path: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(server.url + path, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert raw(server, "/health")[0] == 200
    status, body = raw(server, "/v1/models/nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_greedy_chat_equals_offline_llm(client, checkpoints):
    llm = LLM(str(checkpoints["dense"]), dtype="float32")
    ref = llm.chat(MSGS, SamplingParams(temperature=0, max_tokens=24))
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=24, **GREEDY)
    c = r.choices[0]
    assert c.message.content == ref.text and c.message.role == "assistant"
    assert c.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == len(ref.token_ids)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    # max_completion_tokens is the newer name of the same limit
    r2 = client.chat.completions.create(model=MODEL, messages=MSGS, max_completion_tokens=24, **GREEDY)
    assert r2.choices[0].message.content == ref.text


def test_streaming_chat_matches_and_reports_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=20, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_n_seed_stop_echo_logprobs(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(n=3, seed=11, **kw)
    b = client.completions.create(n=3, seed=11, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same output
    assert len({c.text for c in a.choices}) > 1 and [c.index for c in a.choices] == [0, 1, 2]
    assert a.usage.completion_tokens == 36 and a.object == "text_completion"
    greedy = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    stop = text[3:5]
    s = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop])
    assert s.choices[0].text == text[:text.index(stop)] and s.choices[0].finish_reason == "stop"
    e = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0, echo=True,
                                  logprobs=2)
    assert e.choices[0].text.startswith("Once upon a time")
    lp = e.choices[0].logprobs
    # OpenAI's legacy completions and vLLM: with echo, one entry per prompt token (the first has no logprob and no
    # alternatives) followed by the generated ones, text_offset counted from 0
    n_prompt = e.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 4 and len(lp.token_logprobs) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert all(len(t) == 2 for t in lp.top_logprobs[1:]) and all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]
    assert "".join(lp.tokens[n_prompt:]) == e.choices[0].text[len("Once upon a time"):]
    ids = client.completions.create(model=MODEL, prompt=[1, 60, 70, 80], max_tokens=3, temperature=0)
    batch = client.completions.create(model=MODEL, prompt=["a b", "c d"], max_tokens=3, temperature=0)
    assert ids.choices[0].text is not None and len(batch.choices) == 2


def test_chat_logprobs_and_streamed_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, logprobs=True, top_logprobs=3,
                                       **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy picks the best token
    parts = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, stream=True))
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0)
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"[" * 50000, 400, None),
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL, "messages": MSGS, "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": MSGS, "temperature": 7}, 400, "temperature"),
    ({"model": MODEL, "messages": MSGS, "n": 0}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({"model": MODEL, "messages": MSGS, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": MSGS, "max_tokens": -5}, 400, "max_tokens"),
    ({"model": MODEL, "messages": MSGS, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"model": MODEL, "messages": MSGS, "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ({"model": "gpt-4", "messages": MSGS}, 404, "model"),
    ({"model": MODEL, "messages": MSGS, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": MODEL, "messages": MSGS, "logit_bias": {"99999": 5}}, 400, "logit_bias"),
    ({"model": MODEL, "messages": MSGS, "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"model": MODEL, "messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}}, 400, "response_format"),
    ({"model": MODEL, "messages": MSGS, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400,
     "tools[0]"),
    ({"model": MODEL, "messages": MSGS, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 5}}}}}]}, 400,
     "tools[0].function.parameters"),
    ({"model": MODEL, "messages": MSGS, "tool_choice": "required"}, 400, "tool_choice"),
    ({"model": MODEL, "messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_requests_get_openai_errors(server, body, status, param):
    got, err = raw(server, "/v1/chat/completions", body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    if param is not None:
        assert err["error"]["param"] == param


def test_more_errors_and_the_server_keeps_serving(server, client):
    assert raw(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0})[0] == 400  # no echo
    assert raw(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1, "echo": True})[0] == 400
    assert raw(server, "/v1/completions", {"model": MODEL, "prompt": [], "max_tokens": 2})[0] == 400
    assert raw(server, "/v1/completions", {"model": MODEL, "prompt": [1, 100000]})[0] == 400
    assert raw(server, "/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"})[0] == 400
    status, err = raw(server, "/v1/chat/completions", b'{"model": "tiny", "pad": "' + b"x" * (70 << 10) + b'"}')
    assert status == 413 and err["error"]["code"] == "request_too_large"
    status, err = raw(server, "/v1/nothing-here")
    assert status == 404 and "error" in err
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_api_key_is_enforced(checkpoints):
    cfg = ServeConfig(model=str(checkpoints["dense"]), served_model_name=MODEL, dtype="float32", api_key="sekret")
    with ServerThread(ServerState(cfg)) as s:
        status, err = raw(s, "/v1/models")
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert raw(s, "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        ok = OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert ok.models.list().data[0].id == MODEL
        assert raw(s, "/health")[0] == 200  # health and metrics stay open for probes


def test_quantized_server_equals_quantized_offline_llm(checkpoints):
    cfg = ServeConfig(model=str(checkpoints["dense"]), served_model_name=MODEL, dtype="float32", quantization="int8",
                      threads=1)
    ref = LLM(str(checkpoints["dense"]), dtype="float32", quantization="int8").chat(
        MSGS, SamplingParams(temperature=0, max_tokens=16))
    with ServerThread(ServerState(cfg)) as s:
        c = OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=16, **GREEDY)
    assert r.choices[0].message.content == ref.text
