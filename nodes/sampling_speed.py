"""The VAR Sampler's speed inputs: `speed` exact | fast and the fast-sampling knobs
(vare_core.generation.speed), each at -1 / auto for the speed's own value."""
from __future__ import annotations

from vare_core.embedded import spec as embedded_spec
from vare_core.generation.speed import SPEEDS, check_speed_settings
from vare_core.models import infinity_defaults

from .compat import io

AUTO = "auto"
SPEED_DEFAULT = -1          # a number input at this value: the speed's value (fast: the model's)


def _fast(name: str) -> str:
    """'embedded 1, Infinity 2': the families' fast values of a knob."""
    def shown(value):
        return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"
    return f"embedded {shown(embedded_spec.FAST[name])}, Infinity {shown(infinity_defaults.FAST[name])}"


def speed_inputs() -> list:
    return [
        io.Combo.Input("speed", options=list(SPEEDS), default="exact", optional=True,
                       tooltip="exact: every token of every scale, the reference images. fast: the "
                               "knobs below at the model's fast values (several times faster on large "
                               "images; most pictures stay the same, details change)"),
        io.Int.Input("unguided_scales", default=SPEED_DEFAULT, min=SPEED_DEFAULT, max=16, optional=True,
                     tooltip="the last N scales drawn without guidance (cfg 1): half the batch leaves "
                             f"there. -1 = the speed's value (exact 0; fast: {_fast('unguided_scales')})"),
        io.Int.Input("pruned_scales", default=SPEED_DEFAULT, min=SPEED_DEFAULT, max=16, optional=True,
                     tooltip="the last N scales compute only keep_share of their tokens, the others "
                             f"carried from the scale before. -1 = the speed's value (exact 0; fast: "
                             f"{_fast('pruned_scales')})"),
        io.String.Input("keep_share", default=AUTO, optional=True,
                        tooltip="share of tokens computed on each pruned scale: one number (0.5) or one "
                                f"per pruned scale ('0.5,0.4,0.3'); auto = the speed's value (fast: "
                                f"{_fast('keep_share')})"),
        io.Float.Input("kv_budget", default=float(SPEED_DEFAULT), min=float(SPEED_DEFAULT), max=1.0,
                       step=0.05, optional=True,
                       tooltip="each block keeps at most this share of the image's tokens in its "
                               "key/value cache between scales (less memory, the fine scales read "
                               f"fewer). -1 = the speed's value (exact 1 = all; fast: {_fast('kv_budget')})"),
    ]


def check_keep_share(text) -> str | None:
    """None when keep_share is 'auto' or valid shares, else the message for the node."""
    if not isinstance(text, str):
        return f"keep_share must be text: a share, one share per pruned scale, or 'auto'; got {text!r}"
    if text.strip().lower() == AUTO:
        return None
    try:
        check_speed_settings("exact", {"keep_share": text})
    except ValueError as err:
        return f"{err}, or 'auto' for the speed's value"
    return None


def speed_knobs(speed, unguided_scales, pruned_scales, keep_share, kv_budget) -> dict:
    """The node's inputs -> SamplingSettings fields (those left at -1 / auto: not given)."""
    knobs = {"speed": speed}
    for name, value in (("unguided_scales", unguided_scales), ("pruned_scales", pruned_scales),
                        ("kv_budget", kv_budget)):
        if value is not None and value != SPEED_DEFAULT:
            knobs[name] = value
    if keep_share is not None and str(keep_share).strip().lower() != AUTO:
        knobs["keep_share"] = keep_share
    return knobs
