"""Quantized MoE experts: the selected-expert path equals a dense reference, one decode token computes only its
top-k experts, the quantized model stays close to float, and quantized MoE checkpoints round trip."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import lfm.kernels
from lfm import LLM, SamplingParams
from lfm.model.checkpoint import load_model, save_model
from lfm.model.lfm2 import Experts, MoE
from lfm.model.quant import Int4Linear, QuantExperts, QuantStack, prepare, quantize_model

from .conftest import CONFIGS, random_model
from .engine_util import by_tokens, capture, scripted

torch.set_grad_enabled(False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices on shared cores


# experts of width 64 (so int4 groups of 32 and 64 both divide every matrix), hidden 128
WIDE_MOE = dict(CONFIGS["moe"], hidden_size=128, intermediate_size=384, block_multiple_of=64, moe_intermediate_size=64)
KINDS = [(4, 32), (4, 64), (8, 64)]


def kernels(on: bool):
    return contextlib.nullcontext() if on else lfm.kernels.disabled()


def random_experts(E=8, D=128, I=64, seed=0, dtype=torch.float32) -> Experts:
    g = torch.Generator().manual_seed(seed)
    ex = Experts(E, D, I)
    ex.gate_up_proj.data = (torch.randn(E, 2 * I, D, generator=g) * 0.05).to(dtype)
    ex.down_proj.data = (torch.randn(E, D, I, generator=g) * 0.05).to(dtype)
    return ex


def dense_reference(qe: QuantExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Every expert on every token from the dequantized weights (float32), then the router's weighted pick."""
    gu, dn = qe.gate_up.dequantize(), qe.down.dequantize()  # [E, 2I, D], [E, D, I]
    g, u = torch.einsum("nd,eod->eno", x.float(), gu).chunk(2, dim=-1)
    y_all = torch.einsum("eni,edi->end", F.silu(g) * u, dn)  # [E, N, D]
    picked = y_all[idx, torch.arange(x.shape[0])[:, None]]  # [N, k, D]
    return (w.float()[..., None] * picked).sum(1)


