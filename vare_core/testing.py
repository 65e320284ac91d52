"""Tiny random pipelines for tests and benchmarks (no files needed): the "tiny" model family.

    pipe = tiny_pipeline(seed=0)              # word-level vocabulary of the shapes world
    pipe.generate(["a red circle"], seed=0)   # 32x32 noise-like images, in milliseconds

It speaks the shapes world's words, so its erasure profile is the shapes world's, without the
mined implicit pairs (a random model has no habits worth sampling for).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .checkpoints import file_fingerprint
from .embedded.profile import PROFILE as SHAPES_WORLD_PROFILE
from .embedded.world import VOCABULARY
from .erasure.profile import register_profile
from .generation.pipeline import VarPipeline
from .models.bsq_vae import BSQVAE, VAEConfig
from .models.infinity import Infinity, InfinityConfig, init_weights
from .models.t5 import T5Config, T5Encoder
from .models.text_encoder import TextEncoder, build_word_level_tokenizer

FAMILY = "tiny"


def tiny_pipeline(seed: int = 0, depth: int = 2, embed_dim: int = 64,
                  schedule=((1, 1), (2, 2), (4, 4))) -> VarPipeline:
    torch.manual_seed(seed)
    tokenizer = build_word_level_tokenizer(VOCABULARY)
    t5 = T5Encoder(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                            vocab_size=tokenizer.get_vocab_size())).eval()
    model = init_weights(Infinity(InfinityConfig(
        depth=depth, embed_dim=embed_dim, num_heads=2, bits=16, text_channels=32, text_maxlen=24,
        block_chunks=1, num_levels=len(schedule), cond_drop_rate=0.0)))
    # Give the fresh model some signal so outputs depend on the text and tests are meaningful.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae = BSQVAE(VAEConfig(bits=16, patch_size=8, base_channels=24, channel_mult=(1, 1, 1, 1),
                           num_res_blocks=1)).eval()
    for module in (model, vae, t5):
        module.requires_grad_(False)
    return VarPipeline(model=model.eval(), vae=vae, text_encoder=TextEncoder(tokenizer, t5, 24),
                       name="tiny", fingerprint=file_fingerprint(model.state_dict()),
                       default_schedule=[tuple(s) for s in schedule],
                       defaults={"cfg": 3.0, "tau": 1.0, "top_p": 0.0}, fixed_schedule=True, family=FAMILY)


register_profile(replace(SHAPES_WORLD_PROFILE, family=FAMILY, title="tiny", mining=None, listed=False,
                         guard={**SHAPES_WORLD_PROFILE.guard, "blocks": (0, 1), "scales": 2, "warmup": 1}))
