"""`lfm.eval.LfmLM`, the lm-evaluation-harness backend: its log-likelihoods equal a direct float32 forward of the
model (loglikelihood on a local YAML multiple-choice task through `simple_evaluate`, and loglikelihood_rolling), and
generate_until honours `until` and `max_gen_toks`. The task is local (tests/data/tiny_mc.jsonl through the `json`
dataset builder, as tests/test_serve_lm_eval.py does): nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lfm import LLM, load_model

from .lm_eval_util import DATA, write_mc_task


def task_yaml(tmp: Path) -> Path:
    return write_mc_task(tmp, "lfm_eval_tiny_mc")


@pytest.fixture(scope="module")
def lm(checkpoints):
    from lfm.eval import LfmLM

    return LfmLM(llm=LLM(str(checkpoints["dense"]), dtype="float32", max_model_len=64), batch_size=4)


@pytest.fixture(scope="module")
def direct(checkpoints):
    model = load_model(str(checkpoints["dense"]), dtype="float32")

    def run(ids: list[int], start: int) -> tuple[float, bool]:
        """sum of log p(ids[k] | ids[:k]) for k >= start, and whether each is the argmax: one full forward."""
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
        ks = range(start, len(ids))
        return sum(lp[k - 1, ids[k]].item() for k in ks), all(lp[k - 1].argmax().item() == ids[k] for k in ks)
    return run


def test_simple_evaluate_loglikelihoods_equal_a_direct_forward(lm, direct, tmp_path, one_thread):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(task_yaml(tmp_path)))
    out = simple_evaluate(model=lm, tasks=["lfm_eval_tiny_mc"], task_manager=tasks, log_samples=True,
                          bootstrap_iters=0)
    docs = [json.loads(line) for line in DATA.read_text().splitlines()]
    samples = out["samples"]["lfm_eval_tiny_mc"]
    assert len(samples) == len(docs)
    checked = 0
    for smp in samples:
        for (context, continuation), resp in zip(smp["arguments"], smp["resps"]):
            ll, greedy = resp[0]
            # lm-eval's _encode_pair (HFLM): trailing context spaces join the continuation; whole and context are
            # tokenized without BOS and the continuation is whole[len(context):]
            n = len(context) - len(context.rstrip())
            if n:
                context, continuation = context[:-n], context[-n:] + continuation
            tok = lm.tok
            whole, ctx = tok.encode(context + continuation, add_bos=False), tok.encode(context, add_bos=False)
            want_ll, want_greedy = direct(whole, len(ctx))
            assert ll == pytest.approx(want_ll, abs=1e-5)
            assert greedy == want_greedy
            checked += 1
    assert checked == sum(len(d["choices"]) for d in docs)
    assert 0.0 <= out["results"]["lfm_eval_tiny_mc"]["acc,none"] <= 1.0


def direct_rolling(direct, bos: int, ids: list[int], L: int) -> float:
    """lm-eval's rolling windows written out (HFLM, context_len=1): the first L tokens after BOS, then each next
    block of up to L tokens conditioned on the tokens before it, L + 1 tokens per window; every token once."""
    seq = [bos, *ids]
    total, pos = direct(seq[:L + 1], 1)[0], L
    while pos < len(ids):
        end = min(pos + L, len(ids))  # score ids[pos:end] = seq[pos + 1:end + 1]
        window = seq[end - L:end + 1]
        total += direct(window, len(window) - (end - pos))[0]
        pos = end
    return total


def test_loglikelihood_rolling_equals_a_direct_forward_across_windows(lm, direct, tmp_path, one_thread):
    """A local perplexity YAML task (output_type loglikelihood_rolling, as lm-eval's wikitext) through
    simple_evaluate: each document's log-likelihood equals the windowed direct forward, for a short document and
    one longer than max_length (several windows)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    texts = ["The json module encodes Python objects as JSON text.",
             " ".join(["os.path.join joins path components; shutil copies files."] * 12)]
    assert len(lm.tok.encode(texts[1], add_bos=False)) > 2 * lm.max_length
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "ppl.yaml").write_text(f"""task: lfm_eval_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "hf-cache"}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    out = simple_evaluate(model=lm, tasks=["lfm_eval_tiny_ppl"], task_manager=TaskManager(include_path=str(tmp_path)),
                          log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"]["lfm_eval_tiny_ppl"], key=lambda smp: smp["doc_id"])
    assert [smp["doc"]["text"] for smp in samples] == texts
    for smp, text in zip(samples, texts):
        want = direct_rolling(direct, lm.tok.bos_token_id, lm.tok.encode(text, add_bos=False), lm.max_length)
        assert smp["resps"][0][0] == pytest.approx(want, abs=1e-5)
    assert out["results"]["lfm_eval_tiny_ppl"]["word_perplexity,none"] > 1


def test_generate_until_respects_until_and_max_gen_toks(lm, one_thread):
    from lm_eval.api.instance import Instance

    prompt = "Once upon a time"
    free = lm.generate_until([Instance("generate_until", {}, (prompt, {"max_gen_toks": 12}), 0)], disable_tqdm=True)[0]
    ids = lm.tok.encode(free, add_bos=False)
    assert 0 < len(lm.llm.generate([lm.tok_encode(prompt)], lm.sampling_params({"max_gen_toks": 12}))[0].token_ids) <= 12
    # greedy is deterministic: the same prompt with a stop string cut from the free text ends before it
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop.strip() and len(ids) > 1
    reqs = [Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0),
            Instance("generate_until", {}, (prompt, {"max_gen_toks": 3}), 1)]
    cut, short = lm.generate_until(reqs, disable_tqdm=True)
    assert cut == free[:free.index(stop)]
    assert stop not in cut
    assert len(lm.llm.generate([lm.tok_encode(prompt)], lm.sampling_params({"max_gen_toks": 3}))[0].token_ids) == 3
    assert free.startswith(short) and len(short) < len(free)


def test_registered_under_lfm(checkpoints):
    from lm_eval.api.registry import get_model

    from lfm.eval import LfmLM

    assert get_model("lfm") is LfmLM
    # simple_evaluate(model="lfm", model_args=...) builds it this way (batch_size and device from its own arguments)
    lm = LfmLM.create_from_arg_string(f"pretrained={checkpoints['dense']},dtype=float32,max_length=40",
                                      {"batch_size": 2, "max_batch_size": None, "device": "cpu"})
    assert lm.max_length == 40 and lm.scorer.batch_size == 2 and lm.llm.model.dtype == torch.float32


@pytest.mark.parametrize("n", [0, 1, 5, 59, 60, 61, 130])
def test_rolling_windows_are_lm_evals(n):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from lfm.eval.scoring import rolling_windows

    ids = list(range(100, 100 + n))
    want = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 1, 60, 1)]
    assert [(list(a), list(b)) for a, b in rolling_windows(ids, 1, 60)] == [(list(a), list(b)) for a, b in want]


def test_chat_template_when_asked(lm):
    """simple_evaluate(apply_chat_template=True) renders through apply_chat_template and encodes the string with
    tok_encode: the control-token strings must become the same control ids the template's own encoding gives
    (transformers: a rendered chat tokenized with add_special_tokens=False)."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does json.dumps do?"}]
    text = lm.apply_chat_template(msgs)
    assert text.endswith("<|im_start|>assistant\n")
    assert lm.tok_encode(text) == lm.tok.apply_chat_template(msgs)
    assert lm.chat_template(True) == lm.tok.chat_template and lm.chat_template(False) is None
