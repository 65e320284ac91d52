"""The geometric judge: clean renders pass, VAE-like renders pass, damaged pictures fail."""
import math

import numpy as np
import pytest
import torch

from vare_core.embedded import world
from vare_core.evaluation.judges import geometry
from vare_core.evaluation.judges.geometry import attribute_agreement, judge_images, mean_abs_difference
from vare_core.embedded.world import (BACKGROUND_RGB, COLOR_RGB, COLORS, DARK_SHADE, SHAPES,
                                      STYLES, BACKGROUNDS, random_scene, render)

N_CLEAN = 200


def scenes_and_renders(n: int, seed: int):
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return scenes, np.stack([render(s) for s in scenes])


def vae_like(images: np.ndarray, seed: int, sigma: float = 0.7, noise: float = 0.02) -> np.ndarray:
    """uint8 renders -> float [0, 1], Gaussian-blurred (edge padding) with Gaussian noise added."""
    x = images.astype(np.float32) / 255
    radius = 3
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(t * padded[:, i:i + h] for i, t in enumerate(taps))
    x = sum(t * rows[:, :, i:i + w] for i, t in enumerate(taps))
    x = x + np.random.default_rng(seed).normal(0, noise, x.shape).astype(np.float32)
    return np.clip(x, 0, 1)


# ----------------------------------------------------------------------------- damaged pictures

def _supersampled(inside, background, colour, n: int = 4) -> np.ndarray:
    """Paint colour where inside(x, y) (canvas coordinates) holds, anti-aliased n x n."""
    c = (np.arange(64 * n) + 0.5) / n
    cover = inside(c[None, :], c[:, None]).reshape(64, n, 64, n).mean(axis=(1, 3))[..., None]
    bg, fg = np.array(background, float), np.array(colour, float)
    return np.rint((1 - cover) * bg + cover * fg).astype(np.uint8)


def _colour(rng) -> str:
    return COLORS[rng.integers(len(COLORS))]


def _other_colour(rng, colour: str) -> str:
    others = [c for c in COLORS if c != colour]
    return others[rng.integers(len(others))]


def blotch(rng) -> np.ndarray:
    """A smooth blob of irregular outline: radius modulated by random low harmonics."""
    colour, background = _colour(rng), BACKGROUNDS[rng.integers(3)]
    radius, cx, cy = rng.uniform(14, 20), rng.uniform(26, 38), rng.uniform(26, 38)
    harmonics = [(k, rng.uniform(0.12, 0.22), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5)]
    stretch = rng.uniform(1.0, 1.4)

    def inside(x, y):
        dx, dy = (x - cx) / stretch, y - cy
        theta = np.arctan2(dy, dx)
        r = radius * (1 + sum(a * np.cos(k * theta + p) for k, a, p in harmonics))
        return dx * dx + dy * dy <= r * r
    return _supersampled(inside, BACKGROUND_RGB[background], COLOR_RGB[colour])


def frame_filling_square(rng) -> np.ndarray:
    """A square covering the whole canvas, or one running off three of its borders."""
    colour, background = _colour(rng), BACKGROUNDS[rng.integers(3)]
    if rng.random() < 0.3:
        return np.broadcast_to(np.array(COLOR_RGB[colour], np.uint8), (64, 64, 3)).copy()
    top = rng.uniform(6, 24)  # covers every row below `top`: touches left, right and bottom
    image = _supersampled(lambda x, y: (y >= top) & (x > -1), BACKGROUND_RGB[background],
                          COLOR_RGB[colour])
    return np.ascontiguousarray(np.rot90(image, rng.integers(4)))


def mixed_colours(rng, share: float = 0.2) -> np.ndarray:
    """A clean render with a disc-shaped patch of another colour over ~share of the shape."""
    scene = random_scene(rng)
    image = render(scene)
    other = _other_colour(rng, scene.color)
    inside = world.shape_mask(scene, np.arange(64)[None, :] + 0.5, np.arange(64)[:, None] + 0.5)
    ys, xs = np.nonzero(inside)
    k = rng.integers(len(ys))  # patch centre on the shape; grow the disc until it covers share
    distance = np.hypot(xs - xs[k], ys - ys[k])
    patch_radius = np.sort(distance)[int(share * len(ys))]
    patch = inside & (np.hypot(np.arange(64)[None, :] - xs[k], np.arange(64)[:, None] - ys[k])
                      <= patch_radius)
    image[patch] = COLOR_RGB[other]
    return image


def stray_rectangles(rng, count: int = 3) -> np.ndarray:
    """A clean render with small rectangles of other colours painted on the background."""
    scene = random_scene(rng)
    image = render(scene)
    inside = world.shape_mask(scene, np.arange(64)[None, :] + 0.5, np.arange(64)[:, None] + 0.5)
    for _ in range(count):
        colour = _other_colour(rng, scene.color)
        for _ in range(50):  # a spot on the background, off the shape
            w, h = rng.integers(4, 8, size=2)
            x0, y0 = rng.integers(0, 64 - w), rng.integers(0, 64 - h)
            if not inside[max(y0 - 1, 0):y0 + h + 1, max(x0 - 1, 0):x0 + w + 1].any():
                image[y0:y0 + h, x0:x0 + w] = COLOR_RGB[colour]
                break
    return image


def pure_noise(rng) -> np.ndarray:
    return rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)


