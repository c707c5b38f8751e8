"""The offline API: generate / stream / chat, sampling options, stops, batching, against transformers where it has one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lfm import LLM, SamplingParams

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def llm(checkpoints) -> LLM:
    return LLM(str(checkpoints["dense"]), dtype="float32")


@pytest.fixture(scope="module")
def moe_llm(checkpoints) -> LLM:
    return LLM(str(checkpoints["moe"]), dtype="float32")


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("which", ["llm", "moe_llm"])
def test_batch_of_different_lengths_equals_one_at_a_time(which, request):
    m: LLM = request.getfixturevalue(which)
    prompts = ["Once upon a time", "Hi", "The quick brown fox jumps over the lazy dog", [1, 50, 60, 70]]
    batch = m.generate(prompts, GREEDY)
    for p, out in zip(prompts, batch):
        alone = m.generate([p], GREEDY)[0]
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text
        assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_per_request_params_and_early_finishers_leave_the_batch(llm):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 1)]
    outs = llm.generate(["a", "bb", "ccc"], params)
    assert [len(o.token_ids) for o in outs] == [3, 9, 1]
    long_alone = llm.generate(["bb"], params[1])[0]
    assert outs[1].token_ids == long_alone.token_ids


def test_prompt_forms_and_outputs(llm):
    ids = llm.tokenizer.encode("Hello world")
    assert ids[0] == 1  # BOS added like the real tokenizer
    a = llm.generate("Hello world", GREEDY)[0]
    b = llm.generate([ids], GREEDY)[0]
    assert a.token_ids == b.token_ids and a.prompt_token_ids == ids and a.prompt == "Hello world"
    assert a.text == llm.tokenizer.decode(a.token_ids)


def test_same_seed_same_output_and_different_seed_differs(llm):
    sp = lambda s: SamplingParams(temperature=1.5, max_tokens=24, seed=s, ignore_eos=True)  # noqa: E731
    a, b, c = (llm.generate(["Once upon"], sp(s))[0].token_ids for s in (7, 7, 8))
    assert a == b
    assert a != c
    # seeded rows are reproducible whatever else shares the batch
    mixed = llm.generate(["Other prompt here", "Once upon"], [GREEDY, sp(7)])
    assert mixed[1].token_ids == a


def test_filters_that_leave_one_token_are_greedy(llm):
    greedy = llm.generate(["The cat"], GREEDY)[0].token_ids
    for sp in (SamplingParams(temperature=0.8, top_k=1, max_tokens=12, ignore_eos=True, seed=1),
               SamplingParams(temperature=0.8, top_p=1e-6, max_tokens=12, ignore_eos=True, seed=2),
               SamplingParams(temperature=0.8, min_p=1.0, max_tokens=12, ignore_eos=True, seed=3)):
        assert llm.generate(["The cat"], sp)[0].token_ids == greedy


def test_sampler_filters_match_transformers_processors():
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    from lfm.engine.sampler import Sampler, filter_logits
    from lfm.engine.sequence import Sequence

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g) * 3
    prompt = [3, 4, 4, 9]
    sp = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    seq = Sequence("r", prompt, sp, set(), 16, None, 50)
    seq.sampling_state(torch.device("cpu"))
    pen = Sampler._penalize(logits.clone(), [seq])  # the engine's sampler: penalties, then the filters
    ours = filter_logits(pen, [sp])
    ids = torch.tensor([prompt])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(ref, pen)
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        ref = proc(ids, ref)
    assert torch.equal(torch.isfinite(ref) & (ref > -1e30), ours > -1e30)
    kept = ours > -1e30
    assert torch.allclose(ours[kept], ref[kept])


def test_repetition_penalty_changes_greedy_output(llm):
    plain = llm.generate(["ab ab ab"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    pen = llm.generate(["ab ab ab"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                     repetition_penalty=5.0))[0]
    assert plain.token_ids != pen.token_ids
    assert len(set(pen.token_ids)) >= len(set(plain.token_ids))


def test_stop_token_ids_and_eos(llm, checkpoints, tmp_path):
    base = llm.generate(["Hello"], GREEDY)[0].token_ids
    t = base[4]
    cut = base[: base.index(t) + 1]
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[t]))[0]
    assert out.token_ids == cut and out.finish_reason == "stop"
    # the checkpoint's EOS (generation_config.json) stops generation, unless ignore_eos (the engine takes its stop
    # tokens when it is built: a copy of the checkpoint whose generation_config.json names t)
    ckpt = tmp_path / "eos"
    shutil.copytree(checkpoints["dense"], ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=[t])))
    eos = LLM(str(ckpt), dtype="float32")
    out = eos.generate(["Hello"], SamplingParams(temperature=0, max_tokens=12))[0]
    assert out.token_ids == cut and out.finish_reason == "stop"
    assert out.text == llm.tokenizer.decode(cut[:-1])
    assert eos.generate(["Hello"], GREEDY)[0].token_ids == base


def test_stop_strings_cut_the_text_and_stream_agrees(llm):
    full = llm.generate(["Once upon a time"], GREEDY)[0].text
    assert len(full) > 6
    stop = full[3:6]
    out = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]
    streamed = "".join(llm.stream("Once upon a time", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])))
    assert streamed == out.text


def test_stream_concatenates_to_generate_text(llm):
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    pieces = list(llm.stream("Once upon a time", sp))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.generate("Once upon a time", sp)[0].text


def test_chat_renders_template_and_parses_tool_calls(llm, monkeypatch):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    ids = llm.encode_chat(msgs, tools=tools)
    assert ids[0] == 1 and 6 in ids and 8 in ids  # bos, <|im_start|>, <|tool_list_start|>
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=8), tools=tools)
    assert out.prompt_token_ids == ids
    # a model that answers with a tool call: feed the reply tokens through the same parsing path
    reply = '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>Checking.'
    tk = llm.tokenizer  # the sentinels as the real control tokens a model emits (spelled, they are plain text)
    reply_ids = ([tk.token_to_id("<|tool_call_start|>")] + tk.encode('[get_weather(city="Paris")]', add_bos=False)
                 + [tk.token_to_id("<|tool_call_end|>")] + tk.encode("Checking.", add_bos=False))
    script = iter(reply_ids)
    real = llm.model.forward_step

    def scripted(input_ids, ctx, logits_indices=None):
        logits = real(input_ids, ctx, logits_indices)
        nxt = next(script, 7)
        logits[..., :] = -1e4
        logits[..., nxt] = 1e4
        return logits

    monkeypatch.setattr(llm.model, "forward_step", scripted)
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=64), tools=tools)
    assert out.finish_reason == "stop" and out.token_ids[-1] == 7
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert out.content == "Checking."
    assert "<|tool_call_start|>" in out.text


def test_bad_requests_raise_clear_errors(llm):
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 10**6]], GREEDY)
    with pytest.raises(ValueError, match="leaves no room"):
        llm.generate([[5] * 2000], GREEDY)


def test_exponential_draw_follows_the_distribution():
    """The sampler's draw (argmax of probs / Exp(1) noise, one pass for every row): token frequencies over 40,000
    rows match the probabilities within 4.5 standard errors, a zero-probability token is never drawn, and a seeded
    row's draw depends on its seed only, not on its neighbours."""
    from lfm.engine.sampler import exponential_draw
    from lfm.engine.sequence import Sequence

    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    n = 40_000

    def seqs(k, seed=None):
        out = []
        for _ in range(k):
            s = Sequence("r", [1], SamplingParams(temperature=1.0, seed=seed), set(), 4, None, 8)
            s.sampling_state(torch.device("cpu"))
            out.append(s)
        return out

    picks = exponential_draw(probs.repeat(n, 1), seqs(n))
    freq = torch.bincount(picks, minlength=5).float() / n
    se = (probs * (1 - probs) / n).sqrt()
    assert freq[4] == 0
    assert ((freq - probs).abs() <= 4.5 * se + 1e-9).all(), freq
    alone = [int(exponential_draw(probs.repeat(1, 1), seqs(1, seed=k))[0]) for k in range(30)]
    crowd = [int(exponential_draw(probs.repeat(3, 1), seqs(2) + seqs(1, seed=k))[2]) for k in range(30)]
    assert crowd == alone and len(set(alone)) > 1


