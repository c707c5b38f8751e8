"""Load an `lfm2` / `lfm2moe` GGUF file (ours or llama.cpp's) into our model and tokenizer.

Every tensor is dequantised (F32/F16/BF16, Q8_0, Q4_0/1, Q5_0/1, the K-quants: whatever `gguf.quants` can
dequantise) into the requested float dtype, one tensor at a time, straight into the model allocated once. On the CPU,
a linear weight stored as Q4_0 or Q4_1 is kept quantised instead (`keep_quantized`): both are blocks of 32 inputs with
an affine dequantisation, exactly an `Int4Linear` with group size 32, filled from the blocks' bytes. Every way
a file can be wrong (not GGUF, truncated, another architecture, bad metadata, missing or misshapen tensors) ends in
one `GGUFError` naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model.checkpoint import CheckpointError, empty_model, resolve_dtype
from ..model.config import MAX_SIZES, ConfigError, LfmConfig
from ..model.lfm2 import LfmForCausalLM
from ..model.quant import Int4Linear, QuantExperts, pack_nibbles, prepare
from ..text.tokenizer import Tokenizer
from .gguf_file import GGUFFile
from .mapping import GATING_SIGMOID, MODEL_TYPE, GGUFError, tensor_specs
from .vocab import tokenizer_from_metadata
from .writer import _SAMPLING


def config_from_gguf(g: GGUFFile) -> LfmConfig:
    """Our config from llama.cpp's metadata; a conv layer is a layer whose head_count_kv is 0 (spec §6)."""
    try:
        return _config(g)
    except GGUFError:
        raise
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:  # a key of the wrong type or value
        raise GGUFError(f"{g.path}: invalid model metadata ({type(e).__name__}: {e})") from None


def _int(g: GGUFFile, name: str, default: Any = ..., arch: bool = True, allow_list: bool = False) -> Any:
    """An integer metadata value (or, with `allow_list`, a per-layer list of them); anything else names the key."""
    v = g.key(name, default, arch)
    ok = (lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0)
    if v is None and default is None or ok(v) or allow_list and isinstance(v, list) and v and all(map(ok, v)):
        return v
    key = f"{g.arch}.{name}" if arch else name
    raise GGUFError(f"{g.path}: invalid model metadata: {key} = {str(v)[:80]!r} is not a non-negative integer"
                    + (" (or a list of them)" if allow_list else ""))


def _float(g: GGUFFile, name: str, default: Any = ...) -> float:
    v = g.key(name, default)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    raise GGUFError(f"{g.path}: invalid model metadata: {g.arch}.{name} = {str(v)[:80]!r} is not a finite number")


