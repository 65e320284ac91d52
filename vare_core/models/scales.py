"""Scale schedules and aspect-ratio templates of the Infinity model family.

An image is generated as a pyramid of token grids, coarse to fine. Each grid is one "scale"
(h, w) in latent tokens; one latent token covers 16x16 pixels (the VAE stride). Infinity defines
one 13-scale list per aspect-ratio template (h/w = 1, 1.25, 1.333, 1.5, 1.75, 2, 2.5, 3 and their
inverses) and four presets that use its first 7, 10, 12 or all 13 scales:

    preset  scales  square image
    0.06M   7       256 x 256    (521 tokens)
    0.25M   10      512 x 512    (2521 tokens)
    0.60M   12      768 x 768    (6425 tokens)
    1M      13      1024 x 1024  (10521 tokens)

The per-ratio lists are hand-picked in the official code (FoundationVision/Infinity,
`infinity/utils/dynamic_resolution.py`, commit 4c27bbb): they follow no formula (the 1.75 list
has an 11x6 scale, the 3.0 list ends at 111x37), so they are kept here as a compact table.
Inverse templates swap h and w; their keys are truncated to 3 decimals (1/1.5 -> 0.666), and the
nearest template wins, earlier templates winning exact ties, exactly like the official argmin.

Usage:
    from vare_core.models import scales
    schedule = scales.scale_schedule(1.0, "0.06M")          # [(1, 1), (2, 2), ..., (16, 16)]
    scales.token_offsets(schedule)                          # [0, 1, 5, 21, 57, 121, 265, 521]
    schedule, ratio, preset = scales.schedule_for_image(1024, 768)

A cfg or tau given per scale is read by generation/per_scale.py.
"""

from __future__ import annotations

from typing import Sequence

from ..checks import is_finite_number, is_integer

VAE_STRIDE = 16  # pixels per latent token side (patch 16 VAE, or patch 8 VAE + 2x2 unshuffle)
PRESETS = ("0.06M", "0.25M", "0.60M", "1M")
PRESET_NUM_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

# The 13 scales (h, w) of each "tall or square" template, copied as numbers from the official
# table (see module docstring). Wide templates are the same lists with h and w swapped.
_TALL_SCALES: dict[float, list[tuple[int, int]]] = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24),
            (32, 32), (40, 40), (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24),
            (35, 28), (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21),
            (36, 27), (48, 36), (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22),
            (39, 26), (48, 32), (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20),
            (42, 24), (56, 32), (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19),
            (46, 23), (60, 30), (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16),
            (50, 20), (65, 26), (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15),
            (54, 18), (72, 24), (90, 30), (111, 37)],
}


def _build_templates() -> dict[float, list[tuple[int, int]]]:
    # Same key order as the official dict (1.0, 1.25, 0.8, 1.333, 0.75, ...): it decides ties.
    templates = {}
    for ratio, hws in _TALL_SCALES.items():
        templates[ratio] = list(hws)
        if ratio != 1.0:
            templates[int(1 / ratio * 1000) / 1000] = [(w, h) for h, w in hws]
    return templates


_TEMPLATES = _build_templates()
ASPECT_RATIOS: tuple[float, ...] = tuple(_TEMPLATES)  # h/w of every template, official order
_RATIO_TOLERANCE = 0.01  # a ratio this close to a template names it (4/3 -> 1.333)

# schedule -> (ratio, preset) for every table entry; no two entries share a schedule.
_ENTRY_OF_SCHEDULE = {
    tuple(hws[:n]): (ratio, preset)
    for ratio, hws in _TEMPLATES.items()
    for preset, n in PRESET_NUM_SCALES.items()
}


def _template_key(ratio: float) -> float:
    """The template a ratio names (within 0.01), or a ValueError pointing to nearest_ratio."""
    if not is_finite_number(ratio) \
             or ratio <= 0:
        raise ValueError(f"ratio must be a positive finite number (h/w), got {ratio!r}")
    best = min(ASPECT_RATIOS, key=lambda template: abs(template - ratio))
    if abs(best - ratio) > _RATIO_TOLERANCE:
        raise ValueError(
            f"ratio {ratio} (h/w) is not an aspect template; templates are "
            f"{', '.join(str(r) for r in ASPECT_RATIOS)}. Use nearest_ratio({ratio}) = "
            f"{nearest_ratio(ratio)} to snap it.")
    return best


