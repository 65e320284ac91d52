"""The embedded shapes world's erasure profile: its prompt templates, the implicit pairs mined
from the model, and its EraseConfig settings, registered as the "embedded" family's profile
(erasure/profile.py; the tiny test model reuses it without mining, vare_core/testing.py).

    profile = erasure_profile("embedded")
    pairs = profile.pairs(["circle"], ["square"])             # 50 pairs, same colour/background/style
    pairs = profile.pairs(["circle"], ["square"], pipe=pipe)  # + implicit pairs, mined
    config = profile.config()                                 # the settings measured on this model

Training uses the MAIN word of a shape only ("circle"); synonyms ("disc", "round shape") are
left out on purpose, so the benchmark can check that the erasure carries over to words it
never saw. Every shape not erased is kept (keep pairs; a keep list is refused).

With the pipeline given, implicit pairs are added (erasure/implicit.py): prompts that name no
shape (no word, another word of the world, a made-up word) which the original model draws as
the concept. The embedded model v2 draws a circle for any prompt naming no shape, so erasing
"circle" also erases that habit; for the other shapes none are found and nothing is added.
No word of any shape's name ("round", "plus", "block", "sign", ...) is a candidate: the attack
families (evaluation/shapes_world/attacks.py) that use them stay unseen.
"""
from __future__ import annotations

import random

from ..erasure.implicit import mine_implicit_pairs
from ..erasure.pairs import PromptPair, draw_slot_values, render_template
from ..erasure.profile import ErasureProfile, PairMining, PairWorld, register_profile
from . import spec
from .world import BACKGROUNDS, COLORS, GENERIC_SHAPE_WORD, SHAPES, SYNONYMS, VOCABULARY

FAMILY = spec.NAME
WORLD_TEMPLATES = (
    "a {color} {}",
    "a {}",
    "{color} {}",
    "a {color} {} on a {background} background",
    "a {} on a {background} background",
    "a {style} {color} {}",
    "a {style} {}",
    "a picture of a {color} {}",
    "a photo of a {}",
    "an image of a {color} {} with stripes",
    "a {color} {} on {background}",
    "a drawing of a {style} {color} {} on a {background} background",
)
SLOT_VALUES = {"color": list(COLORS), "background": list(BACKGROUNDS), "style": ["striped", "solid"]}

# EraseConfig settings per formulation and training mode, measured on this model over 4 training
# seeds (bench/erasure_seeds.py; docs/method.md). Every other field is EraseConfig's own.
# LoRA: rank 8 on cross-attention only (FFN factors moved the other shapes: ACC_i 98.5% ->
# 99.3%), lr 2e-3; 20 keep pairs per other shape (pairs.default_keep_count) hold the other shapes.
# consistent: every token trained (alpha 0), every scale weighted the same (the 1-, 4- and
# 16-token scales set the layout), L_Pre weight 2.0, 600 steps (well inside 3 minutes on a CPU).
# paper: alpha 0.05 trains every token with a wrong bit, which keeps the prompted colour on
# erased prompts (90.0% at the paper's 0.25 -> 97.8%), L_Pre weight 1.0 (official 0.5), 150 steps.
# ca_ffn (the full fine-tune) keeps the paper's alpha and L_Pre weight and the width-scaled lr.
# Early-scale erasure (method "early", erasure/early.py; docs/method.md, "Early-scale erasure"):
# the first 3 scales, i.e. the 2x2 and 4x4 ones beside the free 1x1: erased circle -> square and
# triangle -> cross fully and kept more of the other shapes' pictures than every scale (99.0% the
# same at the same seed, against 95.8% / 97.9%); 2 scales left circles standing (96.9%). Entropy
# weight 1: the same result as 0 with soft targets (the student stays as sharp as its target),
# kept as the guard the method defines.
EARLY = {"early_scales": 3, "entropy_weight": 1.0}
ERASURE = {
    "consistent": {
        "lora": {"method": "svare", "train": "lora", "rank": 8, "lora_targets": ("ca",), "lr": 2e-3,
                 "steps": 600, "batch_size": 8, "precision": "fp32", "alpha": 0.0, "preservation_weight": 2.0,
                 "targets": "conditional", "erase_target": "soft", "null_weight": 1.0, "scale_weights": "balanced",
                 **EARLY},
        "ca_ffn": {"method": "svare", "train": "ca_ffn", "rank": 8,
                   "steps": 600, "batch_size": 8, "precision": "fp32", "alpha": 0.0, "preservation_weight": 2.0,
                   "targets": "conditional", "erase_target": "soft", "null_weight": 1.0, "scale_weights": "balanced",
                   **EARLY},
    },
    "paper": {
        "lora": {"method": "svare", "train": "lora", "rank": 8, "lora_targets": ("ca",), "lr": 2e-3,
                 "steps": 150, "batch_size": 8, "precision": "fp32", "alpha": 0.05, "preservation_weight": 1.0,
                 "targets": "cfg", "erase_target": "hard", "null_weight": 0.0, "scale_weights": "tokens",
                 **EARLY},
        "ca_ffn": {"method": "svare", "train": "ca_ffn", "rank": 8,
                   "steps": 150, "batch_size": 8, "precision": "fp32", "alpha": 0.25, "preservation_weight": 0.5,
                   "targets": "cfg", "erase_target": "hard", "null_weight": 0.0, "scale_weights": "tokens",
                   **EARLY},
    },
}
DEFAULT_TRAIN = "lora"
# Implicit pairs per erased concept, at most, as a share of its erasure pairs (docs/method.md,
# "Implicit pairs": 24 for 50, chosen from 12 and 24 measured)
IMPLICIT_SHARE = 0.48
IMPLICIT_CANDIDATES = 48       # sampled IMPLICIT_SAMPLES times each by the original model
IMPLICIT_SAMPLES = 4


