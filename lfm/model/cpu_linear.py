"""bfloat16 linears for CPUs without bfloat16 arithmetic: the same module, a faster kernel (a class swap, no copy).

On AVX2-only CPUs PyTorch multiplies bfloat16 matrices through an emulation: a bfloat16 model decodes at half the
speed its weight bytes allow and prefills 4-8x slower than in float32. `Bf16Linear` keeps the bfloat16 weights (half
the memory of float32) and runs `lfm.kernels.bf16_linear`, which widens them to float32 in registers. Inference only:
with autograd, on other devices or where the kernels are unavailable it is exactly `nn.Linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels as _kernels


class Bf16Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _kernels.bf16_linear(x, self.weight, self.bias)
        return y if y is not None else F.linear(x, self.weight, self.bias)


def use_cpu_kernels(model: nn.Module) -> int:
    """Turn every bfloat16 CPU `nn.Linear` of the model into a `Bf16Linear` (in place, state dict unchanged) where
    that is faster: the kernels are available and the CPU has no native bfloat16 matmul. Returns how many changed."""
    if not _kernels.bf16_faster():
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu":
            m.__class__ = Bf16Linear
            n += 1
    return n
