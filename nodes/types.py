"""Plain containers that travel between VARE nodes (see compat.py for the link type names)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class VareConditioning:
    """Prompts encoded by one model's text encoder (VARE_CONDITIONING), compact: ComfyUI keeps
    node outputs in its cache, so each prompt holds only its own T5 rows (the sum of the prompt
    lengths times the width, on the CPU) and the negative prompt is held once for all of them.
    `padded` gives the sampler its batch, the same bits as one padded batch of all prompts."""
    prompts: list[str]                       # one image per prompt and per batch entry
    negative: str                            # '' when there is none
    states: torch.Tensor                     # (sum(lens), C) each prompt's rows, one after the other
    lens: torch.Tensor                       # (P,) tokens per prompt
    negative_states: torch.Tensor | None = None   # (1, T_neg, C): the negative prompt, once
    negative_lens: torch.Tensor | None = None     # (1,)
    encoder: str = ""                        # which model encoded them (pipeline fingerprint)

    @property
    def text_tokens(self) -> int:
        """The padded length the sampler works at: the longest prompt or the negative prompt."""
        negative = int(self.negative_lens.max()) if self.negative_lens is not None else 0
        return max(int(self.lens.max()), negative)

    def padded(self, batch_size: int = 1, device=None):
        """(states (P * batch_size, T, C) zero-padded to the longest prompt, lens, negative
        states, negative lens) for the sampler: each prompt batch_size times in a row
        ([p0, p0, p1, p1, ...]); the negative prompt stays one row (the pipeline broadcasts it)."""
        from vare_core.models.text_encoder import unpack
        states, lens = unpack(self.states, self.lens, batch_size, device)
        negative_states, negative_lens = self.negative_states, self.negative_lens
        if negative_states is not None and device is not None:
            negative_states, negative_lens = negative_states.to(device), negative_lens.to(device)
        return states, lens, negative_states, negative_lens


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
