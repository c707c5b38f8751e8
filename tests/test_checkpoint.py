"""Checkpoints: round trips with transformers in both directions, dtypes, sharding, and one clear error per bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lfm.model.checkpoint import CheckpointError, load_model, save_model
from lfm.model.safetensors_io import load_file, save_file

from .conftest import CONFIGS, random_model

torch.set_grad_enabled(False)
IDS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,layout", [("dense", "per_expert"), ("dense-mqa-kernel4-untied", "per_expert"),
                                         ("moe", "per_expert"), ("moe", "stacked"), ("moe-top1-untied-kernel4", "stacked")])
def test_transformers_loads_what_we_save_and_we_load_what_it_saves(name, layout, tmp_path):
    ours = random_model(CONFIGS[name], seed=3)
    save_model(ours, tmp_path / "ours", expert_layout=layout, max_shard_bytes=150_000)  # forces several shards
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert (ref(IDS).logits - ours(IDS)).abs().max().item() <= 1e-5
    ref.save_pretrained(tmp_path / "theirs")
    back = load_model(tmp_path / "theirs", dtype="float32")
    assert (back(IDS) - ours(IDS)).abs().max().item() == 0.0
    assert back.config.tie_word_embeddings == ours.config.tie_word_embeddings
    if ours.config.tie_word_embeddings:
        assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_into_half_precision_keeps_expert_bias_in_float32(dtype, checkpoints):
    m = load_model(checkpoints["moe"], dtype=dtype)
    assert m.dtype == dtype
    assert all(p.dtype == dtype for p in m.parameters())
    biases = [b for n, b in m.named_buffers() if n.endswith("expert_bias")]
    assert biases and all(b.dtype == torch.float32 for b in biases)
    f32 = load_model(checkpoints["moe"], dtype="float32")
    assert torch.equal(m.model.embed_tokens.weight, f32.model.embed_tokens.weight.to(dtype))
    assert torch.isfinite(m(IDS)).all()


def test_our_safetensors_writer_and_reader_agree_with_the_library(tmp_path):
    from safetensors.torch import load_file as lib_load
    from safetensors.torch import save_file as lib_save

    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6, dtype=torch.int64),
          "empty": torch.zeros(0, 4), "h": torch.randn(2, 2).half()}
    save_file(ts, tmp_path / "ours.safetensors")
    lib_save(ts, tmp_path / "lib.safetensors")
    for got in (lib_load(tmp_path / "ours.safetensors"), load_file(tmp_path / "lib.safetensors")):
        assert set(got) == set(ts) and all(torch.equal(got[k], ts[k]) for k in ts)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite(d: Path, fn) -> None:
    ts = load_file(d / "model.safetensors")
    fn(ts)
    save_file(ts, d / "model.safetensors")


def test_error_missing_tensor(checkpoints, tmp_path):
    d = _copy(checkpoints["dense"], tmp_path / "c")
    _rewrite(d, lambda ts: ts.pop("model.layers.1.self_attn.q_layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.q_layernorm\.weight.*missing"):
        load_model(d)


def test_error_unexpected_tensor(checkpoints, tmp_path):
    d = _copy(checkpoints["dense"], tmp_path / "c")
    _rewrite(d, lambda ts: ts.__setitem__("model.layers.9.mystery.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.9\.mystery\.weight'"):
        load_model(d)


def test_error_misshaped_tensor(checkpoints, tmp_path):
    d = _copy(checkpoints["dense"], tmp_path / "c")
    _rewrite(d, lambda ts: ts.__setitem__("model.layers.0.conv.in_proj.weight", torch.zeros(10, 64)))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.conv\.in_proj\.weight.*shape \[10, 64\].*\[192, 64\]"):
        load_model(d)


def test_error_truncated_file_names_the_file(checkpoints, tmp_path):
    d = _copy(checkpoints["dense"], tmp_path / "c")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_model(d)


def test_error_unknown_model_type(checkpoints, tmp_path):
    d = _copy(checkpoints["dense"], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        load_model(d)


def test_pickle_checkpoints_are_refused_not_loaded(tmp_path, checkpoints):
    d = tmp_path / "c"
    d.mkdir()
    (d / "config.json").write_text((checkpoints["dense"] / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(CheckpointError, match="pickle file, which lfm never loads"):
        load_model(d)


def test_offline_hub_id_says_how_to_get_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"hf download LiquidAI/LFM2\.5-350M --local-dir"):
        load_model("LiquidAI/LFM2.5-350M")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_model("./not/here")


def test_loading_does_not_hold_two_copies(tmp_path):
    """Peak RSS while loading stays near the model size (measured in a fresh process)."""
    cfg = dict(CONFIGS["dense"], vocab_size=8192, hidden_size=512, intermediate_size=2048, block_multiple_of=256)
    m = random_model(cfg)
    save_model(m, tmp_path / "m")
    size = sum(p.numel() * 4 for p in m.parameters())
    assert size > 40e6
    code = (
        "import resource, torch, sys\n"
        "from lfm.model.checkpoint import load_model\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"m = load_model({str(tmp_path / 'm')!r}, dtype='float32')\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    grew = int(out.stdout.strip().splitlines()[-1])
    assert grew < 1.3 * size, f"loading grew RSS by {grew / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
