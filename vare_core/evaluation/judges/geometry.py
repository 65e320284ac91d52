"""A geometric judge for images of the shapes world (embedded/world.py). It uses no learned
weights, so a broken picture cannot pass because it looks "square-ish" to a network.

For each image the judge reads the background off the border ring and the colour and style off
the foreground pixels. It then fits a clean scene (shape, size, centre) to the foreground mask by
IoU and counts how many pixels disagree with the clean render of that fit. An image is clean when
the border is one background colour, the mask is one of the four shapes, the fit keeps to the
world's size rules and almost no pixel strays from the clean render. Strays are counted up to a
2 px misregistration, so VAE blur and slightly shifted edges or stripes do not count.

Usage:
    results = judge_images(images)            # (B, H, W, 3) float [0, 1] or uint8, torch/numpy
    r = results[0]
    r["shape"], r["color"], r["background"], r["style"]   # None where no value can be judged
    r["shape_iou"], r["stray"], r["clean"], r["fit"]      # fit: the best clean Scene, or None
    attribute_agreement(r, {"shape": "circle", "color": "red"})   # {"shape": True, "color": ...}
    mean_abs_difference(images_a, images_b)   # (B,) mean |a - b| on [0, 1]

Judging 1000 images takes about 2 s on one CPU core (half of it world.render of the fits).
"""
import math
from types import SimpleNamespace

import numpy as np
import torch

from .classifier import to_model_input
from ...embedded.world import (BACKGROUND_RGB, BACKGROUNDS, CANVAS, COLOR_RGB, COLORS, DARK_SHADE,
                               EDGE_MARGIN_PX, MAX_SIZE_PX, MIN_SIZE_PX, SHAPES, Scene, render, shape_mask)

# Thresholds. Pixel values are on [0, 1]; "max-channel" is the largest |a - b| over R, G, B.
# "Measured" means on clean renders, VAE-like renders (Gaussian blur sigma 0.7-1 px + noise),
# renders passed through the embedded VAE, the embedded model's own images, and the damaged
# pictures of tests/test_geometry_judge.py (blotches, frame-filling squares, patches, noise, ...).
BORDER_WIDTH_PX = 2        # the ring the background is read from
BORDER_FLAT_TOL = 0.1      # Euclidean from the ring's median: 3 noise sigmas of VAE-like noise
BORDER_FLAT_SHARE = 0.4    # share of the ring that near; measured clean >= 0.52 (a size-51
                           # square in a corner, sigma-1 blur), model >= 0.72, noise <= 0.1
BACKGROUND_TOL = 0.15      # max-channel, ring median vs background; model <= 0.04, filled >= 0.28
FOREGROUND_TOL = 0.15      # max-channel from the background: half the closest gap (purple/gray)
INTERIOR_ERODE_PX = 2      # colour and style are read 2 px inside the foreground, off the edges
DARK_SPLIT = 0.85          # shade (colour 1, stripes 0.55) under which a pixel is "dark": above
                           # the 0.775 midpoint, as the model draws its stripes lighter
STRIPED_SHARE = 0.2        # dark share; measured solid <= 0.17 (model) / 0.04 (VAE), stripes ~0.5
SHAPE_IOU_MIN = 0.85       # measured: 99.7% of VAE-passed renders above, blotches <= 0.84
MISREGISTRATION_PX = 2     # edges and stripes may lie 2 px off (VAE blur alone is ~1 px)
STRAY_TOL = 0.3            # Euclidean; under the smallest colour-vs-background gap (0.42)
STRAY_MAX = 0.01           # 41 px; measured VAE-like <= 0.0002, patches and stray rectangles
                           # >= 0.013 (blotches measure less but fail SHAPE_IOU_MIN)
SIZE_SLACK_PX = 2          # fitted size may be 2 px outside 26..51 (model images reach 55)
POSITION_SLACK_PX = 1      # the fitted box may touch the canvas edge (the world keeps 1 px)

# "Intact": the judge's strict `clean` asks for the world's exact geometry, which the embedded
# model's own lumpy shapes often miss (its crosses have thin arms: 3% strictly clean). Intact
# asks for a flat background, a shape-like mask and few stray pixels: measured at cfg 4 on the
# original model 83-100% per shape (crosses lowest), on broken erased pictures 17%.
INTACT_STRAY = 0.05
INTACT_IOU = 0.55

