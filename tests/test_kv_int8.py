"""int8 KV cache (`LLM(kv_cache_dtype="int8")`): about half the bytes of bfloat16 (so about twice the blocks in the
same memory), the conv state kept as is, logits close to a float cache, batched decoding equal to one sequence at a
time, and the paged decode kernel agrees with the PyTorch path that dequantizes."""

from __future__ import annotations

import pytest
import torch

from lfm import LLM, SamplingParams, kernels
from lfm.engine.cache import PagedCache, quantize_kv
from lfm.model.checkpoint import empty_model
from lfm.model.presets import preset

from .engine_util import by_tokens, capture, paged_kernel_calls, scripted

torch.set_grad_enabled(False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on shared cores


def model(dtype: torch.dtype = torch.float32):
    m = empty_model(preset("tiny"), dtype)
    m.init_weights(0.05, generator=torch.Generator().manual_seed(0))
    return m.eval()


def logits_through_cache(m, ids: list[int], kv: str | None) -> torch.Tensor:
    """Prefill the first half of ids, then decode the rest one token at a time (the engine made to sample them);
    logits of every decoded step."""
    half = len(ids) // 2
    llm = LLM(m, kv_cache_dtype=kv, block_size=8)
    rec = capture(llm, force=scripted({tuple(ids[:half]): ids[half:]}))
    llm.generate([ids[:half]], SamplingParams(temperature=0, max_tokens=len(ids) - half + 1, ignore_eos=True))
    got = by_tokens(rec)
    return torch.stack([got[tuple(ids[:k + 1])] for k in range(half, len(ids))])


def test_quantize_kv_round_trip_and_zero_vectors():
    x = torch.randn(2, 3, 5, 16)
    x[0, 0, 0] = 0.0
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 5) and q.abs().max() <= 127
    assert s[0, 0, 0] == 0 and torch.equal(q[0, 0, 0], torch.zeros(16, dtype=torch.int8))
    err = (q.float() * s[..., None] - x).abs() / x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    assert err.max() <= 0.5 / 127 + 1e-6  # half a step of each vector's own scale


