"""Multi-scale binary spherical quantisation (BSQ) of Infinity, as pure functions.

A latent grid of `d` channels is turned into a pyramid of bit grids, coarse to fine. Every
token of every scale holds `d` bits; bit `j` is 1 where code channel `j` is positive, and
bits become codes `+-1/sqrt(d)`. Scales are (h, w) tuples; the last one is normally the
latent's own size.

    bits = quantize_multiscale(features, [(1, 1), (2, 2), (4, 4)])   # list of (B, h, w, d) int64
    summed = summed_codes_from_bits(bits, (4, 4))                   # (B, d, 4, 4), decoder input
    x = teacher_forcing_inputs(bits, schedule)                      # (B, L - 1, d) transformer input

Numerics follow the official code (FoundationVision/Infinity, `MultiScaleBSQ` + `BSQ` and the
trainer's bitwise-self-correction routine):
- Encoding, per scale: the residual (features minus the upsampled codes so far) is
  area-downsampled to the scale size (skipped when the scale already has the latent's size),
  L2-normalised per token over the channels, sign-quantised (exact zero gives bit 0) and
  scaled by 1/sqrt(d). The code is upsampled back with *trilinear* interpolation on a 5-D
  (B, d, 1, h, w) tensor (t = 1, align_corners False) and subtracted from the residual.
- Codes from bits: `bits * 2s - s` with s = 1/sqrt(d), then L2-normalised (so for d = 32 the
  value is 1/sqrt(32) up to float rounding).
- Next-scale input (teacher forcing and sampling alike): the cumulative codes kept at the final
  size are resized to the next scale with trilinear interpolation (even though that is a
  downsample), flattened row-major.

Spatial patchify (Infinity-8B, "d56" VAE). Found in the official source
(`infinity/models/infinity.py` autoregressive_infer_cfg, `infinity/models/bitwise_self_correction.py`,
`trainer.py`, `tools/run_infinity.py` load_visual_tokenizer with `apply_spatial_patchify=1`):
- The 8B VAE has patch 8, ch_mult (1, 2, 4, 4) and 14 bits. Quantisation happens at the VAE's
  own resolution with 14 bits: the VAE schedule is the transformer schedule with h and w doubled
  (`vae_scale_schedule = [(t, 2h, 2w)]`, our scales.vae_schedule); the transformer schedule is the usual one
  (1, 2, 4, ... 64 for 1024 px).
- The transformer token at (y, x) of a scale gathers the 2x2 VAE cells (2y + i, 2x + j) with
  `torch.nn.functional.pixel_unshuffle(., 2)`, so its 56 = 4 * 14 bits are ordered
  `c * 4 + i * 2 + j` (VAE channel major, then the row and column inside the 2x2 block).
  The same reordering is applied to bit labels and to the next-scale inputs (codes resized at
  the doubled size, then unshuffled). Sampled bits go back with `pixel_shuffle(., 2)` before
  codes are made and summed at the VAE's resolution; the decoder sees 14 channels.
`patchify_tokens` / `unpatchify_tokens` implement that layout on channels-last grids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _as_hw(scale) -> tuple[int, int]:
    """Accept (h, w) or the official (t, h, w) with t == 1 (images)."""
    scale = tuple(int(s) for s in scale)
    if len(scale) == 3:
        if scale[0] != 1:
            raise ValueError(f"scale {scale}: only images (t = 1) are supported")
        scale = scale[1:]
    if len(scale) != 2 or min(scale) < 1:
        raise ValueError(f"scale {scale}: expected a (h, w) tuple of positive ints")
    return scale


def _as_schedule(scale_schedule) -> list[tuple[int, int]]:
    schedule = [_as_hw(s) for s in scale_schedule]
    if not schedule:
        raise ValueError("scale_schedule is empty; pass a list of (h, w) tuples, coarse to fine")
    return schedule


def upsample_codes(codes: Tensor, size) -> Tensor:
    """Resize (B, d, h, w) codes to `size` with the official 'trilinear' (t = 1) mode."""
    if codes.ndim != 4:
        raise ValueError(f"codes must be (B, d, h, w), got shape {tuple(codes.shape)}")
    h, w = _as_hw(size)
    # 5-D trilinear, exactly the official call (it equals bilinear up to rounding order). The
    # official codes are channels-last views and the CPU kernel rounds differently per memory
    # layout, so fix that layout: results then match the official sampler bit for bit whatever
    # layout the caller's tensor has.
    codes = codes.unsqueeze(2).contiguous(memory_format=torch.channels_last_3d)
    out = F.interpolate(codes, size=(1, h, w), mode="trilinear", align_corners=False)
    return out.squeeze(2)


def sign_quantize(residual: Tensor) -> tuple[Tensor, Tensor]:
    """(B, d, h, w) residual -> codes (B, d, h, w) +-1/sqrt(d) and bits (B, h, w, d) int64: one
    scale of the quantiser (residual_quantize; self_correction.py flips some of its bits)."""
    B, d, h, w = residual.shape
    tokens = F.normalize(residual.permute(0, 2, 3, 1).reshape(B, h * w, d), dim=-1)
    signs = torch.where(tokens > 0, 1.0, -1.0).to(tokens.dtype)
    hard = signs * (1.0 / d**0.5)
    # The official straight-through form `z + (hard - z)`; kept so codes match it to the last bit.
    codes = tokens + (hard - tokens)
    bits = (tokens > 0).long().view(B, h, w, d)
    return codes.view(B, h, w, d).permute(0, 3, 1, 2), bits


@dataclass
class QuantizedPyramid:
    bits: list[Tensor]  # per scale (B, h_k, w_k, d) int64, 1 = positive code
    codes: list[Tensor]  # per scale (B, d, h_k, w_k) codes at their own size
    summed_codes: Tensor  # (B, d, H, W) sum of all upsampled codes ("z", the decoder input)


def residual_quantize(features: Tensor, scale_schedule) -> QuantizedPyramid:
    """The BSQ residual quantiser with all its outputs (see module docstring)."""
    if features.ndim != 4:
        raise ValueError(f"features must be (B, d, h, w), got shape {tuple(features.shape)}")
    schedule = _as_schedule(scale_schedule)
    H, W = features.shape[-2:]
    for h, w in schedule:
        if h > H or w > W:
            raise ValueError(f"scale {(h, w)} is larger than the latent grid {(H, W)}")
    residual = features.float()  # the official quantiser always runs in fp32
    summed = torch.zeros_like(residual)
    all_bits, all_codes = [], []
    for h, w in schedule:
        at_full_size = (h, w) == (H, W)
        if at_full_size:
            scale_residual = residual
        else:
            scale_residual = F.interpolate(residual.unsqueeze(2), size=(1, h, w), mode="area").squeeze(2)
        codes, bits = sign_quantize(scale_residual)
        up = codes if at_full_size else upsample_codes(codes, (H, W))
        residual = residual - up
        summed = summed + up
        all_bits.append(bits)
        all_codes.append(codes)
    return QuantizedPyramid(all_bits, all_codes, summed)


def quantize_multiscale(features: Tensor, scale_schedule) -> list[Tensor]:
    """Raw features (B, d, h, w) -> bits per scale, each (B, h_k, w_k, d) int64."""
    return residual_quantize(features, scale_schedule).bits


def codes_from_bits(bits: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, h, w, d) bits in {0, 1} -> (B, d, h, w) codes +-1/sqrt(d) (official arithmetic).

    Returns a channels-last view, like the official code; values are not checked to be 0/1.
    """
    if bits.ndim != 4:
        raise ValueError(f"bits must be (B, h, w, d), got shape {tuple(bits.shape)}")
    d = bits.shape[-1]
    scale = 1.0 / math.sqrt(d)
    codes = F.normalize(bits.to(dtype) * scale * 2 - scale, dim=-1)
    return codes.permute(0, 3, 1, 2)