_BACKGROUNDS = np.array([BACKGROUND_RGB[b] for b in BACKGROUNDS], np.float32) / 255  # (3, 3)
_COLORS = np.array([COLOR_RGB[c] for c in COLORS], np.float32) / 255                 # (5, 3)
_PROTOTYPES = np.concatenate([_COLORS, DARK_SHADE * _COLORS])  # light shades, then dark ones
_CENTRES = np.arange(CANVAS, dtype=np.float32) + 0.5            # pixel centres, canvas coords
# per shape: area / size^2, and (centroid y - cy) / size, to place a shape by a mask's moments
_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "cross": 0.0}
_CHUNK = 128               # images judged at once (bounds memory)


def _maxabs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Max over the last (RGB) axis of |a - b| (written out: reducing a length-3 axis is slow)."""
    d = np.abs(a - b)
    return np.maximum(np.maximum(d[..., 0], d[..., 1]), d[..., 2])


def _dist2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance over the last (RGB) axis."""
    d = a - b
    return d[..., 0] ** 2 + d[..., 1] ** 2 + d[..., 2] ** 2


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Erode a (B, H, W) mask with a (2 radius + 1)^2 square (outside the canvas counts as set)."""
    for axis in (1, 2):  # a square erodes as a row erosion then a column erosion
        n = mask.shape[axis]
        padded = np.pad(mask, [(radius, radius) if a == axis else (0, 0) for a in range(3)],
                        constant_values=True)
        mask = padded.take(range(0, n), axis=axis).copy()
        for shift in range(1, 2 * radius + 1):
            mask &= padded.take(range(shift, shift + n), axis=axis)
    return mask


def _blur(images: np.ndarray) -> np.ndarray:
    """(B, H, W, C) images blurred by a 5-tap Gaussian (sigma 1 px), edges repeated."""
    taps = np.exp(-np.arange(-2, 3) ** 2 / 2.0)
    taps /= taps.sum()
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    rows = sum(t * padded[:, i:i + h] for i, t in enumerate(taps))
    return sum(t * rows[:, :, i:i + w] for i, t in enumerate(taps)).astype(np.float32)


def _stray_mask(images: np.ndarray, clean: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(B, H, W): pixels farther than STRAY_TOL (Euclidean) from every value that the clean
    render, sharp or blurred, takes within MISREGISTRATION_PX of them (off the canvas: the
    (B, 3) background colour)."""
    tol2 = STRAY_TOL ** 2
    off = _dist2(images, clean) > tol2
    n, ys, xs = np.nonzero(off)                   # only pixels off the render are looked at again
    if len(n):
        r, values, (h, w) = MISREGISTRATION_PX, images[n, ys, xs], images.shape[1:3]
        nearest = np.full(len(n), np.inf, np.float32)
        for reference in (clean, _blur(clean)):
            padded = np.repeat(np.repeat(background[:, None, None], h + 2 * r, 1), w + 2 * r, 2)
            padded[:, r:r + h, r:r + w] = reference
            for dy in range(2 * r + 1):
                for dx in range(2 * r + 1):
                    nearest = np.minimum(nearest, _dist2(values, padded[n, ys + dy, xs + dx]))
        off[n, ys, xs] = nearest > tol2
    return off


def _masks(shape: str, size, cx, cy) -> np.ndarray:
    """(N, 64, 64) masks at pixel centres from world.shape_mask, vectorised over (N,) params."""
    params = SimpleNamespace(shape=shape, size_px=np.asarray(size, np.float32)[:, None, None],
                             cx=np.asarray(cx, np.float32)[:, None, None],
                             cy=np.asarray(cy, np.float32)[:, None, None])
    return shape_mask(params, _CENTRES[None, None, :], _CENTRES[None, :, None])


def _keep_best(shape: str, target: np.ndarray, candidates, best: dict) -> None:
    """Update best (arrays per image) with any candidate (size, cx, cy) of higher IoU."""
    for size, cx, cy in candidates:
        size = np.clip(np.rint(size), 1, 2 * CANVAS)
        masks = _masks(shape, size, cx, cy)
        iou = (masks & target).sum(axis=(1, 2)) / np.maximum((masks | target).sum(axis=(1, 2)), 1)
        better = iou > best["iou"]
        for key, value in (("size", size), ("cx", cx), ("cy", cy), ("iou", iou),
                           ("shape", SHAPES.index(shape))):
            best[key] = np.where(better, value, best[key])