def test_int8_cache_is_about_half_of_bf16_and_keeps_conv_state_as_is():
    c = preset("tiny")
    bs, blocks = 8, 125  # 1000 tokens
    for caching in (False, True):
        full = PagedCache.allocate(c, blocks, bs, 1, torch.bfloat16, "cpu", None, caching)
        q = PagedCache.allocate(c, blocks, bs, 1, torch.bfloat16, "cpu", torch.int8, caching)
        assert not full.quantized and q.quantized
        kv_full = sum(t.numel() * t.element_size() for d in (full.k, full.v) for t in d.values())
        kv_q = sum(t.numel() * t.element_size() for d in (q.k, q.v, q.k_scale, q.v_scale) for t in d.values())
        assert all(t.dtype == torch.int8 for d in (q.k, q.v) for t in d.values())
        assert all(t.dtype == torch.float32 for d in (q.k_scale, q.v_scale) for t in d.values())
        hd = c.head_size
        assert kv_q == kv_full // 2 + kv_full // (2 * hd) * 4  # int8 values + one float32 scale per vector
        assert q.conv.dtype == torch.bfloat16 and (not caching or q.conv_snap.dtype == torch.bfloat16)
        assert q.nbytes() - kv_q == full.nbytes() - kv_full  # the conv state (and its snapshots) do not change
        per_block = PagedCache.block_bytes(c, bs, torch.bfloat16, torch.int8, caching)
        assert per_block * blocks == q.nbytes() - q.conv.numel() * 2
    # the engine: int8 blocks, and in the same memory more of them (twice, less the scales)
    m = model(torch.bfloat16)
    mem = 64 * PagedCache.block_bytes(c, 16, torch.bfloat16, torch.bfloat16, False)
    a = LLM(m, kv_cache_memory=mem, enable_prefix_caching=False).engine
    b = LLM(m, kv_cache_memory=mem, enable_prefix_caching=False, kv_cache_dtype="int8").engine
    assert not a.cache.quantized and a.cache.k[1].dtype == torch.bfloat16 and a.block_manager.num_blocks == 64
    assert b.cache.quantized and b.cache.k[1].dtype == torch.int8 and b.cache.conv.dtype == torch.bfloat16
    hd = c.head_size  # 16 here: a scale costs 4 bytes per 16 values, so 64 * 2 * 16 / (16 + 4) blocks
    assert b.block_manager.num_blocks == mem // PagedCache.block_bytes(c, 16, torch.bfloat16, torch.int8, False)
    assert b.block_manager.num_blocks == 64 * 2 * hd // (hd + 4) == 102


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_kv_logits_close_to_float_kv(dtype):
    m = model(dtype)
    ids = torch.randint(3, 500, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = logits_through_cache(m, ids, None).float()
    got = logits_through_cache(m, ids, "int8").float()
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert 0 < rel <= 3e-2, rel  # quantized (not bit-equal), and close
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    # and the float cache is the full forward (no cache)
    full = m(torch.tensor([ids]))[0, len(ids) // 2:].float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ref, full, atol=tol, rtol=tol)


def test_int8_kv_chunked_prefill_equals_one_shot():
    """Prefill chunks read the earlier chunks' keys back from int8 blocks (as the one-shot prefill reads its own):
    every prompt position and every decode step agree, whatever the step budget (1: every token a decode step)."""
    m = model(torch.float32)
    ids = torch.randint(3, 500, (2, 50), generator=torch.Generator().manual_seed(3)).tolist()
    res = []
    for budget in (4096, 7, 1):
        llm = LLM(m, kv_cache_dtype="int8", block_size=8, max_num_batched_tokens=budget)
        rec = capture(llm, all_rows=True, force=scripted({tuple(p[:30]): p[30:] for p in ids}))
        llm.generate([p[:30] for p in ids],
                     SamplingParams(temperature=0, max_tokens=21, ignore_eos=True, prompt_logprobs=0))
        res.append(by_tokens(rec))
    one = res[0]
    assert len(one) == 100
    scale = max(x.abs().max().item() for x in one.values())
    for r, tol in zip(res[1:], (1e-5, 1e-3)):
        assert r.keys() == one.keys()
        assert max((r[k] - one[k]).abs().max().item() for k in one) <= tol * scale


def test_decode_kernel_equals_the_dequantizing_path(monkeypatch):
    m = model(torch.bfloat16)
    ids = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    if not kernels.available():
        pytest.skip("lfm.kernels unavailable: only the PyTorch path exists")
    used = paged_kernel_calls(monkeypatch)
    fast = logits_through_cache(m, ids, "int8").float()
    assert used and all(used)  # every decode step's attention ran in the kernel
    used.clear()
    with kernels.disabled():
        slow = logits_through_cache(m, ids, "int8").float()
    assert used and not any(used)  # ... and here in PyTorch, dequantizing the blocks
    assert ((fast - slow).abs().max() / slow.abs().max()).item() <= 2e-2


def test_llm_and_continuous_batching_with_int8_kv():
    m = model(torch.float32)
    llm = LLM(m, kv_cache_dtype="int8")
    assert llm.engine.cache.quantized and all(t.dtype == torch.int8 for t in llm.engine.cache.k.values())
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], list(range(20, 45)), [9]]
    batch = llm.generate(prompts, sp)  # prefills and decodes of the three share steps
    alone = [llm.generate([p], sp)[0] for p in prompts]  # one at a time
    same = sum(a.token_ids == b.token_ids for a, b in zip(batch, alone))
    assert same >= 2  # near-ties on random weights may part one row; not more
    # batched decoding over the int8 paged cache = one sequence at a time, made to follow the same tokens
    ones = {}
    for p in prompts:
        one = LLM(m, kv_cache_dtype="int8")
        rec = capture(one)
        out = one.generate([p], sp)[0]
        ones[tuple(p)] = out.token_ids
        assert len(rec) == 12
        ones |= {("rec",) + k: v for k, v in by_tokens(rec).items()}
    many = LLM(m, kv_cache_dtype="int8")
    rec = capture(many, force=scripted({tuple(p): ones[tuple(p)] for p in prompts}))
    many.generate(prompts, sp)
    assert len(rec) == 3 * 12
    for tokens, logits in rec:
        torch.testing.assert_close(logits, ones[("rec",) + tuple(tokens)], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(model(), kv_cache_dtype="fp8")
