"""Aux-loss-free expert balancing for LFM2-MoE (spec section 3): nudge each router's selection bias towards
experts that received fewer tokens than the mean, from the counts of every data-parallel rank."""

from __future__ import annotations

import torch
from torch import nn

from ..model.lfm2 import MoE
from .distributed import World


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float, world: World) -> dict[str, list[int]]:
    """Apply one update (call once per optimizer step) and return each layer's token counts since the last one."""
    loads: dict[str, list[int]] = {}
    for name, m in moe_layers(model):
        if m.tokens_per_expert is None:
            continue
        load = world.all_reduce(m.tokens_per_expert.clone())
        m.tokens_per_expert = None
        loads[name] = [int(x) for x in load.tolist()]
        if m.expert_bias is None or rate <= 0:
            continue
        delta = rate * torch.sign(load.mean() - load)
        delta -= delta.mean()
        m.expert_bias += delta.to(m.expert_bias.dtype)
    return loads


def imbalance(load: list[int]) -> float:
    """max / mean tokens per expert: 1.0 is perfectly balanced."""
    mean = sum(load) / max(len(load), 1)
    return max(load) / mean if mean else 0.0
