"""The string-valued settings of an erasure run, one Literal each: EraseConfig and LossConfig
check against them, and the command line's `choices` and the nodes' Combo options are built from
them (`choices(Method)`), so each list of choices is written once.

What each value means is said where it is used: trainer.EraseConfig, losses.py, trainable.py,
formulations.py.
"""
from __future__ import annotations

from typing import Literal, get_args

Method = Literal["svare", "vare", "naive", "early"]        # losses.erasure_objective, early.early_objective
TrainMode = Literal["ca_ffn", "lora"]                      # trainable.TrainableWeights
LoraTarget = Literal["ca", "kv", "ffn", "sa"]              # trainable.LORA_TARGETS
Precision = Literal["auto", "fp16", "bf16", "fp32"]        # trainer.resolve_precision
KeepTarget = Literal["frozen", "teacher"]                  # what keep pairs are held to in L_Pre
Targets = Literal["cfg", "conditional", "guided"]          # what the logits are trained toward
EraseTarget = Literal["hard", "soft"]                      # L_FCE on selected tokens
ScaleWeights = Literal["tokens", "balanced"]               # how the scales are weighted
Passes = Literal["joint", "split"]                         # rows per forward/backward
StreamBlocks = Literal["off", "on", "auto"]                # blocks streamed for the no-grad phases
Formulation = Literal["paper", "consistent"]               # formulations.FORMULATIONS


# The methods trained on S-VARE's L_FCE + L_Pre: safe rows, null rows and keep pairs as svare's
FILTERED_CE_METHODS: tuple[Method, ...] = ("svare", "early")


def choices(kind) -> tuple[str, ...]:
    """The values of a Literal, in their written order."""
    return get_args(kind)
