"""One erasure profile per model: the pairs and the EraseConfig defaults that every entry point
(Train Erasure node, `erase`, `plan`, the demo, the benchmarks) uses, so a model trains the same
way wherever it is started.

    profile = erasure_profile("embedded")          # or a pipeline, or an Infinity checkpoint name
    config = profile.config(steps=300)             # the defaults, then what the user set
    pairs = profile.pairs(["circle"], ["square"], seed=0)

Embedded (and tiny) models: the shapes world's tuned settings (embedded/erasure_defaults.py).
Infinity: what fits a 12 GB card at 1024^2 by the memory plan (docs/memory.md): LoRA on
cross-attention + FFN, gradient checkpointing, one pair per step in split passes (one row
group's activations at a time), trajectories one prompt at a time (with the blocks streamed
from CPU memory when the card cannot hold the KV cache beside them: Infinity-8B), the text
encoder off the GPU between uses. The official full fine-tune is one switch away: train="ca_ffn".
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .embedded import erasure_defaults
from .embedded.erasure_defaults import SHAPES_WORLD_MODELS
from .erasure.trainer import EraseConfig
from .erasure.trajectories import TrajectorySettings

# Infinity: chosen with `python -m vare_core plan --model infinity_2b --height 1024 --width 1024`
INFINITY_SETTINGS = {"train": "lora", "rank": 8, "lora_targets": ("ca", "ffn"), "batch_size": 1,
                     "gradient_checkpointing": True, "passes": "split", "stream_blocks": "auto"}
INFINITY_TRAJECTORY_BATCH = 1


@dataclass
class ErasureProfile:
    model: str                                    # "embedded", "tiny" or "infinity"
    defaults: dict = field(default_factory=dict)  # EraseConfig fields of this model
    offload_text_encoder: bool = False            # the T5 leaves the GPU between encodes

    def config(self, formulation: str = "auto", **given) -> EraseConfig:
        """EraseConfig: the profile's defaults (with `formulation`), then `given`."""
        if self.model in SHAPES_WORLD_MODELS:
            return erasure_defaults.embedded_erase_config(formulation=formulation, **given)
        settings = {**self.defaults, **erasure_defaults.formulation_settings(self.model, formulation), **given}
        if "trajectory" not in given:
            settings["trajectory"] = TrajectorySettings(batch_size=INFINITY_TRAJECTORY_BATCH)
        return EraseConfig(**settings)

    def pairs(self, concepts, anchors, seed: int = 0, n_per_concept: int = 50, retain=None, keep=(),
              pipe=None):
        """The erasure pairs (and keep pairs) this model trains on; with `pipe` (the original
        pipeline) the shapes-world models add mined implicit pairs (erasure/implicit.py)."""
        from .erasure.pairs import default_keep_count, make_pairs, retain_pairs
        if self.model in SHAPES_WORLD_MODELS:
            return erasure_defaults.embedded_pairs(concepts, anchors, seed=seed, n_per_concept=n_per_concept,
                                                   retain_per_shape=retain, pipe=pipe)
        pairs = make_pairs(concepts, anchors, n_per_concept=n_per_concept, seed=seed)
        count = default_keep_count(n_per_concept) if retain is None else retain
        if keep and count:
            pairs += retain_pairs(list(keep), n_per_concept=count, seed=seed + 1)
        return pairs


def profile_name(model) -> str:
    """'embedded' / 'tiny' for the shapes-world models, else 'infinity' (a pipeline, a name or a path)."""
    name = getattr(model, "name", model)
    return name if name in SHAPES_WORLD_MODELS else "infinity"


def erasure_profile(model) -> ErasureProfile:
    """The profile of a pipeline, a model name ('embedded') or an Infinity checkpoint / preset."""
    name = profile_name(model)
    if name in SHAPES_WORLD_MODELS:
        return ErasureProfile(model=name)
    return ErasureProfile(model="infinity", defaults=dict(INFINITY_SETTINGS), offload_text_encoder=True)