def _fit_shapes(mask: np.ndarray) -> dict:
    """Best {"shape" (index; -1: empty mask), "size", "cx", "cy", "iou"} arrays for (B, H, W).

    Every shape is placed by the mask's moments (area -> size, centroid -> centre); the best
    one is refined by a local search: size and centre +-1 px, then centre +-0.5 and +-0.25 px."""
    b = len(mask)
    best = {"shape": np.full(b, -1), "size": np.zeros(b), "cx": np.zeros(b), "cy": np.zeros(b),
            "iou": np.zeros(b)}
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    weight = np.maximum(area, 1)
    mx = (mask.sum(axis=1) * _CENTRES).sum(axis=1) / weight
    my = (mask.sum(axis=2) * _CENTRES).sum(axis=1) / weight
    for shape in SHAPES:
        size = np.sqrt(area / _AREA[shape])
        cy = my - _CENTROID_DY[shape] * size
        _keep_best(shape, mask, [(np.floor(size), mx, cy), (np.ceil(size), mx, cy)], best)
    for index, shape in enumerate(SHAPES):
        rows = best["shape"] == index
        if not rows.any():
            continue
        sub = {key: value[rows] for key, value in best.items()}
        for sizes, steps in (((-1, 0, 1), (-1, 0, 1)), ((0,), (-0.5, 0, 0.5)),
                             ((0,), (-0.25, 0, 0.25))):
            s0, x0, y0 = sub["size"].copy(), sub["cx"].copy(), sub["cy"].copy()
            _keep_best(shape, mask[rows], [(s0 + ds, x0 + dx, y0 + dy) for ds in sizes
                                           for dx in steps for dy in steps], sub)
        for key in best:
            best[key][rows] = sub[key]
    return best


def _judge_chunk(x: np.ndarray) -> list[dict]:
    """x: (B, 64, 64, 3) float32 in [0, 1]."""
    b, w = len(x), BORDER_WIDTH_PX
    # background: the ring's median colour, if the ring is mostly that one flat colour and it is
    # one of the backgrounds (a ring split between two colours has its median halfway, near
    # neither, and noise is near nothing)
    ring = np.concatenate([x[:, :w].reshape(b, -1, 3), x[:, -w:].reshape(b, -1, 3),
                           x[:, w:-w, :w].reshape(b, -1, 3), x[:, w:-w, -w:].reshape(b, -1, 3)], 1)
    median = np.median(ring, axis=1)                                         # (B, 3)
    flat_share = (_dist2(ring, median[:, None]) <= BORDER_FLAT_TOL ** 2).mean(axis=1)
    bg_index = _dist2(median[:, None], _BACKGROUNDS[None]).argmin(axis=1)
    bg_ok = (flat_share >= BORDER_FLAT_SHARE) & \
        (_maxabs(median, _BACKGROUNDS[bg_index]) <= BACKGROUND_TOL)
    bg_rgb = np.where(bg_ok[:, None], _BACKGROUNDS[bg_index], median)        # (B, 3)

    # colour: majority vote of the foreground's interior over the colours and their dark shades
    foreground = _maxabs(x, bg_rgb[:, None, None]) > FOREGROUND_TOL
    interior = _erode(foreground, INTERIOR_ERODE_PX)
    interior = np.where(interior.any(axis=(1, 2))[:, None, None], interior, foreground)
    # nearest prototype p minimises |x - p|^2, i.e. maximises 2 x.p - |p|^2 (a matrix product)
    score = x @ (2 * _PROTOTYPES.T) - (_PROTOTYPES ** 2).sum(axis=1)
    nearest = score.argmax(axis=-1) % len(COLORS)                           # (B, H, W)
    votes = np.stack([((nearest == c) & interior).sum(axis=(1, 2)) for c in range(len(COLORS))],
                     axis=1)
    color_index, has_fg = votes.argmax(axis=1), votes.max(axis=1) > 0
    # style: share of the colour's voters darker than DARK_SPLIT x the colour
    voters = interior & (nearest == color_index[:, None, None])
    colour = _COLORS[color_index][:, None, None]                             # (B, 1, 1, 3)
    shade = (x * colour).sum(axis=-1) / (colour * colour).sum(axis=-1)
    dark_share = (voters & (shade < DARK_SPLIT)).sum(axis=(1, 2)) / \
        np.maximum(voters.sum(axis=(1, 2)), 1)
    striped = dark_share > STRIPED_SHARE

    # shape mask: pixels nearer the colour than the background; for stripes the mean of the two
    # shades, so that light and dark stripe edges err by about as much inward as outward
    mean_shade = np.where(striped, (1 + DARK_SHADE) / 2, 1.0)[:, None] * _COLORS[color_index]
    mask = (_dist2(x, mean_shade[:, None, None]) < _dist2(x, bg_rgb[:, None, None])) & \
        has_fg[:, None, None]
    fitted = _fit_shapes(mask)
    shape_index, iou = fitted["shape"], fitted["iou"]

    fits = [Scene(SHAPES[shape_index[i]], COLORS[color_index[i]], BACKGROUNDS[bg_index[i]],
                  "striped" if striped[i] else "solid", int(fitted["size"][i]),
                  float(fitted["cx"][i]), float(fitted["cy"][i]))
            if bg_ok[i] and shape_index[i] >= 0 else None for i in range(b)]
    # stray: pixels unlike the clean render of the fit, up to blur and a small misregistration
    stray = np.ones(b)
    rows = [i for i in range(b) if fits[i] is not None]
    if rows:
        clean = np.stack([render(fits[i]) for i in rows]).astype(np.float32) / 255
        stray[rows] = _stray_mask(x[rows], clean, bg_rgb[rows]).mean(axis=(1, 2))

    results = []
    for i, fit in enumerate(fits):
        in_rules = fit is not None and \
            MIN_SIZE_PX - SIZE_SLACK_PX <= fit.size_px <= MAX_SIZE_PX + SIZE_SLACK_PX and \
            min(fit.cx, fit.cy, CANVAS - fit.cx, CANVAS - fit.cy) - fit.size_px / 2 \
            >= EDGE_MARGIN_PX - POSITION_SLACK_PX
        shape_ok = shape_index[i] >= 0 and iou[i] >= SHAPE_IOU_MIN
        results.append({
            "background": BACKGROUNDS[bg_index[i]] if bg_ok[i] else None,
            "color": COLORS[color_index[i]] if has_fg[i] else None,
            "style": ("striped" if striped[i] else "solid") if has_fg[i] else None,
            "shape": SHAPES[shape_index[i]] if shape_ok else None,
            "shape_iou": float(iou[i]),
            "dark_share": float(dark_share[i]),
            "fit": fit,
            "stray": float(stray[i]),
            "clean": bool(in_rules and shape_ok and stray[i] <= STRAY_MAX),
        })
    return results


