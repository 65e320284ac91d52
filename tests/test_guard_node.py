"""The Concept Guard node (through the stand-in) and the Sampler's guard-mask preview."""
import pytest
import torch

from nodes import guard as guard_node
from nodes import host, loaders, sampling
from vare_core.erasure.profile import erasure_profile

from test_nodes import encode, run, sample


@pytest.fixture(autouse=True)
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("VARE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("VARE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model():
    return loaders.LoadModel.execute("embedded", "embedded", "embedded", "auto")[0]


def guarded(model, concept="circle", anchor="square", **given):
    return run(guard_node.ConceptGuard, model=model, concept=concept, anchor=anchor, **given)[0]


def test_the_node_returns_a_guarded_copy_and_leaves_the_base_alone(model):
    before = {name: tensor.clone() for name, tensor in model.model.state_dict().items()}
    out = guarded(model)
    assert model.guard is None and out.guard is not None and out.model is model.model
    assert out.guard == erasure_profile(model).guard_settings([("circle", "square")])
    assert all(torch.equal(before[n], t) for n, t in model.model.state_dict().items())


def test_profile_values_stay_unless_set(model):
    out = guarded(model, scales=3, penalty=-1.0, token_threshold=0.25, bit_threshold=-1.0, warmup=-1)
    profile = erasure_profile(model).guard
    assert out.guard.scales == 3 and out.guard.token_threshold == 0.25
    assert out.guard.penalty == profile["penalty"] and out.guard.warmup == profile["warmup"]


def test_several_concepts_one_anchor_or_one_each(model):
    assert guarded(model, concept="circle\ncross", anchor="square").guard.concepts == \
        (("circle", "square"), ("cross", "square"))
    assert guarded(model, concept="circle\ncross", anchor="square\ntriangle").guard.concepts == \
        (("circle", "square"), ("cross", "triangle"))
    for concept, anchor, words in (("", "square", "concept is empty"), ("circle", " ", "anchor is empty"),
                                   ("a\nb\nc", "x\ny", "2 lines for 3 concepts"),
                                   ("\n".join("c%d" % i for i in range(9)), "x", "at most 8")):
        assert words in guard_node.ConceptGuard.validate_inputs(concept=concept, anchor=anchor)
        with pytest.raises(ValueError, match=words):
            guarded(model, concept=concept, anchor=anchor)


def test_the_guarded_model_samples_the_concept_away(model):
    cond = encode(model, "a red circle on a white background\na red circle on a white background")
    base = sample(model, cond)
    after = sample(guarded(model), cond)
    assert base.shape == after.shape and not torch.equal(base, after)


def test_the_sampler_tints_the_guard_mask_in_its_preview(model, monkeypatch):
    shown = []
    monkeypatch.setattr(host, "report_progress", lambda node, value, total, preview=None: shown.append(preview))
    cond = encode(model, "a red circle on a white background")
    run(sampling.Sampler, model=guarded(model), conditioning=cond, seed=0, cfg="auto", tau="auto", top_k=0,
        top_p=-1.0, resolution="model default", batch_size=1, preview=True, preview_guard_mask=True)
    tinted = [p for p in shown if p is not None]
    shown.clear()
    run(sampling.Sampler, model=guarded(model), conditioning=cond, seed=0, cfg="auto", tau="auto", top_k=0,
        top_p=-1.0, resolution="model default", batch_size=1, preview=True, preview_guard_mask=False)
    plain = [p for p in shown if p is not None]
    assert len(tinted) == len(plain) == len(model.default_schedule)
    differs = [a.tobytes() != b.tobytes() for a, b in zip(tinted, plain)]
    guarded_scales = erasure_profile(model).guard["scales"]
    assert any(differs[:guarded_scales]) and not any(differs[guarded_scales:])