def _config(g: GGUFFile) -> LfmConfig:
    n = _int(g, "block_count")
    if not 0 < n <= MAX_SIZES["num_hidden_layers"]:  # before per-layer lists are built from it
        raise GGUFError(f"{g.path}: invalid model metadata: {g.arch}.block_count = {n} is out of range "
                        f"(lfm accepts 1..{MAX_SIZES['num_hidden_layers']})")
    heads = _int(g, "attention.head_count", allow_list=True)
    heads = max(heads) if isinstance(heads, list) else heads
    kv = _int(g, "attention.head_count_kv", heads, allow_list=True)
    kv = kv if isinstance(kv, list) else [kv] * n
    if len(kv) != n:
        raise GGUFError(f"{g.path}: attention.head_count_kv has {len(kv)} entries for {n} layers")
    attn_kv = {k for k in kv if k}
    if len(attn_kv) > 1:
        raise GGUFError(f"{g.path}: attention layers with different kv head counts {sorted(attn_kv)} are not supported")
    if not heads:
        raise GGUFError(f"{g.path}: invalid model metadata: {g.arch}.attention.head_count is 0")
    D = _int(g, "embedding_length")
    ff = _int(g, "feed_forward_length", 0, allow_list=True)
    ff = max(ff) if isinstance(ff, list) else ff
    hd = _int(g, "attention.key_length", D // heads)
    tokens = g.key("tokenizer.ggml.tokens", [], arch=False)
    emb = g.tensors.get("token_embd.weight")
    vocab = _int(g, "vocab_size", None) or (emb.shape[0] if emb else len(tokens))
    emb_type = emb.type if emb else "F32"
    d: dict[str, Any] = dict(
        model_type=MODEL_TYPE[g.arch], vocab_size=int(vocab), hidden_size=D, num_hidden_layers=n,
        num_attention_heads=heads, num_key_value_heads=attn_kv.pop() if attn_kv else heads,
        layer_types=["conv" if k == 0 else "full_attention" for k in kv], intermediate_size=ff or 1,
        block_auto_adjust_ff_dim=False, head_dim=hd if hd * heads != D else None,
        conv_L_cache=_int(g, "shortconv.l_cache"), norm_eps=_float(g, "attention.layer_norm_rms_epsilon"),
        rope_theta=_float(g, "rope.freq_base", 10000.0), max_position_embeddings=_int(g, "context_length"),
        tie_word_embeddings="output.weight" not in g.tensors,
        torch_dtype={"F32": "float32", "F16": "float16"}.get(emb_type, "bfloat16"),
    )
    for ours, theirs in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        d[ours] = g.key(f"tokenizer.ggml.{theirs}_token_id", None, arch=False)
    scaling = g.key("rope.scaling.type", "none")
    if scaling not in ("none", "linear") or _float(g, "rope.scaling.factor", 1.0) not in (0.0, 1.0):
        raise GGUFError(f"{g.path}: RoPE scaling {scaling!r} is not supported (lfm runs plain RoPE)")
    if g.arch == "lfm2moe":
        gating = _int(g, "expert_gating_func", GATING_SIGMOID)
        if gating != GATING_SIGMOID:
            raise GGUFError(f"{g.path}: expert_gating_func {gating} is not supported (LFM2-MoE routes with sigmoid, 2)")
        d.update(moe_intermediate_size=_int(g, "expert_feed_forward_length"), num_experts=_int(g, "expert_count"),
                 num_experts_per_tok=_int(g, "expert_used_count"),
                 num_dense_layers=_int(g, "leading_dense_block_count", 0), use_expert_bias=True,
                 norm_topk_prob=True, routed_scaling_factor=1.0)
    try:
        return LfmConfig.from_dict(d)
    except ConfigError as e:
        raise GGUFError(f"{g.path}: {e}") from None


_INT4_TYPES = ("Q4_0", "Q4_1")  # GGUF block types an Int4Linear(group_size=32) holds exactly


def _int4_from_blocks(raw: np.ndarray, qtype: str, out_features: int, in_features: int,
                      dtype: torch.dtype) -> Int4Linear:
    """An Int4Linear(group_size=32) holding a Q4_0 / Q4_1 tensor's blocks as they are (no float weight in between).

    A Q4_0 block is fp16 d, then 16 bytes of nibbles: byte j holds element j (low nibble) and element j + 16 (high),
    w = d * (q - 8), so scale = d, zero = 0. A Q4_1 block puts fp16 m after d, w = d * q + m, so scale = d and
    zero = m + 8 * d (ours is w = (q - 8) * scale + zero). Our storage pairs adjacent columns instead: repacked.
    """
    m = Int4Linear(in_features, out_features, 32, dtype)
    q, sc, zero = _int4_blocks(raw, qtype, out_features, in_features)
    m.qweight, m.scales, m.zeros = q, sc.to(dtype), zero.to(dtype)
    return m


def _int4_blocks(raw: np.ndarray, qtype: str, rows: int, in_features: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 blocks of `rows` rows -> our int4 g32 storage: packed nibbles [rows, K / 2], float32 scales and
    zeros [rows, K / 32] (see _int4_from_blocks for the two layouts)."""
    head = 2 if qtype == "Q4_0" else 4
    blocks = np.ascontiguousarray(raw).reshape(rows, in_features // 32, head + 16)
    d = torch.from_numpy(np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32))
    qs = torch.from_numpy(np.ascontiguousarray(blocks[..., head:]))
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(rows, in_features)  # element order within each block
    if qtype == "Q4_0":
        zero = torch.zeros_like(d)
    else:
        zero = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)) + 8 * d
    return pack_nibbles(q), d, zero


def _keep_experts(g: GGUFFile, model: LfmForCausalLM, specs: list) -> set[str]:
    """MoE layers whose three expert tensors are all Q4_0 / Q4_1: a QuantExperts(group 32) holding their blocks as they
    are (no float copy of the experts, ~4.5 GB less at LFM2-8B-A1B's size). Returns the GGUF tensors used."""
    c = model.config
    E, I, D = c.num_experts, c.moe_intermediate_size, c.hidden_size
    by_module: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec.hf.endswith("experts.gate_up_proj") or spec.hf.endswith("experts.down_proj"):
            by_module.setdefault(spec.hf.rsplit(".", 1)[0], {})[spec.part or "down"] = spec
    used: set[str] = set()
    if D % 32 or I % 32:
        return used
    for name, parts in by_module.items():
        if set(parts) != {"gate", "up", "down"} or any(g.tensors[p.gguf].type not in _INT4_TYPES for p in parts.values()):
            continue
        dtype = model.model.embedding_norm.weight.dtype
        qe = QuantExperts(E, D, I, 4, 32, dtype)
        if qe.gate_up.bits != 4 or qe.down.bits != 4:
            continue
        for part, (st, rows_off, K) in {"gate": (qe.gate_up, 0, D), "up": (qe.gate_up, I, D),
                                        "down": (qe.down, 0, I)}.items():
            spec = parts[part]
            N = I if part != "down" else D
            q, sc, z = _int4_blocks(g.raw(spec.gguf), g.tensors[spec.gguf].type, E * N, K)
            st.qweight[:, rows_off:rows_off + N] = q.view(E, N, K // 2)
            st.scales[:, rows_off:rows_off + N] = sc.view(E, N, K // 32).to(dtype)
            st.zeros[:, rows_off:rows_off + N] = z.view(E, N, K // 32).to(dtype)
            used.add(spec.gguf)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, qe)
    return used


def _int4_target(g: GGUFFile, model: LfmForCausalLM, spec) -> str | None:
    """The name of the nn.Linear a Q4_0 / Q4_1 GGUF tensor can become an Int4Linear for, or None (dequantise it)."""
    t = g.tensors[spec.gguf]
    if t.type not in _INT4_TYPES or spec.part or spec.keep_f32 or len(spec.shape) != 2 or not spec.hf.endswith(".weight"):
        return None
    name = spec.hf[:-len(".weight")]
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    if type(mod) is not nn.Linear or mod.bias is not None or mod.in_features % 32 \
            or (mod.out_features, mod.in_features) != spec.shape:
        return None
    if mod.weight is model.model.embed_tokens.weight:  # a head tied to the embedding stays with it
        return None
    return name


def _check_shapes(g: GGUFFile, c: LfmConfig) -> None:
    """The tensor table against the metadata: a file whose metadata promises more than its tensors hold fails here,
    in one line naming the tensor, before anything of the metadata's size is allocated."""
    for spec in tensor_specs(c):
        if spec.gguf not in g.tensors:
            raise GGUFError(f"{g.path}: tensor {spec.gguf!r} is missing (a {g.arch} file of this shape needs it)")
        shape = g.tensors[spec.gguf].shape
        if tuple(shape) != spec.shape:
            raise GGUFError(f"{g.path}: tensor {spec.gguf!r} has shape {list(shape)}, the metadata implies {list(spec.shape)}")


def _fill(g: GGUFFile, model: LfmForCausalLM, keep_quantized: bool = False) -> None:
    """Dequantise each GGUF tensor straight into its place in the model (or, with `keep_quantized`, swap a Q4_0 / Q4_1
    linear for an Int4Linear holding its blocks); every file tensor must be used."""
    c = model.config
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    I = c.moe_intermediate_size
    used: set[str] = _keep_experts(g, model, tensor_specs(c)) if keep_quantized and c.is_moe else set()
    for spec in tensor_specs(c):  # presence and shapes were checked by _check_shapes before allocation
        if spec.gguf in used:
            continue
        target = _int4_target(g, model, spec) if keep_quantized else None
        if target is not None:
            lin = model.get_submodule(target)
            new = _int4_from_blocks(g.raw(spec.gguf), g.tensors[spec.gguf].type, lin.out_features, lin.in_features,
                                    lin.weight.dtype)
            parent, _, child = target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            used.add(spec.gguf)
            continue
        a = g.tensor(spec.gguf)
        dst = params[spec.hf].data
        if spec.part == "gate":
            dst = dst[:, :I]
        elif spec.part == "up":
            dst = dst[:, I:]
        dst.copy_(a.view(dst.shape))
        used.add(spec.gguf)
    extra = sorted(set(g.tensors) - used)
    if extra:
        raise GGUFError(f"{g.path}: unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    if keep_quantized:
        prepare(model)


def generation_defaults(g: GGUFFile) -> dict[str, Any]:
    """What a checkpoint's generation_config.json would say: special ids and any recommended sampling."""
    out: dict[str, Any] = {}
    for ours, theirs in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        v = g.key(f"tokenizer.ggml.{theirs}_token_id", None, arch=False)
        if v is not None:
            out[ours] = int(v)
    for ours, (theirs, cast) in _SAMPLING.items():
        v = g.key(f"general.sampling.{theirs}", None, arch=False)
        if v is not None:
            out[ours] = cast(v)
    return out


def _model(g: GGUFFile, dtype: str | torch.dtype | None, device: str | torch.device,
           keep_quantized: bool = True) -> LfmForCausalLM:
    c = config_from_gguf(g)
    try:
        dt = resolve_dtype(dtype, c)
    except CheckpointError as e:
        raise GGUFError(str(e)) from None
    _check_shapes(g, c)  # every tensor present with its shape before the model is allocated
    model = empty_model(c, dt, device)
    # the int4 kernels are PyTorch's CPU ones: on any other device everything is dequantised
    _fill(g, model, keep_quantized and torch.device(device).type == "cpu")
    return model.eval()


def load_gguf_model(path: str | Path, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
                    keep_quantized: bool = True) -> LfmForCausalLM:
    """The model of a GGUF file, dequantised into `dtype` ("auto": F32 -> float32, F16 -> float16, else bfloat16);
    with `keep_quantized` on the CPU, Q4_0 / Q4_1 linear weights become Int4Linear layers (scales in `dtype`)."""
    return _model(GGUFFile(path), dtype, device, keep_quantized)


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer (vocabulary, merges, special ids, chat template) embedded in a GGUF file."""
    g = GGUFFile(path)
    return tokenizer_from_metadata(g.meta, str(g.path))


def load_gguf(path: str | Path, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
              keep_quantized: bool = True) -> tuple[LfmForCausalLM, Tokenizer, dict[str, Any]]:
    """(model, tokenizer, generation defaults) of a GGUF file, parsing its header once (see `load_gguf_model`)."""
    g = GGUFFile(path)
    tok = tokenizer_from_metadata(g.meta, str(g.path))
    return _model(g, dtype, device, keep_quantized), tok, generation_defaults(g)
