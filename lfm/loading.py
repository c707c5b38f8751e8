"""Load any model source: a checkpoint directory, a Hugging Face Hub id, or a llama.cpp `.gguf` file.

`lfm.model.checkpoint` reads our own format (HF safetensors) and knows nothing of GGUF; `lfm.gguf` builds on the
model package. This module sits above both and picks by the path, so neither has to point back at the other.

Naming a model (checkpoint.resolve): an existing path always wins (a directory called `tiny` or `demo` is that
directory); then `demo` (or no name) is the built-in demo model; anything else must be a Hub id.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import checkpoint
from .model.config import LfmConfig
from .model.lfm2 import LfmForCausalLM


def is_gguf(path: str | Path | None) -> bool:
    return path is not None and str(path).endswith(".gguf")


def load_model(path: str | Path | None, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device = "cpu") -> LfmForCausalLM:
    """The torch.nn.Module of a checkpoint directory, Hub id or `.gguf` file (None: the demo model), in eval mode."""
    if is_gguf(path):
        from .gguf import load_gguf_model

        return load_gguf_model(checkpoint.resolve(path), dtype, device)
    return checkpoint.load_model(checkpoint.resolve(path), dtype, device)


def resolve_config(path_or_id: str | Path) -> LfmConfig:
    """Only the configuration (config.json, or a GGUF file's metadata): enough for `lfm info`, no weights read."""
    p = Path(path_or_id).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        from .gguf.gguf_file import GGUFFile
        from .gguf.reader import config_from_gguf

        return config_from_gguf(GGUFFile(p))
    return checkpoint.resolve_config(path_or_id)
