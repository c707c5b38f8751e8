"""Hugging Face checkpoint directories in and out: resolve a path or Hub id, load safetensors (single file or sharded,
either MoE expert layout, tied or untied head) into any float dtype, and save what transformers loads back.

Loading builds the model on the meta device, allocates it once in the target dtype, then reads each tensor from disk
straight into its parameter: peak memory is the model plus one tensor, never two copies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import ConfigError, LfmConfig
from .lfm2 import LfmForCausalLM, MoE
from .quant import prepare as prepare_quantized
from .quant import quantized_skeleton
from .safetensors_io import Entry, SafetensorsError, read_header, read_into, save_file

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_EXPERT = re.compile(r"^(model\.layers\.\d+\.feed_forward\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint we cannot load; the message names the file or tensor and says what to do."""


def resolve_dtype(dtype: str | torch.dtype | None, config: LfmConfig | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = (config.torch_dtype if config else None) or "float32"
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported (choose float32, bfloat16 or float16)")
    return DTYPES[dtype]


def _is_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s)) and not s.startswith((".", "/", "~"))


def _hub_error(repo: str, err: Exception) -> CheckpointError:
    local = repo.split("/")[-1]
    return CheckpointError(
        f"could not fetch {repo!r} from the Hugging Face Hub ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
        f"On a machine with internet run `hf download {repo} --local-dir ./{local}` (or `huggingface-cli download ...`), "
        f"then pass ./{local} to lfm instead of the Hub id.")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds instead of after the Hub client's retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_fetch(repo: str, fn):
    """Run a huggingface_hub download: from the local cache when it has the files, else online if reachable."""
    try:
        return fn(local_files_only=True)
    except Exception:
        pass
    if not _hub_reachable():
        raise _hub_error(repo, ConnectionError("the Hub is not reachable from this machine")) from None
    try:
        return fn(local_files_only=False)
    except Exception as e:  # unknown repo, gated repo, network failure: all end in the same advice
        raise _hub_error(repo, e) from None


# The demo model that ships inside the package (built by `python -m lfm.train.demo.build`): the default whenever no
# model is named, so every command works offline on a fresh clone.
DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo"


def default_model() -> Path:
    if not (DEMO_MODEL / "config.json").is_file():
        raise CheckpointError(f"the built-in demo model is missing from {DEMO_MODEL}; name a model, or rebuild it "
                              "with: python -m lfm.train.demo.build")
    return DEMO_MODEL


DEMO_NAME = "demo"  # what a user types for the built-in model (`lfm quantize demo -o d4`, `LLM("demo")`)


def model_path_exists(name: str | Path | None) -> bool:
    """Whether a model name is an existing path: a path always wins over a preset or the name `demo`."""
    return name is not None and Path(name).expanduser().exists()


def is_demo_name(name: str | Path | None) -> bool:
    return name is None or (str(name).lower() == DEMO_NAME and not model_path_exists(name))


def resolve(path_or_id: str | Path | None) -> Path:
    """A local checkpoint directory for a path or a Hub id (downloaded with a progress bar, then cached);
    None or `demo` (when no such path exists) means the built-in demo model."""
    if is_demo_name(path_or_id):
        return default_model()
    p = Path(path_or_id).expanduser()
    if p.exists():
        return p
    s = str(path_or_id)
    if not _is_hub_id(s) or s.endswith(".gguf"):
        raise CheckpointError(f"{s}: no such file or directory (and it is not a Hugging Face Hub id like 'LiquidAI/LFM2.5-350M')")
    from huggingface_hub import snapshot_download

    return Path(_hub_fetch(s, lambda **kw: snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.jinja"], **kw)))


def resolve_config(path_or_id: str | Path) -> LfmConfig:
    """Only config.json: enough for `lfm info`, without downloading any weights."""
    if is_demo_name(path_or_id):
        return LfmConfig.from_file(default_model() / "config.json")
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return LfmConfig.from_file(p / "config.json")
    if p.is_file() and p.suffix == ".json":
        return LfmConfig.from_file(p)
    if p.is_file() and p.suffix == ".gguf":
        raise CheckpointError(f"{p}: a GGUF file (read it with lfm.loading.resolve_config)")
    s = str(path_or_id)
    if not _is_hub_id(s):
        raise CheckpointError(f"{s}: no such file or directory")
    from huggingface_hub import hf_hub_download

    return LfmConfig.from_file(_hub_fetch(s, lambda **kw: hf_hub_download(s, "config.json", **kw)))


def weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(wm.values()))
            if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):  # JSONDecodeError / UnicodeDecodeError: ValueError
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object of tensor "
                                  "name -> file name in this directory)") from None
        missing = [n for n in names if not (d / n).exists()]
        if missing:
            raise CheckpointError(f"{d / missing[0]}: listed in model.safetensors.index.json but not present")
        return [d / n for n in names]
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"]
    found = sorted(d.glob("*.safetensors"))
    if found:
        return found
    pickled = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")] if d.is_dir() else []
    hint = f" ({pickled[0]} is a pickle file, which lfm never loads: convert it to safetensors)" if pickled else ""
    raise CheckpointError(f"{d}: no *.safetensors weights found{hint}")


