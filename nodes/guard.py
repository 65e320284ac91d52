"""Concept Guard: a model whose sampler erases a concept, no training (vare_core.generation.guard).

Like Apply Erasure Adapter it takes a model and returns another sharing the weights; the two stack
in either order. Settings left at their "profile" value are the model family's (erasure profile).
"""
from __future__ import annotations

from vare_core.erasure.profile import erasure_profile, listed_profiles, shown

from . import host
from .compat import CATEGORY, VareModel, io

MAX_CONCEPTS = 8            # each adds two rows per image on the guarded scales
PROFILE = -1                # a number input at this value: the model's profile's setting


def profile_values(name: str) -> str:
    """'embedded 5, Infinity 8': what the listed models' profiles decide for a guard setting."""
    return ", ".join(f"{p.title} {shown(p.guard[name])}" for p in listed_profiles() if name in p.guard)


def parse_concepts(concepts: str, anchors: str) -> list[tuple[str, str]]:
    """One concept per line; one anchor for all of them, or one per line."""
    names = [line.strip() for line in str(concepts).splitlines() if line.strip()]
    safe = [line.strip() for line in str(anchors).splitlines() if line.strip()]
    if not names:
        raise ValueError("concept is empty: write the concept to erase (one per line for several)")
    if not safe:
        raise ValueError("anchor is empty: write the safe text the guard steers toward, e.g. "
                         "'a person wearing clothes'")
    if len(names) > MAX_CONCEPTS:
        raise ValueError(f"concept: {len(names)} lines; at most {MAX_CONCEPTS} concepts in one guard")
    if len(safe) not in (1, len(names)):
        raise ValueError(f"anchor: {len(safe)} lines for {len(names)} concepts; give one anchor for all, "
                         "or one per concept line")
    return list(zip(names, safe * len(names) if len(safe) == 1 else safe))


class ConceptGuard(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        def number(name, kind, text, **limits):
            return kind.Input(name, default=PROFILE, optional=True,
                              tooltip=f"{text}; -1 = the model's profile ({profile_values(name)})", **limits)
        return io.Schema(
            node_id="VARE_ConceptGuard", display_name="Concept Guard (VARE)", category=f"{CATEGORY}/erasure",
            description="Erase a concept while sampling, no training: the sampler steers the image tokens "
                        "that would draw the concept toward a safe text. Returns a guarded copy of the model "
                        "(the same weights); stack it with Apply Erasure Adapter in either order.",
            inputs=[
                VareModel.Input("model", tooltip="the model (it may carry adapters)"),
                io.String.Input("concept", default="nudity", multiline=True,
                                tooltip="what to erase; one per line for several"),
                io.String.Input("anchor", default="a person wearing clothes", multiline=True,
                                tooltip="the safe text the guard steers toward: one for every concept, "
                                        "or one per concept line"),
                number("scales", io.Int, "how many first scales are guarded (they carry two extra rows "
                       "per concept and image)", min=-1, max=64),
                number("penalty", io.Float, "how hard the image is pushed away from the concept",
                       min=-1.0, max=20.0, step=0.1),
                number("token_threshold", io.Float, "share of attention to the concept (0 to 1) at which a "
                       "token is guarded; 0 = every token", min=-1.0, max=1.0, step=0.01),
                number("bit_threshold", io.Float, "logit difference under which a bit counts as drawn like "
                       "the concept, at the first scale", min=-1.0, max=100.0, step=0.05),
                number("warmup", io.Int, "first scales left to ordinary guidance (the layout forms there)",
                       min=-1, max=64),
            ],
            outputs=[VareModel.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, concept=None, anchor=None):
        if isinstance(concept, str) and isinstance(anchor, str):
            try:
                parse_concepts(concept, anchor)
            except ValueError as err:
                return str(err)
        return True

    @classmethod
    def execute(cls, model, concept, anchor, scales=PROFILE, penalty=PROFILE, token_threshold=PROFILE,
                bit_threshold=PROFILE, warmup=PROFILE):
        given = {name: value for name, value in (("scales", scales), ("penalty", penalty),
                                                  ("token_threshold", token_threshold),
                                                  ("bit_threshold", bit_threshold), ("warmup", warmup))
                 if value is not None and value != PROFILE}
        settings = erasure_profile(model).guard_settings(parse_concepts(concept, anchor), **given)
        settings.check_blocks(len(model.model.blocks))      # a profile made for a deeper model of the family
        guarded = model.guarded(settings)
        host.register_models(guarded, like=model)
        host.release_when_freed(guarded)
        return io.NodeOutput(guarded)
