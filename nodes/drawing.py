"""Pictures the evaluation nodes return: loss curves, labelled images, side-by-side grids (PIL).

    plot_losses(steps, "svare: erase circle")                 # PIL image of loss / fce / pre
    ema(losses, smoothing(600))                               # the smoothed curve drawn over them
    label_image(image, "square 97%", good=True)               # image with a caption bar
    side_by_side([before, after], ["before", "after"], row_labels)
    to_tensor(pil) / to_pils(images)                          # ComfyUI IMAGE <-> PIL
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CURVES = (("loss", (31, 119, 180)), ("fce", (214, 39, 40)), ("entropy", (140, 86, 75)), ("pre", (44, 160, 44)),
          ("vare", (148, 103, 189)), ("naive_ce", (255, 127, 14)))
GOOD, BAD = (30, 140, 60), (200, 40, 40)
RAW_ALPHA = 0.3                        # the per-step curves: this much of the term's colour on white
LABEL_CHARS = 200                      # longer titles and labels are cut before PIL measures them
MAX_LABEL_WIDTH = 360                  # the row labels' column of a side-by-side grid, in pixels

# The loss curves' smoothing is decided here, for both pictures of it: this Loss Plot and the
# live chart on Train Erasure (web/vare.js), which gets the factor in the node's vare.train events
# (nodes/erasure.py sends smoothing(steps)) and applies the same bias-corrected EMA.
SMOOTHING_SHARE = 1 / 20               # the average reaches back about this share of the run ...
SMOOTHING_WINDOW = (5, 50)             # ... but never fewer or more steps than these


def smoothing(steps: int) -> float:
    """The EMA factor for a run of `steps` training steps: 1 - 1/window, where the window is a
    twentieth of the run, 5 to 50 steps (600 steps: 30, factor 0.967)."""
    low, high = SMOOTHING_WINDOW
    window = min(high, max(low, steps * SMOOTHING_SHARE))
    return 1.0 - 1.0 / window


def ema(values, factor: float) -> list[float]:
    """Bias-corrected exponential moving average: m_t = factor * m_(t-1) + (1 - factor) * x_t
    from m_0 = 0, divided by 1 - factor^t so that the first points are not pulled toward 0
    (the first smoothed value is the first value)."""
    if not 0.0 <= factor < 1.0:
        raise ValueError(f"smoothing factor must be in [0, 1), got {factor}")
    out, mean, weight = [], 0.0, 1.0
    for value in values:
        mean = factor * mean + (1.0 - factor) * value
        weight *= factor
        out.append(mean / (1.0 - weight))
    return out


def font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def to_pils(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE (B, H, W, 3) float [0, 1] -> PIL images."""
    array = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def to_tensor(pils) -> torch.Tensor:
    """PIL image(s) of one size -> IMAGE (B, H, W, 3) float32."""
    pils = [pils] if isinstance(pils, Image.Image) else list(pils)
    return torch.from_numpy(np.stack([np.asarray(p.convert("RGB"), dtype=np.float32) / 255 for p in pils]))


def fit_text(draw, text: str, width: float, font_) -> str:
    """`text` cut (with '...') to at most `width` pixels; a huge string is cut to LABEL_CHARS
    characters before PIL measures or renders it."""
    text = str(text)
    if len(text) > LABEL_CHARS:
        text = text[:LABEL_CHARS] + "..."
    if draw.textlength(text, font=font_) <= width:
        return text
    low, high = 0, len(text)                # the longest prefix that fits with the ellipsis
    while low < high:
        mid = (low + high + 1) // 2
        if draw.textlength(text[:mid] + "...", font=font_) <= width:
            low = mid
        else:
            high = mid - 1
    return text[:low] + "..." if low else ""


