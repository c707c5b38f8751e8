"""lfm: Liquid AI's LFM2 / LFM2.5 models in plain PyTorch, with vLLM's offline API."""

from .engine.llm import LLM
from .engine.sequence import RequestOutput
from .engine.sampling import SamplingParams, StructuredOutputsParams
from .loading import load_model
from .model.checkpoint import CheckpointError, save_model
from .model.config import ConfigError, LfmConfig
from .model.lfm2 import LfmForCausalLM
from .model.presets import preset
from .text import Tokenizer, ToolCall, parse_tool_calls

__all__ = ["LLM", "RequestOutput", "SamplingParams", "StructuredOutputsParams", "load_model", "save_model", "LfmConfig", "LfmForCausalLM",
           "ConfigError", "CheckpointError", "preset", "Tokenizer", "ToolCall", "parse_tool_calls"]
__version__ = "0.1.0"
