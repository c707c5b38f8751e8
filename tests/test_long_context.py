"""Long-context memory accounting and chunked prefill, on tiny shapes built here (complements test_edge.py, which
checks the 350M preset's cache size on meta and float32 chunked prefill through LLM):

* the HybridCache holds KV for attention layers only, linear in max_len and batch, and a conv state whose size does
  not depend on the length; nothing is reallocated while a long prompt is prefilled chunk by chunk;
* chunked prefill through one cache gives the logits of an unchunked prefill, for quantized weights (int8, int4),
  bfloat16 and left-padded batches, and decoding after it continues identically.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lfm.model.cache import HybridCache
from lfm.model.config import LfmConfig
from lfm.model.quant import prepare, quantize_model

from .conftest import CONFIGS, layers, random_model

torch.set_grad_enabled(False)


def _expected_bytes(c: LfmConfig, batch: int, max_len: int, elt: int) -> tuple[int, int]:
    kv = 2 * len(c.attn_layers) * batch * c.num_key_value_heads * max_len * c.head_size * elt
    conv = len(c.conv_layers) * batch * c.hidden_size * (c.conv_L_cache - 1) * elt
    return kv, conv


@pytest.mark.parametrize("attn", [[], [1], [0, 2], [0, 1, 2, 3, 4, 5]])
def test_cache_bytes_scale_with_attention_layers_times_length(attn):
    c = LfmConfig.from_dict(dict(CONFIGS["dense"], num_hidden_layers=6, layer_types=layers(6, attn)))
    for dtype, elt in ((torch.float32, 4), (torch.bfloat16, 2)):
        sizes = {}
        for batch in (1, 3):
            for n in (16, 1024, 4096):
                cache = HybridCache.allocate(c, batch, n, dtype, "meta")
                kv, conv = _expected_bytes(c, batch, n, elt)
                assert sorted(cache.k) == sorted(cache.v) == list(c.attn_layers)
                assert sorted(cache.conv) == list(c.conv_layers)
                assert sum(t.numel() * elt for d in (cache.k, cache.v) for t in d.values()) == kv
                assert sum(t.numel() * elt for t in cache.conv.values()) == conv
                assert cache.nbytes() == kv + conv
                sizes[batch, n] = (kv, conv)
        for batch in (1, 3):  # KV is linear in length (zero without attention), the conv state constant
            (kv16, cv16), (kv1k, cv1k), (kv4k, cv4k) = (sizes[batch, n] for n in (16, 1024, 4096))
            assert kv4k == 4 * kv1k == 256 * kv16 and (kv16 > 0) == bool(attn)
            assert cv16 == cv1k == cv4k and (cv16 > 0) == (len(attn) < 6)
        assert sizes[3, 4096][0] == 3 * sizes[1, 4096][0] and sizes[3, 16][1] == 3 * sizes[1, 16][1]


def test_chunked_prefill_never_reallocates_the_cache():
    model = random_model(CONFIGS["dense"])
    n, chunk = 300, 64
    cache = model.new_cache(1, n)
    ptrs = {(k, i): t.data_ptr() for k, d in (("k", cache.k), ("v", cache.v), ("c", cache.conv)) for i, t in d.items()}
    before = cache.nbytes()
    x = torch.randint(14, 512, (1, n), generator=torch.Generator().manual_seed(0))
    for a in range(0, n, chunk):
        model(x[:, a:a + chunk], cache, logits_to_keep=1)
        assert cache.pos == min(a + chunk, n)
        assert {(k, i): t.data_ptr() for k, d in (("k", cache.k), ("v", cache.v), ("c", cache.conv))
                for i, t in d.items()} == ptrs
    assert cache.nbytes() == before
    with pytest.raises(ValueError, match="cache holds"):
        model(x[:, :1], cache)


def _variant(model, kind: str):
    m = copy.deepcopy(model)
    if kind == "bf16":
        return m.to(torch.bfloat16)
    bits, group = {"int8": (8, 64), "int4": (4, 32)}[kind]
    quantize_model(m, bits, group)
    prepare(m)
    return m


@pytest.mark.parametrize("kind", ["int8", "int4", "bf16"])
def test_chunked_prefill_logits_equal_unchunked(kind):
    base = random_model(CONFIGS["dense"])
    model = _variant(base, kind)
    T = 70
    x = torch.randint(14, 512, (2, T), generator=torch.Generator().manual_seed(1))
    one = model.new_cache(2, T + 4)
    full = model(x, one).float()
    tol = dict(atol=2e-5, rtol=1e-5) if kind != "bf16" else dict(atol=5e-2, rtol=2e-2)
    for chunk in (1, 3, 16, 64):  # 1 and 3: chunks shorter than the conv window (its state carries across)
        cache = model.new_cache(2, T + 4)
        parts = torch.cat([model(x[:, a:a + chunk], cache) for a in range(0, T, chunk)], 1).float()
        torch.testing.assert_close(parts, full, **tol, msg=f"{kind} chunk {chunk}")
        # and decoding continues from either cache identically
        for t in (5, 9, 200):
            tok = torch.tensor([[t], [t + 1]])
            torch.testing.assert_close(model(tok, cache).float(), model(tok, one).float(), **tol)
        one = model.new_cache(2, T + 4)
        model(x, one)


def test_chunked_prefill_of_a_left_padded_batch_equals_unchunked():
    model = _variant(random_model(CONFIGS["dense"]), "int4")
    lens, T = (45, 12, 30), 45
    x = torch.randint(14, 512, (3, T), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, T - n:] = 1
        x[i, :T - n] = 0
    one = model.new_cache(3, T + 3)
    full = model(x, one, attention_mask=mask)
    for chunk in (5, 16):  # boundaries inside row 1's padding and across every row's first tokens
        cache = model.new_cache(3, T + 3)
        parts = torch.cat([model(x[:, a:a + chunk], cache, attention_mask=mask[:, a:a + chunk])
                           for a in range(0, T, chunk)], 1)
        real = mask.bool()
        torch.testing.assert_close(parts[real], full[real], atol=2e-5, rtol=1e-5)
        tok = torch.tensor([[40], [41], [42]])
        torch.testing.assert_close(model(tok, cache), model(tok, one), atol=2e-5, rtol=1e-5)
        one = model.new_cache(3, T + 3)
        model(x, one, attention_mask=mask)
        # each row alone, unpadded, gives the same last-token logits
        for i, n in enumerate(lens):
            alone = model(x[i:i + 1, T - n:], model.new_cache(1, n))[0, -1]
            torch.testing.assert_close(parts[i, -1], alone, atol=2e-5, rtol=1e-5)