def half_and_half(rng) -> np.ndarray:
    """Two flat halves of different colours (shape colours or backgrounds), split either way."""
    pool = [COLOR_RGB[c] for c in COLORS] + [BACKGROUND_RGB[b] for b in BACKGROUNDS]
    a, b = rng.choice(len(pool), 2, replace=False)
    image = np.empty((64, 64, 3), np.uint8)
    image[:, :32], image[:, 32:] = pool[a], pool[b]
    return image if rng.random() < 0.5 else np.ascontiguousarray(image.transpose(1, 0, 2))


def full_frame_stripes(rng) -> np.ndarray:
    """The world's diagonal stripes (colour and its dark shade) over the whole canvas."""
    colour = np.array(COLOR_RGB[_colour(rng)], float)
    c = np.arange(64) + 0.5
    band = np.floor((c[None, :] + c[:, None]) * 2 / (math.sqrt(2) * world.STRIPE_PERIOD_PX))
    dark = (band % 2 == 1)[..., None]
    return np.rint(np.where(dark, colour * DARK_SHADE, colour)).astype(np.uint8)


DAMAGED = {"blotch": blotch, "frame_filling_square": frame_filling_square,
           "mixed_colours": mixed_colours, "stray_rectangles": stray_rectangles,
           "pure_noise": pure_noise, "half_and_half": half_and_half,
           "full_frame_stripes": full_frame_stripes}


def damaged_batch(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([DAMAGED[kind](rng) for _ in range(n)])


# ----------------------------------------------------------------------------- tests

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean_set():
    return scenes_and_renders(N_CLEAN, seed=0)


def _right(result, scene) -> bool:
    return all(result[a] == getattr(scene, a) for a in world.ATTRIBUTES)


def test_clean_renders_are_judged_exactly(clean_set):
    scenes, images = clean_set
    assert {s.shape for s in scenes} == set(SHAPES) and {s.color for s in scenes} == set(COLORS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {s.style for s in scenes} == set(STYLES)
    results = judge_images(images)
    for scene, r in zip(scenes, results):
        assert _right(r, scene), (scene, r)
        assert r["clean"] and r["stray"] <= 0.001 and r["shape_iou"] >= 0.88, (scene, r)
        fit = r["fit"]
        assert abs(fit.size_px - scene.size_px) <= 2, (scene, fit)
        assert abs(fit.cx - scene.cx) <= 1.5 and abs(fit.cy - scene.cy) <= 1.5, (scene, fit)


def test_vae_like_renders_pass(clean_set):
    scenes, images = clean_set
    results = judge_images(vae_like(images, seed=1))
    passed = [r["clean"] and _right(r, s) for s, r in zip(scenes, results)]
    assert np.mean(passed) >= 0.98
    assert np.median([r["stray"] for r in results]) <= 0.002


def test_input_formats_give_the_same_verdict(clean_set):
    scenes, images = clean_set
    scene = scenes[0]
    reference = judge_images(images[:1])[0]
    as_float = torch.from_numpy(images[:1].astype(np.float32) / 255)
    for variant in (as_float, images[0], render(scene, size=128)[None]):
        r = judge_images(variant)[0]
        assert _right(r, scene) and r["clean"], r
    assert judge_images(as_float)[0]["fit"] == reference["fit"]


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_damaged_pictures_fail(kind):
    images = damaged_batch(kind, 40, seed=2)
    for degrade in (False, True):  # as painted, and after a VAE-like blur + noise
        results = judge_images(vae_like(images, seed=3) if degrade else images)
        assert not any(r["clean"] for r in results), kind
        if kind == "blotch":  # no shape at all: no IoU reaches SHAPE_IOU_MIN
            assert all(r["shape"] is None for r in results)
        if kind in ("frame_filling_square", "pure_noise", "half_and_half", "full_frame_stripes"):
            assert all(r["background"] is None and r["shape"] is None and r["fit"] is None
                       and r["stray"] == 1.0 for r in results), kind
        if kind in ("mixed_colours", "stray_rectangles"):
            assert min(r["stray"] for r in results) > geometry.STRAY_MAX


def test_plain_background_has_no_shape():
    image = np.full((1, 64, 64, 3), BACKGROUND_RGB["gray"], np.uint8)
    r = judge_images(image)[0]
    assert r["background"] == "gray" and r["color"] is None and r["shape"] is None
    assert r["fit"] is None and r["stray"] == 1.0 and not r["clean"]


def test_attribute_agreement():
    judged = {"shape": "circle", "color": "red", "background": None, "style": "solid"}
    assert attribute_agreement(judged, {"shape": "circle", "color": "blue"}) == \
        {"shape": True, "color": False}
    assert attribute_agreement(judged, {"background": None, "style": "solid", "size": 3}) == \
        {"background": False, "style": True}
    assert attribute_agreement(judged, {}) == {}


def test_mean_abs_difference(clean_set):
    _, images = clean_set
    a = images[:4]
    assert np.array_equal(mean_abs_difference(a, a.copy()), np.zeros(4))
    assert np.allclose(mean_abs_difference(a, torch.from_numpy(a / 255.0)), 0, atol=1e-6)
    white, black = np.full((1, 8, 8, 3), 255, np.uint8), np.zeros((1, 8, 8, 3), np.uint8)
    assert mean_abs_difference(white, black)[0] == pytest.approx(1.0)
    half = np.full((1, 8, 8, 3), 0.25, np.float32)
    assert mean_abs_difference(half, black)[0] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mean_abs_difference(a, a[:2])
