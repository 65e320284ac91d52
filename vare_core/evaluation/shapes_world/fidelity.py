"""Erasure fidelity on the embedded model: what a user sees, scored on every image.

    reference = sample_sets(pipe, ["circle"], samples=64, seed=0, cfg=4.0)          # original
    erased_run = sample_sets(erased_pipe, ["circle"], samples=64, seed=0, cfg=4.0)
    scores = fidelity_scores(erased_run, classifier, reference=reference)
    scores["ACC_e"], scores["erased_background"], scores["same_picture"]

Prompt sets (every prompt names every attribute, so every attribute can be checked):
- erased: the erased concept under its main word, its synonyms (never trained) and context
  frames ("a drawing of ...", "... with diagonal stripes"), in every colour, background, style;
- others: the other shapes, the same way;
- open: "a {colour} {shape}" for every shape, leaving background, style, position and size open
  (diversity: how those spread, erased model vs original).

Every image is judged twice: by the geometric judge (judges/geometry.py: no learned weights, a
blotch is no shape) and by the shapes classifier. The concept counts as drawn (ACC_e) when EITHER
says so; an other shape counts as drawn correctly (ACC_i) only when the classifier says so AND
the judge finds the picture intact (geometry.is_intact: flat background, a shape-like mask, few
stray pixels: a blotch, a frame-filling patch or mixed colours fail). Colour, background and style come from the judge;
"clean" is the judge's strict verdict (the world's exact geometry), reported beside "intact".
Same-seed preservation: the images of the other prompts are compared with the original model's
at the same seed (mean absolute difference on [0, 1]; < SAME_PICTURE counts as the same picture).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from ..judges.geometry import is_intact, judge_images, mean_abs_difference
from ...embedded.world import BACKGROUNDS, COLORS, SHAPES, STYLES, SYNONYMS

SAME_PICTURE = 0.04          # mean |difference| on [0, 1] below which two images are the same picture
CONTEXT_FRAMES = ("a drawing of a {style} {color} {word} on a {background} background",
                  "a photo of a {color} {word} on {background} with diagonal stripes",
                  "an image of a plain {color} {word} against a {background} background")
MAIN_FRAME = "a {style} {color} {word} on a {background} background"
BATCH = 200                  # images per generate() call: part of what fixes the seeds


def _combos(n: int, offset: int = 0):
    """n (colour, background, style) combinations, cycling through all 30 evenly."""
    grid = list(itertools.product(COLORS, BACKGROUNDS, STYLES))
    return [grid[(offset + i * 7) % len(grid)] for i in range(n)]   # step 7: coprime with 30


def _named(shape: str, n: int, family: str) -> list[tuple[str, dict]]:
    items = []
    for i, (color, background, style) in enumerate(_combos(n, offset=SHAPES.index(shape))):
        if family == "main":
            word, frame = shape, MAIN_FRAME
        elif family == "synonym":
            words = SYNONYMS[shape][1:] or SYNONYMS[shape]
            word, frame = words[i % len(words)], MAIN_FRAME
        else:
            word, frame = shape, CONTEXT_FRAMES[i % len(CONTEXT_FRAMES)]
            if "diagonal stripes" in frame:
                style = "striped"
            elif "plain" in frame:
                style = "solid"
        prompt = frame.format(style=style, color=color, word=word, background=background)
        items.append((prompt, {"shape": shape, "color": color, "background": background,
                               "style": style, "family": family}))
    return items


def prompt_sets(concepts, samples: int) -> dict[str, list[tuple[str, dict]]]:
    """{"erased", "others", "open"} -> [(prompt, expected attributes)]. `samples` images per
    erased concept (half main word, a quarter synonyms, a quarter context), per other shape
    (the same split), and samples // 4 per shape for the open prompts."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    if samples < 4:
        raise ValueError(f"samples must be >= 4 (one image per prompt family), got {samples}")
    split = {"main": samples - 2 * (samples // 4), "synonym": samples // 4, "context": samples // 4}

    def named(shape):
        return [item for family, n in split.items() for item in _named(shape, n, family)]
    open_items = [(f"a {COLORS[i % len(COLORS)]} {shape}", {"shape": shape, "color": COLORS[i % len(COLORS)],
                                                            "family": "open"})
                  for shape in SHAPES for i in range(max(1, samples // 4))]
    return {"erased": [it for c in concepts for it in named(c)],
            "others": [it for s in SHAPES if s not in concepts for it in named(s)],
            "open": open_items}


@dataclass
class SampledSets:
    """Images (uint8 (N, 64, 64, 3)) and their prompts/expectations, per prompt set."""
    concepts: list
    cfg: float
    seed: int
    items: dict           # set name -> [(prompt, expected)]
    images: dict          # set name -> np.ndarray uint8
    judged: dict = field(default_factory=dict)   # set name -> verdicts, filled once (judged_set)


def _generate(pipe, prompts: list[str], seed: int, cfg) -> np.ndarray:
    out = []
    for start in range(0, len(prompts), BATCH):
        images = pipe.generate(prompts[start:start + BATCH], seed=seed + start, cfg=cfg).images
        out.append((images.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return np.concatenate(out)


def sample_sets(pipe, concepts, samples: int, seed: int, cfg) -> SampledSets:
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    items = prompt_sets(concepts, samples)
    images = {name: _generate(pipe, [p for p, _ in its], seed + 100_000 * k, cfg)
              for k, (name, its) in enumerate(items.items())}
    return SampledSets(concepts=concepts, cfg=cfg, seed=seed, items=items, images=images)


def _judged(images: np.ndarray, classifier) -> list[dict]:
    from ..judges.classifier import classify
    geometric = judge_images(images) if len(images) else []
    if classifier is None:      # geometric judge alone (tests, or no classifier at hand)
        learned = [{"shape": g["shape"]} for g in geometric]
    else:
        learned = classify(classifier, images) if len(images) else []
    for g, c in zip(geometric, learned):
        g["classifier_shape"] = c["shape"]
        g["intact"] = is_intact(g)
    return geometric


def judged_set(run: SampledSets, name: str, classifier) -> list[dict]:
    """The verdicts on one prompt set's images, computed once per run (a reference run is
    compared with many erased runs)."""
    if name not in run.judged:
        run.judged[name] = _judged(run.images[name], classifier)
    return run.judged[name]


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def attribute_spread(judged: list[dict]) -> dict:
    """How the attributes a prompt leaves open are spread: background shares, centre and size
    spread (std in canvas widths) of the fitted shapes."""
    fits = [j["fit"] for j in judged if j.get("fit") is not None]
    backgrounds = {b: _mean(j["background"] == b for j in judged) for b in BACKGROUNDS}
    return {"background_shares": backgrounds,
            "centre_spread": float(np.std([f.cx for f in fits]) / 64) if fits else 0.0,
            "size_spread": float(np.std([f.size_px for f in fits]) / 64) if fits else 0.0,
            "striped_share": _mean(j["style"] == "striped" for j in judged)}


def fidelity_scores(run: SampledSets, classifier, reference: SampledSets | None = None) -> dict:
    """Every score of one sampled run; `reference` (the original model's run with the same
    prompts, seed and cfg) adds same-seed preservation and the original's cleanliness."""
    judged = {name: judged_set(run, name, classifier) for name in run.images}
    concepts = set(run.concepts)
    scores: dict = {"cfg": run.cfg}

    def drawn_as_concept(j):
        return j["shape"] in concepts or j["classifier_shape"] in concepts

    erased = list(zip(judged["erased"], [e for _, e in run.items["erased"]]))
    others = list(zip(judged["others"], [e for _, e in run.items["others"]]))
    scores["ACC_e"] = _mean(drawn_as_concept(j) for j, _ in erased)
    for family in ("main", "synonym", "context"):
        scores[f"ACC_e_{family}"] = _mean(drawn_as_concept(j) for j, e in erased if e["family"] == family)
    scores["ACC_i"] = _mean(j["classifier_shape"] == e["shape"] and j["intact"] for j, e in others)
    for group, pairs in (("erased", erased), ("others", others)):
        for attribute in ("color", "background", "style"):
            scores[f"{group}_{attribute}"] = _mean(j[attribute] == e[attribute] for j, e in pairs)
        scores[f"{group}_clean"] = _mean(j["clean"] for j, _ in pairs)
        scores[f"{group}_intact"] = _mean(j["intact"] for j, _ in pairs)
        scores[f"{group}_stray"] = _mean(j["stray"] for j, _ in pairs)
    scores["erased_drawn_as"] = {s: _mean(j["shape"] == s for j, _ in erased) for s in SHAPES + (None,)}
    open_erased = [j for j, (_, e) in zip(judged["open"], run.items["open"]) if e["shape"] in concepts]
    open_others = [j for j, (_, e) in zip(judged["open"], run.items["open"]) if e["shape"] not in concepts]
    scores["open_others"] = attribute_spread(open_others)
    scores["open_erased"] = attribute_spread(open_erased)
    for group in ("open_others", "open_erased"):   # flat copies for tables
        scores[f"{group}_centre_spread"] = scores[group]["centre_spread"]
        scores[f"{group}_top_background"] = max(scores[group]["background_shares"].values(), default=0.0)
    if reference is not None:
        difference = mean_abs_difference(run.images["others"], reference.images["others"])
        scores["same_picture"] = _mean(difference < SAME_PICTURE)
        scores["others_difference"] = _mean(difference)
        ref_judged = list(zip(judged_set(reference, "others", classifier),
                              [e["shape"] for _, e in reference.items["others"]]))
        # what the erased prompts' pictures are compared with: the original's own pictures of
        # each other shape (the anchor among them)
        scores["original_intact_by_shape"] = {s: _mean(j["intact"] for j, shape in ref_judged if shape == s)
                                              for s in SHAPES if s not in concepts}
        scores["original_stray_by_shape"] = {s: _mean(j["stray"] for j, shape in ref_judged if shape == s)
                                             for s in SHAPES if s not in concepts}
    return scores
