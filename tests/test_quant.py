"""Weight-only int8 / int4: kernels equal their dequantized reference, bounded error vs float, save/load round trips."""

from __future__ import annotations

import copy

import pytest
import torch

from lfm import LLM, SamplingParams
from lfm.model.checkpoint import load_model, save_model
from lfm.model.quant import Int4Linear, Int8Linear, QuantEmbedding, prepare, quantize_model

from .conftest import CONFIGS, random_model
from .engine_util import by_tokens, capture, scripted

torch.set_grad_enabled(False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on shared cores


WIDE = dict(CONFIGS["dense"], hidden_size=128, intermediate_size=384, block_multiple_of=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "int4-32", "int4-64", "int4-128"])
def test_quantized_linear_equals_its_dequantized_weights(kind, dtype):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=False).to(dtype)
    lin.weight.copy_(torch.randn(96, 256, generator=g).to(dtype) * 0.05)
    q = Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin, int(kind.split("-")[1]))
    x = torch.randn(5, 256, generator=g).to(dtype)
    want = x.float() @ q.dequantize().t()
    got = q(x).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (got - want).abs().max().item() <= tol * want.abs().max().item()
    # and the quantization error itself is what the bit width predicts
    err = (q.dequantize() - lin.weight.float()).abs().max().item()
    assert err <= (0.003 if kind == "int8" else 0.02)


@pytest.mark.parametrize("bits,max_kl", [(8, 2e-3), (4, 5e-2)])
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_quantized_model_stays_close_and_round_trips(bits, max_kl, name, tmp_path):
    m = random_model(dict(CONFIGS[name], hidden_size=128, intermediate_size=384, block_multiple_of=64), std=0.05)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = m(ids).log_softmax(-1)
    q = quantize_model(copy.deepcopy(m), bits, 32)
    prepare(q)
    assert isinstance(q.model.embed_tokens, QuantEmbedding) and not isinstance(q.lm_head, torch.nn.Linear)
    out = q(ids).log_softmax(-1)
    kl = (ref.exp() * (ref - out)).sum(-1).mean().item()
    assert 0 < kl <= max_kl
    save_model(q, tmp_path)
    back = load_model(tmp_path)
    assert type(back.lm_head) is type(q.lm_head)
    assert torch.equal(back(ids), q(ids))
    # the quantized model decodes through the engine like the float one: logits at every prompt position and at
    # every decode step (made to follow ids) = the full forward
    llm = LLM(back, block_size=8, max_num_batched_tokens=16)
    prompts = ids[:, :25].tolist()
    rec = capture(llm, all_rows=True, force=scripted({tuple(p): r[25:] for p, r in zip(prompts, ids.tolist())}))
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=0))
    got = by_tokens(rec)
    steps = torch.stack([torch.stack([got[tuple(ids[b, :t + 1].tolist())] for t in range(40)]) for b in range(2)])
    assert (steps - q(ids)).abs().max().item() <= 1e-4


def test_quantize_cli_and_quantize_on_load_agree(checkpoints, tmp_path):
    from lfm.cli import main

    assert main(["quantize", str(checkpoints["dense"]), "--bits", "8", "-o", str(tmp_path / "q8")]) == 0
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    a = LLM(str(tmp_path / "q8")).generate("Hello", sp)[0]
    b = LLM(str(checkpoints["dense"]), quantization="int8").generate("Hello", sp)[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    with pytest.raises(ValueError, match="quantization must be 'int8' or 'int4'"):
        LLM(str(checkpoints["dense"]), quantization="int3")
