"""Erasure losses on bitwise logits: S-VARE (L_FCE + w * L_Pre), basic VARE (MSE) and naive CE.

Layout everywhere: `logits[b, t, 2j + v]` is the logit that bit j of token t has value v, shape
(B, L, 2d); `bit_labels` (B, L, d) int64 in {0, 1}. The student is run teacher-forced on the cached
"auxiliary token" trajectory of the SAFE prompt (see trajectories.py); the teacher logits are the
frozen model's CFG-combined, tempered logits cached with that trajectory.

Usage:
    from vare_core.erasure.losses import LossConfig, erasure_objective
    loss, stats = erasure_objective("svare", student_unsafe_logits, student_safe_logits,
                                    teacher_logits, bit_labels, LossConfig())
    loss.backward()
    print(stats["loss"], stats["fce"], stats["pre"], stats["selected_fraction"])

Conventions (match S-VARE's `erase_trainer.py`, commit 7ed8ef2; pinned by
`golden/svare_losses.safetensors`):
- Per-token quantities are averaged over the batch as `mean_b [ sum_t x[b, t] / L ]`, where L is the
  token count. With a `token_mask` (padded batches) the sum runs over valid tokens and L is that
  row's number of valid tokens; without one every token is valid, which is the official formula.
- L_FCE: per-bit CE; a bit is wrong when its CE > gamma (ln 2: p(label) < 0.5), judged on detached
  values; a token is selected when its fraction of wrong bits is >= alpha. Selected tokens
  contribute their mean CE over ALL their bits; the divisor stays L (not the selected count).
  alpha = 0 therefore selects every token (rate >= 0 always) and L_FCE equals the naive CE.
- L_Pre: F.kl_div(log p_student, p_teacher) elementwise over both classes of every bit, averaged
  over the 2d entries: the per-token value is HALF the per-bit mean KL. `preservation_loss`
  returns it WITHOUT the weight; the official code multiplies by reg_lambda = 0.5.
- Basic VARE: the S-VARE repository contains no VARE-only objective (its trainer has just the two
  terms above; the history and the zip of commit 1a5c3ca hold nothing else). We follow the paper's
  description -- MSE between the student's distribution on (c*, trajectory) and the frozen model's
  on (c, trajectory) -- in the same conventions as L_Pre: squared difference of the 2-way softmax
  probabilities averaged over the 2d entries (which equals the per-bit mean of (p1_S - p1_T)^2,
  i.e. `F.mse_loss(p_student, p_teacher)` when every token is valid), sum over tokens / L, batch
  mean. The teacher side is the same cached teacher logits that L_Pre uses.
- Everything is computed in fp32, whatever the logits' dtype (fp16/bf16 autocast training).

Stats keys (floats): loss, selected_fraction, bit_error_rate, mean_bit_ce and, per method,
fce / pre / pre_weighted (svare), vare (vare), naive_ce (naive).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import is_real
from .choices import EraseTarget, Method, choices

LN2 = math.log(2)
METHODS = choices(Method)
ERASE_TARGETS = choices(EraseTarget)


@dataclass
class LossConfig:
    gamma: float = LN2                # a bit is wrong when its CE > gamma (ln 2: p(label) < 0.5)
    alpha: float = 0.25              # a token is selected when >= alpha of its bits are wrong
    preservation_weight: float = 0.5  # official reg_lambda
    erase_target: EraseTarget = "hard"   # L_FCE on selected tokens: hard (CE to the sampled bits,
                                         # official) | soft (CE to the target logits' distribution)

    def __post_init__(self):
        if self.erase_target not in ERASE_TARGETS:
            raise ValueError(f"erase_target must be one of {ERASE_TARGETS}, got {self.erase_target!r}")
        _check_gamma(self.gamma)
        _check_alpha(self.alpha)
        _check_real(self.preservation_weight, "preservation_weight")
        if self.preservation_weight < 0:
            raise ValueError(f"preservation_weight must be >= 0, got {self.preservation_weight}")


# ----------------------------------------------------------------------------- input checks

def _check_real(value, name: str) -> float:
    if not is_real(value):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_gamma(gamma) -> float:
    gamma = _check_real(gamma, "gamma")
    if gamma <= 0:
        raise ValueError(f"gamma (bit CE threshold) must be > 0, got {gamma}; the default is ln 2")
    return gamma


def _check_alpha(alpha) -> float:
    alpha = _check_real(alpha, "alpha")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (fraction of wrong bits) must be in [0, 1], got {alpha}")
    return alpha


def _check_logits(logits: Tensor, name: str) -> None:
    if logits.dim() != 3 or logits.shape[-1] % 2 != 0 or not logits.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (B, L, 2d) with an even last dim, "
                         f"got {tuple(logits.shape)} {logits.dtype}")


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have "
                         "the same shape (same trajectory, same layout)")


def _check_labels(logits: Tensor, bit_labels: Tensor) -> None:
    B, L, two_d = logits.shape
    if bit_labels.shape != (B, L, two_d // 2):
        raise ValueError(f"bit_labels must have shape {(B, L, two_d // 2)} for logits "
                         f"{tuple(logits.shape)}, got {tuple(bit_labels.shape)}")
    if bit_labels.is_floating_point() or bit_labels.is_complex():
        raise ValueError(f"bit_labels must be an integer tensor of 0/1, got {bit_labels.dtype}")
    if bit_labels.numel() and (bit_labels.min() < 0 or bit_labels.max() > 1):
        raise ValueError("bit_labels must contain only 0 and 1")


def _token_weights(token_mask: Tensor | None, like: Tensor) -> Tensor:
    """(B, L) fp32 weights = valid / (number of valid tokens in the row)."""
    B, L = like.shape[:2]
    if token_mask is None:
        return torch.full((B, L), 1.0 / L, dtype=torch.float32, device=like.device)
    if token_mask.shape != (B, L):
        raise ValueError(f"token_mask must have shape {(B, L)}, got {tuple(token_mask.shape)}")
    valid = token_mask.to(device=like.device, dtype=torch.float32)
    counts = valid.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("token_mask has a batch row with no valid tokens; drop that sample")
    return valid / counts


def token_average(per_token: Tensor, token_mask: Tensor | None) -> Tensor:
    """mean_b [ sum_t per_token[b, t] / L_b ], L_b = number of valid tokens of row b."""
    weights = _token_weights(token_mask, per_token)
    return (per_token * weights).sum(dim=1).mean()


# ----------------------------------------------------------------------------- per-bit, per-token

def bit_log_probs(logits: Tensor) -> Tensor:
    """(B, L, 2d) logits -> (B, L, d, 2) fp32 log-probabilities of each bit's two values."""
    _check_logits(logits, "logits")
    B, L, two_d = logits.shape
    return F.log_softmax(logits.float().view(B, L, two_d // 2, 2), dim=-1)


def bit_probs(logits: Tensor) -> Tensor:
    """(B, L, 2d) logits -> (B, L, d, 2) fp32 probabilities of each bit's two values."""
    _check_logits(logits, "logits")
    B, L, two_d = logits.shape
    return F.softmax(logits.float().view(B, L, two_d // 2, 2), dim=-1)


def bit_cross_entropy(logits: Tensor, bit_labels: Tensor) -> Tensor:
    """(B, L, d) per-bit cross-entropy -log p(label), fp32."""
    log_probs = bit_log_probs(logits)
    _check_labels(logits, bit_labels)
    labels = bit_labels.to(device=logits.device, dtype=torch.long).unsqueeze(-1)
    return -log_probs.gather(-1, labels).squeeze(-1)


@torch.no_grad()
def bit_error_mask(bit_ce: Tensor, gamma: float = LN2) -> Tensor:
    """(B, L, d) fp32 1.0 where a bit is wrong (CE > gamma); detached."""
    gamma = _check_gamma(gamma)
    return (bit_ce.detach() > gamma).float()


@torch.no_grad()
def token_error_rate(bit_ce: Tensor, gamma: float = LN2) -> Tensor:
    """(B, L) fraction of a token's bits that are wrong; detached."""
    return bit_error_mask(bit_ce, gamma).mean(dim=-1)


@torch.no_grad()
def token_selection(bit_ce: Tensor, gamma: float = LN2, alpha: float = 0.25) -> Tensor:
    """(B, L) bool: tokens whose fraction of wrong bits is >= alpha (alpha = 0 selects all)."""
    alpha = _check_alpha(alpha)
    return token_error_rate(bit_ce, gamma) >= alpha


def token_mean_bit_ce(bit_ce: Tensor) -> Tensor:
    """(B, L) mean CE over all of a token's bits (right and wrong ones)."""
    return bit_ce.mean(dim=-1)


def token_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """(B, L) official per-token KL(teacher || student): elementwise KL over both classes of every
    bit, averaged over the 2d entries (= half the per-bit mean KL). Teacher detached."""
    _check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    student_log_probs = bit_log_probs(student_logits)
    teacher_probs = bit_probs(teacher_logits.detach())
    kl = F.kl_div(student_log_probs, teacher_probs, reduction="none")  # (B, L, d, 2)
    return kl.mean(dim=(-2, -1))


def token_prob_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """(B, L) squared difference of the bits' 2-way probabilities, averaged over the 2d entries
    (= per-bit mean of (p1_student - p1_teacher)^2). Teacher detached."""
    _check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    student_probs = bit_probs(student_logits)
    teacher_probs = bit_probs(teacher_logits.detach())
    return (student_probs - teacher_probs).square().mean(dim=(-2, -1))


# ----------------------------------------------------------------------------- losses

@torch.no_grad()
def _selection_stats(bit_ce: Tensor, selected: Tensor, wrong: Tensor,
                     token_mask: Tensor | None) -> dict:
    valid = torch.ones_like(selected, dtype=torch.float32) if token_mask is None \
        else token_mask.to(device=selected.device, dtype=torch.float32)
    n_valid = valid.sum().clamp_min(1.0)
    return {
        "selected_fraction": float((selected.float() * valid).sum() / n_valid),
        "selected_tokens": int((selected.float() * (valid > 0).float()).sum()),   # weights: counts
        "bit_error_rate": float((wrong.mean(dim=-1) * valid).sum() / n_valid),
        "mean_bit_ce": float((bit_ce.mean(dim=-1) * valid).sum() / n_valid),
    }


def filtered_ce_loss(student_logits: Tensor, bit_labels: Tensor, gamma: float = LN2,
                     alpha: float = 0.25, token_mask: Tensor | None = None) -> tuple[Tensor, dict]:
    """L_FCE = mean_b [ sum_t selected[b,t] * mean_j CE[b,t,j] / L ]; stats as floats."""
    gamma, alpha = _check_gamma(gamma), _check_alpha(alpha)
    bit_ce = bit_cross_entropy(student_logits, bit_labels)
    wrong = bit_error_mask(bit_ce, gamma)
    selected = token_selection(bit_ce, gamma, alpha)  # detached: selection never carries gradient
    loss = token_average(token_mean_bit_ce(bit_ce) * selected.float(), token_mask)
    return loss, _selection_stats(bit_ce, selected, wrong, token_mask)


def soft_filtered_ce_loss(student_logits: Tensor, target_logits: Tensor, bit_labels: Tensor,
                          gamma: float = LN2, alpha: float = 0.25,
                          token_mask: Tensor | None = None) -> tuple[Tensor, dict]:
    """L_FCE with soft targets: the tokens are selected exactly as in filtered_ce_loss (bits
    judged against the sampled labels), but a selected token is trained toward the target's
    bit distribution (mean over bits of -sum_v p_target(v) log p_student(v)) instead of the
    one sampled value. Same gradient as KL(target || student); teacher detached."""
    gamma, alpha = _check_gamma(gamma), _check_alpha(alpha)
    _check_same_shape(student_logits, target_logits, "student_logits", "target_logits")
    bit_ce = bit_cross_entropy(student_logits, bit_labels)
    wrong = bit_error_mask(bit_ce, gamma)
    selected = token_selection(bit_ce, gamma, alpha)  # detached: selection never carries gradient
    soft_ce = -(bit_probs(target_logits.detach()) * bit_log_probs(student_logits)).sum(-1).mean(-1)
    loss = token_average(soft_ce * selected.float(), token_mask)
    return loss, _selection_stats(bit_ce, selected, wrong, token_mask)


def preservation_loss(student_logits: Tensor, teacher_logits: Tensor,
                      token_mask: Tensor | None = None) -> Tensor:
    """L_Pre without its weight: mean_b [ sum_t token_kl[b,t] / L ] (official convention)."""
    return token_average(token_kl(student_logits, teacher_logits), token_mask)


def naive_ce_loss(student_logits: Tensor, bit_labels: Tensor,
                  token_mask: Tensor | None = None) -> Tensor:
    """Baseline: mean CE over every bit of every (valid) token, no filtering."""
    bit_ce = bit_cross_entropy(student_logits, bit_labels)
    return token_average(token_mean_bit_ce(bit_ce), token_mask)


def vare_loss(student_logits: Tensor, teacher_logits: Tensor,
              token_mask: Tensor | None = None) -> Tensor:
    """Basic VARE: MSE between the student's bit probabilities (unsafe prompt) and the frozen
    teacher's (safe prompt) on the same trajectory: mean_b [ sum_t token_prob_mse[b,t] / L ]."""
    return token_average(token_prob_mse(student_logits, teacher_logits), token_mask)


def _filtered_ce_on_rows(logits: Tensor, bit_labels: Tensor, config: LossConfig,
                         token_mask: Tensor | None, erase_rows: Tensor | None,
                         target_logits: Tensor | None = None) -> tuple[Tensor, dict]:
    """L_FCE over the rows to erase, as a mean over ALL rows (keep rows contribute 0)."""
    def selected_ce(rows_logits, rows_labels, rows_target, mask):
        if config.erase_target == "soft":
            return soft_filtered_ce_loss(rows_logits, rows_target, rows_labels, config.gamma,
                                         config.alpha, mask)
        return filtered_ce_loss(rows_logits, rows_labels, config.gamma, config.alpha, mask)

    if erase_rows is None or bool(erase_rows.all()):
        return selected_ce(logits, bit_labels, target_logits, token_mask)
    rows = erase_rows.to(logits.device)
    if not bool(rows.any()):
        zero = logits.float().sum() * 0.0          # keeps the graph: a keep-only batch has no FCE
        return zero, {"selected_fraction": 0.0, "selected_tokens": 0, "bit_error_rate": 0.0, "mean_bit_ce": 0.0}
    mask = token_mask[rows] if token_mask is not None else None
    target = target_logits[rows.to(target_logits.device)] if target_logits is not None else None
    fce, stats = selected_ce(logits[rows], bit_labels[rows.to(bit_labels.device)], target, mask)
    share = int(rows.sum()) / len(rows)
    # rates over all rows' tokens (keep rows: none selected), so they average exactly over processes
    stats = {k: (v if k == "selected_tokens" else v * share) for k, v in stats.items()}
    return fce * share, stats


def erasure_objective(method: str, student_unsafe_logits: Tensor,
                      student_safe_logits: Tensor | None, teacher_logits: Tensor | None,
                      bit_labels: Tensor | None, config: LossConfig,
                      token_mask: Tensor | None = None,
                      erase_rows: Tensor | None = None,
                      erase_token_mask: Tensor | None = None) -> tuple[Tensor, dict]:
    """One training objective and its float stats.

    svare: L_FCE(student on c*) + w * L_Pre(student on c vs teacher); w = 0 skips the safe pass.
    vare:  vare_loss(student on c*, teacher).   naive: naive_ce_loss(student on c*).
    Inputs a method does not use may be None. selected_fraction / bit_error_rate / mean_bit_ce
    (the student's disagreement with the safe trajectory on c*) are reported whenever bit_labels
    are given: they fall as erasure proceeds.
    erase_rows (B,) bool, svare only: rows that are False are keep pairs (the same prompt on both
    sides); they take part in L_Pre only, and count as 0 in L_FCE's mean over the batch (so a
    batch split over processes still sums to the same loss).
    erase_token_mask: L_FCE's token weights where they differ from token_mask's (the trainer
    leaves a model's free scales out of L_FCE); None: token_mask.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "early":
        raise ValueError("method 'early' has its own objective (the first scales, an entropy term): early.early_objective")
    if not isinstance(config, LossConfig):
        raise ValueError(f"config must be a LossConfig, got {type(config).__name__}")
    _check_logits(student_unsafe_logits, "student_unsafe_logits")
    needs = {"svare": ("bit_labels",), "vare": ("teacher_logits",),
             "naive": ("bit_labels",)}[method]
    if method == "svare" and config.preservation_weight > 0:
        needs = needs + ("student_safe_logits", "teacher_logits")
    if method == "svare" and config.erase_target == "soft":
        needs = needs + ("teacher_logits",)
    given = {"bit_labels": bit_labels, "teacher_logits": teacher_logits,
             "student_safe_logits": student_safe_logits}
    for name in needs:
        if given[name] is None:
            raise ValueError(f"method {method!r} needs {name} (got None)")

    stats: dict = {}
    if method == "svare":
        fce, stats = _filtered_ce_on_rows(student_unsafe_logits, bit_labels, config,
                                          token_mask if erase_token_mask is None else erase_token_mask,
                                          erase_rows, teacher_logits)
        loss = fce
        stats["fce"] = float(fce.detach())
        if config.preservation_weight > 0:
            pre = preservation_loss(student_safe_logits, teacher_logits, token_mask)
            loss = fce + config.preservation_weight * pre
            stats["pre"] = float(pre.detach())
        else:
            stats["pre"] = 0.0
        stats["pre_weighted"] = config.preservation_weight * stats["pre"]
    else:
        if bit_labels is not None:  # progress diagnostics only, no gradient
            with torch.no_grad():
                _, stats = filtered_ce_loss(student_unsafe_logits.detach(), bit_labels,
                                            config.gamma, config.alpha, token_mask)
        if method == "vare":
            loss = vare_loss(student_unsafe_logits, teacher_logits, token_mask)
            stats["vare"] = float(loss.detach())
        else:
            loss = naive_ce_loss(student_unsafe_logits, bit_labels, token_mask)
            stats["naive_ce"] = float(loss.detach())
    stats["loss"] = float(loss.detach())
    return loss, stats
