"""Erasure settings for the embedded shapes-world model: prompt templates and tuned defaults.

    pairs = embedded_pairs(["circle"], ["square"])       # 50 pairs, same colour/background/style
    config = embedded_erase_config()                     # defaults measured on this model

Training uses the MAIN word of a shape only ("circle"); synonyms ("disc", "round shape") are
left out on purpose, so the benchmark can check that the erasure carries over to words it
never saw.

    pairs = embedded_pairs(["circle"], ["square"], pipe=pipe)   # + implicit pairs, mined

With the pipeline given, implicit pairs are added (erasure/implicit.py): prompts that name no
shape (no word, another word of the world, a made-up word) which the original model draws as
the concept. The embedded model v2 draws a circle for any prompt naming no shape, so erasing
"circle" also erases that habit; for the other shapes none are found and nothing is added.
No word of any shape's name ("round", "plus", "block", "sign", ...) is a candidate: the attack
families (evaluation/shapes_world/attacks.py) that use them stay unseen.
"""
from __future__ import annotations

import random

from ..checks import is_integer
from ..erasure.implicit import mine_implicit_pairs
from ..erasure.pairs import (PromptPair, default_keep_count, draw_slot_values, make_pairs, render_template,
                             retain_pairs)
from .world import BACKGROUNDS, COLORS, GENERIC_SHAPE_WORD, SHAPES, SYNONYMS, VOCABULARY

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

# LoRA settings shared by both formulations; DEFAULT_STEPS / DEFAULT_ALPHA /
# DEFAULT_PRESERVATION_WEIGHT are the paper formulation's tuning on this model (the consistent
# formulation overrides them with EMBEDDED_CONSISTENT below).
DEFAULT_STEPS = 150
DEFAULT_TRAIN = "lora"
DEFAULT_RANK = 8
DEFAULT_LR = 2e-3
# Measured over 4 training seeds (bench/erasure_seeds.py): LoRA on
# cross-attention only, since FFN factors moved the other shapes (ACC_i 98.5% -> 99.3%); alpha
# 0.05 trains every token with a wrong bit, which keeps the prompted colour on erased prompts
# (90.0% at the paper's 0.25 -> 97.8%); L_Pre weight 1.0 (official 0.5) and 20 keep pairs per
# other shape (pairs.default_keep_count) hold the other shapes: ACC_i 99.9%, ACC_e 0.6%.
DEFAULT_LORA_TARGETS = ("ca",)
DEFAULT_ALPHA = 0.05
DEFAULT_PRESERVATION_WEIGHT = 1.0
# How the erasure meets classifier-free guidance (docs/method.md, "Guidance-consistent targets").
# paper: the S-VARE paper's objective (CFG-combined teacher for L_Pre, bits sampled at cfg 4 for
# L_FCE), golden-tested. consistent: the conditional branch is trained toward the frozen model's
# own CONDITIONAL logits of the safe prompt (soft targets on the selected tokens), and the null
# branch is held to its frozen self, so the sampler's guidance meets the same branches it always
# met: erased prompts keep colour, background and a clean picture at every cfg.
FORMULATIONS = {
    "paper": {"targets": "cfg", "erase_target": "hard", "null_weight": 0.0, "scale_weights": "tokens"},
    "consistent": {"targets": "conditional", "erase_target": "soft", "null_weight": 1.0,
                   "scale_weights": "tokens"},
}
DEFAULT_FORMULATION = "consistent"
# The embedded model's tuning on top of "consistent" (bench/erasure_seeds.py; docs/method.md): every
# token trained (alpha 0), every scale weighted the same (the 1-, 4- and 16-token scales set the
# layout), and 600 steps (still well inside the 3-minute budget).
EMBEDDED_CONSISTENT = {"alpha": 0.0, "scale_weights": "balanced", "steps": 600, "preservation_weight": 2.0}
# Implicit pairs per erased concept, at most, as a share of its erasure pairs (docs/method.md,
# "Implicit pairs": 24 for 50, chosen from 12 and 24 measured)
IMPLICIT_SHARE = 0.48
IMPLICIT_CANDIDATES = 48       # sampled IMPLICIT_SAMPLES times each by the original model
IMPLICIT_SAMPLES = 4
# Models whose habits are mined (a random-weight test model, "tiny", has none worth the sampling)
MINED_MODELS = ("embedded",)
# Models that speak the shapes world's word-level vocabulary (tiny: testing.tiny_pipeline).
SHAPES_WORLD_MODELS = ("embedded", "tiny")


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
    return max(1, round(IMPLICIT_SHARE * n_per_concept))


