"""Named shapes of the published checkpoints (spec §1) and tiny ones for tests.

A preset is the `config.json` a user would download, so `lfm info LiquidAI/LFM2.5-350M` answers offline and
benchmarks can build random-weight models of the real shapes.
"""

from __future__ import annotations

from typing import Any

from .config import LfmConfig


def _layers(n: int, attn: list[int]) -> list[str]:
    return ["full_attention" if i in attn else "conv" for i in range(n)]


_DENSE_COMMON: dict[str, Any] = dict(
    model_type="lfm2", vocab_size=65536, num_key_value_heads=8, conv_L_cache=3, norm_eps=1e-5, rope_theta=1e6,
    max_position_embeddings=128_000, tie_word_embeddings=True, block_auto_adjust_ff_dim=True,
    block_ffn_dim_multiplier=1.0, block_multiple_of=256, pad_token_id=0, bos_token_id=1, eos_token_id=7,
    torch_dtype="bfloat16",
)
_SMALL_ATTN = [2, 5, 8, 10, 12, 14]
_MOE_COMMON: dict[str, Any] = dict(
    model_type="lfm2_moe", vocab_size=65536, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
    num_key_value_heads=8, layer_types=_layers(24, [2, 6, 10, 14, 18, 21]), intermediate_size=7168,
    moe_intermediate_size=1792, num_experts=32, num_experts_per_tok=4, num_dense_layers=2, use_expert_bias=True,
    norm_topk_prob=True, routed_scaling_factor=1.0, conv_L_cache=3, norm_eps=1e-5, rope_theta=1e6,
    max_position_embeddings=128_000, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=7,
    torch_dtype="bfloat16",
)

PRESETS: dict[str, dict[str, Any]] = {
    "LFM2.5-350M": dict(_DENSE_COMMON, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                        layer_types=_layers(16, _SMALL_ATTN), intermediate_size=6656),
    "LFM2-700M": dict(_DENSE_COMMON, hidden_size=1536, num_hidden_layers=16, num_attention_heads=24,
                      layer_types=_layers(16, _SMALL_ATTN), intermediate_size=10240),
    "LFM2.5-1.2B": dict(_DENSE_COMMON, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                        layer_types=_layers(16, _SMALL_ATTN), intermediate_size=12288),
    "LFM2-2.6B": dict(_DENSE_COMMON, hidden_size=2048, num_hidden_layers=30, num_attention_heads=32,
                      layer_types=_layers(30, [2, 5, 9, 13, 17, 21, 24, 27]), intermediate_size=10752,
                      block_auto_adjust_ff_dim=False),
    "LFM2-8B-A1B": dict(_MOE_COMMON),
    "LFM2.5-8B-A1B": dict(_MOE_COMMON, vocab_size=128000, rope_theta=1e7, pad_token_id=124893, bos_token_id=124894,
                          eos_token_id=124900),
    # tiny shapes for tests and smoke runs: every code path (conv, attention, GQA, MoE, dense-first layers)
    "tiny": dict(_DENSE_COMMON, vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, layer_types=_layers(4, [1, 3]), intermediate_size=192, block_multiple_of=32,
                 max_position_embeddings=2048, torch_dtype="float32"),
    "tiny-moe": dict(_MOE_COMMON, vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, layer_types=_layers(4, [1, 3]), intermediate_size=128,
                     moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_dense_layers=1,
                     max_position_embeddings=2048, torch_dtype="float32"),
}
# the names are the Hub ids' tails; aliases a user is likely to type
_ALIASES = {"LFM2-350M": "LFM2.5-350M", "LFM2.5-350M-Base": "LFM2.5-350M", "LFM2-1.2B": "LFM2.5-1.2B",
            "LFM2.5-1.2B-Instruct": "LFM2.5-1.2B", "LFM2.5-1.2B-Base": "LFM2.5-1.2B"}


def preset_name(name: str) -> str | None:
    """The preset a name or Hub id refers to (case-insensitive, `LiquidAI/` optional), or None."""
    tail = name.split("/")[-1]
    for key in list(PRESETS) + list(_ALIASES):
        if key.lower() == tail.lower():
            return _ALIASES.get(key, key)
    return None


def preset(name: str, **overrides: Any) -> LfmConfig:
    key = preset_name(name)
    if key is None:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return LfmConfig.from_dict({**PRESETS[key], **overrides})
