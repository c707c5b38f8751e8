"""`/v1/completions` with echo + logprobs scores the prompt: every prompt token's log-probability equals a direct
float32 forward of the model, streamed or not, and `max_tokens=0` scores without generating (vLLM's behaviour, which
lm-evaluation-harness's loglikelihood and perplexity requests rely on)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
from openai import OpenAI

from lfm import load_model

from .serve_util import MODEL, openai_client, tiny_server


@pytest.fixture(scope="module")
def server(checkpoints):
    with tiny_server(checkpoints["dense"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return openai_client(server)


def direct_logprobs(path, ids: list[int]) -> list[float]:
    """log p(ids[k] | ids[:k]) for k >= 1 from one full float32 forward (no cache, no engine)."""
    model = load_model(str(path), dtype="float32")
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return [lp[k - 1, ids[k]].item() for k in range(1, len(ids))]


def test_echo_scores_the_prompt_like_a_direct_forward(client, checkpoints):
    prompt = [1, 40, 41, 99, 250, 17, 300, 8]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    lp = c.logprobs
    ref = direct_logprobs(checkpoints["dense"], prompt)
    assert len(lp.token_logprobs) == len(prompt) and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(ref, abs=1e-5)
    # top-1 alternative = the argmax; its logprob is the largest
    assert all(max(t.values()) >= x - 1e-6 for t, x in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(prompt)
    assert c.finish_reason == "length" and lp.text_offset[0] == 0

    # max_tokens=1: the prompt's entries, then exactly one generated one (lm-eval's loglikelihood request)
    r1 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp1 = r1.choices[0].logprobs
    assert len(lp1.tokens) == len(prompt) + 1 and lp1.token_logprobs[:len(prompt)] == lp.token_logprobs
    assert lp1.token_logprobs[-1] == pytest.approx(max(lp1.top_logprobs[-1].values()), abs=1e-6)  # greedy

    # streamed: the echo chunk carries the prompt's entries, then the generated token; the same numbers
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1,
                                            temperature=0, stream=True))
    streamed = [x for ch in chunks for x in (ch.choices[0].logprobs.token_logprobs if ch.choices[0].logprobs else [])]
    offsets = [x for ch in chunks for x in (ch.choices[0].logprobs.text_offset if ch.choices[0].logprobs else [])]
    assert streamed == lp1.token_logprobs and offsets == lp1.text_offset

    # a batch of prompts, text prompts too: one choice per prompt, each scored on its own
    other = [1, 77, 78, 79]
    b = client.completions.create(model=MODEL, prompt=[prompt, other], max_tokens=0, echo=True, logprobs=0)
    assert [len(ch.logprobs.tokens) for ch in b.choices] == [len(prompt), len(other)]
    assert b.choices[1].logprobs.token_logprobs[1:] == pytest.approx(direct_logprobs(checkpoints["dense"], other),
                                                                    abs=1e-5)
    t = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=0, echo=True, logprobs=0)
    assert t.choices[0].text == "Once upon a time" and len(t.choices[0].logprobs.tokens) == t.usage.prompt_tokens


def test_max_tokens_zero_needs_echo_and_the_server_keeps_serving(server, client):
    req = urllib.request.Request(server.url + "/v1/completions", method="POST",
                                 data=json.dumps({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 0}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "max_tokens"
    r = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