def summed_codes_from_bits(bits_per_scale: list[Tensor], final_size) -> Tensor:
    """Sum of every scale's codes upsampled to `final_size`: (B, d, H, W), the decoder input."""
    if not bits_per_scale:
        raise ValueError("bits_per_scale is empty")
    final_size = _as_hw(final_size)
    summed = None
    for bits in bits_per_scale:
        codes = codes_from_bits(bits)
        up = codes if tuple(codes.shape[-2:]) == final_size else upsample_codes(codes, final_size)
        summed = up if summed is None else summed + up
    return summed


def next_scale_input(summed_codes: Tensor, size, spatial_patchify: bool = False) -> Tensor:
    """Cumulative codes (B, d, H, W) resized to `size` (trilinear), as (B, h*w, d) row-major.

    With `spatial_patchify` (8B), `size` is the VAE-level size (2h, 2w) and the result is the
    transformer's (B, h*w, 4d) tokens in the official pixel-unshuffle channel order.
    """
    resized = upsample_codes(summed_codes, size)
    grid = resized.permute(0, 2, 3, 1)  # (B, h, w, d)
    if spatial_patchify:
        grid = patchify_tokens(grid)
    B, h, w, c = grid.shape
    return grid.reshape(B, h * w, c)


def teacher_forcing_inputs(bits_per_scale: list[Tensor], scale_schedule, spatial_patchify: bool = False) -> Tensor:
    """Bits of every scale -> the transformer's input tokens for scales 1.. (B, L - 1, d).

    This is the official `x_BLC_wo_prefix` (bitwise self-correction with nothing flipped).
    `scale_schedule` is the VAE-level schedule the bits live on (doubled under patchify).
    """
    schedule = _as_schedule(scale_schedule)
    if len(schedule) != len(bits_per_scale):
        raise ValueError(f"{len(bits_per_scale)} bit grids but {len(schedule)} scales in scale_schedule")
    for k, (bits, (h, w)) in enumerate(zip(bits_per_scale, schedule)):
        if bits.ndim != 4 or tuple(bits.shape[1:3]) != (h, w):
            raise ValueError(f"bits of scale {k} have shape {tuple(bits.shape)}, expected (B, {h}, {w}, d)")
    final_size = schedule[-1]
    summed, inputs = None, []
    for k, bits in enumerate(bits_per_scale[:-1]):
        up = upsample_codes(codes_from_bits(bits), final_size)
        summed = up if summed is None else summed + up
        inputs.append(next_scale_input(summed, schedule[k + 1], spatial_patchify))
    if not inputs:
        B, d = bits_per_scale[0].shape[0], bits_per_scale[0].shape[-1]
        return torch.zeros(B, 0, 4 * d if spatial_patchify else d, device=bits_per_scale[0].device)
    return torch.cat(inputs, dim=1)


