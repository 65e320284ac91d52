"""Erasure settings for the embedded shapes-world model: prompt templates and tuned defaults.

    pairs = embedded_pairs(["circle"], ["square"])       # 50 pairs, same colour/background/style
    config = embedded_erase_config()                     # defaults measured on this model

Training uses the MAIN word of a shape only ("circle"); synonyms ("disc", "round shape") are
left out on purpose, so the benchmark can check that the erasure carries over to words it
never saw.
"""
from __future__ import annotations

from ..erasure.pairs import PromptPair, default_keep_count, make_pairs, retain_pairs
from .world import BACKGROUNDS, COLORS, SHAPES, SYNONYMS, VOCABULARY

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
# Measured over 4 training seeds (bench/erasure_seeds.py; README has the sweep): LoRA on
# cross-attention only, since FFN factors moved the other shapes (ACC_i 98.5% -> 99.3%); alpha
# 0.05 trains every token with a wrong bit, which keeps the prompted colour on erased prompts
# (90.0% at the paper's 0.25 -> 97.8%); L_Pre weight 1.0 (official 0.5) and 20 keep pairs per
# other shape (pairs.default_keep_count) hold the other shapes: ACC_i 99.9%, ACC_e 0.6%.
DEFAULT_LORA_TARGETS = ("ca",)
DEFAULT_ALPHA = 0.05
DEFAULT_PRESERVATION_WEIGHT = 1.0
# How the erasure meets classifier-free guidance (README "Guidance-consistent targets").
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
# The embedded model's tuning on top of "consistent" (bench/erasure_seeds.py; README): every
# token trained (alpha 0), every scale weighted the same (the 1-, 4- and 16-token scales set the
# layout), and 600 steps (still well inside the 3-minute budget).
EMBEDDED_CONSISTENT = {"alpha": 0.0, "scale_weights": "balanced", "steps": 600, "preservation_weight": 2.0}
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


def embedded_pairs(concepts, anchors, seed: int = 0, n_per_concept: int = 50,
                   retain_per_shape: int | None = None) -> list[PromptPair]:
    """Erasure pairs, then `retain_per_shape` keep-as-is pairs for every shape not erased
    (anchors included; None = pairs.default_keep_count(n_per_concept), 20 for 50; 0 = none, the
    paper's setting). Without them the LoRA drifts on the other shapes (README: "Keep pairs")."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    anchors = [anchors] if isinstance(anchors, str) else list(anchors)
    concepts = [shape_name(c, "concept") for c in concepts]
    anchors = [shape_name(a, "anchor") for a in anchors]
    world = dict(templates=list(WORLD_TEMPLATES), vocabulary=set(VOCABULARY), slot_values=SLOT_VALUES)
    pairs = make_pairs(concepts, anchors, n_per_concept=n_per_concept, seed=seed, **world)
    if retain_per_shape is None and isinstance(n_per_concept, int):
        retain_per_shape = default_keep_count(n_per_concept)
    if isinstance(retain_per_shape, bool) or not isinstance(retain_per_shape, int) or retain_per_shape < 0:
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
