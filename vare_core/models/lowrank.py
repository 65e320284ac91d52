"""Linear layers that carry low-rank updates (LoRA) beside their weight, never merged into it.

    layer = Linear(2048, 2048)
    add_update(layer, LowRankUpdate(lora_a, lora_b, scale=0.8))   # y = x W^T + b + 0.8 (x A^T) B^T
    remove_updates(layer)

An adapted layer computes `scale * (x A^T) B^T` beside `x W^T`: no adapted copy of W (an fp32
matrix the size of the weight, per layer, kept for the backward pass) is ever formed, so a
LoRA costs its factors and a rank-wide activation, in training and when applied. The updates are
child modules: DDP and FSDP see their factors as the model's parameters while they are installed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

UPDATE_PREFIX = "lora_"     # child-module names of the updates (lora_0, lora_1, ...)


class LowRankUpdate(nn.Module):
    """scale * (x A^T) B^T; A (rank, in), B (out, rank). Kept in their own dtype (fp32 masters
    while training) and cast to the input's dtype per call: the cast is rank-sized."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.lora_a = lora_a if isinstance(lora_a, nn.Parameter) else nn.Parameter(lora_a, requires_grad=False)
        self.lora_b = lora_b if isinstance(lora_b, nn.Parameter) else nn.Parameter(lora_b, requires_grad=False)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(x, self.lora_a.to(x.dtype))
        return F.linear(low, self.lora_b.to(x.dtype)) * self.scale

    def delta(self) -> torch.Tensor:
        """The fp32 weight change it stands for (for merging into a saved checkpoint)."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())


class Linear(nn.Linear):
    """nn.Linear plus the outputs of its updates (its only children). `bias` replaces the
    layer's own: the attention layers assemble theirs from separate q / v biases."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias if bias is None else bias)
        for update in self.children():
            out = out + update(x)
        return out


def add_update(layer: Linear, update: LowRankUpdate) -> str:
    """Install `update` on `layer` (after any already there); returns its child name."""
    if not isinstance(layer, Linear):
        raise TypeError(f"{type(layer).__name__} cannot carry low-rank updates (not a lowrank.Linear)")
    name = f"{UPDATE_PREFIX}{len(layer._modules)}"
    layer.add_module(name, update)
    return name


def remove_update(layer: Linear, name: str) -> None:
    del layer._modules[name]


def is_update_parameter(name: str) -> bool:
    """True for the parameter names of installed updates (`...mat_q.lora_0.lora_a`)."""
    return f".{UPDATE_PREFIX}" in name and name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every update folded into its layer's weight (and no update
    tensors): what a checkpoint of the adapted model holds."""
    state = {k: v for k, v in model.state_dict().items() if not is_update_parameter(k)}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and len(module._modules):
            weight = module.weight.detach()
            merged = weight.float() + sum(update.delta().to(weight.device) for update in module.children())
            state[f"{name}.weight"] = merged.to(weight.dtype)
    return state
