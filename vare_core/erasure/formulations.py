"""How the erasure meets classifier-free guidance: the two objectives every model can train with
(docs/method.md, "Guidance-consistent targets").

- paper: the S-VARE paper's objective (CFG-combined teacher for L_Pre, bits sampled at cfg 4
  for L_FCE), golden-tested.
- consistent: the conditional branch is trained toward the frozen model's own CONDITIONAL logits
  of the safe prompt (soft targets on the selected tokens), and the null branch is held to its
  frozen self, so the sampler's guidance meets the same branches it always met: erased prompts
  keep colour, background and a clean picture at every cfg.

FORMULATIONS holds the EraseConfig fields that make each objective; a model's erasure profile
(erasure/profile.py) states them in its own settings, beside its tuning.
"""
from __future__ import annotations

from .choices import Formulation, choices

FORMULATIONS = {
    "paper": {"targets": "cfg", "erase_target": "hard", "null_weight": 0.0},
    "consistent": {"targets": "conditional", "erase_target": "soft", "null_weight": 1.0},
}
assert tuple(FORMULATIONS) == choices(Formulation)
DEFAULT_FORMULATION: Formulation = "consistent"
AUTO = "auto"                 # the model's profile decides (DEFAULT_FORMULATION for every model)


def formulation_name(formulation: str | None, default: str = DEFAULT_FORMULATION) -> str:
    """'auto' (or None) -> `default`; a formulation's name as it is; ValueError otherwise."""
    name = default if formulation in (None, AUTO) else formulation
    if name not in FORMULATIONS:
        raise ValueError(f"formulation {formulation!r}: choose {AUTO}, {', '.join(FORMULATIONS)}")
    return name
