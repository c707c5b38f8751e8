"""AVX2 kernels (a C++ extension built at first use): weight-only int8 / int4 GEMV for decode-sized batches, and a
bfloat16-weight GEMM for CPUs without bfloat16 arithmetic (`lfm.model.cpu_linear`).

`Int8Linear` / `Int4Linear` call `int8_linear` / `int4_linear` first; these return None whenever the kernels do not
apply (more than `MAX_ROWS` rows, autograd, non-CPU tensors, kernels unavailable or disabled), and the layer then
uses PyTorch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`.

`LFM_KERNELS=0` disables the kernels for a process; `set_enabled(False)` / `with disabled():` inside one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

INT4_ACT_BITS = 8  # activation precision of the int4 kernel for bfloat16 / float16 inputs (8 or 16)
# rows of activations (tokens) up to which the kernels are used: measured faster than PyTorch's weight-only ops at
# every M tried (1 to 1024, bfloat16, one thread: ~2x at M = 32..256, 1.5-2x at 1024); 2048 = LLM's prefill chunk
MAX_ROWS = 2048
# int4 weights x int8 activations (bfloat16 / float16 inputs, INT4_ACT_BITS = 8) run on AMX tiles from this many rows
# where the CPU has AMX-INT8 (`python benchmarks/kernel_bench.py --rows R --threads 2 --only w1`: "ours int4" vs its
# row kernel). On a 2-vCPU Xeon, 1024 -> 4608, cold weights: 8 rows 419 vs 875 us, 16 rows 470 vs 1,520, 64 rows
# 1,667 vs 7,385; 4 rows take the row kernel 421 us (about what AMX costs at any small batch), so AMX starts between.
# Batch-invariant: a row's result does not depend on the other rows.
AMX_MIN_ROWS = 6
# MoE experts: the fused decode step (at most 64 rows) computes each (token, expert) with the row kernel, so expert
# matmuls of up to 64 rows keep it too (the general path and the fused step then agree bit for bit)
AMX_EXPERT_MIN_ROWS = 65
# from this many rows the dequantized bfloat16 copy + oneDNN beats the AMX int4 kernel (prefill-sized batches)
AMX_DEQUANT_ROWS = 128

_lock = threading.Lock()
_native_bf16 = False  # set at the first extension() call (reading /proc/cpuinfo once)
_ext: ModuleType | None = None
_tried = False
_enabled = True


def extension() -> ModuleType | None:
    """The loaded extension (built on first call), or None when unavailable or disabled."""
    global _ext, _tried, _native_bf16
    if not _tried:
        with _lock:
            if not _tried:
                from .build import load

                _ext = load()
                _native_bf16 = native_bf16()
                _tried = True
    return _ext if _enabled else None


def available() -> bool:
    return extension() is not None


def set_enabled(flag: bool) -> None:
    """Turn the kernels on or off for this process (off: the torch fallback, e.g. to compare)."""
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    global _enabled
    old, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = old


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x @ (weight * scales[:, None]).T in scales' dtype (as the torch path returns), or None where the kernel does not
    apply. float32 activations are multiplied in float (PyTorch's precision); bfloat16 / float16 ones as int16."""
    if not _enabled:
        return None
    ext = _ext if _tried else extension()
    if ext is None:
        return None
    return ext.int8_linear(x, weight, scales, MAX_ROWS)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, amx_min_rows: int = AMX_MIN_ROWS) -> torch.Tensor | None:
    """x @ W.T with W[n, k] = (q - 8) * scale + zero per group (portable nibble layout), or None where the kernel does
    not apply. float32 activations are multiplied in float (PyTorch's precision); bfloat16 / float16 ones as int8
    (INT4_ACT_BITS: an error of the order of bfloat16's own rounding, and half the instructions of int16)."""
    if not _enabled:
        return None
    ext = _ext if _tried else extension()
    if ext is None:
        return None
    return ext.int4_linear(x, qweight, scales, zeros, group_size, MAX_ROWS, INT4_ACT_BITS, amx_min_rows)


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch.max(x, -1) for a contiguous float32 [n, V] CPU tensor (values, first index of each row's maximum; NaN
    propagates), or None where the kernel does not apply: greedy decoding's argmax (16 x 65,536: 0.15 ms against
    1.07 for ATen's)."""
    if not _enabled or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() \
            or x.shape[1] == 0:
        return None
    ext = _ext if _tried else extension()
    if ext is None:
        return None
    return ext.row_max(x)


