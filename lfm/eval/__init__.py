"""Evaluation: lm-evaluation-harness backend (`LfmLM`, model name `lfm`), built-in local tasks and `lfm eval`.

`checks` (IFEval-style instruction checks), `tool_match` (BFCL-style tool-call matching) and `json_match` (JSON
extraction scoring) are plain functions with no engine or lm-eval dependency, shared with RL rewards. Names are imported on first use, so `lfm eval --help`
(which imports lfm.eval.cli) loads neither torch nor lm-eval.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"LfmLM": "lm", "Scorer": "scoring", "INSTRUCTIONS": "checks", "check_instruction": "checks",
          "follow_instructions": "checks", "instruction_reward": "checks", "ToolCallScore": "tool_match",
          "match_call": "tool_match", "score_tool_calls": "tool_match", "tool_call_reward": "tool_match",
          "JsonScore": "json_match", "extract_json": "json_match", "score_json": "json_match",
          "json_reward": "json_match"}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lfm.eval' has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(f".{module}", __name__), name)
    except ImportError as e:
        if module != "lm":
            raise
        raise ImportError(f"lfm.eval.LfmLM needs lm-evaluation-harness: pip install 'lfm[eval]' ({e})") from None
