"""vLLM's tokenizer routes (`/tokenize`, `/detokenize`, `/tokenizer_info`), `/health`'s JSON status and the
startup summary: ids equal what the completion and chat routes feed the model, bad input gets a 400."""

from __future__ import annotations

import pytest
from openai import OpenAI

from lfm.serve.cli import startup_lines

from .serve_util import MODEL, openai_client, tiny_server
from .test_serve_api import raw

MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(checkpoints):
    with tiny_server(checkpoints["dense"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return openai_client(server)


def test_tokenize_matches_what_the_model_is_fed(server, client):
    tok = server.state.tokenizer
    text = "Once upon a time"
    status, body = raw(server, "/tokenize", {"model": MODEL, "prompt": text})
    assert status == 200 and body["tokens"] == tok.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 256
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=3, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=body["tokens"], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == body["count"] and by_ids.choices[0].text == r.choices[0].text
    # add_special_tokens=False: no BOS (lm-eval's remote tokenizer asks for this)
    plain = raw(server, "/tokenize", {"prompt": text, "add_special_tokens": False})[1]["tokens"]
    assert tok.add_bos_token and body["tokens"] == [tok.bos_token_id, *plain]
    # as vLLM / transformers: a control-token string is the control id (lm-eval takes EOS's id this way)
    eos = raw(server, "/tokenize", {"prompt": tok.eos_token, "add_special_tokens": False})[1]["tokens"]
    assert eos == [tok.eos_token_id]
    # messages: the chat template, exactly as /v1/chat/completions renders it
    chat = raw(server, "/tokenize", {"model": MODEL, "messages": MSGS})[1]
    c = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1)
    assert chat["tokens"] == tok.apply_chat_template(MSGS, add_generation_prompt=True)
    assert chat["count"] == c.usage.prompt_tokens
    # detokenize: vLLM keeps special tokens in the text
    status, body = raw(server, "/detokenize", {"model": MODEL, "tokens": chat["tokens"]})
    assert status == 200 and body["prompt"] == tok.decode(chat["tokens"], skip_special_tokens=False)
    assert body["prompt"].startswith(tok.bos_token) and "<|im_start|>" in body["prompt"]
    info = raw(server, "/tokenizer_info")[1]
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token and info["chat_template"]


@pytest.mark.parametrize("path,body,status,param", [
    ("/detokenize", {"tokens": [1, 100000]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/tokenize", {"model": MODEL}, 400, None),
    ("/tokenize", {"prompt": "a", "messages": MSGS}, 400, None),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_special_tokens": "yes"}, 400,
     "add_special_tokens"),
])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, path, body, status, param):
    got, err = raw(server, path, body)
    assert got == status and set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    if param is not None:
        assert err["error"]["param"] == param
    assert raw(server, "/tokenize", {"prompt": "still here"})[0] == 200


def test_health_is_json_and_startup_lines_name_the_settings(server):
    status, body = raw(server, "/health")
    assert status == 200 and body == {"status": "ok", "model": MODEL}
    lines = "\n".join(startup_lines(server.state, "127.0.0.1", 8123))
    eng = server.state.llm.engine
    for want in (MODEL, "float32", "256 tokens", f"{eng.block_manager.num_blocks:,} blocks", "threads   1 (torch CPU)",
                 "http://127.0.0.1:8123/v1"):
        assert want in lines, (want, lines)
