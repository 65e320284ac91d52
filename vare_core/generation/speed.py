"""Fast sampling: the knobs `speed="fast"` turns on, checked once and laid out over a schedule.

    settings = SamplingSettings(speed="fast")                  # the model's fast defaults
    settings = SamplingSettings(speed="fast", kv_budget=0.1)   # ... with one knob of one's own
    settings = SamplingSettings(unguided_scales=2)             # exact otherwise: one knob alone
    plan = speed_plan(settings, schedule, fast_defaults)       # what the sampler does per scale
    plan = speed_plan(settings, schedule, fast_defaults, untouched=3)   # a Concept Guard on 3 scales

The knobs, each off at its exact value (0, 0, 1, 1): the same bits as the exact sampler.
- unguided_scales: the last N scales are drawn without guidance (cfg 1); the unconditional rows
  leave the batch and the key/value caches there (StageVAR, Switti: the late scales refine
  detail the guidance no longer steers).
- pruned_scales / keep_share: the last N scales compute only that share of their tokens, those
  that differ most from their neighbours; the others take the previous scale's output (FastVAR). One
  share for all of them, or one per pruned scale.
- kv_budget: each block keeps at most this share of the schedule's tokens in its key/value cache
  between scales, those the scale's queries attend to most (ScaleKV).
A knob given explicitly wins in either speed; `fast` fills the others from the model family's
fast defaults (models/infinity_defaults.py FAST, the embedded model's embedded/spec.py FAST).
No knob acts on a Concept Guard's scales (`untouched`): drawn at cfg 1 its push toward the
anchor shrinks and the concept comes back; pruned, it would not read every token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..checks import is_finite_number, is_integer
from .per_scale import per_scale_values

SPEEDS = ("exact", "fast")
EXACT = {"unguided_scales": 0, "pruned_scales": 0, "keep_share": 1.0, "kv_budget": 1.0}
KNOBS = tuple(EXACT)


def check_speed_settings(speed, knobs: Mapping) -> dict:
    """ValueError naming the setting for anything out of range; returns the knobs as kept
    (keep_share: a float, or a tuple when one per pruned scale)."""
    if speed not in SPEEDS:
        raise ValueError(f"speed must be one of {', '.join(SPEEDS)}, got {speed!r}")
    checked = dict(knobs)
    for name in ("unguided_scales", "pruned_scales"):
        value = knobs.get(name)
        if value is not None and not is_integer(value, minimum=0):
            raise ValueError(f"{name} must be a whole number of scales >= 0 (0: off), got {value!r}")
    share = knobs.get("keep_share")
    if share is not None:
        try:
            values = per_scale_values(share, "keep_share")
        except ValueError:
            raise ValueError(f"keep_share {share!r} is not a share: write one number above 0 and at most 1 "
                             f"(e.g. 0.5), or one per pruned scale (e.g. \"0.5,0.4,0.3\")") from None
        if any(not 0 < v <= 1 for v in values):
            raise ValueError(f"keep_share must be above 0 and at most 1 (1: every token), got {share!r}")
        checked["keep_share"] = values[0] if len(values) == 1 else tuple(values)
        pruned = knobs.get("pruned_scales")
        if len(values) > 1 and pruned is not None and len(values) != pruned:
            raise _share_count_error(len(values), pruned)
    budget = knobs.get("kv_budget")
    if budget is not None and not (is_finite_number(budget) and 0 < budget <= 1):
        raise ValueError(f"kv_budget must be a share of the schedule's tokens above 0 and at most 1 "
                         f"(1: keep every token), got {budget!r}")
    return checked


def _share_count_error(values: int, pruned: int) -> ValueError:
    return ValueError(f"keep_share: {values} values for {pruned} pruned scales; give one number, "
                      f"or one per pruned scale")


@dataclass(frozen=True)
class SpeedPlan:
    """The knobs laid out over one schedule."""
    unguided_from: int                 # first scale drawn at cfg 1 (n_scales: none)
    keep_shares: tuple[float, ...]     # per scale, 1.0 where every token is computed
    kv_budget: int | None              # tokens each block keeps between scales (None: all)

    @property
    def prunes(self) -> bool:
        return any(share < 1.0 for share in self.keep_shares)


def speed_plan(settings, schedule: Sequence[tuple[int, int]], fast_defaults: Mapping | None = None,
               untouched: int = 0) -> SpeedPlan:
    """settings: a SamplingSettings (its speed and knobs); fast_defaults: the family's FAST
    (None: Infinity's), used for the knobs left None under speed "fast". untouched: the first
    scales stay guided and whole whatever the knobs say (a Concept Guard's)."""
    if fast_defaults is None:
        from ..models.infinity_defaults import FAST as fast_defaults
    n_scales = len(schedule)
    knobs = {}
    for name in KNOBS:
        value = getattr(settings, name)
        if value is None:
            value = fast_defaults.get(name, EXACT[name]) if settings.speed == "fast" else EXACT[name]
        knobs[name] = value
    knobs = check_speed_settings(settings.speed, knobs)
    pruned = min(knobs["pruned_scales"], n_scales - 1)      # scale 0 has nothing to carry from
    shares = per_scale_values(knobs["keep_share"], "keep_share")
    if len(shares) not in (1, max(pruned, 1)):
        raise _share_count_error(len(shares), pruned)
    shares = shares * pruned if len(shares) == 1 else shares
    keep = [1.0] * (n_scales - pruned) + (shares[-pruned:] if pruned else [])
    keep = [1.0] * untouched + keep[untouched:]
    total = sum(h * w for h, w in schedule)
    budget = None if knobs["kv_budget"] >= 1.0 else max(1, math.ceil(knobs["kv_budget"] * total))
    unguided = min(knobs["unguided_scales"], n_scales)
    return SpeedPlan(unguided_from=max(n_scales - unguided, untouched), keep_shares=tuple(keep),
                     kv_budget=budget)
