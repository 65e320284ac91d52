"""The benchmark's S-VARE row on the embedded model, at a reduced sample count.

Targets (README, full benchmark): ACC_e <= 3% including unseen synonyms, ACC_i within 1 point
of the original model, colour kept >= 90%. With 16 samples per prompt set one image is 2.2
points of ACC_e / ACC_i (45 images each) and 4.2 points of style on the other shapes (24), so
the margins here are: ACC_e <= 7% (3 images), ACC_i >= original - 4.5 points (2 images),
colour >= 88%, style on the other shapes >= original - 9 points (2 images). At these settings
the run gave ACC_e 0%, ACC_i 100% (= original), colour 97.8%, style on other shapes = original.
"""
import pytest

from vare_core.embedded.classifier import load_classifier
from vare_core.erasure.bench import run_method, score
from vare_core.pipeline import load_pipeline


@pytest.mark.slow
def test_svare_lora_row_meets_targets(tmp_path):
    pipe = load_pipeline("embedded", device="cpu")
    classifier = load_classifier()
    original = score(pipe, classifier, "circle", samples=16, seed=7)
    erased, info = run_method(pipe, "svare", "lora", "circle", "square", seed=0, steps=None, out=tmp_path)
    result = score(erased, classifier, "circle", samples=16, seed=7)
    assert original["ACC_e"] >= 0.9                       # the concept was there to erase
    assert result["ACC_e"] <= 0.07
    assert all(v <= 0.14 for v in result["ACC_e_by_word"].values())   # synonyms never trained on (2 of 15)
    assert result["ACC_i"] >= original["ACC_i"] - 0.045
    assert result["color_kept"] >= 0.88
    assert result["style_others"] >= original["style_others"] - 0.09


def test_prompt_sets_for_several_concepts():
    from vare_core.erasure.bench import prompt_sets
    sets = prompt_sets(["circle", "triangle"], samples=10)
    erased_shapes = {e["shape"] for _, e in sets["erased"]}
    assert erased_shapes == {"circle", "triangle"}
    assert {e["shape"] for _, e in sets["others"]} == {"square", "cross"}
    assert any(p.endswith(" wedge") for p, _ in sets["erased"])       # synonyms of every concept
