"""The network, its configuration, cache and checkpoints. Depends on nothing else in lfm."""

from .cache import HybridCache
from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, LfmConfig
from .lfm2 import LfmForCausalLM

__all__ = ["HybridCache", "CheckpointError", "load_model", "save_model", "ConfigError", "LfmConfig", "LfmForCausalLM"]
