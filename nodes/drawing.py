"""Pictures the evaluation nodes return: loss curves, labelled images, side-by-side grids (PIL).

    plot_losses(steps, "svare: erase circle")                 # PIL image of loss / fce / pre
    label_image(image, "square 97%", good=True)               # image with a caption bar
    side_by_side([before, after], ["before", "after"], row_labels)
    to_tensor(pil) / to_pils(images)                          # ComfyUI IMAGE <-> PIL
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CURVES = (("loss", (31, 119, 180)), ("fce", (214, 39, 40)), ("pre", (44, 160, 44)),
          ("vare", (148, 103, 189)), ("naive_ce", (255, 127, 14)))
GOOD, BAD = (30, 140, 60), (200, 40, 40)


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


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def plot_losses(steps: list[dict], title: str, width: int = 768, height: int = 384) -> Image.Image:
    """Every loss term of the history against the step; skipped steps (no finite loss) left out."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 16, 52, height - 40
    draw.text((left, 10), title, fill="black", font=font(16))
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
    xs = [x for pts, _ in series.values() for x, _ in pts]
    ys = [y for pts, _ in series.values() for _, y in pts]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.05 if max(ys) > 0 else 1.0

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    for y in _ticks(y0, y1):
        _, yy = px(x0, y)
        draw.line([(left, yy), (right, yy)], fill=(230, 230, 230))
        draw.text((6, yy - 7), f"{y:.3g}", fill="black", font=font(12))
    for x in _ticks(x0, x1):
        xx, _ = px(x, y0)
        draw.text((xx - 8, bottom + 6), f"{x:g}", fill="black", font=font(12))
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((right - 40, bottom + 22), "step", fill="black", font=font(12))
    legend_x = left + 8
    for key, (points, color) in series.items():
        coords = [px(x, y) for x, y in points]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        else:
            cx, cy = coords[0]
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        draw.text((legend_x, top - 18), f"{key} {points[-1][1]:.4f}", fill=color, font=font(12))
        legend_x += 110
    return image


def label_image(image: Image.Image, text: str, good: bool, min_side: int = 160) -> Image.Image:
    """Scale small images up (nearest, keeps pixels visible) and add a caption bar below."""
    scale = max(1, math.ceil(min_side / min(image.size)))
    shown = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    bar = 22
    out = Image.new("RGB", (shown.width, shown.height + bar), GOOD if good else BAD)
    out.paste(shown, (0, 0))
    ImageDraw.Draw(out).text((4, shown.height + 4), text, fill="white", font=font(13))
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
        draw.text((x + 2, y + 1), f"{box.label.removesuffix('_EXPOSED').lower()} {box.score:.2f}", fill=BAD, font=font(12))
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
    label_w = 12 + 7 * max((len(t) for t in row_labels), default=0) if any(row_labels) else 0
    header = 26
    out = Image.new("RGB", (label_w + cw * len(columns), header + ch * rows), "white")
    draw = ImageDraw.Draw(out)
    for c, (title, column) in enumerate(zip(titles, columns)):
        draw.text((label_w + c * cw + 6, 6), title, fill="black", font=font(14))
        for r, cell in enumerate(column):
            resample = Image.NEAREST if scale >= 1 else Image.LANCZOS
            out.paste(cell.resize((cw, ch), resample), (label_w + c * cw, header + r * ch))
    for r, label in enumerate(row_labels[:rows]):
        draw.text((6, header + r * ch + ch // 2 - 7), label, fill="black", font=font(13))
    return out
