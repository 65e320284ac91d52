"""Named Infinity configs, detection of the config from a checkpoint's tensor shapes, and the
mapping between our parameter names and the official checkpoint layout.

Usage::

    config = detect_infinity_config(state_dict)          # official or our key names
    model = build_infinity(state_dict, dtype=torch.bfloat16, device="cuda")
    official = to_official_keys(model.state_dict(), model.cfg.blocks_per_chunk)
"""
from __future__ import annotations

import re

import torch

from .infinity import Infinity, InfinityConfig

PRESETS = {
    "infinity_2b": InfinityConfig.infinity_2b,
    "infinity_8b": InfinityConfig.infinity_8b,
}

_OFFICIAL_BLOCK = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.*)$")
_OUR_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


def preset_config(name: str) -> InfinityConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def _blocks_per_chunk(state_dict) -> int:
    modules = [int(m.group(2)) for k in state_dict if (m := _OFFICIAL_BLOCK.match(k))]
    return max(modules) + 1 if modules else 1


def from_official_keys(state_dict: dict) -> dict:
    """`block_chunks.{c}.module.{m}.x` -> `blocks.{c*per_chunk+m}.x`; other keys unchanged."""
    per_chunk = _blocks_per_chunk(state_dict)
    out = {}
    for key, value in state_dict.items():
        m = _OFFICIAL_BLOCK.match(key)
        out[f"blocks.{int(m.group(1)) * per_chunk + int(m.group(2))}.{m.group(3)}" if m else key] = value
    return out


def to_official_keys(state_dict: dict, blocks_per_chunk: int) -> dict:
    out = {}
    for key, value in state_dict.items():
        m = _OUR_BLOCK.match(key)
        if m:
            c, i = divmod(int(m.group(1)), blocks_per_chunk)
            key = f"block_chunks.{c}.module.{i}.{m.group(2)}"
        out[key] = value
    return out


MAX_DEPTH = 512     # Infinity-20B has 58 blocks; a key naming block 99,999,999 is damage


def _check_indices(found: set[int], prefix: str) -> None:
    """Block numbers in the keys must be 0..n-1, all present: the depth comes from the tensors
    that exist, never from one stray key."""
    top = max(found)
    if top >= MAX_DEPTH or len(found) != top + 1:
        missing = sorted(set(range(min(top + 1, 10_000))) - found)[:5]
        raise ValueError(f"the checkpoint's keys name {prefix}.{top} but hold tensors for "
                         f"{len(found)} of them (missing e.g. {missing}); the file is damaged or "
                         f"mixes checkpoints (at most {MAX_DEPTH} blocks are accepted)")


def detect_infinity_config(state_dict: dict, **overrides) -> InfinityConfig:
    """Read every size from tensor shapes (official or our key names)."""
    sd = state_dict
    required = ["pos_start", "word_embed.weight", "text_norm.weight", "cfg_uncond", "lvl_embed.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"not an Infinity transformer checkpoint: missing {missing}")
    official = any(_OFFICIAL_BLOCK.match(k) for k in sd)
    if official:
        chunk_ids = {int(m.group(1)) for k in sd if (m := _OFFICIAL_BLOCK.match(k))}
        chunks = 1 + max(chunk_ids)
        _check_indices(chunk_ids, "block_chunks")
        _check_indices({int(m.group(2)) for k in sd if (m := _OFFICIAL_BLOCK.match(k))}, "block_chunks.*.module")
        per_chunk = _blocks_per_chunk(sd)
        depth = chunks * per_chunk
        first = "block_chunks.0.module.0."
    else:
        block_ids = {int(m.group(1)) for k in sd if (m := _OUR_BLOCK.match(k))}
        if not block_ids:
            raise ValueError("not an Infinity transformer checkpoint: no transformer blocks")
        _check_indices(block_ids, "blocks")
        depth = 1 + max(block_ids)
        chunks, first = overrides.pop("block_chunks", 1), "blocks.0."
    embed_dim = sd["pos_start"].shape[-1]
    heads = sd[first + "sa.scale_mul_1H11"].shape[1]
    mlp_hidden = sd[first + "ffn.fc1.weight"].shape[0]
    cfg = InfinityConfig(
        depth=depth, embed_dim=embed_dim, num_heads=heads, bits=sd["word_embed.weight"].shape[1],
        text_channels=sd["text_norm.weight"].shape[0], text_maxlen=sd["cfg_uncond"].shape[0],
        block_chunks=chunks, mlp_ratio=mlp_hidden / embed_dim,
        num_levels=sd["lvl_embed.weight"].shape[0])
    if cfg.mlp_hidden != mlp_hidden:
        raise ValueError(f"FFN width {mlp_hidden} cannot be expressed as round(dim*ratio/256)*256")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def preset_name(cfg: InfinityConfig) -> str:
    """'infinity_2b' / 'infinity_8b' when the sizes match a preset, else 'custom'."""
    for name, make in PRESETS.items():
        ref = make()
        if (ref.depth, ref.embed_dim, ref.num_heads, ref.bits) == (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.bits):
            return name
    return "custom"


def build_infinity(state_dict: dict, *, dtype: torch.dtype | None = None, device="cpu",
                   source: str = "state dict", **overrides) -> Infinity:
    """Build the model for these weights and load them strictly.

    The model is created on the `meta` device and the tensors are assigned in place (cast to
    `dtype` one by one, except Infinity.FP32_PARAMETERS), so no full fp32 copy is ever made on
    the target device.
    """
    try:
        cfg = detect_infinity_config(state_dict, **overrides)
    except (ValueError, KeyError, IndexError) as err:
        raise ValueError(f"{source}: {err}") from None
    ours = from_official_keys(state_dict)
    with torch.device("meta"):
        model = Infinity(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in ours]
    unexpected = [k for k in ours if k not in expected]
    wrong = [f"{k}: file {tuple(ours[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in ours and ours[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source} does not match the Infinity config detected from it "
            f"(depth {cfg.depth}, width {cfg.embed_dim}, {cfg.bits} bits): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)}), "
            f"wrong shapes {wrong[:5]}")
    tensors = {}
    for key, value in ours.items():
        target_dtype = (Infinity.parameter_dtype(key, dtype) if dtype is not None and value.is_floating_point()
                        else value.dtype)
        tensors[key] = value.to(device=device, dtype=target_dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()