@pytest.mark.parametrize("sampled", [False, True])
def test_a_broken_row_gets_minus_one_and_its_neighbours_do_not_notice(sampled):
    """The sampler's contract with the engine: a row whose logits hold NaN (or whose filtered distribution does not
    sum to a number) gets token -1 and no logprob record, and every other row gets exactly what it gets without
    that row beside it, on the greedy one-pass path and on the sampling path (seeded rows)."""
    from lfm.engine.sampler import Sampler
    from lfm.engine.sequence import Sequence

    V = 50
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g)
    logits[2, 7] = float("nan")
    if sampled:
        logits[1] = float("inf")  # softmax of +inf rows: NaN, found after the filters

    def seqs(rows):
        out = []
        for i in rows:
            params = SamplingParams(temperature=0.8 if sampled else 0.0, top_p=0.9, seed=100 + i, logprobs=2)
            out.append(Sequence(f"r{i}", [1, 2], params, set(), 8, None, V))
        return out

    tokens, records = Sampler()(logits.clone(), seqs(range(4)))
    broken = {1, 2} if sampled else {2}
    assert [i for i, t in enumerate(tokens) if t == -1] == sorted(broken)
    assert all((records[i] is None) == (i in broken) for i in range(4))
    for i in set(range(4)) - broken:
        alone, rec = Sampler()(logits[i:i + 1].clone(), seqs([i]))
        assert alone[0] == tokens[i] and 0 <= tokens[i] < V
        assert rec[0].logprob == records[i].logprob