def patchify_tokens(grid: Tensor) -> Tensor:
    """(B, 2h, 2w, c) channels-last grid -> (B, h, w, 4c), channel `c_idx*4 + i*2 + j`.

    Equals the official `pixel_unshuffle(grid.permute(0, 3, 1, 2), 2)` moved back to
    channels-last; works for bits (integers) and codes alike.
    """
    if grid.ndim != 4 or grid.shape[1] % 2 or grid.shape[2] % 2:
        raise ValueError(f"grid must be (B, 2h, 2w, c) with even sides, got shape {tuple(grid.shape)}")
    B, H, W, c = grid.shape
    blocks = grid.reshape(B, H // 2, 2, W // 2, 2, c)  # (B, h, i, w, j, c)
    return blocks.permute(0, 1, 3, 5, 2, 4).reshape(B, H // 2, W // 2, 4 * c)


def unpatchify_tokens(tokens: Tensor) -> Tensor:
    """(B, h, w, 4c) -> (B, 2h, 2w, c): the inverse of `patchify_tokens` (official pixel_shuffle)."""
    if tokens.ndim != 4 or tokens.shape[-1] % 4:
        raise ValueError(f"tokens must be (B, h, w, 4c), got shape {tuple(tokens.shape)}")
    B, h, w, c4 = tokens.shape
    c = c4 // 4
    blocks = tokens.reshape(B, h, w, c, 2, 2)  # (B, h, w, c, i, j)
    return blocks.permute(0, 1, 4, 2, 5, 3).reshape(B, 2 * h, 2 * w, c)
