"""How big the engine is when the user does not say: the paged KV cache's bytes (`LLM(kv_cache_memory=None)`, the
default) and the batch limits (`batch_defaults`: max_num_seqs, max_num_batched_tokens).

On a CPU: 4 GiB. Its pages are touched only as blocks are used, so an unused budget costs nothing.

On a GPU the pool is allocated up front, so it is sized as vLLM sizes it: `gpu_memory_utilization` (vLLM's name and
default, 0.9) of the device's memory is this engine's share (per instance, as vLLM's: two servers at 0.45 share one
GPU); the weights and what a step needs beside the cache come off that share, and the rest is KV, but never more
than the device has free right now less the step's need (other processes' memory is not ours). A step's need is
measured, not guessed: one forward of a full step's worth of tokens (`max_num_batched_tokens`, the largest prefill
chunk) on the device, its peak allocation above the weights, plus the logits of a decode step of every sequence
(the model's dtype, the sampler's float32 copy and temporaries) and a fixed slack for cuBLAS / Triton workspaces,
CUDA graph pools and fragmentation. The engine then allocates no more blocks than max_num_seqs full-length
sequences can use, so a small model does not take the whole GPU for nothing.
"""

from __future__ import annotations

import torch

from ..model.lfm2 import LfmForCausalLM

CPU_KV_CACHE_MEMORY = 4 << 30
GPU_SLACK = 768 << 20  # cuBLAS / Triton workspaces, CUDA graph pools, allocator fragmentation
GiB = 1 << 30


def gpu_kv_budget(total: int, free: int, allocated: int, utilization: float, reserve: int) -> int:
    """Bytes for KV blocks: this engine's share (utilization x total) less its own allocations (the weights) and the
    step's reserve, and at most what is free on the device less that reserve."""
    share = int(utilization * total) - allocated - reserve
    budget = min(share, free - reserve)
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: gpu_memory_utilization {utilization:g} gives this engine "
            f"{utilization * total / GiB:.1f} GiB of {total / GiB:.1f}, the weights take {allocated / GiB:.1f}, a "
            f"step needs ~{reserve / GiB:.1f} and {free / GiB:.1f} GiB are free; raise gpu_memory_utilization, "
            f"lower max_num_batched_tokens / max_num_seqs, or give kv_cache_memory")
    return budget


def step_reserve(model: LfmForCausalLM, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Bytes a step needs on the model's GPU beside the weights and the KV pool (measured; see the module doc)."""
    dev = model.device
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    with torch.inference_mode():
        model(torch.zeros(1, max_num_batched_tokens, dtype=torch.long, device=dev), logits_to_keep=1)
    torch.cuda.synchronize(dev)
    prefill = torch.cuda.max_memory_allocated(dev) - base
    torch.cuda.empty_cache()  # give the forward's blocks back, so mem_get_info sees them free
    logits = max_num_seqs * model.config.vocab_size * (model.dtype.itemsize + 3 * 4)
    return prefill + logits + GPU_SLACK


def default_kv_cache_memory(model: LfmForCausalLM, gpu_memory_utilization: float, max_num_seqs: int,
                            max_num_batched_tokens: int) -> int:
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if model.device.type != "cuda":
        return CPU_KV_CACHE_MEMORY
    reserve = step_reserve(model, max_num_seqs, max_num_batched_tokens)
    free, total = torch.cuda.mem_get_info(model.device)
    return gpu_kv_budget(total, free, torch.cuda.memory_allocated(model.device), gpu_memory_utilization, reserve)


def batch_defaults(device: str | torch.device, server: bool) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) when the user names neither. CPU: this project's choices (a server
    keeps steps short for its running requests). GPU: vLLM's (`EngineArgs.get_batch_defaults`): a card of >= 70 GiB
    that is not an A100 (vLLM measured large steps slower there) batches 1,024 sequences and 16,384 tokens a step
    (8,192 for a server), any other card 256 sequences and 8,192 tokens (2,048)."""
    try:
        dev = torch.device(device)
    except RuntimeError:  # not a device: loading the model says so, in one line
        dev = torch.device("cpu")
    if dev.type != "cuda" or not torch.cuda.is_available():  # (no CUDA: likewise)
        return (64, 512) if server else (256, 2048)
    props = torch.cuda.get_device_properties(dev)
    big = props.total_memory >= 70 * GiB and "a100" not in props.name.lower()
    if server:
        return (1024, 8192) if big else (256, 2048)
    return (1024, 16384) if big else (256, 8192)
