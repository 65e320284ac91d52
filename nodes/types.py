"""Plain containers that travel between VARE nodes (see compat.py for the link type names)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class VareConditioning:
    """Prompts encoded by one model's text encoder (VARE_CONDITIONING)."""
    prompts: list[str]                       # one image per prompt and per batch entry
    negative: str                            # '' when there is none
    states: torch.Tensor                     # (P, T, C) T5 states, zero past each length
    lens: torch.Tensor                       # (P,) tokens per prompt
    negative_states: torch.Tensor | None = None
    negative_lens: torch.Tensor | None = None
    encoder: str = ""                        # which model encoded them (pipeline fingerprint)

    def repeated(self, batch_size: int) -> "VareConditioning":
        """Each prompt batch_size times in a row: [p0, p0, p1, p1, ...]."""
        def rep(t):
            return None if t is None else t.repeat_interleave(batch_size, dim=0)
        return VareConditioning(
            prompts=[p for p in self.prompts for _ in range(batch_size)], negative=self.negative,
            states=rep(self.states), lens=rep(self.lens), negative_states=rep(self.negative_states),
            negative_lens=rep(self.negative_lens), encoder=self.encoder)


@dataclass
class LossHistory:
    """What the training node reports per step (VARE_LOSS_HISTORY)."""
    steps: list[dict] = field(default_factory=list)   # trainer callback dicts, phase "train"
    method: str = ""
    concepts: list[str] = field(default_factory=list)
    cancelled: bool = False

    @property
    def title(self) -> str:
        concepts = ", ".join(self.concepts) or "concept"
        return f"{self.method or 'erasure'}: erase {concepts}" + (" (cancelled)" if self.cancelled else "")
