"""How hard an applied adapter pushes the layers it changes, and the limits apply_adapter holds
it to: a stranger's file whose update cannot give finite logits at the stated strength is refused
before it reaches the sampler.

    sizes = update_sizes(adapter, pipe.model, strength=1.0)    # per layer: norm, ratio, output bound
    problem = update_problem(adapter, pipe.model, 1.0)          # None, or why it is refused
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

# An applied update (strength x the adapter's weight change) may be at most this many times the
# size (Frobenius norm) of the weights it changes: a LoRA layer against its weight, ca_ffn deltas
# against their block's cross-attention or FFN tensors together. Trained erasure adapters nudge
# their layers; measured on the embedded model at strength 2 (the largest): ca_ffn 300 steps 0.20,
# the default LoRA (600 steps) 0.98, a LoRA at 5x its learning rate 1.47; on the tiny test
# model a LoRA at 20x the learning rate 17.5. Far beyond, the update replaces the layer: in fp16
# the embedded model's logits overflow between 100 and 1000 (fp32: between 1e10 and 3e10).
# apply_adapter also refuses, per dtype, an update that can move a layer's output past the
# dtype's largest value (the check that catches fp16 first).
MAX_UPDATE_RATIO = 100.0
# an adapter file's LoRA factor names: blocks.{i}.{ca|ffn|sa}.{layer}.lora_{A|B}
LORA_KEY = re.compile(r"^(blocks\.\d+\.(?:ca|ffn|sa)\.\w+)\.lora_([AB])$")


def _frobenius(tensor: torch.Tensor) -> float:
    """||tensor||_F as a Python float, without overflow for entries near the dtype's limit."""
    if tensor.numel() == 0:
        return 0.0
    peak = float(tensor.detach().abs().max())
    if peak == 0.0 or not math.isfinite(peak):
        return peak
    return peak * float(torch.linalg.vector_norm((tensor.detach() / peak).float()))


def _lora_update_norm(lora_a: torch.Tensor, lora_b: torch.Tensor) -> float:
    """||B A||_F exactly, from the rank x rank Gram matrices (trace(B^T B A A^T)): the product
    (out x in) is never formed. In float64: factors of 1e20 square to 1e40."""
    a, b = lora_a.detach().double(), lora_b.detach().double()
    value = float(((b.T @ b) * (a @ a.T)).sum())
    return math.sqrt(max(value, 0.0)) if math.isfinite(value) else math.inf


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


@dataclass
class UpdateSize:
    """How hard an applied adapter pushes one layer (LoRA) or block part (ca_ffn)."""
    norm: float              # Frobenius norm of strength x the weight change
    ratio: float             # norm / the Frobenius norm of the base weights it changes
    fan_in: int              # inputs of the layer (a unit-size input moves its output by <= norm * sqrt(fan_in))
    dtype: torch.dtype       # what the layer computes in

    @property
    def output_bound(self) -> float:
        return self.norm * math.sqrt(self.fan_in)


def update_sizes(adapter, model: nn.Module, strength: float) -> dict[str, UpdateSize]:
    """Per changed layer (LoRA) or block part (ca_ffn: blocks.{i}.ca / .ffn, their tensors
    together, so a bias that starts at zero is measured with its layer), at `strength`. What
    apply_adapter checks; also a way to see how hard an adapter pushes."""
    out = {}
    if adapter.train == "lora":
        scale = abs(strength * float(adapter.metadata.get("lora_scale", 1.0)))
        for layer in sorted({LORA_KEY.match(k).group(1) for k in adapter.tensors}):
            weight = model.get_submodule(layer).weight
            lora_a = adapter.tensors[f"{layer}.lora_A"]
            norm = scale * _lora_update_norm(lora_a, adapter.tensors[f"{layer}.lora_B"])
            base = _frobenius(weight)
            out[layer] = UpdateSize(norm, norm / base if base > 0 else math.inf, lora_a.shape[1], weight.dtype)
        return out
    for name, delta in adapter.tensors.items():
        old = model.get_parameter(name)
        group = ".".join(name.split(".")[:3])                         # blocks.{i}.ca | blocks.{i}.ffn
        size = out.setdefault(group, UpdateSize(0.0, 0.0, 1, old.dtype))
        size.norm = math.hypot(size.norm, _frobenius(delta))          # hypot: no overflow on the way
        size.ratio = math.hypot(size.ratio, _frobenius(old))          # the base's norm, for now
        size.fan_in = max(size.fan_in, old.shape[1] if old.ndim == 2 else 1)
    for size in out.values():
        base, size.norm = size.ratio, abs(strength) * size.norm
        size.ratio = size.norm / base if base > 0 else math.inf
    return out


def update_problem(adapter, model: nn.Module, strength: float) -> str | None:
    """Why the update is refused, or None: it cannot give finite logits (it can move a layer's output past the
    largest value of the dtype the layer runs in) or that is no erasure (MAX_UPDATE_RATIO times
    the weights it changes)."""
    fix = ("lower the strength, or the file is damaged or not an erasure adapter "
           "(trained ones change a layer by about its own size or less)")
    for layer, size in update_sizes(adapter, model, strength).items():
        limit = torch.finfo(size.dtype).max if size.dtype.is_floating_point else math.inf
        if not size.output_bound <= limit:
            return (
                f"at strength {strength:g} its change of {layer} (norm {size.norm:.3g}) can move the "
                f"layer's output by {size.output_bound:.3g}, beyond the largest {_dtype_name(size.dtype)} value "
                f"({limit:.5g}) it runs in: the logits would overflow; {fix}")
        if not size.ratio <= MAX_UPDATE_RATIO:
            return (
                f"at strength {strength:g} its change of {layer} is {size.ratio:.3g} times the size of "
                f"the weights it changes (Frobenius norms; at most {MAX_UPDATE_RATIO:g}); {fix}")
    if adapter.train == "lora":        # the factors are cast to the layer's dtype as they run
        for name, tensor in adapter.tensors.items():
            dtype = model.get_submodule(LORA_KEY.match(name).group(1)).weight.dtype
            peak = float(tensor.abs().max()) if tensor.numel() else 0.0
            if dtype.is_floating_point and peak > torch.finfo(dtype).max:
                return (f"{name} holds {peak:.3g}, beyond the largest {_dtype_name(dtype)} "
                                   f"value ({torch.finfo(dtype).max:.5g}) the layer runs in; {fix}")
    return None
