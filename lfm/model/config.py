"""The model configuration: one dataclass read from (and written back to) a Hugging Face `config.json`.

Every `lfm2` / `lfm2_moe` file ever published is accepted: `layer_types` or the older `full_attn_idxs`, the key aliases
(`block_ff_dim`, `tie_embedding`, `block_dim`), RoPE theta at top level or inside `rope_parameters`, and the dense
FFN-width rule. Anything we cannot run is refused here with one line naming the key, before any weight is touched.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_TYPES = ("lfm2", "lfm2_moe")
LAYER_TYPES = ("conv", "full_attention")

# Plausibility bounds: a value above these is a damaged or hostile file, refused before anything is allocated (a
# hidden_size of 1e9 would otherwise ask for terabytes, 1e8 layers would spin for minutes building the layer list).
# They sit far above the largest published LFM2 shapes (lfm/model/presets.py): vocab 128,000 (LFM2.5-8B-A1B),
# hidden 2,048, 30 layers (LFM2-2.6B), FFN 12,288 (LFM2.5-1.2B), 32 heads, 32 experts, conv kernel 3, 128K context.
MAX_SIZES: dict[str, int] = {
    "vocab_size": 1 << 22,  # 4.2M: 32x LFM2.5-8B-A1B's 128,000 (the largest public vocabularies are ~262K)
    "hidden_size": 1 << 16,  # 65,536: 32x
    "num_hidden_layers": 1024,  # 34x LFM2-2.6B's 30
    "num_attention_heads": 1024,  # 32x
    "num_key_value_heads": 1024,
    "head_dim": 4096,  # LFM2: 64
    "intermediate_size": 1 << 19,  # 524,288: 42x LFM2.5-1.2B's 12,288
    "moe_intermediate_size": 1 << 19,
    "num_experts": 4096,  # 128x LFM2-8B-A1B's 32
    "num_experts_per_tok": 4096,
    "conv_L_cache": 256,  # LFM2: 3
    "max_position_embeddings": 1 << 24,  # 16.7M tokens: 128x LFM2's 128K
}
MAX_PARAMS = 1 << 40  # 1.1e12 parameters: ~130x LFM2-8B-A1B, whatever the mix of the sizes above


class ConfigError(ValueError):
    """A config.json we cannot run; the message names the offending key."""


@dataclass(slots=True)
class LfmConfig:
    model_type: str = "lfm2"
    vocab_size: int = 65536
    hidden_size: int = 1024
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    layer_types: list[str] = field(default_factory=list)
    intermediate_size: int = 6656  # as written in the file; `ff_dim` is the width actually used
    block_auto_adjust_ff_dim: bool = True
    block_ffn_dim_multiplier: float | None = 1.0
    block_multiple_of: int = 256
    head_dim: int | None = None  # derived from hidden/heads unless the file says otherwise
    conv_L_cache: int = 3
    conv_bias: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 128_000
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    torch_dtype: str | None = None
    # lfm2_moe only
    moe_intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    num_dense_layers: int = 0
    use_expert_bias: bool = True
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # keys we do not interpret, kept so a saved config round-trips
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if not self.layer_types and isinstance(n, int) and 0 < n <= MAX_SIZES["num_hidden_layers"]:
            self.layer_types = ["conv"] * n
        self.validate()

    # ---- derived shapes -------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.model_type == "lfm2_moe"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def ff_dim(self) -> int:
        """Width of the dense SwiGLU (spec §2); lfm2_moe uses `intermediate_size` as is."""
        ff = self.intermediate_size
        if self.is_moe or not self.block_auto_adjust_ff_dim:
            return ff
        ff = int(2 * ff / 3)
        if self.block_ffn_dim_multiplier is not None:
            ff = int(self.block_ffn_dim_multiplier * ff)
            m = self.block_multiple_of
            ff = m * ((ff + m - 1) // m)
        return ff

    @property
    def attn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def conv_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "conv"]

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and i >= self.num_dense_layers

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.model_type in MODEL_TYPES, f"model_type {self.model_type!r} is not supported (expected one of {MODEL_TYPES})")
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "conv_L_cache", "max_position_embeddings"):
            v = getattr(self, k)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{k} must be a positive integer, got {v!r}")
        for k in ("head_dim", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "num_dense_layers"):
            v = getattr(self, k)
            need(v is None and k == "head_dim" or isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{k} must be a non-negative integer, got {v!r}")
        for k, hi in MAX_SIZES.items():
            v = getattr(self, k)
            need(v is None or v <= hi, f"{k} = {v} is implausibly large (lfm accepts up to {hi:,}; the largest "
                 "LFM2 is far below): a damaged config?")
        for k in ("norm_eps", "rope_theta", "routed_scaling_factor"):
            v = getattr(self, k)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                 f"{k} must be a finite number, got {v!r}")
        m = self.block_ffn_dim_multiplier
        need(m is None or isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) and m > 0,
             f"block_ffn_dim_multiplier must be a positive number or null, got {m!r}")
        need(isinstance(self.block_multiple_of, int) and not isinstance(self.block_multiple_of, bool)
             and 0 < self.block_multiple_of <= MAX_SIZES["intermediate_size"],
             f"block_multiple_of must be a positive integer, got {self.block_multiple_of!r}")
        need(isinstance(self.layer_types, list), f"layer_types must be a list, got {type(self.layer_types).__name__}")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        need(not bad, f"layer_types contains {bad[0]!r} (expected 'conv' or 'full_attention')" if bad else "")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})")
        need(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})")
        need(self.head_size % 2 == 0, f"head_dim ({self.head_size}) must be even for rotary embeddings")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.ff_dim > 0, f"the dense FFN width derived from intermediate_size={self.intermediate_size} is {self.ff_dim}")
        if self.is_moe:
            need(self.num_experts > 0, "lfm2_moe needs num_experts > 0")
            need(0 < self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})")
            need(self.moe_intermediate_size > 0, "lfm2_moe needs moe_intermediate_size > 0")
            need(0 <= self.num_dense_layers <= self.num_hidden_layers,
                 f"num_dense_layers ({self.num_dense_layers}) must be in 0..num_hidden_layers ({self.num_hidden_layers})")
        total = self.param_counts()["total"]
        need(total <= MAX_PARAMS, f"the sizes imply {total:,} parameters (lfm accepts up to {MAX_PARAMS:,}): a damaged "
             "config? (vocab_size, hidden_size, num_hidden_layers, intermediate_size, num_experts)")

    # ---- parameter and memory arithmetic (what `lfm info` prints) ---------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts: total, active per token, and the parts they are made of."""
        d, hd = self.hidden_size, self.head_size
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        b = 1 if self.conv_bias else 0
        conv = 3 * d * d + 3 * d * b + d * self.conv_L_cache + d * b + d * d + d * b
        attn = d * q + 2 * d * kv + q * d + 2 * hd
        dense = 3 * d * self.ff_dim
        expert = 3 * d * self.moe_intermediate_size
        total = active = self.vocab_size * d + d  # embedding + final norm
        if not self.tie_word_embeddings:
            total += self.vocab_size * d
            active += self.vocab_size * d
        for i, t in enumerate(self.layer_types):
            layer = 2 * d + (conv if t == "conv" else attn)
            total += layer
            active += layer
            if self.is_moe_layer(i):
                router = self.num_experts * d
                total += router + self.num_experts * expert
                active += router + self.num_experts_per_tok * expert
            else:
                total += dense
                active += dense
        return {"total": total, "active": active, "embedding": self.vocab_size * d}

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_key_value_heads * self.head_size * len(self.attn_layers) * dtype_bytes

    def conv_state_bytes(self, dtype_bytes: int = 2) -> int:
        return len(self.conv_layers) * self.hidden_size * (self.conv_L_cache - 1) * dtype_bytes

    # ---- (de)serialisation --------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LfmConfig:
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        d = dict(raw)
        mt = d.pop("model_type", None)
        if mt is None:
            raise ConfigError("config.json has no model_type (expected 'lfm2' or 'lfm2_moe')")
        if mt not in MODEL_TYPES:
            raise ConfigError(f"model_type {mt!r} is not supported (expected one of {MODEL_TYPES})")
        # aliases used by older files
        for old, new in (("block_ff_dim", "intermediate_size"), ("tie_embedding", "tie_word_embeddings"),
                         ("block_dim", "hidden_size"), ("block_norm_eps", "norm_eps"), ("num_heads", "num_attention_heads")):
            if old in d:
                d.setdefault(new, d[old])
                d.pop(old)
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        if isinstance(rope, dict) and "rope_theta" in rope:
            d.setdefault("rope_theta", rope["rope_theta"])
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type != "default":
            raise ConfigError(f"rope_parameters.rope_type {rope_type!r} is not supported (only 'default' RoPE)")
        n = d.get("num_hidden_layers", d.get("num_layers"))
        d.pop("num_layers", None)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_SIZES["num_hidden_layers"]):
            # checked before the layer list below is built from it
            raise ConfigError(f"num_hidden_layers must be an integer in 1..{MAX_SIZES['num_hidden_layers']}, got {n!r}")
        if "layer_types" not in d or d["layer_types"] is None:
            idxs = d.pop("full_attn_idxs", None)
            if n is None:
                raise ConfigError("config.json needs num_hidden_layers")
            if idxs is None:
                idxs = list(range(n))  # the reference's default: attention everywhere
            if not isinstance(idxs, list) or not all(isinstance(i, int) for i in idxs):
                raise ConfigError(f"full_attn_idxs must be a list of layer indices, got {str(idxs)[:80]}")
            idxs = set(idxs)
            d["layer_types"] = ["full_attention" if i in idxs else "conv" for i in range(n)]
        else:
            d.pop("full_attn_idxs", None)
            if not isinstance(d["layer_types"], list):
                raise ConfigError(f"layer_types must be a list, got {str(d['layer_types'])[:80]}")
            d["layer_types"] = ["full_attention" if t in ("full_attention", "attention") else t for t in d["layer_types"]]
        if "dtype" in d:
            d.setdefault("torch_dtype", d.pop("dtype"))
        if mt == "lfm2_moe":
            # the reference's defaults for keys a lfm2_moe file may omit
            d.setdefault("intermediate_size", 7168)
            d.setdefault("moe_intermediate_size", 1792)
            d.setdefault("num_experts", 32)
            d.setdefault("num_experts_per_tok", 4)
            d.setdefault("num_dense_layers", 2)
        names = {f.name for f in fields(cls)} - {"extra", "model_type"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        for k in ("conv_bias", "tie_word_embeddings", "use_expert_bias", "norm_topk_prob", "block_auto_adjust_ff_dim"):
            if k in known and not isinstance(known[k], bool):
                raise ConfigError(f"{k} must be true or false, got {known[k]!r}")
        try:
            return cls(model_type=mt, extra=extra, **known)
        except (TypeError, ValueError, OverflowError) as e:  # wrong value types surface here
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"invalid config.json: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> LfmConfig:
        """Errors name the file: `DIR/config.json: hidden_size = ... is implausibly large ...`."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face form: what transformers' Lfm2Config / Lfm2MoeConfig read."""
        d = {k: v for k, v in asdict(self).items() if k not in ("extra", "rope_theta", "torch_dtype")}
        d = {**self.extra, **d}
        d["architectures"] = ["Lfm2MoeForCausalLM" if self.is_moe else "Lfm2ForCausalLM"]
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d["full_attn_idxs"] = self.attn_layers
        if self.head_dim is None:
            d.pop("head_dim")
        if self.torch_dtype:
            d["dtype"] = self.torch_dtype
        if not self.is_moe:
            for k in ("moe_intermediate_size", "num_experts", "num_experts_per_tok", "num_dense_layers",
                      "use_expert_bias", "norm_topk_prob", "routed_scaling_factor"):
                d.pop(k)
        else:
            for k in ("block_auto_adjust_ff_dim", "block_ffn_dim_multiplier", "block_multiple_of", "full_attn_idxs"):
                d.pop(k)
        return d

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
