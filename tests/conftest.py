"""Shared fixtures: tiny random models in varied shapes, saved as real checkpoints, and the test tokenizer.

Nothing is downloaded: every model and tokenizer is built here, at test time.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*causal_conv1d.*")

from lfm.model.checkpoint import save_model  # noqa: E402
from lfm.model.config import LfmConfig  # noqa: E402
from lfm.model.lfm2 import LfmForCausalLM  # noqa: E402


def layers(n: int, attn: list[int]) -> list[str]:
    return ["full_attention" if i in attn else "conv" for i in range(n)]


DENSE = dict(model_type="lfm2", vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, layer_types=layers(4, [1, 3]), intermediate_size=192, block_multiple_of=32,
             max_position_embeddings=1024, eos_token_id=7, tie_word_embeddings=True)
MOE = dict(DENSE, model_type="lfm2_moe", intermediate_size=96, moe_intermediate_size=32, num_experts=8,
           num_experts_per_tok=2, num_dense_layers=1, use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=1.0)

# shapes the parity tests sweep: layouts, kernel widths, head counts, FFN rules, head tying, every MoE option
CONFIGS = {
    "dense": DENSE,
    "dense-all-conv": dict(DENSE, layer_types=layers(3, []), num_hidden_layers=3),
    "dense-all-attn-mha": dict(DENSE, layer_types=layers(3, [0, 1, 2]), num_hidden_layers=3, num_key_value_heads=4),
    "dense-mqa-kernel4-untied": dict(DENSE, num_key_value_heads=1, conv_L_cache=4, tie_word_embeddings=False),
    "dense-kernel2-noadjust": dict(DENSE, conv_L_cache=2, block_auto_adjust_ff_dim=False, intermediate_size=80,
                                   layer_types=layers(5, [0, 4]), num_hidden_layers=5),
    "dense-multiplier-theta": dict(DENSE, block_ffn_dim_multiplier=1.5, block_multiple_of=48, rope_theta=1e4,
                                   norm_eps=1e-6, num_attention_heads=8, num_key_value_heads=2),
    "dense-conv-bias": dict(DENSE, conv_bias=True),
    "dense-kernel1-headdim32-kv1": dict(DENSE, conv_L_cache=1, head_dim=32, num_key_value_heads=1),
    "moe": MOE,
    "moe-nobias-nonorm-scaled": dict(MOE, use_expert_bias=False, norm_topk_prob=False, routed_scaling_factor=2.5,
                                     num_dense_layers=0),
    "moe-top1-untied-kernel4": dict(MOE, num_experts_per_tok=1, tie_word_embeddings=False, conv_L_cache=4,
                                    layer_types=layers(4, [0, 2])),
    "moe-topall-scaled": dict(MOE, num_experts=4, num_experts_per_tok=4, routed_scaling_factor=0.5, num_dense_layers=2),
}


def random_model(cfg: dict | LfmConfig, seed: int = 0, std: float = 0.08) -> LfmForCausalLM:
    """Random weights with enough signal that logits differ clearly; norms and the expert bias not at their init."""
    c = cfg if isinstance(cfg, LfmConfig) else LfmConfig.from_dict(dict(cfg))
    torch.manual_seed(seed)
    m = LfmForCausalLM(c)
    g = torch.Generator().manual_seed(seed)
    m.init_weights(std, generator=g)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        for name, b in m.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
    return m.eval()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from lfm.text.tiny_tokenizer import build_tiny_tokenizer

    return Path(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Every config in CONFIGS saved once as a checkpoint directory with the test tokenizer."""
    out = {}
    for name, cfg in CONFIGS.items():
        d = tmp_path_factory.mktemp(name)
        save_model(random_model(cfg), d, tokenizer_dir=tokenizer_dir)
        out[name] = d
    return out


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny matrices on a shared 2-core machine: more threads only add syncs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _training_tests_get_autograd(request):
    """Inference test modules switch autograd off at import (collection), process-wide; training tests need it on."""
    if request.module.__name__.rsplit(".", 1)[-1].startswith("test_train"):
        with torch.enable_grad():
            yield
    else:
        yield
