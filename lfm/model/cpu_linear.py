"""bfloat16 linears on lfm.kernels' bf16 kernel where it is faster: the same module (a class swap, no copy).

On AVX2-only CPUs PyTorch multiplies bfloat16 matrices through an emulation: a bfloat16 model decodes at half the
speed its weight bytes allow and prefills 4-8x slower than in float32. `Bf16Linear` keeps the bfloat16 weights (half
the memory of float32) and runs `lfm.kernels.bf16_linear`, which widens them to float32 in registers. On CPUs with
native bfloat16 (AVX-512 BF16 / AMX) it does so for decode-sized batches only, where reading the weights is all
that counts and the kernel beats oneDNN; prefill stays on oneDNN (`kernels.bf16_kernel_rows`). Inference only:
with autograd, on other devices or where the kernels are unavailable it is exactly `nn.Linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels as _kernels


class Bf16Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if x.dim() and x.numel() <= _kernels.bf16_kernel_rows() * x.shape[-1]:  # else oneDNN's native bf16 wins
            y = _kernels.bf16_linear(x, self.weight, self.bias)
        return y if y is not None else F.linear(x, self.weight, self.bias)


def use_cpu_kernels(model: nn.Module) -> int:
    """Turn every bfloat16 CPU `nn.Linear` of the model into a `Bf16Linear` (in place, state dict unchanged) where
    that is faster for some batch sizes (kernels available). Returns how many changed."""
    todo = [m for m in model.modules()
            if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
    if not todo or not _kernels.bf16_faster():  # nothing to swap (a GPU model): the kernels are not even built
        return 0
    for m in todo:
        m.__class__ = Bf16Linear
    return len(todo)