def routing(N, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    return idx, torch.rand(N, k, generator=g)


@pytest.mark.parametrize("bits,group", KINDS)
def test_int4_experts_share_int4linears_layout(bits, group):
    """Each expert's slice is exactly what Int4Linear / Int8Linear would store for that matrix (one kernel, one layout)."""
    ex = random_experts()
    qe = QuantExperts.from_experts(ex, bits, group)
    assert qe.gate_up.bits == qe.down.bits == bits
    for e in (0, 5):
        lin = torch.nn.Linear(128, 128, bias=False)
        lin.weight.data = ex.gate_up_proj.data[e].clone()
        if bits == 4:
            ref = Int4Linear.from_linear(lin, group)
            s = qe.gate_up
            assert torch.equal(s.qweight[e], ref.qweight) and torch.equal(s.scales[e], ref.scales)
            assert torch.equal(s.zeros[e], ref.zeros) and s.qweight[e].is_contiguous()
        assert torch.equal(qe.gate_up.dequantize(e), qe.gate_up.dequantize()[e])
        err = (qe.gate_up.dequantize(e) - ex.gate_up_proj[e]).abs().max().item()
        assert 0 < err <= (0.003 if bits == 8 else 0.02)


def test_int4_falls_back_to_int8_where_the_group_does_not_divide():
    qe = QuantExperts.from_experts(random_experts(I=32), 4, 64)  # down_proj has K = 32
    assert qe.gate_up.bits == 4 and qe.down.bits == 8


@pytest.mark.parametrize("on", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("N", [1, 2, 9])
@pytest.mark.parametrize("bits,group", KINDS)
def test_selected_experts_equal_dense_reference(bits, group, N, on):
    qe = QuantExperts.from_experts(random_experts(), bits, group)
    x = torch.randn(N, 128, generator=torch.Generator().manual_seed(2))
    idx, w = routing(N, 8, 3, seed=N)
    with kernels(on):
        got = qe(x, idx, w)
        want = dense_reference(qe, x, idx, w)
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
        # the float Experts' grouped path on the dequantized weights agrees too
        assert torch.allclose(qe.dequantize()(x, idx, w), want, rtol=0, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
def test_bfloat16_experts_stay_close(bits):
    qe = QuantExperts.from_experts(random_experts(dtype=torch.bfloat16), bits, 64)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    idx, w = routing(5, 8, 2, seed=7)
    for n in (1, 5):  # the one-token path and the grouped one
        got, want = qe(x[:n], idx[:n], w[:n]).float(), dense_reference(qe, x[:n], idx[:n], w[:n])
        assert got.dtype == torch.float32 and (got - want).abs().max().item() <= 3e-2 * want.abs().max().item()


def test_one_decode_token_runs_only_its_top_k_experts(monkeypatch):
    """A batch-1 decode step multiplies by exactly the k chosen experts of each MoE layer, no others."""
    m = quantize_model(random_model(WIDE_MOE, std=0.05), 4, 64)
    prepare(m)
    calls: list[tuple[int, int]] = []
    orig = QuantStack.mm
    monkeypatch.setattr(QuantStack, "mm", lambda self, x, e: calls.append((id(self), e)) or orig(self, x, e))
    chosen: dict[int, list[int]] = {}
    moes = [mod for mod in m.modules() if isinstance(mod, MoE)]
    for mod in moes:
        mod.experts.register_forward_pre_hook(lambda ex, args: chosen.__setitem__(id(ex), args[1].reshape(-1).tolist()))
    ids = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    eng = LLM(m).engine
    eng.add_request("r", ids[:11], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    eng.step()  # the prompt
    calls.clear()
    steps: list[list[int]] = []
    run = eng.runner.run
    eng.runner.run = lambda sch: (steps.append([it.num_tokens for it in sch]), run(sch))[1]
    eng.step()  # one decode token
    assert steps == [[1]]
    k = WIDE_MOE["num_experts_per_tok"]
    assert len(moes) == 3 and len(calls) == len(moes) * 2 * k
    for mod in moes:
        ex = mod.experts
        assert [e for s, e in calls if s == id(ex.gate_up)] == chosen[id(ex)]
        assert [e for s, e in calls if s == id(ex.down)] == chosen[id(ex)]


@pytest.mark.parametrize("on", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("bits,group,max_kl", [(4, 64, 3e-2), (4, 32, 3e-2), (8, 64, 2e-3)])
def test_quantized_moe_model(bits, group, max_kl, on, tmp_path):
    m = random_model(WIDE_MOE, std=0.05)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    q = quantize_model(copy.deepcopy(m), bits, group)
    prepare(q)
    assert not any("experts" in n for n, _ in q.named_parameters())  # no float copy of the experts is left
    assert all(isinstance(mod.gate, torch.nn.Linear) for mod in q.modules() if isinstance(mod, MoE))  # router float
    with kernels(on):
        out = q(ids)
        # tight: the same model with only the experts dequantized back to float
        deq = copy.deepcopy(q)
        for mod in deq.modules():
            if isinstance(mod, MoE):
                mod.experts = mod.experts.dequantize()
        ref_q = deq(ids)
        assert (out - ref_q).abs().max().item() <= 1e-4 * ref_q.abs().max().item()
        # loose: vs the float model (int4 / int8 everywhere, embedding and head included)
        ref, lo = m(ids).log_softmax(-1), out.log_softmax(-1)
        kl = (ref.exp() * (ref - lo)).sum(-1).mean().item()
        assert 0 < kl <= max_kl
        # decode through the engine (one token at a time: the k-expert path) = the full forward
        for rows in (2, 1):  # two sequences decoding together; one alone (every decode step the one-token path)
            llm = LLM(q, block_size=8)
            prompts = ids[:rows, :10].tolist()
            rec = capture(llm, all_rows=True, force=scripted({tuple(p): r[10:] for p, r in zip(prompts, ids.tolist())}))
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True, prompt_logprobs=0))
            got = by_tokens(rec)
            steps = torch.stack([torch.stack([got[tuple(ids[b, :t + 1].tolist())] for t in range(24)])
                                 for b in range(rows)])
            assert (steps - out[:rows]).abs().max().item() <= 1e-4 * out.abs().max().item()
        # save -> load round trip: same modules, identical logits
        save_model(q, tmp_path)
        back = load_model(tmp_path)
        assert isinstance(back.model.layers[1].feed_forward.experts, QuantExperts)
        assert torch.equal(back(ids), out)


def test_quantize_cli_on_moe_and_quantize_on_load_agree(checkpoints, tmp_path):
    from lfm.cli import main

    assert main(["quantize", str(checkpoints["moe"]), "--bits", "4", "--group-size", "32", "-o", str(tmp_path / "q4")]) == 0
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = LLM(str(tmp_path / "q4"))
    b = LLM(str(checkpoints["moe"]), quantization="int4", group_size=32)
    assert isinstance(a.model.model.layers[1].feed_forward.experts, QuantExperts)
    assert a.generate("Hello", sp)[0].token_ids == b.generate("Hello", sp)[0].token_ids