def load_model(path: str | Path, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
               config: LfmConfig | None = None) -> LfmForCausalLM:
    """The torch.nn.Module of a checkpoint directory or Hub id, in eval mode (`.gguf` files: `lfm.load_model`,
    which dispatches to lfm.gguf; this package does not know that format)."""
    if str(path).endswith(".gguf"):
        raise CheckpointError(f"{path}: a GGUF file: load it with lfm.load_model (lfm.loading)")
    d = resolve(path)
    if d.is_file():
        raise CheckpointError(f"{d}: expected a checkpoint directory (config.json + *.safetensors)")
    try:
        config = config or LfmConfig.from_file(d / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    dt = resolve_dtype(dtype, config)
    headers = []
    for path_ in weight_files(d):  # every header is read and checked before anything large is allocated
        try:
            headers.append((path_, read_header(path_)[0]))
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
    skeleton = _skeleton(config, dt)
    shapes = _targets(skeleton)
    if config.tie_word_embeddings and not quantization_of(config):
        shapes.pop("lm_head.weight", None)  # tied after allocation (to_empty would give each use its own copy)
    _place(d, config, headers, shapes)  # names and shapes against the meta model: nothing read yet
    model = _materialize(skeleton, config, device)
    _place(d, config, headers, _targets(model), read=True)
    prepare_quantized(model)
    return model.eval()


def _place(d: Path, config: LfmConfig, headers: list[tuple[Path, dict[str, Entry]]], targets: dict[str, torch.Tensor],
           read: bool = False) -> None:
    """Map every file tensor to (a slice of) a model tensor and check that the files fill the model exactly: each
    tensor's shape, nothing unexpected, nothing missing, nothing twice. Run first on the meta model (shapes only,
    so a config that does not match its weights fails before allocation), then with `read` to fill the real one."""
    filled: dict[str, int] = {}
    unexpected: list[str] = []
    I = config.moe_intermediate_size
    for path_, entries in headers:
        with open(path_, "rb") if read else _nothing() as f:
            for name, e in entries.items():
                m = _EXPERT.match(name)
                if m:  # published layout: one tensor per expert -> a slice of the stacked parameter
                    prefix, ex, w = m.group(1), int(m.group(2)), m.group(3)
                    key = f"{prefix}.{'down_proj' if w == 'w2' else 'gate_up_proj'}"
                    if key not in targets or ex >= targets[key].shape[0]:
                        unexpected.append(name)
                        continue
                    t = targets[key][ex]
                    t = t if w == "w2" else (t[:I] if w == "w1" else t[I:])
                elif name == "lm_head.weight" and name not in targets:
                    continue  # some exporters write the tied head too; the embedding is the one we keep
                elif name in targets:
                    key, t = name, targets[name]
                else:
                    unexpected.append(name)
                    continue
                _check(path_, e, t)
                if read:
                    _read(f, path_, e, t)
                filled[key] = filled.get(key, 0) + t.numel()
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{d}: unexpected tensor {unexpected[0]!r}{more}: is this a {config.model_type} checkpoint of this shape?")
    for key, t in targets.items():
        if filled.get(key, 0) < t.numel():
            raise CheckpointError(f"{d}: tensor {key!r} is missing from the checkpoint")
        if filled[key] > t.numel():
            raise CheckpointError(f"{d}: tensor {key!r} appears more than once")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def quantization_of(config: LfmConfig) -> tuple[int, int] | None:
    """(bits, group size) of a checkpoint quantized by `lfm quantize`, else None."""
    q = config.extra.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "lfm" or q.get("bits") not in (4, 8):
        raise CheckpointError(f"quantization_config {q} is not one lfm can load (expected quant_method 'lfm', bits 4 or 8)")
    return int(q["bits"]), int(q.get("group_size", 64))


def _check(path: Path, e: Entry, t: torch.Tensor) -> None:
    if tuple(t.shape) != e.shape:
        raise CheckpointError(f"{path}: tensor {e.name!r} has shape {list(e.shape)}, the config implies {list(t.shape)}")
    if not e.dtype.is_floating_point and e.dtype != t.dtype:
        raise CheckpointError(f"{path}: tensor {e.name!r} is {e.dtype}, expected floating point weights")


def _read(f, path: Path, e: Entry, t: torch.Tensor) -> None:
    try:
        read_into(f, e, t)
    except SafetensorsError as err:
        raise CheckpointError(f"{path}: {err}") from None


def empty_model(config: LfmConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> LfmForCausalLM:
    """Allocated once, directly in `dtype` on `device`, values undefined (to be loaded or initialised)."""
    return _materialize(_skeleton(config, dtype), config, device)


def _skeleton(config: LfmConfig, dtype: torch.dtype) -> LfmForCausalLM:
    """The model on the meta device: every name and shape, no memory (the head is tied by `_materialize`)."""
    quant = quantization_of(config)
    with torch.device("meta"):
        model = LfmForCausalLM(config).to(dtype)
        if quant:
            quantized_skeleton(model, *quant)
    for mod in model.modules():  # the selection bias stays float32, as in the reference
        if isinstance(mod, MoE) and mod.expert_bias is not None:
            mod.expert_bias = mod.expert_bias.float()
    return model


def _materialize(model: LfmForCausalLM, config: LfmConfig, device: str | torch.device) -> LfmForCausalLM:
    model.to_empty(device=device)
    if config.tie_word_embeddings and not quantization_of(config):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _targets(model: LfmForCausalLM) -> dict[str, torch.Tensor]:
    out = {k: v.data for k, v in model.named_parameters()}
    out.update({k: v for k, v in model.named_buffers()})
    if getattr(model.lm_head, "weight", 0) is getattr(model.model.embed_tokens, "weight", None):  # tied: stored once
        out.pop("lm_head.weight", None)
    return out


def state_for_saving(model: LfmForCausalLM, expert_layout: str = "per_expert") -> dict[str, torch.Tensor]:
    """Checkpoint tensors in file order; experts split per expert (the published layout) unless 'stacked'."""
    I = model.config.moe_intermediate_size
    out: dict[str, torch.Tensor] = {}
    for k, t in _targets(model).items():
        if expert_layout == "per_expert" and k.endswith("experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.w1.weight"] = t[e, :I]
                out[f"{base}{e}.w3.weight"] = t[e, I:]
        elif expert_layout == "per_expert" and k.endswith("experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.w2.weight"] = t[e]
        else:
            out[k] = t
    return out


def save_model(model: LfmForCausalLM, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
               max_shard_bytes: int = 4 << 30, expert_layout: str = "per_expert") -> Path:
    """Write config.json, safetensors (sharded with an index above `max_shard_bytes`) and the tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = state_for_saving(model, expert_layout)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", {"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / name, {"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    cfg = model.config
    cfg.torch_dtype = {v: k for k, v in DTYPES.items() if k in ("float32", "bfloat16", "float16")}[model.dtype]
    cfg.save(out)
    if tokenizer_dir is not None:
        for name in _SIDE_FILES:
            src = Path(tokenizer_dir, name)
            if src.exists() and src.resolve() != (out / name).resolve():
                (out / name).write_bytes(src.read_bytes())
    if not (out / "generation_config.json").exists():
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out
