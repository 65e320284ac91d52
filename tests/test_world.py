"""The shapes world: determinism, render geometry, prompts and their parsing."""
import re

import numpy as np
import pytest

from vare_core.embedded import world
from vare_core.embedded.world import (
    BACKGROUND_RGB, BACKGROUNDS, COLOR_RGB, COLORS, SHAPES, STYLES, SYNONYMS, VOCABULARY, Scene,
    describe, make_dataset, prompt_attributes, random_scene, render,
)


def shape_pixels(image: np.ndarray, background: str) -> np.ndarray:
    """Boolean mask of pixels that differ from the background colour."""
    return np.abs(image.astype(int) - BACKGROUND_RGB[background]).sum(axis=2) > 30


def test_make_dataset_is_deterministic_from_seed():
    images_a, prompts_a, scenes_a = make_dataset(40, seed=3)
    images_b, prompts_b, scenes_b = make_dataset(40, seed=3)
    images_c, prompts_c, _ = make_dataset(40, seed=4)
    assert images_a.shape == (40, 64, 64, 3) and images_a.dtype == np.uint8
    assert np.array_equal(images_a, images_b) and prompts_a == prompts_b and scenes_a == scenes_b
    assert not np.array_equal(images_a, images_c) and prompts_a != prompts_c


def test_random_scene_covers_the_spec_ranges():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(2000)]
    assert {s.shape for s in scenes} == set(SHAPES) and {s.color for s in scenes} == set(COLORS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {s.style for s in scenes} == set(STYLES)
    sizes = np.array([s.size_px for s in scenes])
    assert sizes.min() >= 0.4 * 64 and sizes.max() <= 0.8 * 64 and sizes.max() - sizes.min() >= 20
    for s in scenes:  # bounding box fully inside the canvas
        assert s.size_px / 2 <= s.cx <= 64 - s.size_px / 2
        assert s.size_px / 2 <= s.cy <= 64 - s.size_px / 2
    centres = np.array([s.cx for s in scenes])
    assert centres.std() > 5  # "anywhere", not clustered in the middle


def test_random_scene_fixed_attributes_keep_the_rest():
    free = random_scene(np.random.default_rng(7))
    fixed = random_scene(np.random.default_rng(7), shape="cross", color=None, cx=20.0)
    assert fixed.shape == "cross" and fixed.cx == 20.0
    assert (fixed.color, fixed.background, fixed.style, fixed.size_px, fixed.cy) == \
           (free.color, free.background, free.style, free.size_px, free.cy)
    with pytest.raises(ValueError, match="unknown"):
        random_scene(np.random.default_rng(0), colour="red")
    with pytest.raises(ValueError, match="shape"):
        Scene("hexagon", "red", "white", "solid", 30, 32.0, 32.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_render_geometry(shape):
    rng = np.random.default_rng(SHAPES.index(shape))
    for _ in range(20):
        scene = random_scene(rng, shape=shape)
        image = render(scene)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
            assert tuple(corner) == BACKGROUND_RGB[scene.background]
        rows, cols = np.nonzero(shape_pixels(image, scene.background))
        # bounding box of the drawn pixels = size_px (+-1 for anti-aliased edges), inside canvas
        assert abs((cols.max() - cols.min() + 1) - scene.size_px) <= 1.5
        assert abs((rows.max() - rows.min() + 1) - scene.size_px) <= 1.5
        assert rows.min() > 0 and cols.min() > 0 and rows.max() < 63 and cols.max() < 63


def test_triangle_apex_up_and_cross_arm_width():
    triangle = render(Scene("triangle", "red", "white", "solid", 48, 32.0, 32.0))
    widths = shape_pixels(triangle, "white").sum(axis=1)[8:56]
    assert widths[2] < 8 and widths[-2] > 40 and np.all(np.diff(widths) >= 0)  # narrow on top

    cross = render(Scene("cross", "blue", "black", "solid", 48, 32.0, 32.0))
    widths = shape_pixels(cross, "black").sum(axis=1)
    assert abs(widths[12] - 16) <= 1  # vertical arm, away from the bar: 48 / 3
    assert abs(widths[32] - 48) <= 1  # through the horizontal bar: full size
    assert not shape_pixels(cross, "black")[12, 12]  # the corners between arms are background


def covered_area(image: np.ndarray, colour: str, background: str) -> float:
    """Shape area in pixels, counting anti-aliased edge pixels by their coverage."""
    direction = np.subtract(COLOR_RGB[colour], BACKGROUND_RGB[background])
    return float(((image.astype(float) - BACKGROUND_RGB[background]) @ direction).sum()
                 / (direction @ direction))


def test_circle_and_square_areas():
    for cx in (32.0, 27.3):
        circle = render(Scene("circle", "green", "gray", "solid", 40, cx, 30.6))
        square = render(Scene("square", "green", "gray", "solid", 40, cx, 30.6))
        assert covered_area(circle, "green", "gray") == pytest.approx(np.pi * 20 ** 2, abs=3)
        assert covered_area(square, "green", "gray") == pytest.approx(40 ** 2, abs=3)


def test_stripes_only_in_striped_style():
    base = dict(shape="square", color="yellow", background="white", size_px=40, cx=32.0, cy=32.0)
    colour = np.array(COLOR_RGB["yellow"])
    for style in STYLES:
        image = render(Scene(style=style, **base)).astype(int)
        interior = image[16:48, 16:48].reshape(-1, 3)
        dark = np.abs(interior - colour * world.DARK_SHADE).sum(axis=1) < 10
        light = np.abs(interior - colour).sum(axis=1) < 10
        if style == "solid":
            assert light.all()
            continue
        assert 0.35 < dark.mean() < 0.65 and 0.25 < light.mean() < 0.65  # both shades, ~half each
        # diagonal stripes: constant along x + y, period 8 px across them (8 * sqrt 2 along x)
        assert np.array_equal(image[20, 30], image[30, 20])
        assert np.array_equal(image[25, 25], image[24, 26])
        row_is_dark = np.abs(image[32, 16:48] - colour * world.DARK_SHADE).sum(axis=1) < 10
        starts = np.flatnonzero(np.diff(row_is_dark.astype(int)) == 1)
        assert len(starts) >= 2 and np.allclose(np.diff(starts), 8 * np.sqrt(2), atol=1)


def test_colours_distinct_from_backgrounds():
    for colour in COLOR_RGB.values():
        for shade in (np.array(colour), np.array(colour) * world.DARK_SHADE):
            for background in BACKGROUND_RGB.values():
                assert np.abs(shade - background).max() > 60


@pytest.mark.parametrize("shape", SHAPES)
def test_prompt_round_trip_for_every_synonym(shape):
    rng = np.random.default_rng(1)
    for word in SYNONYMS[shape]:
        for _ in range(15):
            scene = random_scene(rng, shape=shape)
            prompt = describe(scene, rng, shape_word=word)
            assert word in prompt
            assert prompt_attributes(prompt) == {"shape": shape, "color": scene.color,
                                                 "background": scene.background,
                                                 "style": scene.style}, prompt


def test_partial_prompts_state_only_mentioned_attributes():
    rng = np.random.default_rng(2)
    scene = random_scene(rng, shape="triangle", color="blue")
    assert prompt_attributes(describe(scene, rng, mention=("color",))) == {"color": "blue"}
    generic = describe(scene, rng, mention=("color", "background"))
    assert " shape" in generic and prompt_attributes(generic) == {
        "color": "blue", "background": scene.background}
    assert prompt_attributes(describe(scene, rng, mention=())) == {}
    for _ in range(200):  # random subsets, as in training data: always consistent with the scene
        scene = random_scene(rng)
        stated = prompt_attributes(describe(scene, rng, mention=None))
        assert all(getattr(scene, k) == v for k, v in stated.items())


def test_prompt_attributes_examples_and_errors():
    assert prompt_attributes("a red circle on a white background") == {
        "shape": "circle", "color": "red", "background": "white"}
    assert prompt_attributes("a striped blue square") == {
        "style": "striped", "color": "blue", "shape": "square"}
    assert prompt_attributes("Yellow triangle") == {"color": "yellow", "shape": "triangle"}
    assert prompt_attributes("a picture of a cross") == {"shape": "cross"}
    assert prompt_attributes("a blue shape on a black background") == {
        "color": "blue", "background": "black"}
    assert prompt_attributes("an image of a purple plus sign with stripes") == {
        "color": "purple", "shape": "cross", "style": "striped"}
    assert prompt_attributes("a round shape on grey") == {"shape": "circle", "background": "gray"}
    assert prompt_attributes("a disc without stripes") == {"shape": "circle", "style": "solid"}
    with pytest.raises(ValueError, match="two colors"):
        prompt_attributes("a red blue circle")
    with pytest.raises(ValueError, match="shape_word"):
        describe(Scene("circle", "red", "white", "solid", 30, 32.0, 32.0),
                 np.random.default_rng(0), shape_word="wedge")


def test_vocabulary_covers_every_generated_prompt():
    _, prompts, _ = make_dataset(300, seed=5, size=16)
    words = {w for p in prompts for w in p.split()}
    assert words <= set(VOCABULARY)
    assert "grey" in VOCABULARY and "gray" in VOCABULARY and VOCABULARY == sorted(set(VOCABULARY))
    assert all(re.fullmatch(r"[a-z]+", w) for w in VOCABULARY)
    # every synonym word and attribute value is in the vocabulary
    needed = {w for ws in SYNONYMS.values() for s in ws for w in s.split()}
    assert needed | set(COLORS) | set(BACKGROUNDS) | {"striped", "shape"} <= set(VOCABULARY)


def test_render_scales_with_size():
    scene = Scene("square", "red", "black", "solid", 32, 32.0, 32.0)
    big = render(scene, size=128)
    assert big.shape == (128, 128, 3)
    assert covered_area(big, "red", "black") == pytest.approx(64 * 64, abs=3)
