"""lm-evaluation-harness's `local-completions` model against `lfm serve`: a multiple-choice task scores every
choice, and perplexity scoring (`loglikelihood_rolling`) scores a text, with the same log-likelihood as a direct float32
forward of the model.

This is how lm-eval is pointed at an OpenAI-compatible server (vLLM's documented recipe): it finds `/tokenizer_info`
and `/tokenize` (its "remote" tokenizer backend, so nothing is downloaded), sends context + continuation as token
ids with `echo=true, logprobs=1, max_tokens=1`, and sums `token_logprobs[ctxlen:-1]`. The task is local: a YAML file
over tests/data/tiny_mc.jsonl, loaded with the `json` dataset builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lfm import load_model
from lfm.serve import ServeConfig, ServerState, ServerThread

from .lm_eval_util import DATA, write_mc_task

MODEL = "tiny"


def task_yaml(tmp: Path) -> Path:
    return write_mc_task(tmp, "lfm_tiny_mc")


def test_multiple_choice_loglikelihoods_equal_a_direct_forward(checkpoints, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    before = torch.get_num_threads()
    cfg = ServeConfig(model=str(checkpoints["dense"]), served_model_name=MODEL, dtype="float32", max_model_len=256,
                      threads=1)
    with ServerThread(ServerState(cfg)) as s:
        tok = s.state.tokenizer
        # no tokenizer named: lm-eval probes /tokenizer_info and /tokenize and picks its remote backend
        lm = LocalCompletionsAPI(model=MODEL, base_url=s.url + "/v1/completions", max_length=256, max_retries=1)
        assert lm.tokenizer_backend == "remote"
        tasks = TaskManager(include_path=str(task_yaml(tmp_path)))
        out = simple_evaluate(model=lm, tasks=["lfm_tiny_mc"], task_manager=tasks, log_samples=True, bootstrap_iters=0)
        # perplexity (loglikelihood_rolling): lm-eval's prefix token is the BOS id it gets from /tokenize
        text = "The json module encodes Python objects as JSON text."
        [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    torch.set_num_threads(before)

    model = load_model(str(checkpoints["dense"]), dtype="float32")

    def direct(ids: list[int], start: int) -> float:
        """sum of log p(ids[k] | ids[:k]) for k >= start, one full float32 forward."""
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
        return sum(lp[k - 1, ids[k]].item() for k in range(start, len(ids)))

    assert rolling == pytest.approx(direct([tok.bos_token_id, *tok.encode(text, add_bos=False)], 1), abs=1e-5)
    samples = out["samples"]["lfm_tiny_mc"]
    docs = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert len(samples) == len(docs)
    checked = 0
    for smp in samples:
        doc = smp["doc"]
        got = [r[0][0] for r in smp["resps"]]  # (loglikelihood, is_greedy) per choice
        assert len(got) == len(doc["choices"]) == len(smp["arguments"])
        for (context, continuation), ll in zip(smp["arguments"], got):
            # lm-eval's _encode_pair: trailing spaces of the context move to the continuation, the whole text and
            # the context are tokenized (no BOS), the tokens after the context's are the continuation's
            n = len(context) - len(context.rstrip())
            if n:
                context, continuation = context[:-n], context[-n:] + continuation
            whole = tok.encode(context + continuation, add_bos=False)
            ctx = tok.encode(context, add_bos=False)
            assert ll == pytest.approx(direct(whole, len(ctx)), abs=1e-5), (context, continuation)
            assert ll < 0  # issue 16: every choice used to score 0.0
            checked += 1
    assert checked == sum(len(d["choices"]) for d in docs)
    acc = out["results"]["lfm_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
