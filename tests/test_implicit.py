"""Implicit pairs: mining prompts that do not name the concept but whose images show it."""
from types import SimpleNamespace

import pytest
import torch

from vare_core.embedded.profile import contrast_pairs, default_implicit_count, implicit_candidates
from vare_core.erasure.profile import erasure_profile
from vare_core.embedded.world import SYNONYMS, VOCABULARY
from vare_core.erasure.implicit import concept_shares, mine_implicit_pairs


class FakePipe:
    """Images are all white where the prompt holds 'x' (and the seed is even), else black."""
    def __init__(self):
        self.calls = []

    def generate(self, prompts, seed=0):
        self.calls.append((list(prompts), seed))
        images = torch.zeros(len(prompts), 4, 4, 3)
        for i, prompt in enumerate(prompts):
            if "x" in prompt and ((seed + i) % 2 == 0 or "xx" in prompt):
                images[i] = 1.0
        return SimpleNamespace(images=images)


def white(images):
    return [bool(image.mean() > 0.5) for image in images]


def test_shares_count_the_judged_images_of_each_prompt():
    shares = concept_shares(FakePipe(), ["a", "a x", "a xx"], white, samples=4)
    assert shares == [0.0, 0.5, 1.0]


def test_mining_keeps_the_candidates_the_judge_sees_in_order_and_up_to_the_limit():
    candidates = [("a xx", "a s"), ("plain", "plain s"), ("b x", "b s"), ("c xx", "c s")]
    pairs = mine_implicit_pairs(FakePipe(), candidates, white, "concept", "anchor", samples=4)
    assert [(p.unsafe, p.safe) for p in pairs] == [("a xx", "a s"), ("b x", "b s"), ("c xx", "c s")]
    assert all(p.concept == "concept" and p.anchor == "anchor" for p in pairs)
    strict = mine_implicit_pairs(FakePipe(), candidates, white, "c", "a", samples=4, min_share=0.75)
    assert [p.unsafe for p in strict] == ["a xx", "c xx"]
    assert len(mine_implicit_pairs(FakePipe(), candidates, white, "c", "a", limit=1)) == 1


def test_mining_uses_the_same_seeds_on_every_call():
    one, two = FakePipe(), FakePipe()
    candidates = [("a x", "a s"), ("b x", "b s")]
    mine_implicit_pairs(one, candidates, white, "c", "a", seed=3)
    mine_implicit_pairs(two, candidates, white, "c", "a", seed=3)
    assert one.calls == two.calls


def test_nothing_to_mine_samples_nothing():
    pipe = FakePipe()
    assert mine_implicit_pairs(pipe, [], white, "c", "a") == []
    assert mine_implicit_pairs(pipe, [("a x", "a s")], white, "c", "a", limit=0) == []
    assert pipe.calls == []


@pytest.mark.parametrize("kwargs, message", [({"samples": 0}, "samples"), ({"min_share": 0}, "min_share"),
                                             ({"limit": -1}, "limit")])
def test_bad_mining_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mine_implicit_pairs(FakePipe(), [("a x", "a s")], white, "c", "a", **kwargs)


def test_candidates_name_no_shape_and_differ_from_the_anchor_prompt_only_in_the_subject():
    shape_words = {w for phrases in SYNONYMS.values() for phrase in phrases for w in phrase.split()}
    candidates = implicit_candidates("square", seed=0)
    assert len(candidates) >= 40 and candidates == implicit_candidates("square", seed=0)
    made_up = 0
    for unsafe, safe in candidates:
        assert not shape_words & set(unsafe.split()), unsafe   # "round", "plus", ... stay unseen
        words, safe_words = unsafe.split(), safe.split()
        i = safe_words.index("square")
        before, after = safe_words[:i], safe_words[i + 1:]
        assert words[:i] == before and words[len(words) - len(after):] == after, (unsafe, safe)
        assert len(words) - len(before) - len(after) in (0, 1)       # no word or one in its place
        made_up += any(w not in VOCABULARY for w in unsafe.split())
    assert made_up >= len(candidates) // 4      # a third of them carry a made-up word


def test_contrast_pairs_name_each_kept_shape_in_the_safe_prompts_wording():
    from vare_core.erasure.pairs import PromptPair
    implicit = [PromptPair("a red", "a red square", "circle", "square"),
                PromptPair("a red on gray", "a red square on gray", "circle", "square")]
    pairs = contrast_pairs(implicit, ["square", "triangle"])
    assert [p.unsafe for p in pairs] == ["a red square", "a red triangle", "a red square on gray",
                                         "a red triangle on gray"]
    assert all(p.unsafe == p.safe and p.concept == "" for p in pairs)
    assert len(contrast_pairs(implicit + implicit, ["square"])) == 2      # no duplicates


def test_the_default_count_is_a_share_of_the_erasure_pairs():
    assert default_implicit_count(50) == 24 and default_implicit_count(2) == 1


def test_bad_implicit_count_is_named():
    with pytest.raises(ValueError, match="implicit"):
        erasure_profile("embedded").pairs("circle", "square", pipe=FakePipe(), implicit=-1)


def test_on_the_embedded_model_only_the_models_default_shape_gets_implicit_pairs():
    """v2 and v2.1 draw a circle for prompts naming no shape: erasing circle mines them, square none."""
    from vare_core.embedded.loader import load_embedded
    pipe = load_embedded("cpu")
    circle = erasure_profile("embedded").pairs("circle", "square", pipe=pipe, retain=0)
    square = erasure_profile("embedded").pairs("square", "triangle", pipe=pipe, retain=0)
    implicit = [p for p in circle[50:] if p.concept]
    contrast = [p for p in circle[50:] if not p.concept]
    assert len(implicit) == 24 and len(square) == 50
    assert all(p.concept == "circle" and p.anchor == "square" and "circle" not in p.unsafe for p in implicit)
    # one keep pair per implicit pair and kept shape (square, triangle, cross), duplicates merged
    assert 48 <= len(contrast) <= 72 and all(p.unsafe == p.safe for p in contrast)
    assert len(erasure_profile("embedded").pairs("circle", "square", retain=0)) == 50     # no pipeline, no mining
