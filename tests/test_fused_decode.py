"""The fused CPU decode step (lfm/kernels/decode.cpp via lfm/engine/cpu_decode.py) against the general step.

The reference is the same engine with `LFM_FUSED_DECODE=0` (every step through `LfmForCausalLM.forward_step`, whose
own parity with transformers is tested elsewhere), and the plain full forward. Bounds: float32 logits within 1e-4
relative; bfloat16 within one bfloat16 ulp of the largest logit (2^-6 of it) (the quantized paths in practice agree bit for
bit: same GEMV kernels, same rounding points); greedy tokens equal.
"""

from __future__ import annotations

import pytest
import torch

from lfm import LLM, SamplingParams
from lfm.model.quant import quantize_model

from .conftest import CONFIGS, random_model
from .engine_util import capture, check_against_full_forward

from lfm import kernels  # noqa: E402

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="lfm.kernels unavailable on this CPU")
pytestmark = needs_kernels

PROMPTS = [[1, 5, 9, 33, 2], [4, 4, 100, 200, 300, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24], [8]]


def _model(cfg: str, dtype: torch.dtype, quant: int | None, group: int = 32):
    m = random_model(CONFIGS[cfg]).to(dtype)
    if quant:
        quantize_model(m, quant, group)
    return m


def _run(monkeypatch, model, fused: bool, n: int = 20, **kw):
    monkeypatch.setenv("LFM_FUSED_DECODE", "1" if fused else "0")
    llm = LLM(model, **kw)
    assert (llm.engine.runner.fused is not None) == fused
    rec = capture(llm)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return llm, [o.token_ids for o in outs], {tuple(t): x for t, x in rec}


def _compare(a: dict, b: dict, dtype: torch.dtype) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        ref = a[k]
        bound = 1e-4 * ref.abs().max() if dtype == torch.float32 else 2 ** -6 * ref.abs().max()
        err = (b[k] - ref).abs().max()
        assert err <= bound, f"{len(k)} tokens: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("cfg", ["dense", "dense-mqa-kernel4-untied", "dense-kernel1-headdim32-kv1",
                                 "dense-kernel2-noadjust", "dense-multiplier-theta"])
@pytest.mark.parametrize("dtype,quant", [(torch.bfloat16, 4), (torch.bfloat16, 8), (torch.bfloat16, None),
                                         (torch.float32, 4), (torch.float32, 8)])
def test_fused_step_equals_general_step(monkeypatch, one_thread, cfg, dtype, quant):
    m = _model(cfg, dtype, quant)
    _, ta, ra = _run(monkeypatch, m, False, block_size=4)
    llm, tb, rb = _run(monkeypatch, m, True, block_size=4)
    assert tb == ta
    _compare(ra, rb, dtype)
    steps = llm.engine.runner.fused.timings()["steps"]
    assert steps >= 19, f"only {steps} fused steps: the general path ran instead"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kv", ["int8", "auto"])
def test_kv_cache_dtypes(monkeypatch, one_thread, kv, dtype):
    m = _model("dense", dtype, 4)
    _, ta, ra = _run(monkeypatch, m, False, kv_cache_dtype=kv)
    _, tb, rb = _run(monkeypatch, m, True, kv_cache_dtype=kv)
    assert tb == ta
    _compare(ra, rb, dtype)


