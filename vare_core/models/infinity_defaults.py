"""What the pack chooses for the Infinity family (every checkpoint and preset of presets.py), as
plain data: the layers that use it read it here (generation/pipeline.py the sampling defaults,
erasure/profile.py the erasure settings, as Infinity's erasure profile).

Erasure: what fits a 12 GB card at 1024x1024 by the memory plan (docs/memory.md; chosen with
`python -m vare_core plan --model infinity_2b --height 1024 --width 1024`): LoRA rank 8 on
cross-attention + FFN, gradient checkpointing, one pair per step in split passes (one row group's
activations at a time), trajectories one prompt at a time with the blocks streamed from CPU
memory when the card cannot hold the KV cache beside them (Infinity-8B), the text encoder off the
GPU between encodes. Every setting not named is EraseConfig's own: the paper's (500 steps, alpha
0.25, L_Pre weight 0.5, the width-scaled official lr). The official full fine-tune is one switch
away: train="ca_ffn".
"""
from __future__ import annotations

# The pipeline's sampling defaults (VarPipeline.defaults) for an Infinity checkpoint.
SAMPLING = {"cfg": 3.0, "tau": 0.5, "top_k": 0, "top_p": 0.97}
# speed "fast" (generation/speed.py), not measured on Infinity's weights: the published settings
# of the methods it follows, on the 13 scales of 1024x1024: guidance off on the last 2 scales
# (48x48, 64x64; StageVAR/Switti turn it off in the late "fidelity" scales), FastVAR's pruning on
# the last 3 (40x40 keeps half, 48x48 and 64x64 less), ScaleKV's budget of about a tenth.
FAST = {"unguided_scales": 2, "pruned_scales": 3, "keep_share": (0.5, 0.4, 0.3), "kv_budget": 0.2}

DEFAULT_TRAIN = "lora"
OFFLOAD_TEXT_ENCODER = True        # the T5 waits in CPU memory between encodes while it trains

# Early-scale erasure (method "early", erasure/early.py), not measured on Infinity: the first 6
# scales (1x1 to 12x12 tokens a side, the same in every preset), about half of the 1M schedule's 13
# like the embedded model's 3 of 5, and inside the smallest preset's 7 (a window past the schedule
# is refused); the entropy weight the embedded model's. EraseConfig's own early settings are these.
EARLY = {"early_scales": 6, "entropy_weight": 1.0}
# EraseConfig fields per formulation (erasure/formulations.py) and training mode.
ERASURE = {
    "consistent": {
        "lora": {"train": "lora", "rank": 8, "lora_targets": ("ca", "ffn"), "batch_size": 1,
                 "gradient_checkpointing": True, "passes": "split", "stream_blocks": "auto",
                 "trajectory": {"batch_size": 1},
                 "targets": "conditional", "erase_target": "soft", "null_weight": 1.0, "scale_weights": "tokens",
                 **EARLY},
        "ca_ffn": {"train": "ca_ffn", "rank": 8, "lora_targets": ("ca", "ffn"), "batch_size": 1,
                   "gradient_checkpointing": True, "passes": "split", "stream_blocks": "auto",
                   "trajectory": {"batch_size": 1},
                   "targets": "conditional", "erase_target": "soft", "null_weight": 1.0, "scale_weights": "tokens",
                   **EARLY},
    },
    "paper": {
        "lora": {"train": "lora", "rank": 8, "lora_targets": ("ca", "ffn"), "batch_size": 1,
                 "gradient_checkpointing": True, "passes": "split", "stream_blocks": "auto",
                 "trajectory": {"batch_size": 1},
                 "targets": "cfg", "erase_target": "hard", "null_weight": 0.0, "scale_weights": "tokens",
                 **EARLY},
        "ca_ffn": {"train": "ca_ffn", "rank": 8, "lora_targets": ("ca", "ffn"), "batch_size": 1,
                   "gradient_checkpointing": True, "passes": "split", "stream_blocks": "auto",
                   "trajectory": {"batch_size": 1},
                   "targets": "cfg", "erase_target": "hard", "null_weight": 0.0, "scale_weights": "tokens",
                   **EARLY},
    },
}

# The Concept Guard (generation/guard.py): ScaleErasure's published configuration for
# Infinity-2B/8B at 1024x1024 (13 scales; sampled at cfg 3, tau 0.5): the first 8 scales guarded,
# queries of blocks 1-5, tokens at an unsafe share >= 0.332, the bit threshold 0.1 / tau (0.2)
# doubling per scale, penalty 3, 2 warm-up scales.
GUARD = {"neutral": "background, object, animal, tree, sky, architecture", "scales": 8,
         "blocks": (1, 2, 3, 4, 5), "token_threshold": 0.332, "bit_threshold": 0.2, "bit_growth": 2.0,
         "penalty": 3.0, "warmup": 2}
