"""Long-context memory accounting and chunked prefill, on tiny shapes built here (complements test_edge.py, which
checks the 350M preset's cache size on meta and float32 chunked prefill through LLM):

* the engine's PagedCache holds KV for attention layers only, linear in the tokens it has room for (blocks), and a
  conv state per sequence slot whose size does not depend on the length; nothing is reallocated while a long prompt
  is prefilled chunk by chunk (`max_num_batched_tokens`), and a sequence takes blocks only as it grows;
* chunked prefill through the engine gives the logits of an unchunked prefill (and of the plain full forward), for
  quantized weights (int8, int4), bfloat16 and batches of prompts of different lengths sharing steps, and decoding
  after it continues identically.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lfm import LLM, SamplingParams
from lfm.engine.cache import PagedCache
from lfm.model.config import LfmConfig
from lfm.model.quant import prepare, quantize_model

from .conftest import CONFIGS, layers, random_model
from .engine_util import by_tokens, capture, scripted

torch.set_grad_enabled(False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on shared cores


def _expected_bytes(c: LfmConfig, batch: int, max_len: int, elt: int) -> tuple[int, int]:
    kv = 2 * len(c.attn_layers) * batch * c.num_key_value_heads * max_len * c.head_size * elt
    conv = len(c.conv_layers) * batch * c.hidden_size * (c.conv_L_cache - 1) * elt
    return kv, conv


@pytest.mark.parametrize("attn", [[], [1], [0, 2], [0, 1, 2, 3, 4, 5]])
def test_cache_bytes_scale_with_attention_layers_times_length(attn):
    """A pool for `batch` sequences of n tokens: batch * n / block_size blocks and batch conv slots."""
    c = LfmConfig.from_dict(dict(CONFIGS["dense"], num_hidden_layers=6, layer_types=layers(6, attn)))
    bs = 16
    for dtype, elt in ((torch.float32, 4), (torch.bfloat16, 2)):
        sizes = {}
        for batch in (1, 3):
            for n in (16, 1024, 4096):
                blocks = batch * n // bs
                cache = PagedCache.allocate(c, blocks, bs, batch, dtype, "meta", None, False)
                kv, conv = _expected_bytes(c, batch, n, elt)
                assert sorted(cache.k) == sorted(cache.v) == list(c.attn_layers)
                assert sorted(cache.conv_index) == list(c.conv_layers)
                assert cache.conv.shape == (len(c.conv_layers), batch, c.conv_L_cache - 1, c.hidden_size)
                assert sum(t.numel() * elt for d in (cache.k, cache.v) for t in d.values()) == kv
                assert cache.conv.numel() * elt == conv
                assert cache.nbytes() == kv + conv
                assert PagedCache.block_bytes(c, bs, dtype, dtype, False) * blocks == kv
                # prefix caching adds one conv snapshot (a slot's worth) per block
                snap = PagedCache.allocate(c, blocks, bs, batch, dtype, "meta", None, True)
                assert snap.nbytes() == kv + conv + blocks * conv // batch
                assert PagedCache.block_bytes(c, bs, dtype, dtype, True) * blocks == snap.nbytes() - conv
                sizes[batch, n] = (kv, conv)
        for batch in (1, 3):  # KV is linear in length (zero without attention), the conv state constant
            (kv16, cv16), (kv1k, cv1k), (kv4k, cv4k) = (sizes[batch, n] for n in (16, 1024, 4096))
            assert kv4k == 4 * kv1k == 256 * kv16 and (kv16 > 0) == bool(attn)
            assert cv16 == cv1k == cv4k and (cv16 > 0) == (len(attn) < 6)
        assert sizes[3, 4096][0] == 3 * sizes[1, 4096][0] and sizes[3, 16][1] == 3 * sizes[1, 16][1]


def test_chunked_prefill_never_reallocates_the_cache():
    model = random_model(CONFIGS["dense"])
    n, chunk, bs = 300, 64, 16
    llm = LLM(model, max_num_batched_tokens=chunk, block_size=bs)
    eng = llm.engine
    cache = eng.cache

    def ptrs():
        assert eng.cache is cache and eng.runner.cache is cache and eng.runner.backend.cache is cache
        ts = {("k", i): t for i, t in cache.k.items()} | {("v", i): t for i, t in cache.v.items()}
        ts |= {("conv", 0): cache.conv, ("snap", 0): cache.conv_snap}
        return {key: t.data_ptr() for key, t in ts.items()}

    before, nbytes = ptrs(), cache.nbytes()
    progress: list[int] = []
    run = eng.runner.run

    def watched(scheduled):
        assert ptrs() == before
        out = run(scheduled)
        assert ptrs() == before
        (it,) = scheduled
        s = it.seq
        progress.append(s.num_computed_tokens + it.num_tokens)
        assert len(s.block_table) == -(-progress[-1] // bs)  # blocks taken as the sequence grows, none ahead
        return out

    eng.runner.run = watched
    x = torch.randint(14, 512, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    out = llm.generate([x], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3
    assert progress == [min(a + chunk, n) for a in range(0, n, chunk)] + [n + 1, n + 2]
    assert cache.nbytes() == nbytes and ptrs() == before
    # a context the cache cannot hold is refused up front, and generation stops where the context ends
    small = LLM(model, max_num_batched_tokens=chunk, block_size=bs, max_model_len=n)
    with pytest.raises(ValueError, match="no room"):
        small.generate([x], SamplingParams(temperature=0, max_tokens=1))
    end = small.generate([x[:n - 5]], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert end.finish_reason == "length" and len(end.token_ids) == 5


def _variant(model, kind: str):
    m = copy.deepcopy(model)
    if kind == "bf16":
        return m.to(torch.bfloat16)
    bits, group = {"int8": (8, 64), "int4": (4, 32)}[kind]
    quantize_model(m, bits, group)
    prepare(m)
    return m


def _engine_logits(model, prompts: list[list[int]], budget: int, continuations: list[list[int]]
                   ) -> dict[tuple[int, ...], torch.Tensor]:
    """Logits at every prompt position and after each forced continuation token, prefilled `budget` tokens a step
    (the prompts sharing steps)."""
    llm = LLM(model, max_num_batched_tokens=budget, block_size=8)
    rec = capture(llm, all_rows=True, force=scripted({tuple(p): c for p, c in zip(prompts, continuations)}))
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=len(continuations[0]) + 1, ignore_eos=True,
                                         prompt_logprobs=0))
    return by_tokens(rec)


@pytest.mark.parametrize("kind", ["int8", "int4", "bf16"])
def test_chunked_prefill_logits_equal_unchunked(kind):
    base = random_model(CONFIGS["dense"])
    model = _variant(base, kind)
    T = 70
    x = torch.randint(14, 512, (2, T), generator=torch.Generator().manual_seed(1))
    prompts, cont = x.tolist(), [[5, 9, 200], [6, 10, 201]]
    tol = dict(atol=2e-5, rtol=1e-5) if kind != "bf16" else dict(atol=5e-2, rtol=2e-2)
    one = _engine_logits(model, prompts, 4096, cont)
    assert len(one) == 2 * (T + 3)  # every prompt position, then the three continuation tokens
    assert all(tuple(p + c) in one for p, c in zip(prompts, cont))
    full = model(x).float()
    for b in range(2):  # the one-shot prefill is the plain full forward
        for t in range(T):
            torch.testing.assert_close(one[tuple(prompts[b][:t + 1])], full[b, t], **tol)
    for chunk in (1, 3, 16, 64):  # 1 and 3: chunks shorter than the conv window (its state carries across)
        parts = _engine_logits(model, prompts, chunk, cont)
        assert parts.keys() == one.keys()
        for key in one:  # prompt positions, and decoding after the chunked prefill continues identically
            torch.testing.assert_close(parts[key], one[key], **tol, msg=lambda m: f"{kind} chunk {chunk}: {m}")


def test_chunked_prefill_of_a_batch_of_different_lengths_equals_unchunked():
    """Prompts of 45, 12 and 30 tokens chunked together (chunk boundaries inside and across prompts) equal the
    unchunked engine, each prompt alone, and the plain model's left-padded batch forward."""
    model = _variant(random_model(CONFIGS["dense"]), "int4")
    lens, T = (45, 12, 30), 45
    x = torch.randint(14, 512, (3, T), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, T - n:] = 1
        x[i, :T - n] = 0
    padded = model(x, attention_mask=mask)
    prompts = [x[i, T - n:].tolist() for i, n in enumerate(lens)]
    cont = [[40], [41], [42]]
    one = _engine_logits(model, prompts, 4096, cont)
    alone = {}
    for p, c in zip(prompts, cont):
        alone |= _engine_logits(model, [p], 4096, [c])
    assert alone.keys() == one.keys()
    for chunk in (5, 16):
        parts = _engine_logits(model, prompts, chunk, cont)
        assert parts.keys() == one.keys()
        for key in one:
            torch.testing.assert_close(parts[key], one[key], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(parts[key], alone[key], atol=2e-5, rtol=1e-5)
        for i, (p, n) in enumerate(zip(prompts, lens)):
            for t in range(n):
                torch.testing.assert_close(parts[tuple(p[:t + 1])], padded[i, T - n + t], atol=2e-5, rtol=1e-5)


def test_long_prompts_prefill_in_chunks_sized_by_a_byte_budget():
    """Prompts longer than long_prefill_tokens are prefilled in chunks whose activations fit a byte budget (the
    issue's bounded memory at 32K), shorter ones by the token budget; the logits are those of the uncapped run."""
    from lfm.engine.scheduler import long_prefill_chunk
    from lfm.model.presets import preset

    c = preset("LFM2.5-350M")  # bfloat16: 2 x (2 x 4,608 + 4 x 1,024) bytes a token -> 944 tokens in 24 MiB
    assert c.ff_dim == 4608 and long_prefill_chunk(c, 2, 24 << 20, 16, 2048) == 944
    assert long_prefill_chunk(c, 2, 1 << 40, 16, 2048) == 2048  # never above the step's token budget
    assert long_prefill_chunk(c, 2, 1, 16, 2048) == 16  # at least one block
    moe = LfmConfig.from_dict(CONFIGS["moe"])  # experts: top-k x moe_intermediate_size wide per token
    per = 4 * (2 * max(moe.ff_dim, moe.num_experts_per_tok * moe.moe_intermediate_size) + 4 * moe.hidden_size)
    assert long_prefill_chunk(moe, 4, 100 * per, 8, 4096) == 96
    assert LLM(random_model(CONFIGS["dense"])).engine.scheduler.long_prefill[0] == 8192  # on by default

    model = random_model(CONFIGS["dense"])
    x = torch.randint(14, 512, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    short = x[:90]
    runs = {}
    for cap in (None, (100, 40)):
        llm = LLM(model, max_num_batched_tokens=256, block_size=8)
        llm.engine.scheduler.long_prefill = cap
        chunks: list[tuple[int, int]] = []
        run = llm.engine.runner.run

        def watched(scheduled, run=run, chunks=chunks):
            chunks.extend((it.seq.num_prompt_tokens, it.num_tokens) for it in scheduled
                          if it.seq.num_computed_tokens < it.seq.num_prompt_tokens)
            return run(scheduled)

        llm.engine.runner.run = watched
        rec = capture(llm, all_rows=True)
        outs = llm.generate([x, short], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                       prompt_logprobs=0))
        runs[cap] = ([o.token_ids for o in outs], by_tokens(rec), chunks)
    (tok0, log0, ch0), (tok1, log1, ch1) = runs[None], runs[(100, 40)]
    assert [n for p, n in ch1 if p == 300] == [40] * 7 + [20]  # the long prompt: chunks of the cap
    assert [n for p, n in ch1 if p == 90] == [90]  # a short one: the token budget's
    assert max(n for p, n in ch0 if p == 300) > 40
    assert tok0 == tok1 and log0.keys() == log1.keys()
    for k in log0:
        torch.testing.assert_close(log1[k], log0[k], atol=2e-5, rtol=1e-5)


def test_long_prompt_prefill_runs_in_low_memory(monkeypatch):
    """A long prompt's prefill steps run inside kernels.low_memory() (int4 layers take the AMX kernel instead of a
    dequantized bfloat16 copy of their weight: no second copy of the weights at long context); other steps do not."""
    from torch import nn

    from lfm import kernels
    from lfm.model.quant import Int4Linear

    seen: list[bool] = []
    real = kernels.low_memory
    monkeypatch.setattr(kernels, "low_memory", lambda on=True: (seen.append(on), real(on))[1])
    llm = LLM(random_model(CONFIGS["dense"]), max_num_batched_tokens=64, block_size=8)
    llm.engine.runner.long_prompt_tokens = 100
    llm.generate([list(range(20, 220))], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert seen[:4] == [True] * 4 and not any(seen[4:])  # 200 tokens: chunks of 64, 64, 64, 8; then decodes
    seen.clear()
    llm.generate([list(range(20, 80))], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert seen and not any(seen)
    if not kernels.amx():
        pytest.skip("no AMX here: low_memory() changes nothing on this CPU")
    lin = Int4Linear.from_linear(nn.Linear(256, 512, bias=False).bfloat16(), 64)
    x = torch.randn(300, 256).bfloat16()
    args = (x, lin.qweight, lin.scales, lin.zeros, 64)
    assert kernels.dequant_linear(*args) is not None  # 300 rows: a bf16 copy + the native matmul
    with kernels.low_memory():
        assert kernels.dequant_linear(*args) is None
        y = lin(x)  # the AMX kernel
    torch.testing.assert_close(y.float(), kernels.dequant_linear(*args).float(), atol=0.05, rtol=0.05)
