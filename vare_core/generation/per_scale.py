"""A per-scale setting (cfg, tau): one number for every scale or one number per scale, as typed
by a user (text, a number, a list), checked, and laid out over a model's scales.

    from vare_core.generation import per_scale
    per_scale.parse_setting("3", n_scales=13, name="--cfg")            # 3.0 (laid out by the model)
    per_scale.parse_per_scale("3,3,4,4,4,4,4", 7, "cfg")                # [3.0, 3.0, 4.0, ...]
    per_scale.with_free_scales(4.0, n_scales=5, free=1)                 # [1.0, 4.0, 4.0, 4.0, 4.0]
"""
from __future__ import annotations

import math
import numbers
import re

from ..checks import is_integer, is_real


def per_scale_values(value, name: str, n_scales: int | None = None) -> list[float]:
    """The finite numbers of a per-scale setting (cfg, tau) as given, not yet expanded.

    Accepts a number, a list of numbers, or text: "3", "3,3,4", "[3, 3, 4]", "3 3 4". Any
    other input is a ValueError naming `name`; n_scales only makes its example concrete."""
    if n_scales is None:
        allowed = 'a number (e.g. 3) or one number per scale (e.g. "3,3,4,4,4")'
    else:
        allowed = (f"a number (e.g. 3) or {n_scales} comma-separated numbers, one per scale "
                   f"(e.g. \"{','.join(['3'] * min(n_scales, 4))}{',...' if n_scales > 4 else ''}\")")

    def fail(reason: str):
        try:
            shown = repr(value)
        except ValueError:          # an int too long to print
            shown = f"<{type(value).__name__} too long to print>"
        shown = shown if len(shown) <= 80 else shown[:80] + "..."
        raise ValueError(f"{name}: {reason} in {shown}; expected {allowed}")

    if isinstance(value, bool):
        fail("a boolean is not a number")
    if isinstance(value, numbers.Real):
        items = [value]
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        parts = [part for part in re.split(r"[,\s]+", text.strip()) if part]
        if not parts:
            fail("no numbers")
        items = []
        for part in parts:
            try:
                items.append(float(part))
            except ValueError:
                fail(f"{part[:40]!r} is not a number")
    elif isinstance(value, (list, tuple)):
        items = list(value)
        if not items:
            fail("no numbers")
        if any(not is_real(v) for v in items):
            fail("every entry must be a number")
    else:
        fail(f"type {type(value).__name__} is not supported")
    try:
        values = [float(v) for v in items]
    except OverflowError:           # an int beyond the float range
        values = [math.inf]
    if not all(math.isfinite(v) for v in values):
        fail("values must be finite")
    if n_scales is not None and len(values) not in (1, n_scales):
        fail(f"got {len(values)} values for {n_scales} scales")
    return values


# Far beyond any useful setting, near enough that the sampler's arithmetic stays finite:
# cfg 1e308 made inf logits, tau 1e-320 divided them by a denormal.
SETTING_RANGES = {"cfg": (-100.0, 100.0), "tau": (1e-3, 100.0)}


def check_setting_range(values: list[float], name: str) -> None:
    """ValueError naming `name` (cfg / tau, any '--' or prefix) when a value is out of range."""
    kind = "tau" if "tau" in name else "cfg"
    low, high = SETTING_RANGES[kind]
    bad = [v for v in values if not low <= v <= high]
    if bad:
        typical = "3-6" if kind == "cfg" else "0.5-1"
        raise ValueError(f"{name} {bad[0]:g} is outside [{low:g}, {high:g}]; typical values are {typical}")


def parse_setting(value, n_scales: int, name: str) -> float | list[float]:
    """A cfg / tau as typed: one number stays one number (the model lays it out over its
    scales: see with_free_scales), several must be exactly one per scale."""
    given = per_scale_values(value, name, n_scales)
    return given[0] if len(given) == 1 else parse_per_scale(given, n_scales, name)


def with_free_scales(value, n_scales: int, free: int):
    """One cfg / tau number -> one per scale, the first `free` scales at 1.0 (no guidance, the
    model's own temperature); a per-scale list is used as given.

    Why: a model whose first scales are one or a few tokens sets the layout there (background,
    position, size). Its bits are drawn independently, and guidance or a low temperature pushes
    each towards its likelier side, so what a prompt leaves open collapses to one choice (the
    embedded model: 15% white backgrounds at cfg 4 where it predicts 31%). The official VAR
    sampler likewise starts its guidance at zero on the first scale."""
    if free <= 0:
        return value
    values = per_scale_values(value, "cfg / tau", n_scales)     # "3,3,4,4,5" is a per-scale list too
    if len(values) != 1:
        return value
    return [1.0] * min(free, n_scales) + [float(values[0])] * max(n_scales - free, 0)


def parse_per_scale(value, n_scales: int, name: str) -> list[float]:
    """Expand a per-scale setting (cfg, tau) to one float per scale (see per_scale_values).

    A single value is repeated; otherwise exactly n_scales values are needed."""
    if not is_integer(n_scales, minimum=1):
        raise ValueError(f"n_scales must be a positive int, got {n_scales!r}")
    values = per_scale_values(value, name, n_scales)
    return values * n_scales if len(values) == 1 else values
