"""The fidelity benchmark's prompt sets and scores, on synthetic images (no model needed)."""
import numpy as np
import pytest

from vare_core.evaluation.shapes_world import fidelity
from vare_core.embedded.world import SHAPES, Scene, prompt_attributes, random_scene, render


def test_every_prompt_names_every_attribute_it_is_scored_on():
    sets = fidelity.prompt_sets(["circle"], samples=16)
    for name in ("erased", "others"):
        for prompt, expected in sets[name]:
            stated = prompt_attributes(prompt)
            assert stated == {k: expected[k] for k in ("shape", "color", "background", "style")}, prompt
    assert {e["shape"] for _, e in sets["erased"]} == {"circle"}
    assert {e["shape"] for _, e in sets["others"]} == set(SHAPES) - {"circle"}
    families = [e["family"] for _, e in sets["erased"]]
    assert families.count("main") == 8 and families.count("synonym") == 4 and families.count("context") == 4
    assert any("disc" in p for p, _ in sets["erased"]) and any("drawing" in p for p, _ in sets["erased"])
    for prompt, expected in sets["open"]:   # open prompts leave background and style open
        assert set(prompt_attributes(prompt)) == {"shape", "color"}


def test_prompt_sets_cover_the_attribute_grid_and_several_concepts():
    sets = fidelity.prompt_sets(["circle", "triangle"], samples=32)
    erased = sets["erased"]
    assert {e["shape"] for _, e in erased} == {"circle", "triangle"}
    assert len({(e["color"], e["background"]) for _, e in erased if e["shape"] == "circle"}) >= 12
    with pytest.raises(ValueError, match="samples"):
        fidelity.prompt_sets("circle", samples=2)


def _rendered_run(items_by_set, damage=None, rng_seed=0):
    """A SampledSets whose images are clean renders of exactly what each prompt asks for."""
    rng = np.random.default_rng(rng_seed)
    images = {}
    for name, items in items_by_set.items():
        out = []
        for _, expected in items:
            fixed = {k: expected.get(k) for k in ("shape", "color", "background", "style")}
            out.append(render(random_scene(rng, **fixed)))
        images[name] = np.stack(out)
    if damage is not None:
        images = {name: damage(name, imgs) for name, imgs in images.items()}
    return fidelity.SampledSets(concepts=["circle"], cfg=4.0, seed=0, items=items_by_set, images=images)


def test_clean_renders_score_perfectly_and_identical_images_are_the_same_picture():
    items = fidelity.prompt_sets(["circle"], samples=8)
    run = _rendered_run(items)
    scores = fidelity.fidelity_scores(run, classifier=None, reference=run)
    assert scores["ACC_e"] == 1.0            # the concept is drawn: nothing was erased
    assert scores["ACC_i"] == 1.0
    for group in ("erased", "others"):
        for attribute in ("color", "background", "style", "clean", "intact"):
            assert scores[f"{group}_{attribute}"] == 1.0, (group, attribute)
    assert scores["same_picture"] == 1.0 and scores["others_difference"] == 0.0


def _blotch(images):
    """Smear a random other-coloured patch over the middle of every image."""
    damaged = images.copy()
    damaged[:, 16:44, 10:40] = np.array([30, 170, 50], dtype=np.uint8)
    damaged[:, 30:50, 25:55] = np.array([240, 210, 20], dtype=np.uint8)
    return damaged


def test_damaged_pictures_fail_and_count_as_changed():
    items = fidelity.prompt_sets(["circle"], samples=8)
    reference = _rendered_run(items)
    damaged = _rendered_run(items, damage=lambda name, imgs: _blotch(imgs) if name == "others" else imgs)
    scores = fidelity.fidelity_scores(damaged, classifier=None, reference=reference)
    assert scores["others_clean"] <= 0.1 and scores["others_intact"] <= 0.1
    assert scores["ACC_i"] <= 0.1
    assert scores["same_picture"] == 0.0 and scores["others_difference"] > 0.04
    assert scores["erased_clean"] == 1.0     # untouched set unaffected


def test_frame_filling_squares_are_not_clean_squares():
    items = {"erased": [("a solid red circle on a white background",
                         {"shape": "circle", "color": "red", "background": "white", "style": "solid", "family": "main"})],
             "others": [("a solid red square on a white background",
                         {"shape": "square", "color": "red", "background": "white", "style": "solid", "family": "main"})],
             "open": []}
    full = render(Scene("square", "red", "white", "solid", size_px=70, cx=32, cy=32))
    run = fidelity.SampledSets(concepts=["circle"], cfg=4.0, seed=0, items=items,
                               images={"erased": full[None], "others": full[None],
                                       "open": np.zeros((0, 64, 64, 3), np.uint8)})
    scores = fidelity.fidelity_scores(run, classifier=None)
    assert scores["others_intact"] == 0.0 and scores["ACC_i"] == 0.0
    assert scores["erased_background"] == 0.0     # no white background left


def test_spread_of_open_attributes():
    items = fidelity.prompt_sets(["circle"], samples=32)
    run = _rendered_run(items)
    scores = fidelity.fidelity_scores(run, classifier=None)
    spread = scores["open_others"]
    assert sum(spread["background_shares"].values()) == pytest.approx(1.0)
    assert 0.05 < spread["centre_spread"] < 0.3      # random_scene spreads the centre (~0.12)
