"""Edge-engine invariants: chunked prefill equals one-shot prefill, the cache holds KV only for attention layers plus a
constant conv state (long-context memory accounting), and the MoE path that runs only the selected experts equals a
dense reference that runs all of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lfm import LLM, SamplingParams
from lfm.model.cache import HybridCache
from lfm.model.presets import preset

from .conftest import CONFIGS, random_model

torch.set_grad_enabled(False)


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_chunked_prefill_equals_one_shot(checkpoints, name):
    llm = LLM(str(checkpoints[name]), dtype="float32")
    prompts = [list(range(20, 61)), list(range(100, 117)), [5, 300, 301]]  # left padding inside early chunks
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = [o.token_ids for o in llm.generate(prompts, sp)]
    for chunk in (1, 7, 16):
        llm.prefill_chunk = chunk
        assert [o.token_ids for o in llm.generate(prompts, sp)] == ref, chunk
    # and the logits themselves, through the model's cache
    model = llm.model
    x = torch.randint(14, 512, (2, 37))
    full = model(x)
    cache = model.new_cache(2, 40)
    parts = [model(x[:, a:a + 10], cache) for a in range(0, 37, 10)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-5)


def test_long_context_cache_is_attention_kv_plus_constant_conv_state():
    c = preset("LFM2.5-350M")
    kv_per_token = 2 * len(c.attn_layers) * c.num_key_value_heads * c.head_size * 2  # k and v, bfloat16
    conv = len(c.conv_layers) * c.hidden_size * (c.conv_L_cache - 1) * 2
    assert kv_per_token == 12 * 1024 and conv == 40 * 1024  # the spec's 12 KiB/token, 40 KiB per sequence
    with torch.device("meta"):
        for n in (512, 32768):
            cache = HybridCache.allocate(c, 1, n, torch.bfloat16, "meta")
            assert cache.nbytes() == n * kv_per_token + conv
            assert sum(t.numel() for t in cache.conv.values()) * 2 == conv  # independent of n
    assert HybridCache.allocate(c, 1, 32768, torch.bfloat16, "meta").nbytes() == 384 * 2**20 + 40 * 1024


def test_long_prompt_runs_with_bounded_prefill(checkpoints):
    """A prompt far longer than one chunk (tiny shape, 4K tokens) decodes like the unchunked path."""
    llm = LLM(str(checkpoints["dense"]), dtype="float32", max_model_len=4200)
    prompt = torch.randint(14, 512, (4096,), generator=torch.Generator().manual_seed(0)).tolist()
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.prefill_chunk = 512
    chunked = llm.generate([prompt], sp)[0].token_ids
    llm.prefill_chunk = 8192
    assert llm.generate([prompt], sp)[0].token_ids == chunked


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
