"""The experts of an MoE layer as two grouped GEMMs (`torch._grouped_mm`): no per-expert loop, no host sync.

`Experts.forward` (lfm/model/lfm2.py) groups tokens by expert and runs one matmul per chosen expert, which needs the
per-expert counts on the host: a device sync and up to 32 launches per layer, and a step that CUDA graphs cannot
capture. Here the token rows are sorted by expert on the device, the group ends are a device cumsum, and
`torch._grouped_mm` multiplies every group by its expert's matrix in one launch (gate/up), then again (down): the
same math, graph-safe. CUDA runs it for bfloat16 on compute capability 9.0+ (H100 / H200); elsewhere the CUDA backend
passes lfm.kernels.triton.grouped_gemm instead (any float dtype, any GPU Triton supports). CPU has a reference
implementation of torch's in PyTorch, which is how tests compare both with `Experts.forward` without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..model.lfm2 import Experts


@lru_cache(maxsize=None)
def grouped_mm_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch._grouped_mm runs for these weights (asked per MoE layer per step: answered once)."""
    if not hasattr(torch, "_grouped_mm"):  # torch < 2.8
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return False


def torch_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K] grouped by expert, w [E, N, K], offs [E] (cumulative group ends) -> [M, N]."""
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)


def grouped_experts(experts: Experts, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                    mm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = torch_grouped_mm
                    ) -> torch.Tensor:
    """x [N, D]; idx, weight [N, k] (the router's picks and their weights) -> [N, D], as `Experts.forward`. `mm` is
    the grouped GEMM: torch's, or lfm.kernels.triton.grouped_gemm where torch's does not run."""
    N, k = idx.shape
    E = experts.gate_up_proj.shape[0]
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)  # rows grouped by expert, in token order within a group (as Experts.forward)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))  # bincount would size its output on the host
    offs = counts.cumsum(0, dtype=torch.int32)  # group e ends at offs[e]
    tok = order // k
    xs = x[tok]
    gate, up = mm(xs, experts.gate_up_proj, offs).chunk(2, dim=-1)
    ys = mm(F.silu(gate) * up, experts.down_proj, offs)
    ys = ys * weight.reshape(-1)[order, None]
    return x.new_zeros(x.shape).index_add(0, tok, ys.to(x.dtype))