def implicit_pairs(pipe, concepts, anchors, limit: int, seed: int = 0) -> list[PromptPair]:
    """Mined implicit pairs for each (concept, anchor): candidates the original model `pipe`
    draws as the concept in at least half of IMPLICIT_SAMPLES images (geometric judge)."""
    from ..evaluation.judges.geometry import judge_images
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


def embedded_pairs(concepts, anchors, seed: int = 0, n_per_concept: int = 50,
                   retain_per_shape: int | None = None, pipe=None,
                   implicit: int | None = None) -> list[PromptPair]:
    """Erasure pairs; with `pipe` (the original embedded pipeline) up to `implicit` (None:
    default_implicit_count(n_per_concept), 24 for 50) mined implicit pairs per concept and their
    contrast keep pairs; then `retain_per_shape` keep-as-is pairs for every shape not erased
    (anchors included; None = pairs.default_keep_count(n_per_concept), 20 for 50; 0 = none, the
    paper's setting). Without them the LoRA drifts on the other shapes (docs/method.md, "Keep pairs")."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    anchors = [anchors] if isinstance(anchors, str) else list(anchors)
    concepts = [shape_name(c, "concept") for c in concepts]
    anchors = [shape_name(a, "anchor") for a in anchors]
    world = dict(templates=list(WORLD_TEMPLATES), vocabulary=set(VOCABULARY), slot_values=SLOT_VALUES)
    pairs = make_pairs(concepts, anchors, n_per_concept=n_per_concept, seed=seed, **world)
    implicit = default_implicit_count(n_per_concept) if implicit is None else implicit
    if not is_integer(implicit, minimum=0):
        raise ValueError(f"implicit must be an integer >= 0, got {implicit!r}")
    if pipe is not None and implicit and getattr(pipe, "name", None) in MINED_MODELS:
        found = implicit_pairs(pipe, concepts, anchors, limit=implicit, seed=seed)
        pairs += found + contrast_pairs(found, [shape for shape in SHAPES if shape not in concepts])
    if retain_per_shape is None and isinstance(n_per_concept, int):
        retain_per_shape = default_keep_count(n_per_concept)
    if not is_integer(retain_per_shape, minimum=0):
        raise ValueError(f"retain_per_shape must be an integer >= 0, got {retain_per_shape!r}")
    keep = [shape for shape in SHAPES if shape not in concepts]
    if retain_per_shape and keep:
        pairs += retain_pairs(keep, n_per_concept=retain_per_shape, seed=seed + 1, **world)
    return pairs


def embedded_erase_config(steps: int | None = None, formulation: str = "auto", **overrides):
    """EraseConfig with this model's defaults; the tuned LoRA settings apply to train="lora"
    only (full CA+FFN weights keep the paper's alpha / L_Pre weight and the width-scaled lr)."""
    from ..erasure.trainer import EraseConfig
    train = overrides.get("train", DEFAULT_TRAIN)
    settings = dict(method="svare", train=train, rank=DEFAULT_RANK, steps=DEFAULT_STEPS, batch_size=8,
                    precision="fp32")
    settings.update(tuned_settings(SHAPES_WORLD_MODELS[0], train, formulation))
    if steps is not None:
        settings["steps"] = steps
    settings.update(overrides)
    return EraseConfig(**settings)


def formulation_settings(model_name: str, formulation: str = "auto") -> dict:
    """EraseConfig settings of a formulation ("auto": the model's default, "consistent" for
    every model; Infinity keeps the paper's alpha / steps, the embedded model its tuning)."""
    formulation = DEFAULT_FORMULATION if formulation == "auto" else formulation
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation {formulation!r}: choose auto, {', '.join(FORMULATIONS)}")
    settings = dict(FORMULATIONS[formulation])
    if formulation == "consistent" and model_name in SHAPES_WORLD_MODELS:
        settings.update(EMBEDDED_CONSISTENT)
    return settings


def tuned_settings(model_name: str, train: str, formulation: str = "auto") -> dict:
    """EraseConfig settings measured for this model and training mode: the formulation's, plus
    the embedded model's LoRA tuning (the trainer's defaults, e.g. its width-scaled lr, apply
    to the rest)."""
    settings = formulation_settings(model_name, formulation)
    if model_name in SHAPES_WORLD_MODELS and train == DEFAULT_TRAIN:
        tuned = {"lr": DEFAULT_LR, "lora_targets": DEFAULT_LORA_TARGETS, "alpha": DEFAULT_ALPHA,
                 "preservation_weight": DEFAULT_PRESERVATION_WEIGHT}
        settings = {**tuned, **settings}
    return settings
