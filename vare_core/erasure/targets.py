"""What the erasure trains toward, prepared once before training (trainer.py, EraseConfig.targets).

    targets = prepare_targets(model, bank, trajs, pairs, config, autocast)
    trajs.teacher_logits        # now the targets each row's L_FCE (soft) / L_Pre is held to
    targets.null_rows           # frozen null-branch logits per row (null_weight > 0), or None
    targets.guide(logits, rows, "unsafe")   # "guided": the student's CFG mix, else unchanged
    targets.token_weights       # (1, L) per-token weights (scale_weights="balanced"), or None
    targets.erase_weights       # (1, L) L_FCE's token weights: the free scales' tokens at 0 (and,
                                # method early, every token past its first scales), or
                                # token_weights when there are none

Why: the sampler mixes two branches, cfg * cond + (1 - cfg) * null. The paper trains the
conditional branch toward the CFG-combined teacher and the sampler then guides it again; the
guidance-consistent targets ("conditional") are the frozen model's own conditional logits of
the safe prompt, so a trained branch meets guidance as the safe prompt's branch always did.
All targets are computed with the frozen model (a LoRA with B = 0, or before any update).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .choices import FILTERED_CE_METHODS
from .early import within_first_scales
from .trajectories import frozen_conditional_logits


@dataclass
class Targets:
    null_rows: torch.Tensor | None        # (N, L, 2d) frozen null logits on each row's trajectory
    guided_null: dict | None              # "guided": {"unsafe"|"safe": (N, L, 2d)} frozen null logits
    token_weights: torch.Tensor | None    # (1, L), sums to 1
    erase_weights: torch.Tensor | None    # (1, L), sums to 1: token_weights without the free scales
                                          # (method early: only its first scales)
    cfg: float
    tau: float

    def guide(self, logits: torch.Tensor, rows, side: str) -> torch.Tensor:
        """"guided" targets: the sampler's CFG mix of the student's conditional logits with the
        frozen null branch (both / tau); any other targets: the logits unchanged."""
        if self.guided_null is None:
            return logits
        null = self.guided_null[side][rows].float()
        return self.cfg * (logits.float() / self.tau) + (1 - self.cfg) * null


def scale_balanced_weights(schedule) -> torch.Tensor:
    """(1, L) token weights giving every scale the same total: the 1-, 4- and 16-token scales
    decide the layout but are a few % of the tokens."""
    weights = torch.cat([torch.full((h * w,), 1.0 / (len(schedule) * h * w)) for h, w in schedule])
    return (weights / weights.sum())[None]


def without_free_scales(token_weights: torch.Tensor | None, schedule, free_scales: int) -> torch.Tensor | None:
    """(1, L) weights with the first `free_scales` scales' tokens at 0, renormalised (None and
    free_scales 0: unchanged). The free scales are sampled without guidance and hold what the
    prompt leaves open (layout, background): the erasure loss has nothing to move there, and
    moving it shifts every other prompt's picture at the same seed."""
    if free_scales == 0:
        return token_weights
    total = sum(h * w for h, w in schedule)
    weights = torch.full((1, total), 1.0 / total) if token_weights is None else token_weights.clone()
    weights[:, :sum(h * w for h, w in schedule[:free_scales])] = 0
    return weights / weights.sum()


@torch.no_grad()
def prepare_targets(model, bank, trajs, pairs, config, autocast, free_scales: int = 0) -> Targets:
    """Rewrite trajs.teacher_logits (in memory; the cache file keeps the CFG teacher) to the
    targets of config.targets, and compute the frozen null logits the objective needs.
    free_scales: how many first scales L_FCE leaves out (without_free_scales)."""
    settings = config.trajectory
    rows = list(range(len(pairs)))
    safe = [p.safe for p in pairs]

    def frozen(condition, prompts, indices=rows):
        # as many pairs through the frozen model at once as trajectories were sampled at once
        return frozen_conditional_logits(model, condition, trajs, indices, prompts, settings.tau,
                                         chunk=settings.batch_size, autocast=autocast).to(trajs.teacher_logits)

    svare = config.method in FILTERED_CE_METHODS
    null_rows = frozen(bank.null_condition, safe) if svare and config.null_weight > 0 else None
    guided_null = None
    if config.targets == "conditional":
        trajs.teacher_logits = frozen(bank.condition, safe)
    elif config.targets == "guided":   # the null logits of each prompt's own length
        guided_null = {side: frozen(bank.null_condition, [getattr(p, side) for p in pairs])
                       for side in ("unsafe", "safe")}
    else:
        keep = [i for i, p in enumerate(pairs) if p.unsafe == p.safe]
        if keep and svare and config.preservation_weight > 0 and config.keep_target == "frozen":
            # keep pairs are held to their own conditional logits
            trajs.teacher_logits[keep] = frozen(bank.condition, [safe[i] for i in keep], keep)
    weights = scale_balanced_weights(trajs.schedule).to(trajs.teacher_logits.device) \
        if config.scale_weights == "balanced" else None
    erase_weights = without_free_scales(weights, trajs.schedule, free_scales)
    if config.method == "early":       # L_FCE and the entropy term on the first scales only
        erase_weights = within_first_scales(erase_weights, trajs.schedule, config.early_scales)
    if erase_weights is not None:
        erase_weights = erase_weights.to(trajs.teacher_logits.device)
    return Targets(null_rows=null_rows, guided_null=guided_null, token_weights=weights, erase_weights=erase_weights,
                   cfg=settings.cfg, tau=settings.tau)
