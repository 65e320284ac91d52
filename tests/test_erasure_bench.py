"""The benchmark's S-VARE row on the embedded model, at a reduced sample count.

Targets (README, full benchmark): ACC_e <= 3% including unseen synonyms, ACC_i within 1 point
of the original model, colour kept >= 90%. With 16 samples per prompt set the estimates are
noisier, so the margins here are: ACC_e <= 8%, ACC_i >= original - 6 points, colour >= 85%.
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
    assert result["ACC_e"] <= 0.08
    assert all(v <= 0.15 for v in result["ACC_e_by_word"].values())   # synonyms never trained on
    assert result["ACC_i"] >= original["ACC_i"] - 0.06
    assert result["color_kept"] >= 0.85


def test_prompt_sets_for_several_concepts():
    from vare_core.erasure.bench import prompt_sets
    sets = prompt_sets(["circle", "triangle"], samples=10)
    erased_shapes = {e["shape"] for _, e in sets["erased"]}
    assert erased_shapes == {"circle", "triangle"}
    assert {e["shape"] for _, e in sets["others"]} == {"square", "cross"}
    assert any(p.endswith(" wedge") for p, _ in sets["erased"])       # synonyms of every concept