def _check_preset(preset: str) -> int:
    if preset not in PRESET_NUM_SCALES:
        raise ValueError(f"preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    return PRESET_NUM_SCALES[preset]


def nearest_ratio(h_div_w: float) -> float:
    """The aspect template nearest to h_div_w (earlier template on an exact tie, as official)."""
    if not is_finite_number(h_div_w) \
             or h_div_w <= 0:
        raise ValueError(f"h_div_w must be a positive finite number (height / width), got {h_div_w!r}")
    best = ASPECT_RATIOS[0]
    for template in ASPECT_RATIOS[1:]:  # strict < keeps the first of equal distances
        if abs(h_div_w - template) < abs(h_div_w - best):
            best = template
    return best


def scale_schedule(ratio: float = 1.0, preset: str = "1M") -> list[tuple[int, int]]:
    """(h, w) in tokens of every scale, coarse to fine, for an aspect template and a preset."""
    n_scales = _check_preset(preset)
    return list(_TEMPLATES[_template_key(ratio)][:n_scales])


def image_size(ratio: float = 1.0, preset: str = "1M") -> tuple[int, int]:
    """(height_px, width_px) of the image a template + preset entry produces."""
    h, w = scale_schedule(ratio, preset)[-1]
    return h * VAE_STRIDE, w * VAE_STRIDE


def all_image_sizes() -> dict[tuple[int, int], tuple[float, str]]:
    """Every valid (height_px, width_px) -> (ratio, preset), in table order."""
    return {image_size(ratio, preset): (ratio, preset)
            for ratio in ASPECT_RATIOS for preset in PRESETS}


def schedule_for_image(height: int, width: int) -> tuple[list[tuple[int, int]], float, str]:
    """Pick the template and preset whose image is exactly height x width pixels.

    Returns (scale_schedule, ratio, preset). Infinity was trained on these sizes only, so other
    sizes are refused with a list of the valid ones (nearest aspect first)."""
    for value, label in ((height, "height"), (width, "width")):
        if not is_integer(value, minimum=1):
            raise ValueError(f"image {label} must be a positive integer of pixels, got {value!r}")
    sizes = all_image_sizes()
    if (height, width) in sizes:
        ratio, preset = sizes[(height, width)]
        return scale_schedule(ratio, preset), ratio, preset
    ratio = nearest_ratio(height / width)
    near = ", ".join(f"{h}x{w} ({p})" for p in PRESETS for h, w in [image_size(ratio, p)])
    every = ", ".join(f"{h}x{w}" for h, w in sizes)
    raise ValueError(
        f"image size {height}x{width} (height x width) is not one Infinity generates. "
        f"Nearest aspect template h/w={ratio}: {near}. All valid sizes: {every}.")


def _is_positive_int(value) -> bool:
    """True for ints (numpy ints too) above zero; bools, floats and text are refused."""
    return (not isinstance(value, (bool, float, str))) and hasattr(value, "__index__") \
        and int(value) > 0


def _check_schedule(schedule: Sequence) -> list[tuple[int, int]]:
    """Validate a schedule of (h, w) pairs of positive ints and return it as a list of tuples."""
    if isinstance(schedule, (str, bytes)) or len(schedule) == 0:
        raise ValueError(f"scale schedule must be a non-empty list of (h, w) pairs, got {schedule!r}")
    pairs = []
    for item in schedule:
        if not isinstance(item, (tuple, list)):
            raise ValueError(f"scale schedule entry {item!r} is not an (h, w) pair of positive ints")
        if len(item) == 3:
            raise ValueError(
                f"scale schedule entry {tuple(item)} has 3 numbers; pass (h, w) pairs "
                "(official (t, h, w) entries convert with [(h, w) for _, h, w in entries])")
        if len(item) != 2 or not all(_is_positive_int(v) for v in item):
            raise ValueError(f"scale schedule entry {item!r} is not an (h, w) pair of positive ints")
        pairs.append((int(item[0]), int(item[1])))
    return pairs


def token_counts(schedule: Sequence) -> list[int]:
    """Tokens per scale (h * w)."""
    return [h * w for h, w in _check_schedule(schedule)]


def token_offsets(schedule: Sequence) -> list[int]:
    """Start of every scale in the flat token sequence, plus the total at the end."""
    offsets = [0]
    for count in token_counts(schedule):
        offsets.append(offsets[-1] + count)
    return offsets


def rope_reference_grid(schedule: Sequence) -> tuple[int, int]:
    """The grid RoPE positions are normalised to: the last (h, w) of the 1M schedule of the same
    template (official "STAR style" RoPE, row position = round(r * H_ref / h)).

    A schedule that is no table entry (custom schedules of small models) uses its own last scale."""
    pairs = tuple(_check_schedule(schedule))
    entry = _ENTRY_OF_SCHEDULE.get(pairs)
    if entry is None:
        return pairs[-1]
    return _TEMPLATES[entry[0]][-1]


def vae_schedule(schedule: Sequence, patchify: bool) -> list[tuple[int, int]]:
    """The VAE-side scale sizes. With spatial patchify (8B: patch-8 VAE, 2x2 pixel-unshuffle into
    the transformer) the VAE works on grids twice as large; the transformer schedule is unchanged."""
    pairs = _check_schedule(schedule)
    return [(2 * h, 2 * w) for h, w in pairs] if patchify else pairs