def shape_name(word: str, role: str) -> str:
    """A shape word or synonym -> the main shape name; clear error otherwise."""
    if not isinstance(word, str):
        raise ValueError(f"{role} must be a shape name (text), got {word!r}")
    text = " ".join(word.lower().split())
    for shape, words in SYNONYMS.items():
        if text in words:
            return shape
    raise ValueError(f"{role} {word!r} is not a shape of the embedded model; it knows "
                     f"{', '.join(SHAPES)} (and the synonyms {', '.join(w for ws in SYNONYMS.values() for w in ws[1:])})")


def _made_up_word(rng: random.Random) -> str:
    """A lowercase word of 4-7 letters that is not in the world's vocabulary."""
    while True:
        word = "".join(rng.choice("bcdfghjklmnpqrstvwxz" if i % 2 == 0 else "aeiouy")
                       for i in range(rng.randint(4, 7)))
        if word not in VOCABULARY:
            return word


def implicit_candidates(anchor: str, n: int = IMPLICIT_CANDIDATES, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt naming no shape, the same prompt with the anchor) for the world's templates, the
    subject slot left empty, filled with a non-shape word of the vocabulary, or a made-up word,
    in turn."""
    shape_words = {w for phrases in SYNONYMS.values() for phrase in phrases for w in phrase.split()}
    fillers = sorted(set(VOCABULARY) - shape_words - {GENERIC_SHAPE_WORD, "a", "an", "of", "on", "with"})
    rng = random.Random(seed)
    candidates = []
    for i in range(n):
        template = WORLD_TEMPLATES[rng.randrange(len(WORLD_TEMPLATES))]
        values = draw_slot_values(template, rng, SLOT_VALUES)
        subject = ("", rng.choice(fillers), _made_up_word(rng))[i % 3]
        unsafe = " ".join(render_template(template, subject, values).split())
        candidates.append((unsafe, render_template(template, anchor, values)))
    return list(dict.fromkeys(candidates))


def default_implicit_count(n_per_concept: int) -> int:
    return MINING.default_count(n_per_concept)


def implicit_pairs(pipe, concepts, anchors, limit: int, seed: int = 0) -> list[PromptPair]:
    """Mined implicit pairs for each (concept, anchor): candidates the original model `pipe`
    draws as the concept in at least half of IMPLICIT_SAMPLES images (geometric judge)."""
    from ..evaluation.judges.geometry import (
        judge_images,  # the judges sit below the profiles
    )
    pairs = []
    for concept, anchor in zip(concepts, anchors * len(concepts) if len(anchors) == 1 else anchors):
        def shows_concept(images, concept=concept):
            return [r["shape"] == concept for r in judge_images(images)]
        pairs += mine_implicit_pairs(pipe, implicit_candidates(anchor, seed=seed), shows_concept, concept,
                                     anchor, samples=IMPLICIT_SAMPLES, seed=seed, limit=limit)
    return pairs


def contrast_pairs(implicit: list[PromptPair], keep: list[str]) -> list[PromptPair]:
    """Keep pairs that differ from each implicit pair's safe prompt only in the shape word, one
    per kept shape ("a red square" -> "a red triangle", ...): what the implicit pair teaches
    ("a red" draws no circle) must not carry over to prompts that name a shape."""
    pairs = []
    for pair in implicit:
        words = pair.safe.split()
        for shape in keep:
            prompt = " ".join(shape if w == pair.anchor else w for w in words)
            pairs.append(PromptPair(unsafe=prompt, safe=prompt, concept="", anchor=""))
    return list(dict.fromkeys(pairs))


def mined_pairs(pipe, concepts, anchors, kept, limit: int, seed: int = 0) -> list[PromptPair]:
    """Implicit pairs the original model `pipe` gives, up to `limit` per concept, and their
    contrast keep pairs for the `kept` shapes."""
    found = implicit_pairs(pipe, concepts, anchors, limit=limit, seed=seed)
    return found + contrast_pairs(found, kept)


WORLD = PairWorld(templates=WORLD_TEMPLATES, slot_values=SLOT_VALUES, vocabulary=frozenset(VOCABULARY),
                  concepts=tuple(SHAPES), concept_word="shape", concept_name=shape_name)
MINING = PairMining(share=IMPLICIT_SHARE, mine=mined_pairs)
# The Concept Guard's settings on this model (generation/guard.py), chosen on four ordered pairs at
# cfg 2, 4 and 6 and checked on all twelve (docs/guard.md): every scale carries the guard's rows,
# but it acts only on the last two (6x6, 8x8: where this model settles the shape; acting on the
# layout scales moves the other shapes' pictures and does not erase); every token (the
# cross-attention queries of this 4-block model barely tell a concept's prompts from the others':
# AUC 0.55-0.69, a token mask would select at random); bits within 0.8 of the concept's logits,
# the same at both scales; penalty 1.5 (3 erases no more and costs colour and stripes).
GUARD = {"neutral": "background, colour, stripes", "scales": 5, "blocks": (0, 1, 2, 3), "token_threshold": 0.0,
         "bit_threshold": 0.8, "bit_growth": 1.0, "penalty": 1.5, "warmup": 3}

PROFILE = ErasureProfile(family=FAMILY, title="embedded", settings=ERASURE, default_train=DEFAULT_TRAIN,
                         world=WORLD, mining=MINING, guard=GUARD)
register_profile(PROFILE)
