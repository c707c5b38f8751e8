"""lfm: Liquid AI's LFM2 / LFM2.5 models in plain PyTorch, with vLLM's offline API.

Names resolve lazily (PEP 562): `import lfm` costs nothing, and torch loads at the first `lfm.LLM` (or any other name
below). The `lfm` command line imports this package, and `lfm --help` must answer before torch would have loaded.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LLM": ".engine.llm", "RequestOutput": ".engine.sequence", "SamplingParams": ".engine.sampling",
    "StructuredOutputsParams": ".engine.sampling",
    "load_model": ".loading", "save_model": ".model.checkpoint", "CheckpointError": ".model.checkpoint",
    "ConfigError": ".model.config", "LfmConfig": ".model.config", "LfmForCausalLM": ".model.lfm2",
    "preset": ".model.presets", "Tokenizer": ".text", "ToolCall": ".text", "parse_tool_calls": ".text",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and IDEs see; nothing is imported at run time
    from .engine.llm import LLM
    from .engine.sampling import SamplingParams, StructuredOutputsParams
    from .engine.sequence import RequestOutput
    from .loading import load_model
    from .model.checkpoint import CheckpointError, save_model
    from .model.config import ConfigError, LfmConfig
    from .model.lfm2 import LfmForCausalLM
    from .model.presets import preset
    from .text import Tokenizer, ToolCall, parse_tool_calls


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # resolve once
        return value
    raise AttributeError(f"module 'lfm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
