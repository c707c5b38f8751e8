"""Export a checkpoint (directory, Hub id or in-memory model) to a GGUF file that llama.cpp runs.

Streams: every tensor's type and size is declared first, then each tensor is read from the safetensors file (or
the live model), converted and written before the next is touched, so an 8B export holds one tensor at a time.
The file is written under a temporary name and renamed when complete; a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.checkpoint import CheckpointError, resolve, weight_files
from ..model.config import ConfigError, LfmConfig
from ..model.lfm2 import LfmForCausalLM
from ..model.safetensors_io import Entry, SafetensorsError, read_header, read_tensor
from ..text.tokenizer import Tokenizer, TokenizerError
from .mapping import ARCH, GATING_SIGMOID, GGUFError, TensorSpec, require_gguf, tensor_specs, unsupported
from .vocab import tokenizer_metadata

# --type name -> (GGMLQuantizationType name, LlamaFileType value for general.file_type)
TYPES: dict[str, tuple[str, int]] = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7),
                                     "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3), "q5_0": ("Q5_0", 8), "q5_1": ("Q5_1", 9)}
_SAMPLING = {"temperature": ("temp", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
             "min_p": ("min_p", float), "repetition_penalty": ("penalty_repeat", float)}


# ---- where tensors come from ---------------------------------------------------------------------------------------
class Source:
    """Checkpoint tensors by name: read from disk on demand (any shard, any expert layout) or taken from a model."""

    def __init__(self, names: set[str], get: Callable[[str], torch.Tensor]) -> None:
        self.names, self._get = names, get

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str, where: str) -> torch.Tensor:
        if name not in self.names:
            raise GGUFError(f"{where}: tensor {name!r} is missing from the checkpoint")
        return self._get(name)

    @classmethod
    def from_dir(cls, d: Path) -> Source:
        index: dict[str, tuple[Path, Entry]] = {}
        try:
            for f in weight_files(d):
                entries, _ = read_header(f)
                index.update({n: (f, e) for n, e in entries.items()})
        except SafetensorsError as e:
            raise GGUFError(str(e)) from None

        def get(name: str) -> torch.Tensor:
            path, e = index[name]
            try:
                with open(path, "rb") as f:
                    return read_tensor(f, e)
            except SafetensorsError as err:
                raise GGUFError(f"{path}: {err}") from None

        return cls(set(index), get)

    @classmethod
    def from_model(cls, model: LfmForCausalLM) -> Source:
        state = {k: v.detach() for k, v in model.named_parameters()}
        state.update(dict(model.named_buffers()))
        return cls(set(state), state.__getitem__)


def fetch(src: Source, spec: TensorSpec, c: LfmConfig, where: str) -> torch.Tensor:
    """The GGUF tensor `spec` as a torch tensor (checkpoint dtype), checked against the shape the config implies."""
    base = spec.hf.rsplit(".", 1)[0]  # ...feed_forward.experts
    per_expert = lambda w: torch.stack([src.get(f"{base}.{e}.{w}.weight", where) for e in range(c.num_experts)])  # noqa: E731
    if spec.part in ("gate", "up") and spec.hf in src:
        t = src.get(spec.hf, where)
        I = c.moe_intermediate_size
        t = t[:, :I] if spec.part == "gate" else t[:, I:]
    elif spec.part in ("gate", "up"):  # the published layout: one tensor per expert
        t = per_expert("w1" if spec.part == "gate" else "w3")
    elif spec.hf.endswith("experts.down_proj") and spec.hf not in src:
        t = per_expert("w2")
    elif spec.hf.endswith("expert_bias") and not c.use_expert_bias:
        t = torch.zeros(spec.shape)  # llama.cpp requires the bias; zeros select exactly as no bias does
    else:
        t = src.get(spec.hf, where)
    if spec.part == "squeeze" and t.dim() == 3 and t.shape[1] == 1:
        t = t[:, 0]
    if tuple(t.shape) != spec.shape:
        raise GGUFError(f"{where}: tensor {spec.hf!r} has shape {list(t.shape)}, the config implies {list(spec.shape)}")
    if not t.dtype.is_floating_point:
        raise GGUFError(f"{where}: tensor {spec.hf!r} is {t.dtype}, expected floating point weights")
    return t


# ---- types -----------------------------------------------------------------------------------------------------------
def tensor_type(spec: TensorSpec, qname: str) -> str:
    """The GGML type one tensor gets in a file of type `qname` (llama.cpp's converter rules)."""
    gguf = require_gguf()
    if spec.keep_f32 or len(spec.shape) == 1:
        return "F32"
    if qname in ("F32", "F16", "BF16"):
        return qname
    if spec.gguf in ("token_embd.weight", "output.weight") and qname != "Q8_0":
        qname = "Q8_0"  # as llama-quantize: the embedding / head keep more bits in 4- and 5-bit files
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qname]][0]
    return qname if spec.shape[-1] % block == 0 else "F16"  # rows that do not fill whole blocks: F16, as llama.cpp


