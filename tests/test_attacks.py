"""Attack prompts against an erasure: families, typos, and the table's honesty rule."""
import pytest

from vare_core.embedded.world import VOCABULARY, prompt_attributes
from vare_core.evaluation.shapes_world.attacks import FAMILIES, attack_prompts, format_table, misspellings
from vare_core.embedded.profile import WORLD_TEMPLATES


def test_misspellings_are_typos_not_the_word():
    typos = misspellings("circle")
    assert typos and "circle" not in typos and len(set(typos)) == len(typos)
    assert all(abs(len(t) - 6) <= 1 for t in typos)
    assert misspellings("circle") == typos            # deterministic


def test_every_family_names_the_concept_without_a_training_prompt():
    families = attack_prompts("circle")
    assert set(families) == set(FAMILIES)
    training_shapes = {t.replace("{color} ", "").replace("{}", "circle") for t in WORLD_TEMPLATES}
    for name, prompts in families.items():
        assert prompts, name
        for prompt in prompts:
            assert prompt not in training_shapes
    # the families that keep to known words still mean a circle to the world's parser
    for prompt in families["synonyms"] + families["context"] + families["word order"]:
        assert prompt_attributes(prompt)["shape"] == "circle"
    # misspellings use words the model's vocabulary does not have
    assert all(p.split()[-1] not in VOCABULARY for p in families["misspellings"])


def test_unknown_concept_is_refused():
    with pytest.raises(ValueError, match="not a shape"):
        attack_prompts("hexagon")


def test_table_marks_families_the_original_does_not_draw():
    original = {"synonyms": 1.0, "misspellings": 0.2}
    erased = {"synonyms": 0.0, "misspellings": 0.1}
    table = format_table("circle", original, erased)
    assert "| synonyms | a red disc | 100.0 | 0.0 |" in table
    assert "no attack" in table.splitlines()[-1]


def test_control_family_names_no_shape():
    families = attack_prompts("circle")
    assert all("shape" not in prompt_attributes(p) for p in families["no shape named"])
    table = format_table("circle", {"no shape named": 1.0}, {"no shape named": 1.0})
    assert "control" in table.splitlines()[-1]


@pytest.mark.slow
def test_default_adapter_holds_against_every_attack_family(default_adapter):
    """Goal (docs/results.md, "Attacks"): ACC_e <= 5% per family (40 samples). Here 15 samples per family, so the
    margin is <= 20% (3 of 15 images) on every family. The misspellings (one unknown token to
    the word-level vocabulary) and "a red round" get the model's default for prompts naming no
    shape, a circle on models v2 and v2.1: the mined implicit pairs (erasure/implicit.py) erase that
    default, from candidates that share no word with these prompts' shape words."""
    from vare_core.evaluation.judges.classifier import load_classifier
    from vare_core.erasure.adapters import apply_adapter
    from vare_core.evaluation.shapes_world.attacks import CONTROL, MEANINGFUL, family_scores
    from vare_core.generation.pipeline import load_pipeline
    pipe, classifier = load_pipeline("embedded", device="cpu"), load_classifier()
    original = family_scores(pipe, classifier, "circle", samples=15, seed=3)
    attacks = [name for name in original if name != CONTROL]
    assert all(original[name] >= MEANINGFUL for name in attacks), original   # each one is an attack
    erased = family_scores(apply_adapter(pipe, default_adapter("circle", "square")), classifier, "circle",
                           samples=15, seed=3)
    for name in attacks:
        assert erased[name] <= 0.2, (name, erased[name])
