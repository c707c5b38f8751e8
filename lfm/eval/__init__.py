"""Evaluation: lm-evaluation-harness backend (`LfmLM`, model name `lfm`), local tasks and `lfm eval`.

`checks` (IFEval-style instruction checks) and `tool_match` (BFCL-style tool-call matching) are plain functions
with no engine or lm-eval dependency, shared with RL rewards. `LfmLM` needs lm-eval and is imported on first use.
"""

from __future__ import annotations

from typing import Any

from .checks import INSTRUCTIONS, check_instruction, follow_instructions, instruction_reward
from .tool_match import ToolCallScore, match_call, score_tool_calls, tool_call_reward

__all__ = ["LfmLM", "INSTRUCTIONS", "check_instruction", "follow_instructions", "instruction_reward",
           "ToolCallScore", "match_call", "score_tool_calls", "tool_call_reward"]


def __getattr__(name: str) -> Any:
    if name == "LfmLM":
        try:
            from .lm import LfmLM
        except ImportError as e:
            raise ImportError(f"lfm.eval.LfmLM needs lm-evaluation-harness: pip install 'lm-eval' ({e})") from None
        return LfmLM
    raise AttributeError(f"module 'lfm.eval' has no attribute {name!r}")