def _nbytes(shape: tuple[int, ...], qname: str) -> int:
    gguf = require_gguf()
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qname]]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def encode(t: torch.Tensor, qname: str) -> np.ndarray:
    """One tensor in GGUF bytes (F32/F16 as floats, the rest as the quantiser's uint8 blocks)."""
    if qname == "F32":
        return t.to(torch.float32).contiguous().numpy()
    if qname == "F16":
        return t.to(torch.float16).contiguous().numpy()
    if qname == "BF16":  # torch rounds to nearest even, as ggml does
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    gguf = require_gguf()
    return gguf.quants.quantize(t.to(torch.float32).contiguous().numpy(), gguf.GGMLQuantizationType[qname])


# ---- metadata ------------------------------------------------------------------------------------------------------
def model_metadata(c: LfmConfig) -> dict[str, Any]:
    """The `{arch}.*` keys llama.cpp reads for lfm2 / lfm2moe (spec §6)."""
    a = ARCH[c.model_type]
    kv_heads = [c.num_key_value_heads if t == "full_attention" else 0 for t in c.layer_types]
    meta: dict[str, Any] = {
        f"{a}.block_count": c.num_hidden_layers, f"{a}.context_length": c.max_position_embeddings,
        f"{a}.embedding_length": c.hidden_size, f"{a}.feed_forward_length": c.ff_dim,
        f"{a}.attention.head_count": c.num_attention_heads, f"{a}.attention.head_count_kv": kv_heads,
        f"{a}.attention.key_length": c.head_size, f"{a}.attention.value_length": c.head_size,
        f"{a}.rope.dimension_count": c.head_size, f"{a}.rope.freq_base": float(c.rope_theta),
        f"{a}.attention.layer_norm_rms_epsilon": float(c.norm_eps), f"{a}.vocab_size": c.vocab_size,
        f"{a}.shortconv.l_cache": c.conv_L_cache,
    }
    if c.is_moe:
        meta.update({f"{a}.expert_count": c.num_experts, f"{a}.expert_used_count": c.num_experts_per_tok,
                     f"{a}.expert_feed_forward_length": c.moe_intermediate_size,
                     f"{a}.leading_dense_block_count": c.num_dense_layers,
                     f"{a}.expert_gating_func": GATING_SIGMOID})
    return meta


def _add(w: Any, key: str, val: Any) -> None:
    """Typed GGUF values: counts uint32, reals float32, lists as arrays (ints int32, strings string)."""
    if isinstance(val, bool):
        w.add_bool(key, val)
    elif isinstance(val, int):
        w.add_int32(key, val) if key.endswith(".top_k") else w.add_uint32(key, val)
    elif isinstance(val, float):
        w.add_float32(key, val)
    elif isinstance(val, str):
        w.add_string(key, val)
    else:
        w.add_array(key, list(val))


