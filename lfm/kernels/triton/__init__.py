"""Triton kernels for the engine's CUDA backend (`lfm.engine.triton_backend`), one small file per kernel.

They use `PagedCache`'s layouts, so the CUDA backend drops in behind the same seam as the PyTorch one. On CPU tensors
they run only under Triton's interpreter (`TRITON_INTERPRET=1` set before triton is imported): that is how CI
checks them (tests/test_triton_kernels.py). Importing this package needs `triton` (the `gpu` extra).
"""

from .grouped_gemm import grouped_gemm
from .paged_attention import paged_decode_attention
from .rmsnorm import rms_norm
from .rope_qknorm import rope_qknorm
from .short_conv import short_conv
from .store_kv import store_kv

__all__ = ["grouped_gemm", "paged_decode_attention", "rms_norm", "rope_qknorm", "short_conv", "store_kv"]