def amx() -> bool:
    """Whether int4 layers with bfloat16 / float16 activations use the AMX kernel for batches (AMX_MIN_ROWS)."""
    ext = extension()
    return ext is not None and INT4_ACT_BITS == 8 and bool(ext.amx_int8())


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) for a bfloat16 weight, multiplied in float32 and returned in x's dtype, or None
    where the kernel does not apply (autograd, non-CPU tensors, more than MAX_ROWS rows, kernels unavailable)."""
    if not _enabled:
        return None
    ext = _ext if _tried else extension()
    if ext is None:
        return None
    return ext.bf16_linear(x, weight, bias, MAX_ROWS)


# rows of bfloat16 activations from which dequantizing a quantized weight to bfloat16 and using the CPU's native
# bfloat16 matmul (AMX / AVX-512 BF16, through oneDNN) beats the int8 / int4 kernels, whose work grows with every row
# (one measurement on a 2-core Sapphire Rapids VM, 2 threads, 1024x4608: int4 kernel 2.1 / 9.1 ms at 16 / 64 rows,
# dequantized + AMX 1.5 / 2.0 ms; at 8 rows the kernel still wins). Only on CPUs with native bfloat16; elsewhere
# the kernels run at every batch size.
DEQUANT_ROWS = 16
_scratch = threading.local()  # one reused bfloat16 buffer per thread (the largest weight dequantized so far)
_low_memory = threading.local()


@contextlib.contextmanager
def low_memory(on: bool = True) -> Iterator[None]:
    """Within it (this thread), int4 layers make no dequantized bfloat16 copy of their weight where the AMX kernel
    can take the batch instead: what the engine asks for while it prefills a long prompt, where memory runs out
    before speed does (`benchmarks/long_context_bench.py --kv-cache-dtype int8`, 32K tokens on the 350M at int4:
    peak RSS 957 -> 937 MiB, prefill 276 -> 238 tok/s)."""
    prev = getattr(_low_memory, "on", False)
    _low_memory.on = on
    try:
        yield
    finally:
        _low_memory.on = prev


def native_bf16() -> bool:
    from .build import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def dequant_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                   group_size: int = 0) -> torch.Tensor | None:
    """x @ W.T for a quantized weight (int4: qweight [N, K/2] + scales / zeros; int8: weight [N, K] + scales [N])
    through a bfloat16 copy of W and PyTorch's native bfloat16 matmul, for bfloat16 x of at least DEQUANT_ROWS rows
    on a CPU with native bfloat16; None where that does not apply (the caller uses its kernel)."""
    if (not _enabled or x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.numel() < DEQUANT_ROWS * x.shape[-1]
            or (torch.is_grad_enabled() and x.requires_grad) or not _native_bf16):
        return None
    if zeros is not None and (x.numel() < AMX_DEQUANT_ROWS * x.shape[-1] or getattr(_low_memory, "on", False)) \
            and amx():
        return None  # int4 batches below AMX_DEQUANT_ROWS (or any, in low_memory()): the AMX kernel
    ext = _ext if _tried else extension()
    if ext is None:
        return None
    N = weight.shape[0]
    K = weight.shape[1] * (2 if zeros is not None else 1)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < N * K:
        buf = _scratch.buf = torch.empty(N * K, dtype=torch.bfloat16)
    w = buf[:N * K]
    if zeros is not None:
        ext.int4_dequant_bf16(weight, scales, zeros, group_size, w)
    else:
        ext.int8_dequant_bf16(weight, scales, w)
    y = torch.nn.functional.linear(x, w.view(N, K))
    return y if y.dtype == scales.dtype else y.to(scales.dtype)


def bf16_kernel_rows() -> int:
    """Rows of activations up to which `bf16_linear` beats PyTorch's bfloat16 matmul here: every batch (MAX_ROWS) on
    CPUs without native bfloat16; decode-sized batches (< DEQUANT_ROWS) where oneDNN has AVX-512 BF16 / AMX, since a
    single row is bound by reading the weights (`python benchmarks/kernel_bench.py --threads 2`, cold weights, one
    row, on a 2-vCPU Xeon with AMX: 1024 -> 4608 0.70 vs 0.94 ms, the 65536-row head 9.2 vs 11.4 ms); 0 where the
    kernels are unavailable. The general and the fused decode step
    then run the same kernel, so they agree bit for bit."""
    if not available():
        return 0
    return DEQUANT_ROWS - 1 if _native_bf16 else MAX_ROWS


def bf16_faster() -> bool:
    """Whether `bf16_linear` beats PyTorch's bfloat16 matmul for some batch sizes here (see bf16_kernel_rows)."""
    return bf16_kernel_rows() > 0


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                           v_scale: torch.Tensor | None, block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor | None:
    """One decode step of attention for n sequences over a paged KV cache: q [n, H, D]; k_cache / v_cache
    [num_blocks, KV, block_size, D] (int8 caches with their per-vector scales k_scale / v_scale
    [num_blocks, KV, block_size] float32, None or empty for float caches); block_tables [n, max_blocks] int32
    (sequence b's key l in block block_tables[b, l // block_size] at offset l % block_size); context_lens [n] int32.
    Returns softmax(q k^T * scale) v over keys 0..context_lens[b]-1 as [n, H, D] in q's dtype; reads the caches only
    (the new token's key / value must already be in them). None where the kernel does not apply (autograd, non-CPU
    tensors, kernels unavailable or disabled); malformed inputs raise RuntimeError."""
    if not _enabled or (torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad
                                                     or v_cache.requires_grad)):
        return None
    if any(t is not None and t.device.type != "cpu"
           for t in (q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens)):
        return None
    ext = _ext if _tried else extension()
    if ext is None:
        return None
    empty = torch.empty(0)
    return ext.paged_decode_attention(q, k_cache, v_cache, empty if k_scale is None else k_scale,
                                      empty if v_scale is None else v_scale, block_tables, context_lens, scale)
