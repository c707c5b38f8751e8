"""Edge-engine invariants: chunked prefill (a small `max_num_batched_tokens`) equals one-shot prefill, the paged cache
holds KV only for attention layers plus a constant conv state per sequence (long-context memory accounting), and
the MoE path that runs only the selected experts equals a dense reference that runs all of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lfm import LLM, SamplingParams
from lfm.engine.cache import PagedCache
from lfm.model.presets import preset

from .conftest import CONFIGS, random_model
from .engine_util import by_tokens, capture, check_against_full_forward

torch.set_grad_enabled(False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on shared cores


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_chunked_prefill_equals_one_shot(checkpoints, name):
    prompts = [list(range(20, 61)), list(range(100, 117)), [5, 300, 301]]  # chunks that cut across prompts
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(str(checkpoints[name]), dtype="float32")
    ref = [o.token_ids for o in llm.generate(prompts, sp)]
    for chunk in (1, 7, 16):
        llm = LLM(str(checkpoints[name]), dtype="float32", max_num_batched_tokens=chunk)
        sizes: list[int] = []
        run = llm.engine.runner.run
        llm.engine.runner.run = lambda sch: (sizes.append(sum(it.num_tokens for it in sch)), run(sch))[1]
        assert [o.token_ids for o in llm.generate(prompts, sp)] == ref, chunk
        assert max(sizes) == chunk  # every step within the budget, and the budget used
    # and the logits themselves at every position: prefill chunks of 10 tokens (two prompts sharing steps)
    model = llm.model
    x = torch.randint(14, 512, (2, 37), generator=torch.Generator().manual_seed(0))
    full = model(x)
    llm = LLM(model, max_num_batched_tokens=10, block_size=4)
    rec = capture(llm, all_rows=True)
    llm.generate(x.tolist(), SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    got = by_tokens(rec)
    for b in range(2):
        for t in range(37):
            torch.testing.assert_close(got[tuple(x[b, :t + 1].tolist())], full[b, t], atol=2e-5, rtol=1e-5)


def test_long_context_cache_is_attention_kv_plus_constant_conv_state():
    c = preset("LFM2.5-350M")
    kv_per_token = 2 * len(c.attn_layers) * c.num_key_value_heads * c.head_size * 2  # k and v, bfloat16
    conv = len(c.conv_layers) * c.hidden_size * (c.conv_L_cache - 1) * 2
    assert kv_per_token == 12 * 1024 and conv == 40 * 1024  # the spec's 12 KiB/token, 40 KiB per sequence
    bs, bf16 = 16, torch.bfloat16
    assert PagedCache.block_bytes(c, bs, bf16, bf16, False) == bs * kv_per_token
    # with prefix caching each block also keeps a conv snapshot (one sequence's conv state) for prefix hits
    assert PagedCache.block_bytes(c, bs, bf16, bf16, True) == bs * kv_per_token + conv
    for n in (512, 32768):
        cache = PagedCache.allocate(c, n // bs, bs, 1, bf16, "meta", None, False)  # one sequence of n tokens
        assert cache.nbytes() == n * kv_per_token + conv
        assert cache.conv.numel() * 2 == conv  # independent of n
        assert PagedCache.allocate(c, n // bs, bs, 3, bf16, "meta", None, False).nbytes() == n * kv_per_token + 3 * conv
    assert PagedCache.allocate(c, 32768 // bs, bs, 1, bf16, "meta", None, False).nbytes() == 384 * 2**20 + 40 * 1024
    # int8 KV: int8 values plus one float32 scale per 64-value vector, 53% of bfloat16
    q = PagedCache.block_bytes(c, bs, bf16, torch.int8, False)
    assert q == bs * kv_per_token * (c.head_size + 4) // (2 * c.head_size)
    assert abs(q / (bs * kv_per_token) - 0.53) < 0.01
    q_cache = PagedCache.allocate(c, 32768 // bs, bs, 1, bf16, "meta", torch.int8, False)
    assert q_cache.nbytes() == 32768 // bs * q + conv


def test_long_prompt_runs_with_bounded_prefill(checkpoints):
    """A prompt far longer than one step's budget (tiny shape, 4K tokens) decodes like the unchunked path, and its
    logits are the full forward's."""
    prompt = torch.randint(14, 512, (4096,), generator=torch.Generator().manual_seed(0)).tolist()
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(str(checkpoints["dense"]), dtype="float32", max_model_len=4200, max_num_batched_tokens=512)
    sizes: list[int] = []
    run = llm.engine.runner.run
    llm.engine.runner.run = lambda sch: (sizes.append(sum(it.num_tokens for it in sch)), run(sch))[1]
    rec = capture(llm)
    chunked = llm.generate([prompt], sp)[0].token_ids
    assert max(sizes) == 512 and len(sizes) == 4096 // 512 + 3  # 8 prefill chunks, then 3 decode steps
    one = LLM(str(checkpoints["dense"]), dtype="float32", max_model_len=4200, max_num_batched_tokens=8192)
    assert one.generate([prompt], sp)[0].token_ids == chunked
    check_against_full_forward(llm.model, rec)


@pytest.mark.parametrize("name", ["moe", "moe-top1-untied-kernel4", "moe-topall-scaled", "moe-nobias-nonorm-scaled"])
def test_selected_experts_equal_the_dense_reference(name):
    model = random_model(CONFIGS[name])
    moe = next(m for m in model.modules() if type(m).__name__ == "MoE")
    x = torch.randn(37, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    got = moe(x)
    # dense reference: every expert on every token, weighted by a [N, E] matrix that is zero off the chosen experts
    w, idx = moe.route(x)
    gate = torch.zeros(x.shape[0], moe.gate.weight.shape[0]).scatter(1, idx, w)
    E = moe.experts
    outs = []
    for e in range(E.gate_up_proj.shape[0]):
        g, u = F.linear(x, E.gate_up_proj[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(g) * u, E.down_proj[e]))
    ref = (torch.stack(outs, 1) * gate[..., None]).sum(1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # and a single token touches only its k experts (the decode path never loops over all of them)
    calls = []
    orig = F.linear

    def counting(inp, weight, *a, **k):
        calls.append(weight.shape)
        return orig(inp, weight, *a, **k)

    F.linear = counting
    try:
        moe(x[:1])
    finally:
        F.linear = orig
    expert_calls = [s for s in calls if s in (E.gate_up_proj.shape[1:], E.down_proj.shape[1:])]
    assert len(expert_calls) == 2 * moe.k
