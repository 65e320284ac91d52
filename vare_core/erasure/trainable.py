"""The tensors an erasure trains, apart from the adapter file they end up in (adapters.py).

    weights = TrainableWeights(model, "lora", rank=8, targets=("ca",), generator=generator)
    with weights.installed():       # the model computes with them; the originals come back after
        ...train on weights.named_parameters()...
    tensors = weights.export()      # what save_adapter writes

train="ca_ffn" (the official S-VARE setting): fp32 master copies of every block's
cross-attention and FFN tensors, exported as deltas. train="lora": low-rank factors A, B on the
chosen layers (LORA_TARGETS), added to the layers' outputs (models/lowrank.py), B = 0 at the start.
"""
from __future__ import annotations

import copy
import math
import re
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..checks import is_integer
from ..models.lowrank import LowRankUpdate, add_update, is_update_parameter, remove_update
from .choices import LoraTarget, TrainMode, choices

TRAIN_MODES = choices(TrainMode)
LORA_TARGETS = {"ca": ("ca.mat_q", "ca.mat_kv", "ca.proj"),
                "kv": ("ca.mat_kv",),          # only the text side of cross-attention
                "ffn": ("ffn.fc1", "ffn.fc2"),
                "sa": ("sa.mat_qkv", "sa.proj")}
assert tuple(LORA_TARGETS) == choices(LoraTarget)
CA_FFN_PARAM = re.compile(r"^blocks\.\d+\.(ca|ffn)\.[\w.]+$")


def ca_ffn_parameter_names(model: nn.Module) -> list[str]:
    """Every trainable tensor of the blocks' cross-attention and FFN (buffers excluded)."""
    return [name for name, _ in model.named_parameters()
            if CA_FFN_PARAM.match(name) and not is_update_parameter(name)]   # not applied LoRAs


def lora_layer_names(model: nn.Module, targets) -> list[str]:
    """Linear layers (module names) of the chosen targets in every block."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"lora_targets {list(targets)}: choose one or more of {sorted(LORA_TARGETS)}")
    suffixes = tuple(dict.fromkeys(s for t in targets for s in LORA_TARGETS[t]))   # "ca" holds "kv"
    return [f"blocks.{i}.{suffix}" for i in range(len(model.blocks)) for suffix in suffixes]


def check_lora_rank(model: nn.Module, rank: int, targets) -> None:
    """A rank above a target layer's smaller side adds nothing: refuse it with the limit."""
    if not is_integer(rank, minimum=1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    for name in lora_layer_names(model, targets):
        out_features, in_features = model.get_submodule(name).weight.shape
        if rank > min(out_features, in_features):
            raise ValueError(f"rank {rank} is larger than layer {name} allows "
                             f"({out_features}x{in_features}): choose a rank of at most "
                             f"{min(out_features, in_features)}")


class TrainableWeights:
    """The trained tensors of an erasure, as fp32 master copies; frozen tensors stay shared.

    `with weights.installed(): ...` puts them into the model (ca_ffn: the masters replace the
    parameters; lora: each target layer adds scale * (x A^T) B^T to its output, models/lowrank.py,
    so no adapted copy of a weight is formed) and always puts the original tensors back.
    """

    def __init__(self, model: nn.Module, train: str, rank: int = 4, targets=("ca", "ffn"),
                 lora_scale: float = 1.0, generator: torch.Generator | None = None):
        if train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
        self.model, self.train, self.lora_scale = model, train, float(lora_scale)
        self.params: dict[str, nn.Parameter] = {}
        if train == "ca_ffn":
            self.base = {n: model.get_parameter(n) for n in ca_ffn_parameter_names(model)}
            for name, base in self.base.items():
                self.params[name] = nn.Parameter(base.detach().float().clone())
            return
        check_lora_rank(model, rank, targets)
        self.layers = lora_layer_names(model, targets)
        for layer in self.layers:
            weight = model.get_submodule(layer).weight
            out_features, in_features = weight.shape
            lora_a = torch.empty(rank, in_features, dtype=torch.float32)   # CPU: same on any device
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)   # as nn.Linear
            self.params[f"{layer}.lora_A"] = nn.Parameter(lora_a.to(weight.device))
            self.params[f"{layer}.lora_B"] = nn.Parameter(   # B = 0: training starts at the base
                torch.zeros(out_features, rank, device=weight.device, dtype=torch.float32))

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.params.items())

    @contextmanager
    def installed(self):
        done = []
        try:
            if self.train == "ca_ffn":
                for name, master in self.params.items():
                    module_name, _, attr = name.rpartition(".")
                    setattr(self.model.get_submodule(module_name), attr, master)
                    done.append(name)
            else:
                for layer in self.layers:
                    update = LowRankUpdate(self.params[f"{layer}.lora_A"], self.params[f"{layer}.lora_B"],
                                           self.lora_scale)
                    done.append((layer, add_update(self.model.get_submodule(layer), update)))
            yield self
        finally:
            for item in done:
                if self.train == "ca_ffn":
                    module_name, _, attr = item.rpartition(".")
                    setattr(self.model.get_submodule(module_name), attr, self.base[item])
                else:
                    remove_update(self.model.get_submodule(item[0]), item[1])

    @torch.no_grad()
    def export(self) -> dict[str, torch.Tensor]:
        """Adapter tensors on the CPU: ca_ffn deltas (fp32 for an fp32 base, else bf16, which
        keeps the range of tiny deltas) or the fp32 LoRA factors."""
        if self.train == "lora":
            return {name: p.detach().float().cpu().clone() for name, p in self.params.items()}
        out = {}
        for name, master in self.params.items():
            base = self.base[name]
            delta = master.detach().float() - base.detach().float()
            keep = torch.float32 if base.dtype == torch.float32 else torch.bfloat16
            out[name] = delta.to(keep).cpu()
        return out


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of the module tree that shares every parameter and buffer."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)
