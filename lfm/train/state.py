"""Training checkpoints that survive a kill at any instant and resume at any world size.

A checkpoint is a directory `checkpoints/step_NNNNNNN/` holding the model in Hugging Face format (`model/`, loadable
by `lfm.LLM` and transformers; or `adapter/`, PEFT files, for LoRA runs), the optimizer state (`optimizer.safetensors`
+ `optimizer.json`) and `trainer_state.json` (step, rows consumed). It is written under a temporary name and renamed
into place only when complete, then `latest` is replaced atomically, so the newest *complete* checkpoint is always
the one a resume finds. States are gathered to full tensors (torch.distributed.checkpoint's state-dict API), which
is what makes a 2-rank checkpoint resume on 1 rank and back. No pickle anywhere: tensors in safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..model.checkpoint import load_model, save_model
from ..model.config import LfmConfig
from ..model.lfm2 import LfmForCausalLM
from .distributed import World

FORMAT = 1


def _fsync_tree(d: Path) -> None:
    for p in sorted(d.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def model_from_state(config: LfmConfig, sd: dict[str, torch.Tensor]) -> LfmForCausalLM:
    """A plain model around gathered tensors (no copy), for writing Hugging Face files."""
    with torch.device("meta"):
        m = LfmForCausalLM(config)
    m.load_state_dict(sd, strict=False, assign=True)
    if config.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight
    return m


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optim: torch.optim.Optimizer, world: World,
                    trainer_state: dict[str, Any], tokenizer_dir: Path | None, lora: Any | None = None,
                    keep: int = 2) -> Path | None:
    """Collective: every rank calls it; rank 0 writes. Returns the checkpoint directory on rank 0."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=full) if lora is None else {}
    osd = get_optimizer_state_dict(model, optim, options=full)
    final = None
    if world.is_main:
        ckpts = run_dir / "checkpoints"
        ckpts.mkdir(parents=True, exist_ok=True)
        tmp = ckpts / f".tmp-step_{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if lora is None:
            save_model(model_from_state(model.config, msd), tmp / "model", tokenizer_dir)
        else:
            from .lora import save_adapter
            save_adapter(model, tmp / "adapter", lora)
        tensors, groups = _flatten_optimizer(osd)
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps({"param_groups": groups}, indent=1))
        (tmp / "trainer_state.json").write_text(json.dumps({"format": FORMAT, "step": step, **trainer_state}, indent=1))
        _fsync_tree(tmp)
        final = ckpts / f"step_{step:07d}"
        if final.exists():  # the same step written again after a resume: the new one replaces it
            old = ckpts / f".old-step_{step:07d}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _write_atomic(ckpts / "latest", final.name + "\n")
        for stale in sorted(p for p in ckpts.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    world.barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (half-written ones are never named by `latest`)."""
    ckpts = run_dir / "checkpoints"
    pointer = ckpts / "latest"
    if pointer.is_file():
        d = ckpts / pointer.read_text().strip()
        if (d / "trainer_state.json").is_file():
            return d
    done = sorted(p for p in ckpts.glob("step_*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model: nn.Module, optim: torch.optim.Optimizer, world: World,
                    lora: bool = False) -> dict[str, Any]:
    """Collective: restore model and optimizer (full tensors read on rank 0, broadcast to the shards)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{ckpt}: checkpoint format {state.get('format')} is not {FORMAT}")
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world.sharded)
    if not lora:
        msd: dict[str, torch.Tensor] = {}
        if world.is_main or not world.sharded:
            src = load_model(ckpt / "model", dtype=next(model.parameters()).dtype)
            msd = {k: v for k, v in src.state_dict().items()}
        set_model_state_dict(model, msd, options=opts)
    osd: dict[str, Any] = {}
    if world.is_main or not world.sharded:
        groups = json.loads((ckpt / "optimizer.json").read_text())["param_groups"]
        osd = _unflatten_optimizer(load_file(ckpt / "optimizer.safetensors"), groups)
    set_optimizer_state_dict(model, optim, osd, options=opts)
    return state


def _flatten_optimizer(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for fqn, st in osd.get("state", {}).items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"{fqn}::{k}"] = t.detach().contiguous().cpu()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd.get("param_groups", [])]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        fqn, _, k = key.rpartition("::")
        state.setdefault(fqn, {})[k] = t
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
