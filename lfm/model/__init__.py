"""The network, its configuration and checkpoints. Depends on nothing else in lfm (but lfm.kernels, a leaf)."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, LfmConfig
from .lfm2 import LfmForCausalLM

__all__ = ["CheckpointError", "load_model", "save_model", "ConfigError", "LfmConfig", "LfmForCausalLM"]