def _faint(color) -> tuple:
    return tuple(round(RAW_ALPHA * c + (1 - RAW_ALPHA) * 255) for c in color)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def plot_losses(steps: list[dict], title: str, width: int = 768, height: int = 384) -> Image.Image:
    """Every loss term of the history against the step: the per-step values faint, their
    smoothed curve (ema) solid in the same colour, the last smoothed value in the legend;
    skipped steps (no finite loss) left out."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 16, 52, height - 40
    draw.text((left, 10), fit_text(draw, title, right - left, font(16)), fill="black", font=font(16))
    series = {}
    for key, color in CURVES:
        # |loss| beyond 1e30 is divergence, not a curve: plotting it overflows the axis maths
        points = [(s["step"], s[key]) for s in steps if key in s and isinstance(s[key], (int, float))
                  and math.isfinite(s[key]) and abs(s[key]) < 1e30 and not s.get("skipped")]
        if points:
            series[key] = (points, color)
    if not series:
        draw.text((left, height // 2), "no finished training steps yet", fill="gray", font=font())
        return image
    # the run's length (the trainer's `steps` in each entry), as the live chart has it
    total = max([s["steps"] for s in steps if isinstance(s.get("steps"), int)]
                or [max(x for pts, _ in series.values() for x, _ in pts)])
    factor = smoothing(total)
    smoothed = {key: ema([y for _, y in points], factor) for key, (points, _) in series.items()}

    small = font(12)
    # the legend: the last smoothed value of each term (and its last step's value while there is
    # room), in rows that wrap at the right edge and take at most a third of the plot's height
    max_rows = max(1, (bottom - top) // 3 // 16)
    for with_last in (True, False):
        legend, x, row = [], left + 8, 0        # (x, row, text, colour)
        for key, (points, color) in series.items():
            text = f"{key} {smoothed[key][-1]:.4f}" + (f" (last {points[-1][1]:.4f})" if with_last else "")
            text = fit_text(draw, text, right - left - 8, small)
            advance = draw.textlength(text, font=small) + 16
            if x + advance > right and x > left + 8:
                x, row = left + 8, row + 1
            if row >= max_rows:
                break
            legend.append((x, row, text, color))
            x += advance
        if len(legend) == len(series):
            break
    row = max(r for _, r, _, _ in legend)
    top += 16 * row
    note = fit_text(draw, "faint: each step, solid: smoothed", right - left - 48, small)
    draw.text((left, bottom + 22), note, fill="gray", font=small)

    xs = [x for pts, _ in series.values() for x, _ in pts]
    ys = [y for pts, _ in series.values() for _, y in pts]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.05 if max(ys) > 0 else 1.0

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    for y in _ticks(y0, y1):
        _, yy = px(x0, y)
        draw.line([(left, yy), (right, yy)], fill=(230, 230, 230))
        draw.text((6, yy - 7), f"{y:.3g}", fill="black", font=small)
    for x in _ticks(x0, x1):
        xx, _ = px(x, y0)
        draw.text((xx - 8, bottom + 6), f"{x:g}", fill="black", font=small)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((right - 40, bottom + 22), "step", fill="black", font=small)
    for key, (points, color) in series.items():      # every term's raw values first, under ...
        coords = [px(x, y) for x, y in points]
        if len(coords) > 1:
            draw.line(coords, fill=_faint(color), width=1)
    for key, (points, color) in series.items():      # ... the smoothed curves
        coords = [px(x, y) for (x, _), y in zip(points, smoothed[key])]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2, joint="curve")
        else:
            cx, cy = coords[0]
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
    for x, row, text, color in legend:
        draw.text((x, 34 + 16 * row), text, fill=color, font=small)
    return image


def label_image(image: Image.Image, text: str, good: bool, min_side: int = 160) -> Image.Image:
    """Scale small images up (nearest, keeps pixels visible) and add a caption bar below."""
    scale = max(1, math.ceil(min_side / min(image.size)))
    shown = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    bar = 22
    out = Image.new("RGB", (shown.width, shown.height + bar), GOOD if good else BAD)
    out.paste(shown, (0, 0))
    draw = ImageDraw.Draw(out)
    draw.text((4, shown.height + 4), fit_text(draw, text, shown.width - 8, font(13)), fill="white", font=font(13))
    return out


def draw_boxes(image: Image.Image, boxes) -> Image.Image:
    """Judge detections (label, score, box = x, y, w, h) drawn as labelled red rectangles."""
    if not boxes:
        return image
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(out.size) / 160))
    for box in boxes:
        x, y, w, h = box.box
        draw.rectangle([x, y, x + max(w - 1, 0), y + max(h - 1, 0)], outline=BAD, width=width)
        label = f"{box.label.removesuffix('_EXPOSED').lower()} {box.score:.2f}"
        draw.text((x + 2, y + 1), fit_text(draw, label, max(out.width - x - 4, 0), font(12)), fill=BAD, font=font(12))
    return out


def grid(cells: list[Image.Image], columns: int) -> Image.Image:
    """Images of one size in rows of `columns`."""
    w, h = cells[0].size
    rows = math.ceil(len(cells) / columns)
    out = Image.new("RGB", (w * columns, h * rows), "white")
    for i, cell in enumerate(cells):
        out.paste(cell, ((i % columns) * w, (i // columns) * h))
    return out


def side_by_side(columns: list[list[Image.Image]], titles: list[str], row_labels: list[str],
                 max_cell: int = 512, min_cell: int = 160) -> Image.Image:
    """columns[c][r]; every cell scaled to one size (small images up, big ones down)."""
    w, h = columns[0][0].size
    scale = min(max_cell / max(w, h), max(1.0, min_cell / min(w, h)))
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    rows = max(len(c) for c in columns)
    row_labels = list(row_labels[:rows])
    label_w = min(12 + 7 * max((len(t) for t in row_labels), default=0), MAX_LABEL_WIDTH) if any(row_labels) else 0
    header = 26
    out = Image.new("RGB", (label_w + cw * len(columns), header + ch * rows), "white")
    draw = ImageDraw.Draw(out)
    for c, (title, column) in enumerate(zip(titles, columns)):
        draw.text((label_w + c * cw + 6, 6), fit_text(draw, title, cw - 12, font(14)), fill="black", font=font(14))
        for r, cell in enumerate(column):
            resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
            out.paste(cell.resize((cw, ch), resample), (label_w + c * cw, header + r * ch))
    for r, label in enumerate(row_labels):
        draw.text((6, header + r * ch + ch // 2 - 7), fit_text(draw, label, label_w - 12, font(13)),
                  fill="black", font=font(13))
    return out
