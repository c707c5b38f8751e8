"""LoRA: a no-op at init, trains only the adapter, merges exactly, and round-trips through PEFT on transformers."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from lfm.model.checkpoint import save_model
from lfm.train.lora import (LORA_TARGETS, LoraConfig, LoraLinear, apply_lora, load_adapter, lora_state_dict,
                            merge_lora, save_adapter)

from .conftest import CONFIGS, DENSE, MOE, random_model

torch.set_num_threads(1)

CFG = LoraConfig(r=4, alpha=8)


def _ids(vocab: int, shape=(2, 11), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _randomise_b(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))


def _lora_model(cfg: dict):
    m = random_model(cfg)
    apply_lora(m, CFG)
    _randomise_b(m)
    return m


@torch.no_grad()
@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_apply_lora_is_a_noop_at_init_and_trains_only_the_adapter(cfg):
    m = random_model(cfg)
    ids = _ids(m.config.vocab_size)
    before = m(ids)
    frozen = {n: p.clone() for n, p in m.named_parameters()}
    names = apply_lora(m, CFG)
    assert names and all(n.rsplit(".", 1)[1] in LORA_TARGETS for n in names)
    assert "lm_head" not in names and not any(n.endswith(("conv.conv", "feed_forward.gate")) for n in names)
    assert any(n.endswith("self_attn.q_proj") for n in names) and any(n.endswith("conv.in_proj") for n in names)
    assert (m(ids) - before).abs().max().item() == 0.0
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(names)
    for layer in m.model.layers:  # the depthwise kernel and the router are plain modules, still frozen
        if not layer.is_attn:
            assert type(layer.conv.conv) is torch.nn.Conv1d and not layer.conv.conv.weight.requires_grad
        if hasattr(layer.feed_forward, "gate"):
            assert type(layer.feed_forward.gate) is torch.nn.Linear
            assert not layer.feed_forward.experts.gate_up_proj.requires_grad
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert apply_lora(m, CFG) == []  # already wrapped: nothing more to do
    after = dict(m.named_parameters())
    for n, p in frozen.items():  # base weights kept under .base
        q = after[n] if n in after else after[n.replace(".weight", ".base.weight").replace(".bias", ".base.bias")]
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["dense", "dense-conv-bias", "moe", "moe-top1-untied-kernel4"])
def test_adapter_loads_in_peft_on_transformers(name, tmp_path):
    cfg = CONFIGS[name]
    import peft
    from transformers import AutoModelForCausalLM

    base = random_model(cfg)
    save_model(base, tmp_path / "base")
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        plain = base(ids)
    names = apply_lora(base, CFG)
    _randomise_b(base)
    save_adapter(base, tmp_path / "adapter", CFG, base_model_name_or_path=str(tmp_path / "base"))
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert set(keys) == {f"base_model.model.{n}.lora_{x}.weight" for n in names for x in "AB"}
    if name == "dense":  # PEFT's saved names, spelled out: no adapter name, HF module path
        assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
        assert "base_model.model.model.layers.0.conv.in_proj.lora_B.weight" in keys

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = base(ids), pm(input_ids=ids, use_cache=False).logits
    assert (ours - plain).abs().max().item() > 1e-2  # the adapter really changes the output
    assert (ours - theirs).abs().max().item() <= 1e-5
    hf_lora = {n.removeprefix("base_model.model.") for n, mod in pm.named_modules() if hasattr(mod, "lora_A")}
    assert hf_lora == set(names)  # PEFT wrapped exactly the modules we wrapped


def test_adapter_saved_by_peft_loads_here(tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    ours = random_model(MOE)
    save_model(ours, tmp_path / "base")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    pcfg = peft.LoraConfig(r=3, lora_alpha=7, target_modules=["q_proj", "out_proj", "w2"], task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, pcfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    pm.save_pretrained(tmp_path / "adapter")
    cfg = load_adapter(ours, tmp_path / "adapter")
    assert (cfg.r, cfg.alpha, cfg.targets) == (3, 7, ("out_proj", "q_proj", "w2"))
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids) - pm(input_ids=ids, use_cache=False).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_merge_and_reload_reproduce_the_lora_model(cfg, tmp_path):
    m = _lora_model(cfg)
    ids = _ids(m.config.vocab_size)
    with torch.no_grad():
        want = m(ids)
    save_adapter(m, tmp_path, CFG)
    merge_lora(m)
    assert not any(isinstance(x, LoraLinear) for x in m.modules())
    assert not any("lora" in n or ".base." in n for n, _ in m.named_parameters())
    with torch.no_grad():
        assert (m(ids) - want).abs().max().item() <= 1e-5
    save_model(m, tmp_path / "merged")  # an ordinary model again

    fresh = random_model(cfg)
    got_cfg = load_adapter(fresh, tmp_path)
    assert (got_cfg.r, got_cfg.alpha, set(got_cfg.targets)) == (CFG.r, CFG.alpha, set(CFG.targets))
    with torch.no_grad():
        assert (fresh(ids) - want).abs().max().item() <= 1e-5


def test_bad_adapters_raise_and_leave_the_model_alone(tmp_path):
    good = tmp_path / "good"
    save_adapter(_lora_model(DENSE), good, CFG)
    cfg_json = json.loads((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")

    def variant(name, config=cfg_json, weights=tensors):
        d = tmp_path / name
        d.mkdir()
        if config is not None:
            (d / "adapter_config.json").write_text(json.dumps(config))
        if weights is not None:
            save_file(weights, d / "adapter_model.safetensors")
        return d

    key = "base_model.model.model.layers.0.conv.in_proj.lora_A.weight"
    cases = {
        tmp_path / "nowhere": "does not exist",
        variant("no-config", config=None): "no adapter_config.json",
        variant("no-weights", weights=None): "no adapter_model.safetensors",
        variant("ia3", config=dict(cfg_json, peft_type="IA3")): "peft_type must be 'LORA'",
        variant("dora", config=dict(cfg_json, use_dora=True)): "use_dora=True is not supported",
        variant("shape", weights=dict(tensors, **{key: torch.zeros(4, 7)})): "has shape (4, 7)",
        variant("unknown", weights=dict(tensors, **{key.replace("in_proj", "nope"): torch.zeros(4, 64)})):
            "unknown key",
        variant("missing", weights={k: v for k, v in tensors.items() if k != key}): "missing",
    }
    m = random_model(DENSE)
    before = {n: p.clone() for n, p in m.state_dict().items()}
    for d, msg in cases.items():
        with pytest.raises(ValueError, match=re.escape(msg)) as e:
            load_adapter(m, d)
        assert "\n" not in str(e.value)
        assert not any(isinstance(x, LoraLinear) for x in m.modules())
        now = m.state_dict()
        assert now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())
        assert all(p.requires_grad for p in m.parameters())


def test_half_precision_base_keeps_a_float32_adapter(tmp_path):
    m = random_model(DENSE).to(torch.bfloat16)
    apply_lora(m, CFG)
    lin = m.model.layers[0].conv.in_proj
    assert lin.weight.dtype == torch.bfloat16 and lin.lora_A.weight.dtype == lin.lora_B.weight.dtype == torch.float32
    _randomise_b(m)
    ids = _ids(m.config.vocab_size)
    with torch.no_grad():
        want = m(ids)
    assert want.dtype == torch.bfloat16
    save_adapter(m, tmp_path, CFG)
    fresh = random_model(DENSE).to(torch.bfloat16)
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids), want)


def test_sgd_moves_only_the_adapter():
    m = _lora_model(MOE).train()
    ids = _ids(m.config.vocab_size, (2, 9))
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(3):
        logits = m(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in m.named_parameters():
        changed = not torch.equal(p, start[n])
        assert changed == ("lora_" in n), n
        if "lora_" not in n:
            assert p.grad is None
    assert set(lora_state_dict(m)) == {f"base_model.model.{n}" for n in start if "lora_" in n}
