"""GGUF (llama.cpp) files: export a checkpoint to `lfm2` / `lfm2moe` GGUF, and load one back into lfm.

Depends on `model` and `text`. Names resolve lazily, so `lfm --help` (which registers `export gguf`) imports neither
torch nor the `gguf` package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"GGUFError": "mapping", "TYPES": "writer", "export_gguf": "writer", "load_gguf": "reader",
            "load_gguf_model": "reader", "load_gguf_tokenizer": "reader"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lfm.gguf' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