def test_two_threads_same_result(monkeypatch):
    """The row split over threads must not change any output (each output row is one thread's whole sum)."""
    m = _model("dense", torch.bfloat16, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, ta, ra = _run(monkeypatch, m, True)
        torch.set_num_threads(2)
        _, tb, rb = _run(monkeypatch, m, True)
    finally:
        torch.set_num_threads(before)
    assert ta == tb
    for k in ra:
        assert torch.equal(ra[k], rb[k])


def test_conv_snapshots_written_by_fused_steps_serve_prefix_hits(monkeypatch, one_thread):
    """Decode steps that fill a block snapshot the conv state there; a later prompt extending the conversation hits
    that prefix and must continue exactly as the full forward does (float32, int8 weights)."""
    monkeypatch.setenv("LFM_FUSED_DECODE", "1")
    m = _model("dense", torch.float32, 8)
    llm = LLM(m, block_size=4)
    assert llm.engine.runner.fused is not None
    first = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))[0].token_ids
    rec = capture(llm)
    follow = PROMPTS[0] + first + [3, 4]
    llm.generate([follow], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert llm.engine.stats()["prefix_cache_hit_tokens"] >= 16  # blocks filled by the fused decode steps
    check_against_full_forward(m, rec)


def test_first_step_of_one_token_prompt_and_full_forward(monkeypatch, one_thread):
    """A one-token prompt's first step is already a single-token step (fresh conv state): full-forward parity."""
    monkeypatch.setenv("LFM_FUSED_DECODE", "1")
    m = _model("dense-mqa-kernel4-untied", torch.float32, 4)
    llm = LLM(m, block_size=4)
    rec = capture(llm)
    llm.generate([[8], [9, 10]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    check_against_full_forward(m, rec)


@pytest.mark.parametrize("cfg", ["moe", "moe-nobias-nonorm-scaled", "moe-top1-untied-kernel4", "moe-topall-scaled"])
@pytest.mark.parametrize("quant", [4, 8])
def test_fused_moe_step_equals_general_step(monkeypatch, one_thread, cfg, quant):
    """Router, top-k, the chosen experts and their weighted sum inside the fused step: batch 1 (one float sum of
    the k outputs) and 3 sequences (expert-ordered adds) both match the general path."""
    m = _model(cfg, torch.bfloat16, quant)
    _, ta, ra = _run(monkeypatch, m, False, block_size=4)
    llm, tb, rb = _run(monkeypatch, m, True, block_size=4)
    assert tb == ta
    _compare(ra, rb, torch.bfloat16)
    assert all(torch.equal(ra[k], rb[k]) for k in ra)  # bit for bit (index_add's float sum of k > 2 experts too)
    assert llm.engine.runner.fused.timings()["steps"] >= 19
    for fused in (False, True):  # one sequence alone: the batch-1 combine
        monkeypatch.setenv("LFM_FUSED_DECODE", "1" if fused else "0")
        llm1 = LLM(m)
        rec = capture(llm1)
        llm1.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        if fused:
            _compare(ref1, {tuple(t): x for t, x in rec}, torch.bfloat16)
        else:
            ref1 = {tuple(t): x for t, x in rec}


def test_declines_what_it_cannot_run(monkeypatch):
    monkeypatch.setenv("LFM_FUSED_DECODE", "1")
    assert LLM(random_model(CONFIGS["moe"]).to(torch.bfloat16)).engine.runner.fused is None  # unquantized experts
    assert LLM(_model("moe", torch.float32, 4)).engine.runner.fused is None  # MoE with float32 activations
    assert LLM(random_model(CONFIGS["dense-conv-bias"]).to(torch.bfloat16)).engine.runner.fused is None
    assert LLM(random_model(CONFIGS["dense"])).engine.runner.fused is None  # float32 weights: no float GEMV here
    monkeypatch.setenv("LFM_FUSED_DECODE", "0")
    assert LLM(_model("dense", torch.bfloat16, 4)).engine.runner.fused is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_step_logits_are_not_overwritten_by_the_next_step(monkeypatch, dtype):
    # the plan writes every step's logits into one reused buffer: what a step returned must stay as it was
    monkeypatch.setenv("LFM_FUSED_DECODE", "1")
    llm = LLM(_model("dense", dtype, 4))
    f = llm.engine.runner.fused
    first = f.step([5, 6], [0, 0], [0, 16], [0, 1], [-1, -1], [[0], [1]])
    kept = first.clone()
    second = f.step([7, 8], [1, 1], [1, 17], [0, 1], [-1, -1], [[0], [1]])
    assert not torch.equal(second, kept)  # the next step did write different logits
    assert torch.equal(first, kept)


def test_bad_step_inputs_raise_not_crash(monkeypatch):
    monkeypatch.setenv("LFM_FUSED_DECODE", "1")
    llm = LLM(_model("dense", torch.bfloat16, 4))
    f = llm.engine.runner.fused
    nb = llm.engine.cache.num_blocks
    with pytest.raises(RuntimeError, match="block table"):
        f.step([1], [3], [0], [0], [-1], [[nb + 5]])
    with pytest.raises(RuntimeError, match="conv slot"):
        f.step([1], [3], [0], [10 ** 6], [-1], [[0]])
    with pytest.raises(RuntimeError, match="context length"):
        f.step([1], [10 ** 6], [0], [0], [-1], [[0]])


def test_demo_model_greedy_128_tokens(monkeypatch, one_thread):
    """The shipped demo model, int4 and bfloat16: 128 greedy tokens through the fused step = the general step."""
    for quant in ("int4", None):
        toks = []
        for fused in (False, True):
            monkeypatch.setenv("LFM_FUSED_DECODE", "1" if fused else "0")
            llm = LLM(dtype="bfloat16", quantization=quant)
            assert (llm.engine.runner.fused is not None) == fused
            out = llm.chat([[{"role": "user", "content": "Write a long story about a lighthouse keeper."}]],
                           SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))
            toks.append(out[0].token_ids)
        assert toks[0] == toks[1], quant


@pytest.mark.skipif(not kernels.amx(), reason="no AMX-INT8 here (or LFM_KERNELS_NO_AMX): the row kernels only")
@pytest.mark.parametrize("group", [32, 64])
def test_amx_batches_equal_the_general_step_bit_for_bit(monkeypatch, group):
    """From kernels.AMX_MIN_ROWS sequences the int4 projections run on AMX tiles, in the fused step and in the general
    path alike (one kernel, each row's value independent of the batch): logits equal bit for bit, greedy tokens
    equal, and an int4 model keeps the fused step up to its 64 rows (no switch to dequantized weights there)."""
    m = _model("dense", torch.bfloat16, 4, group)
    prompts = [[1 + i, 5, 9 + 2 * i] + [7] * (i % 5) for i in range(kernels.AMX_MIN_ROWS + 3)]
    outs = {}
    for fused in (False, True):
        monkeypatch.setenv("LFM_FUSED_DECODE", "1" if fused else "0")
        llm = LLM(m, block_size=4)
        rec = capture(llm)
        res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        outs[fused] = ([o.token_ids for o in res], {tuple(t): x for t, x in rec})
    assert llm.engine.runner.fused.max_rows == 64
    assert llm.engine.runner.fused.timings()["steps"] >= 7
    assert outs[True][0] == outs[False][0]
    a, b = outs[False][1], outs[True][1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
