"""The fidelity benchmark's S-VARE row on the embedded model: two pairs, reduced samples, cfg 4.

Targets (docs/results.md, full benchmark over 12 pairs x 2 seeds at 64 samples): ACC_e <= 3%; erased
prompts keep colour / background / style at the original's rate minus 3 points and stay intact;
other prompts within 1 point of the original; >= 90% of them the same picture at the same seed.
Measured on embedded model v2.1 at 64 samples (defaults of 2026-12-02, mined implicit pairs): the
worst single pair at cfg 4 has ACC_e 1.6% (circle -> cross), 94.8% the same picture (circle ->
square), erased prompts 100% intact (v2: 1.6%, 92.7%, 96.9%). Here 16 samples per prompt set: one
image is 6.2 points of ACC_e (16 images) and 2.1 points of the other prompts' scores (48 images),
so the margins are stated in images (see each assert).
"""
import pytest

from vare_core.erasure.adapters import apply_adapter
from vare_core.evaluation.judges.classifier import load_classifier
from vare_core.evaluation.shapes_world.erasure_bench import score
from vare_core.generation.pipeline import load_pipeline

SAMPLES, SEED, CFG = 16, 7, 4.0


@pytest.fixture(scope="module")
def pipe_and_classifier():
    return load_pipeline("embedded", device="cpu"), load_classifier()


@pytest.mark.slow
@pytest.mark.parametrize("concept, anchor", [("circle", "square"), ("square", "triangle")])
def test_svare_default_row_meets_the_fidelity_targets(pipe_and_classifier, default_adapter, concept, anchor):
    pipe, classifier = pipe_and_classifier
    original = score(pipe, classifier, concept, SAMPLES, SEED, CFG)
    reference = original.pop("run")
    erased = apply_adapter(pipe, default_adapter(concept, anchor))     # S-VARE, LoRA: the defaults
    result = score(erased, classifier, concept, SAMPLES, SEED, CFG, reference)
    # the 3-minute training budget is measured by bench/erasure_seeds.py ("training seconds"),
    # not asserted here: a timed test fails whenever the shared CPU is slow
    assert original["ACC_e"] >= 0.9                                   # the concept was there
    assert result["ACC_e"] <= 1 / 16                                  # 1 of 16 images
    for attribute in ("color", "background", "style"):                # 1 image below the original
        assert result[f"erased_{attribute}"] >= original[f"erased_{attribute}"] - 1 / 16, attribute
    assert result["erased_intact"] >= min(original["original_intact_by_shape"][anchor], 1.0) - 1 / 16
    assert result["ACC_i"] >= original["ACC_i"] - 2 / 48               # 2 of 48 images
    for attribute in ("color", "background", "style", "intact"):
        assert result[f"others_{attribute}"] >= original[f"others_{attribute}"] - 2 / 48, attribute
    assert result["same_picture"] >= 0.90                             # the target itself
