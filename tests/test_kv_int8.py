"""int8 KV cache (`LLM(kv_cache_dtype="int8")`): half the bytes of bfloat16, the same positions, logits close to a
float cache, and the decode kernel agrees with the PyTorch path that dequantizes."""

from __future__ import annotations

import pytest
import torch

from lfm import LLM, SamplingParams, kernels
from lfm.model.cache import quantize_kv
from lfm.model.checkpoint import empty_model
from lfm.model.presets import preset

torch.set_grad_enabled(False)


def model(dtype: torch.dtype = torch.float32):
    m = empty_model(preset("tiny"), dtype)
    m.init_weights(0.05, generator=torch.Generator().manual_seed(0))
    return m.eval()


def logits_through_cache(m, ids: list[int], kv: torch.dtype | None) -> torch.Tensor:
    """Prefill the first half of ids, then decode the rest one token at a time; logits of every decoded step."""
    m.kv_cache_dtype = kv
    c = m.new_cache(1, len(ids))
    half = len(ids) // 2
    m(torch.tensor([ids[:half]]), c, logits_to_keep=1)
    out = [m(torch.tensor([[t]]), c)[0, -1] for t in ids[half:]]
    return torch.stack(out)


def test_quantize_kv_round_trip_and_zero_vectors():
    x = torch.randn(2, 3, 5, 16)
    x[0, 0, 0] = 0.0
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 5) and q.abs().max() <= 127
    assert s[0, 0, 0] == 0 and torch.equal(q[0, 0, 0], torch.zeros(16, dtype=torch.int8))
    err = (q.float() * s[..., None] - x).abs() / x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    assert err.max() <= 0.5 / 127 + 1e-6  # half a step of each vector's own scale


def test_int8_cache_is_about_half_of_bf16_and_keeps_conv_state_as_is():
    m = model(torch.bfloat16)
    m.kv_cache_dtype = None
    full = m.new_cache(1, 1000)
    m.kv_cache_dtype = torch.int8
    q = m.new_cache(1, 1000)
    kv_full = sum(t.numel() * t.element_size() for d in (full.k, full.v) for t in d.values())
    kv_q = sum(t.numel() * t.element_size() for d in (q.k, q.v, q.k_scale, q.v_scale) for t in d.values())
    hd = m.config.head_size
    assert kv_q == kv_full // 2 + kv_full // (2 * hd) * 4  # int8 values + one float32 scale per vector
    assert all(q.conv[i].dtype == torch.bfloat16 for i in q.conv)
    assert q.nbytes() - kv_q == full.nbytes() - kv_full  # the conv state does not change


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_kv_logits_close_to_float_kv(dtype):
    m = model(dtype)
    ids = torch.randint(3, 500, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = logits_through_cache(m, ids, None).float()
    got = logits_through_cache(m, ids, torch.int8).float()
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert 0 < rel <= 3e-2, rel  # quantized (not bit-equal), and close
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_decode_kernel_equals_the_dequantizing_path():
    m = model(torch.bfloat16)
    ids = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    if not kernels.available():
        pytest.skip("lfm.kernels unavailable: only the PyTorch path exists")
    fast = logits_through_cache(m, ids, torch.int8).float()
    with kernels.disabled():
        slow = logits_through_cache(m, ids, torch.int8).float()
    assert ((fast - slow).abs().max() / slow.abs().max()).item() <= 2e-2


def test_llm_and_continuous_batching_with_int8_kv():
    m = model(torch.float32)
    llm = LLM(m, kv_cache_dtype="int8")
    assert m.kv_cache_dtype == torch.int8
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], list(range(20, 45)), [9]]
    batch = llm.generate(prompts, sp)  # a left-padded batch: the masked (dequantizing) path
    alone = [llm.generate([p], sp)[0] for p in prompts]  # one at a time: the decode kernel
    same = sum(a.token_ids == b.token_ids for a, b in zip(batch, alone))
    assert same >= 2  # near-ties on random weights may part one row; not more
    caches = [m.new_cache(1, 64) for _ in prompts]  # decode_many over per-sequence int8 caches
    for p, c in zip(prompts, caches):
        m(torch.tensor([p]), c, logits_to_keep=1)
    many = m.decode_many(torch.tensor([1, 2, 3]), caches)
    for b, (p, c) in enumerate(zip(prompts, caches)):
        m.kv_cache_dtype = torch.int8
        c1 = m.new_cache(1, 64)
        m(torch.tensor([p]), c1, logits_to_keep=1)
        one = m(torch.tensor([[b + 1]]), c1)[0, -1]
        assert torch.allclose(many[b], one, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(model(), kv_cache_dtype="fp8")
