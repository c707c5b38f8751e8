"""The one table both directions share: which GGUF tensor holds which part of which checkpoint tensor (spec §6).

Export walks it to write a file, import walks it to fill a model, so the two can never disagree about a name, a
shape or a transpose. Shapes are in numpy / torch order (GGUF stores the reverse, `ne`); the writer and the reader of
the `gguf` package do that reversal themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.checkpoint import CheckpointError
from ..model.config import LfmConfig

ARCH = {"lfm2": "lfm2", "lfm2_moe": "lfm2moe"}  # our model_type -> GGUF general.architecture
MODEL_TYPE = {v: k for k, v in ARCH.items()}
GATING_SIGMOID = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


class GGUFError(CheckpointError):
    """A GGUF file or an export we cannot do; the message names the file or the config key (a ValueError)."""


def require_gguf():
    """The `gguf` package, imported on first use (so `lfm` runs without it until a GGUF file is involved)."""
    try:
        import gguf
    except ImportError:
        raise GGUFError("GGUF support needs the `gguf` package: pip install gguf") from None
    return gguf


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One GGUF tensor: its name, the checkpoint tensor it comes from and the slice of it (`part`)."""

    gguf: str
    hf: str
    shape: tuple[int, ...]  # of the GGUF tensor, numpy order
    keep_f32: bool = False  # norms, the conv kernel, the router and the expert bias stay F32 in quantised files
    part: str = ""  # "" whole tensor; "gate"/"up": the halves of experts.gate_up_proj; "squeeze": conv [D,1,L]->[D,L]


def tensor_specs(c: LfmConfig) -> list[TensorSpec]:
    """Every tensor of the GGUF file for this config, in file order."""
    D, V, hd = c.hidden_size, c.vocab_size, c.head_size
    out = [TensorSpec("token_embd.weight", "model.embed_tokens.weight", (V, D))]
    for i, kind in enumerate(c.layer_types):
        b, m = f"blk.{i}.", f"model.layers.{i}."
        out.append(TensorSpec(b + "attn_norm.weight", m + "operator_norm.weight", (D,), True))
        if kind == "conv":
            out += [
                TensorSpec(b + "shortconv.in_proj.weight", m + "conv.in_proj.weight", (3 * D, D)),
                TensorSpec(b + "shortconv.conv.weight", m + "conv.conv.weight", (D, c.conv_L_cache), True, "squeeze"),
                TensorSpec(b + "shortconv.out_proj.weight", m + "conv.out_proj.weight", (D, D)),
            ]
        else:
            a = m + "self_attn."
            q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
            out += [
                TensorSpec(b + "attn_q.weight", a + "q_proj.weight", (q, D)),
                TensorSpec(b + "attn_k.weight", a + "k_proj.weight", (kv, D)),
                TensorSpec(b + "attn_v.weight", a + "v_proj.weight", (kv, D)),
                TensorSpec(b + "attn_output.weight", a + "out_proj.weight", (D, q)),
                TensorSpec(b + "attn_q_norm.weight", a + "q_layernorm.weight", (hd,), True),
                TensorSpec(b + "attn_k_norm.weight", a + "k_layernorm.weight", (hd,), True),
            ]
        out.append(TensorSpec(b + "ffn_norm.weight", m + "ffn_norm.weight", (D,), True))
        f = m + "feed_forward."
        if c.is_moe_layer(i):
            E, I = c.num_experts, c.moe_intermediate_size
            out += [
                TensorSpec(b + "ffn_gate_inp.weight", f + "gate.weight", (E, D), True),
                TensorSpec(b + "exp_probs_b.bias", f + "expert_bias", (E,), True),
                TensorSpec(b + "ffn_gate_exps.weight", f + "experts.gate_up_proj", (E, I, D), part="gate"),
                TensorSpec(b + "ffn_up_exps.weight", f + "experts.gate_up_proj", (E, I, D), part="up"),
                TensorSpec(b + "ffn_down_exps.weight", f + "experts.down_proj", (E, D, I)),
            ]
        else:
            F = c.ff_dim
            out += [
                TensorSpec(b + "ffn_gate.weight", f + "w1.weight", (F, D)),
                TensorSpec(b + "ffn_up.weight", f + "w3.weight", (F, D)),
                TensorSpec(b + "ffn_down.weight", f + "w2.weight", (D, F)),
            ]
    out.append(TensorSpec("token_embd_norm.weight", "model.embedding_norm.weight", (D,), True))
    if not c.tie_word_embeddings:
        out.append(TensorSpec("output.weight", "lm_head.weight", (V, D)))
    return out


def unsupported(c: LfmConfig) -> str | None:
    """Why llama.cpp's lfm2 / lfm2moe graph cannot run this config (checked against its source), or None.

    - no bias slot on the short-conv projections or kernel;
    - the conv state keeps L_cache-1 columns and asserts L_cache > 1;
    - q and out_proj are created as [hidden, hidden], so heads * head_dim must equal hidden;
    - the MoE always normalises the top-k weights and never reads a routing scale (only 1.0 survives);
    - its hybrid memory aborts (GGML_ASSERT(buffer)) when a model has no attention layer or no conv layer.
    """
    if not c.attn_layers or not c.conv_layers:
        return ("llama.cpp's lfm2 needs at least one conv and one attention layer (its hybrid cache aborts on a "
                f"model of {'only conv' if not c.attn_layers else 'only attention'} layers)")
    if c.conv_bias:
        return "conv_bias=true: llama.cpp's short convolution has no bias tensors"
    if c.conv_L_cache < 2:
        return f"conv_L_cache={c.conv_L_cache}: llama.cpp needs a conv kernel of width 2 or more"
    if c.num_attention_heads * c.head_size != c.hidden_size:
        return (f"head_dim={c.head_size} with {c.num_attention_heads} heads is not hidden_size={c.hidden_size}: "
                "llama.cpp's lfm2 attention assumes heads * head_dim == hidden_size")
    if c.is_moe and not c.norm_topk_prob:
        return "norm_topk_prob=false: llama.cpp's lfm2moe always normalises the top-k expert weights"
    if c.is_moe and c.routed_scaling_factor != 1.0:
        return f"routed_scaling_factor={c.routed_scaling_factor}: llama.cpp's lfm2moe ignores it (only 1.0 survives GGUF)"
    return None