# ---- the export ----------------------------------------------------------------------------------------------------
def _open_source(model: str | Path | LfmForCausalLM, tokenizer: Tokenizer | str | Path | None):
    """(config, raw tensor source, tokenizer, generation_config, name, where) for a directory, Hub id or model."""
    gen: dict[str, Any] = {}
    if isinstance(model, LfmForCausalLM):
        c, src, where, name, tok_dir = model.config, Source.from_model(model), "model", "lfm", None
    else:
        if str(model).endswith(".gguf"):
            raise GGUFError(f"{model}: already a GGUF file (export reads a checkpoint directory or Hub id)")
        try:
            d = resolve(model)
            if not d.is_dir():
                raise GGUFError(f"{d}: expected a checkpoint directory (config.json + *.safetensors)")
            c = LfmConfig.from_file(d / "config.json")
            src = Source.from_dir(d)
        except (CheckpointError, ConfigError) as e:
            raise GGUFError(str(e)) from None
        where, name, tok_dir = str(d), d.name, d
        if (d / "generation_config.json").is_file():
            try:
                gen = json.loads((d / "generation_config.json").read_text())
            except json.JSONDecodeError:
                raise GGUFError(f"{d / 'generation_config.json'} is not valid JSON") from None
    if not isinstance(tokenizer, Tokenizer):
        tdir = tokenizer if tokenizer is not None else tok_dir
        if tdir is None or not Path(tdir, "tokenizer.json").is_file():
            raise GGUFError(f"{tdir or where}: no tokenizer.json; a GGUF file must hold the tokenizer "
                            "(pass the tokenizer directory)")
        try:
            tokenizer = Tokenizer.from_dir(tdir)
        except TokenizerError as e:
            raise GGUFError(str(e)) from None
    return c, src, tokenizer, gen, name, where


def export_gguf(model: str | Path | LfmForCausalLM, out: str | Path, type: str = "f16",
                tokenizer: Tokenizer | str | Path | None = None, progress: bool = True) -> Path:
    """Write `model` (checkpoint directory, Hub id or in-memory model) as a GGUF file of `type` (see TYPES)."""
    if type.lower() not in TYPES:
        raise GGUFError(f"GGUF type {type!r} is not supported (choose one of {', '.join(TYPES)})")
    qname, file_type = TYPES[type.lower()]
    gguf = require_gguf()
    c, src, tok, gen, name, where = _open_source(model, tokenizer)
    why = unsupported(c)
    if why:
        raise GGUFError(f"{where}: cannot export to GGUF: {why}")
    out = Path(out)
    if not out.parent.is_dir():
        raise GGUFError(f"{out.parent}: output directory does not exist")
    specs = tensor_specs(c)
    types = [tensor_type(s, qname) for s in specs]
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(tmp, ARCH[c.model_type])
    try:
        meta: dict[str, Any] = {"general.name": name, "general.file_type": file_type,
                                "general.quantization_version": gguf.GGML_QUANT_VERSION}
        meta.update(model_metadata(c))
        meta.update(tokenizer_metadata(tok, c.vocab_size))
        for key, (gkey, cast) in _SAMPLING.items():
            if gen.get(key) is not None:
                meta[f"general.sampling.{gkey}"] = cast(gen[key])
        for k, v in meta.items():
            _add(w, k, v)
        sizes = [_nbytes(s.shape, q) for s, q in zip(specs, types)]
        for s, q, n in zip(specs, types, sizes):
            w.add_tensor_info(s.gguf, s.shape, np.dtype(np.float32), n, raw_dtype=gguf.GGMLQuantizationType[q])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        from tqdm import tqdm

        with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"GGUF {type.lower()}", file=sys.stderr,
                  disable=not progress) as bar:
            for s, q, n in zip(specs, types, sizes):
                data = encode(fetch(src, s, c, where), q)
                if data.nbytes != n:  # a quantiser that disagrees with the declared size would corrupt the file
                    raise GGUFError(f"{s.gguf}: encoded to {data.nbytes} bytes, expected {n}")
                w.write_tensor_data(data)
                bar.update(n)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