def judge_images(images) -> list[dict]:
    """Judge (B, H, W, 3) or (H, W, 3) images: float [0, 1] or uint8, numpy or torch; other
    sizes are resized to 64 px.

    Per image a dict: background, color, style, shape (each None where it cannot be judged;
    shape None also when the best IoU is under SHAPE_IOU_MIN), shape_iou (IoU of the best fit
    of any shape), dark_share (share of the shape's pixels in the dark shade),
    fit (the best-fitting clean Scene, None without a background or foreground), stray (share of
    pixels off that clean render; 1.0 without a fit) and clean (bool)."""
    with torch.no_grad():
        x = to_model_input(images, CANVAS).permute(0, 2, 3, 1).cpu().numpy()
    results = []
    for start in range(0, len(x), _CHUNK):
        results += _judge_chunk(x[start:start + _CHUNK])
    return results


def is_intact(judged: dict) -> bool:
    """A judge_images verdict -> flat background, a shape-like mask, few stray pixels."""
    return (judged["background"] is not None and judged["stray"] <= INTACT_STRAY
            and (judged["shape_iou"] or 0.0) >= INTACT_IOU)


def attribute_agreement(judged: dict, expected: dict) -> dict:
    """{attribute: judged == expected} for each of shape/color/background/style in `expected`
    (other keys are ignored); a judged None never matches."""
    return {k: judged.get(k) is not None and judged.get(k) == v for k, v in expected.items()
            if k in ("shape", "color", "background", "style")}


def _as_float(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    images = images.astype(np.float32) / 255 if images.dtype == np.uint8 else \
        images.astype(np.float32)
    return images[None] if images.ndim == 3 else images


def mean_abs_difference(a, b) -> np.ndarray:
    """(B,) mean absolute pixel difference on [0, 1] between two batches of (B, H, W, 3) images
    (float [0, 1] or uint8, numpy or torch; no resizing)."""
    xa, xb = _as_float(a), _as_float(b)
    if xa.shape != xb.shape or xa.ndim != 4:
        raise ValueError(f"image batches must share a (B, H, W, C) shape, got {xa.shape} and "
                         f"{xb.shape}")
    return np.abs(xa - xb).mean(axis=(1, 2, 3))
