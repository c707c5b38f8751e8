"""LoRA as a module swap on our one network, stored in PEFT's adapter format.

Why PEFT's format: an adapter trained here must load with `peft.PeftModel.from_pretrained` on transformers'
`Lfm2ForCausalLM` (and vice versa), so our module names are the HF names and the file keys are PEFT's:
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (PEFT strips the adapter name when saving).
Only dense `nn.Linear`s are targets: the depthwise conv kernel is tiny and shape-sensitive, the MoE experts are
stacked Parameters, the router decides routing, and `lm_head` is tied to the embedding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

LORA_TARGETS = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "w1", "w2", "w3")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel(LoraModel(hf_model)) puts in front of the HF module path


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: base(x) + B(A(drop(x))) * alpha / r.

    A gets PEFT's kaiming-uniform init and B starts at zero, so a fresh adapter leaves the model's outputs unchanged.
    Over a bf16/fp16 base the adapter is kept in float32 (PEFT's default too): small updates survive the optimizer.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.base = base
        self.base.requires_grad_(False)
        dtype = torch.float32 if base.weight.dtype in (torch.bfloat16, torch.float16) else base.weight.dtype
        kw = dict(device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.drop: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.lora_B(self.lora_A(self.drop(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return self.base(x) + lora.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling in float32 (merging in bf16 would round the small update away)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    # PEFT's rule for a list of names: the full name, or a suffix after a dot (for plain names: the last component)
    return any(name == t or name.endswith("." + t) for t in targets)


def _target_linears(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and _matches(n, targets)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoraLinear by module name (the name PEFT keys are built from)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Freeze the whole model, then wrap every targeted `nn.Linear` in a `LoraLinear`; returns the wrapped names.

    Exact `nn.Linear` only: quantized linears and existing `LoraLinear`s are left alone, so a second call adds nothing.
    """
    model.requires_grad_(False)
    found = _target_linears(model, tuple(cfg.targets))
    for name, lin in found:
        _swap(model, name, LoraLinear(lin, cfg.r, cfg.alpha, cfg.dropout))
    return [n for n, _ in found]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved key names (contiguous CPU copies, ready for `save_file`)."""
    out = {}
    for name, m in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            out[f"{PREFIX}{name}.{part}.weight"] = getattr(m, part).weight.detach().cpu().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, cfg: LoraConfig,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json, the two files `PeftModel.from_pretrained` reads."""
    tensors = lora_state_dict(model)
    if not tensors:
        raise ValueError("model has no LoRA layers to save; call apply_lora first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS_NAME, {"format": "pt"})
    config = {  # a subset of what PEFT's own save_pretrained writes; absent keys take PEFT's defaults
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets), "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _read_config(d: Path) -> LoraConfig:
    """Parse adapter_config.json, refusing every PEFT option that would change the maths we implement."""
    path = d / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"no {CONFIG_NAME} in {d}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        got = raw.get("peft_type") if isinstance(raw, dict) else raw
        raise ValueError(f"{path}: peft_type must be 'LORA', got {got!r}")
    plain = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
             "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
             "exclude_modules": None, "target_parameters": None, "layer_replication": None}
    for key, ok in plain.items():
        if raw.get(key) not in (None, ok, [], {}):
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported (only plain LoRA)")
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{path}: target_modules must be a list of module names, got {targets!r}")
    r, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{path}: bad r={r!r} or lora_alpha={alpha!r}")
    return LoraConfig(r=r, alpha=alpha, dropout=float(raw.get("lora_dropout") or 0.0), targets=tuple(sorted(targets)))


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoraConfig:
    """Apply a saved PEFT LoRA adapter to a plain model and load its weights; returns the adapter's config.

    Everything is checked before the model is touched, so a bad adapter raises `ValueError` and changes nothing.
    """
    d = Path(adapter_dir)
    if not d.is_dir():
        raise ValueError(f"adapter directory {d} does not exist")
    cfg = _read_config(d)
    wpath = d / WEIGHTS_NAME
    if not wpath.is_file():
        raise ValueError(f"no {WEIGHTS_NAME} in {d} (only safetensors adapters are supported)")
    try:
        tensors = load_file(str(wpath))
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"cannot read {wpath}: {e}") from None
    if lora_modules(model):
        raise ValueError("model already has LoRA layers; load the adapter into a plain model")
    expected = {}
    for name, lin in _target_linears(model, cfg.targets):
        expected[f"{PREFIX}{name}.lora_A.weight"] = (cfg.r, lin.in_features)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (lin.out_features, cfg.r)
    for key, t in tensors.items():
        if key not in expected:
            raise ValueError(f"{wpath}: unknown key {key!r} (no such targeted linear in this model)")
        if tuple(t.shape) != expected[key]:
            raise ValueError(f"{wpath}: {key} has shape {tuple(t.shape)}, this model needs {expected[key]}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{wpath}: {len(missing)} LoRA tensors missing, e.g. {missing[0]!r}")
    apply_lora(model, cfg)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            for part in ("lora_A", "lora_B"):
                w = getattr(m, part).weight
                w.copy_(tensors[f"{PREFIX}{name}.{part}.weight"].to(device=w.device, dtype=w.dtype))
    return cfg


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (W += B @ A * scaling) and put the plain `nn.Linear` back.

    The result is an ordinary model again (saveable with `save_model`, quantizable); parameters stay frozen.
    """
    for name, m in lora_modules(model).items():
        w = m.base.weight
        w.copy_((w.float() + m.delta_weight().to(w.device)).to(w.dtype))
        _swap(model, name, m.base)
