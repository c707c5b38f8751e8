"""Training checkpoints that survive a kill at any instant and resume at any world size.

A checkpoint is a directory `checkpoints/step_NNNNNNN/` holding the model in Hugging Face format (`model/`, loadable
by `lfm.LLM` and transformers; or `adapter/`, PEFT files, for LoRA runs), the optimizer state (`optimizer.safetensors`
+ `optimizer.json`) and `trainer_state.json` (step, rows consumed). It is written under a temporary name, fsynced,
and renamed into place only when complete (the rename is the completion marker; the parent directory is fsynced
after it), then `latest` is replaced atomically. A resume does not trust names alone: every file of a candidate is
checked (JSON parses, safetensors headers tile their files exactly, the step matches), newest first, so a checkpoint
damaged after the fact (truncated at any byte, garbage in a file) is reported in one line naming the file and the
previous complete one is used. States are gathered to full tensors (torch.distributed.checkpoint's state-dict API),
which is what makes a 2-rank checkpoint resume on 1 rank and back. No pickle anywhere: tensors in safetensors, the
rest JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..model.checkpoint import CheckpointError, load_model, save_model, weight_files
from ..model.config import ConfigError, LfmConfig
from ..model.safetensors_io import SafetensorsError, load_file, read_header, save_file
from ..model.lfm2 import LfmForCausalLM
from .distributed import World

FORMAT = 1


class DamagedCheckpoint(Exception):
    """One file of a checkpoint is incomplete or unreadable; the message names it (the resume then falls back)."""


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(d: Path) -> None:
    for p in sorted(d.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for sub in sorted((p for p in d.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(sub)
    _fsync_dir(d)


def write_atomic(path: Path, text: str) -> None:
    """Replace a small file all at once: a reader (or a crash) sees the old text or the new, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
        _fsync_dir(ckpts)  # the rename itself reaches the disk before `latest` names it
        write_atomic(ckpts / "latest", final.name + "\n")
        for stale in sorted(p for p in ckpts.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
        for left in ckpts.glob(".tmp-step_*"):  # a save that a crash interrupted earlier
            shutil.rmtree(left, ignore_errors=True)
    world.barrier()
    return final


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path}: missing") from None
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise DamagedCheckpoint(f"{path}: unreadable ({str(e).splitlines()[0][:120]})") from None


def _header(path: Path) -> None:
    try:
        read_header(path)
    except SafetensorsError as e:
        raise DamagedCheckpoint(str(e)) from None


def check_checkpoint(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's trainer state once every file it needs has been checked (no tensor is read): JSON files
    parse, safetensors headers fit their files byte for byte. Raises DamagedCheckpoint naming the first bad file."""
    state = _json(ckpt / "trainer_state.json")
    ints = ("step", "rows_consumed", "tokens_seen")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool)
                                              for k in ints):
        raise DamagedCheckpoint(f"{ckpt / 'trainer_state.json'}: not a trainer state (needs integer {', '.join(ints)})")
    if state.get("format") != FORMAT:
        raise DamagedCheckpoint(f"{ckpt / 'trainer_state.json'}: format {state.get('format')!r} is not {FORMAT}")
    if ckpt.name.startswith("step_") and ckpt.name != f"step_{state['step']:07d}":
        raise DamagedCheckpoint(f"{ckpt / 'trainer_state.json'}: step {state['step']} does not match the directory name")
    groups = _json(ckpt / "optimizer.json")
    if not isinstance(groups, dict) or not isinstance(groups.get("param_groups"), list):
        raise DamagedCheckpoint(f"{ckpt / 'optimizer.json'}: no 'param_groups' list")
    _header(ckpt / "optimizer.safetensors")
    if (ckpt / "adapter").is_dir():
        _json(ckpt / "adapter" / "adapter_config.json")
        _header(ckpt / "adapter" / "adapter_model.safetensors")
    else:
        try:
            LfmConfig.from_file(ckpt / "model" / "config.json")
            files = weight_files(ckpt / "model")
        except (ConfigError, CheckpointError, OSError) as e:
            raise DamagedCheckpoint(str(e)) from None
        for f in files:
            _header(f)
    return state


def find_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that passes `check_checkpoint` (the one `latest` names first, then by step, newest
    first), and one line for each newer one that did not."""
    ckpts = run_dir / "checkpoints"
    order: list[Path] = []
    pointer = ckpts / "latest"
    try:
        named = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
    except (OSError, ValueError):
        named = ""
    if named.startswith("step_") and "/" not in named:
        order.append(ckpts / named)
    steps = sorted((p for p in ckpts.glob("step_*") if p.is_dir()), key=lambda p: p.name, reverse=True)
    order += [p for p in steps if p not in order]
    damaged: list[str] = []
    for d in order:
        if not d.is_dir():
            damaged.append(f"{pointer}: names {d.name}, which does not exist")
            continue
        try:
            check_checkpoint(d)
            return d, damaged
        except DamagedCheckpoint as e:
            damaged.append(str(e))
    return None, damaged


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (half-written or damaged ones are skipped)."""
    return find_checkpoint(run_dir)[0]


def load_checkpoint(ckpt: Path, model: nn.Module, optim: torch.optim.Optimizer, world: World,
                    lora: bool = False) -> dict[str, Any]:
    """Collective: restore model and optimizer (full tensors read on rank 0, broadcast to the shards)."""
    try:
        state = check_checkpoint(ckpt)
    except DamagedCheckpoint as e:
        raise CheckpointError(str(e)) from None
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
