"""Early-scale erasure (method "early"): S-VARE's objective with its erasure loss confined to the
first k scales of the schedule, and an entropy term that keeps the erased distribution as sharp
as its target's. After the idea of SACE (2026); the formulas are the pack's reading of it
(docs/method.md, "Early-scale erasure").

    weights = within_first_scales(erase_weights, schedule, k)     # (1, L): tokens past k at 0
    loss, stats = early_objective(unsafe_logits, safe_logits, target_logits, bit_labels,
                                  LossConfig(), entropy_weight=0.1, erase_token_mask=weights)

    loss = L_FCE + entropy_weight * L_H + w * L_Pre

- L_FCE: svare's filtered cross-entropy on the erase rows (the same selection by alpha / gamma,
  the same hard or soft target) with the token weights of `erase_token_mask`: zero past the
  first k scales, renormalised over the tokens kept (within_first_scales, after the trainer's
  without_free_scales).
- L_H: on the same rows and tokens (every token of the window, selected or not), the weighted
  mean of (H_student - H_target)^2, where H is a token's mean per-bit binary entropy (nats) of
  the 2-way softmax: the student's logits on the unsafe prompt against the target logits the
  L_FCE trains toward (the frozen safe prompt's; detached). It is 0 when the student is exactly
  as sharp as the target and grows as it collapses onto one bit value or spreads toward uniform.
- L_Pre: svare's preservation KL on the safe rows, every scale, weighted by preservation_weight.

Stats: svare's (fce, pre, pre_weighted, selected_fraction, ...) plus entropy (L_H, unweighted),
entropy_weighted, and student_entropy / target_entropy (mean H over the erase rows' window).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .losses import LossConfig, bit_log_probs, erasure_objective, token_average


def within_first_scales(token_weights: Tensor | None, schedule, early_scales: int) -> Tensor:
    """(1, L) weights with every token past the first `early_scales` scales at 0, renormalised
    over the tokens kept (token_weights None: every token the same)."""
    total = sum(h * w for h, w in schedule)
    weights = torch.full((1, total), 1.0 / total) if token_weights is None else token_weights.clone()
    weights[:, sum(h * w for h, w in schedule[:early_scales]):] = 0
    kept = weights.sum()
    if not bool(kept > 0):
        raise ValueError(f"the first {early_scales} scale(s) hold no token the erasure loss trains")
    return weights / kept


def check_early_scales(early_scales: int, n_scales: int, free_scales: int) -> None:
    """The window must lie inside the schedule and hold a scale the erasure loss trains (the
    free scales, drawn without guidance, are left out unless erase_free_scales is on)."""
    if early_scales > n_scales:
        raise ValueError(f"early_scales {early_scales}: the model's schedule has {n_scales} scales; "
                         f"choose 1 to {n_scales}")
    if early_scales <= free_scales:
        raise ValueError(f"early_scales {early_scales} covers only the model's {free_scales} free scale(s) "
                         "(drawn without guidance), which the erasure loss leaves out: choose early_scales "
                         f">= {free_scales + 1}, or set erase_free_scales to train the free scales too")


def check_entropy_weight(entropy_weight) -> float:
    if isinstance(entropy_weight, bool) or not isinstance(entropy_weight, (int, float)) \
            or not math.isfinite(entropy_weight) or entropy_weight < 0:
        raise ValueError(f"entropy_weight must be a finite number >= 0, got {entropy_weight!r}")
    return float(entropy_weight)


def token_entropy(logits: Tensor) -> Tensor:
    """(B, L) mean over a token's bits of the binary entropy of each bit's 2-way softmax (nats)."""
    log_probs = bit_log_probs(logits)
    return -(log_probs.exp() * log_probs).sum(-1).mean(-1)


def entropy_gap(student_logits: Tensor, target_logits: Tensor, window: Tensor | None = None,
                erase_rows: Tensor | None = None) -> tuple[Tensor, dict]:
    """L_H = mean over the erase rows (keep rows count 0, as in L_FCE's mean over all rows) of
    sum_t window[t] (H_student[t] - H_target[t])^2; window: L_FCE's token weights (None: every
    token the same). Target detached. -> (L_H, {"student_entropy", "target_entropy"})."""
    if student_logits.shape != target_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and target_logits "
                         f"{tuple(target_logits.shape)} must have the same shape")
    rows = None if erase_rows is None or bool(erase_rows.all()) else erase_rows.to(student_logits.device)
    if rows is not None and not bool(rows.any()):
        zero = student_logits.float().sum() * 0.0      # keeps the graph: a keep-only batch
        return zero, {"student_entropy": 0.0, "target_entropy": 0.0}
    if rows is not None:
        student_logits, target_logits = student_logits[rows], target_logits[rows.to(target_logits.device)]
        window = window[rows.to(window.device)] if window is not None and window.shape[0] > 1 else window
    if window is not None:
        window = window.expand(student_logits.shape[0], -1)
    student, target = token_entropy(student_logits), token_entropy(target_logits.detach())
    gap = token_average((student - target).square(), window)
    with torch.no_grad():
        stats = {"student_entropy": float(token_average(student, window)),
                 "target_entropy": float(token_average(target, window))}
    share = 1.0 if rows is None else int(rows.sum()) / len(rows)
    return gap * share, stats


def early_objective(student_unsafe_logits: Tensor, student_safe_logits: Tensor | None,
                    teacher_logits: Tensor | None, bit_labels: Tensor, config: LossConfig,
                    entropy_weight: float, token_mask: Tensor | None = None,
                    erase_rows: Tensor | None = None,
                    erase_token_mask: Tensor | None = None) -> tuple[Tensor, dict]:
    """L_FCE (on erase_token_mask's tokens) + entropy_weight * L_H + w * L_Pre, and float stats;
    the arguments are losses.erasure_objective's, with erase_token_mask the early window."""
    entropy_weight = check_entropy_weight(entropy_weight)
    if teacher_logits is None and entropy_weight > 0:
        raise ValueError("method 'early' needs teacher_logits (the target of its entropy term), got None")
    loss, stats = erasure_objective("svare", student_unsafe_logits, student_safe_logits, teacher_logits,
                                    bit_labels, config, token_mask=token_mask, erase_rows=erase_rows,
                                    erase_token_mask=erase_token_mask)
    window = token_mask if erase_token_mask is None else erase_token_mask
    if teacher_logits is None:
        entropy, entropy_stats = loss.new_zeros(()), {"student_entropy": 0.0, "target_entropy": 0.0}
    elif entropy_weight > 0:
        entropy, entropy_stats = entropy_gap(student_unsafe_logits, teacher_logits, window, erase_rows)
        loss = loss + entropy_weight * entropy
    else:
        with torch.no_grad():               # reported, not trained
            entropy, entropy_stats = entropy_gap(student_unsafe_logits.detach(), teacher_logits, window,
                                                 erase_rows)
    stats.update(entropy_stats)
    stats["entropy"] = float(entropy.detach())
    stats["entropy_weighted"] = entropy_weight * stats["entropy"]
    stats["loss"] = float(loss.detach())
    return loss, stats
