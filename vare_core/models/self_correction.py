"""Bitwise self-correction: teacher-forcing inputs with randomly flipped bits (the Infinity
training recipe; the embedded model is trained with it, embedded/training/train.py).

    x_wo_prefix, labels = self_corrected_batch(features, schedule, max_flip=0.3, generator=gen)
    logits = model(condition, x_wo_prefix, schedule)       # labels: (B, L, d) int64

Plain teacher forcing feeds each scale the exact codes of the scales before it, so the model never
sees its own mistakes and, at sampling time, continues a wrong coarse token as if it were right.
Here, scale by scale, the residual still to be coded is quantised (the label), then a random
share of its bits (drawn per scale from [0, max_flip]) is flipped and the flipped codes are what
the next scales see and what the residual of the next scales is measured against. So a later
scale's label is the correction of the earlier mistakes. With max_flip = 0 this is exactly
bsq_quant.residual_quantize + teacher_forcing_inputs (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .bsq_quant import codes_from_bits, next_scale_input, sign_quantize, upsample_codes


def self_corrected_batch(features: torch.Tensor, schedule, max_flip: float = 0.3,
                         generator: torch.Generator | None = None, noisy_scales: int | None = None,
                         first_scale_flips: torch.Tensor | None = None, layout_scales: int = 0):
    """features (B, d, H, W) raw VAE latents -> (x_wo_prefix (B, L - 1, d), labels (B, L, d)).

    noisy_scales: flip bits on the first N scales only (default: all).
    layout_scales: the first N scales are never flipped at random. They hold a layout code that
    the sampler draws freely (embedded/training/coarse_codes.py): a random flip there is a new layout for the later
    scales to follow, not a mistake to correct, and correcting it would tie the layout to the
    image instead of the drawn code.
    first_scale_flips: (B, d) bool, bits of the 1x1 first scale flipped on purpose (on top of
    any random flips), so later scales learn to continue that code (coarse_codes.repair_flips)."""
    if not 0.0 <= max_flip <= 1.0:
        raise ValueError(f"max_flip must be in [0, 1], got {max_flip}")
    schedule = [tuple(s) for s in schedule]
    noisy_scales = len(schedule) if noisy_scales is None else noisy_scales
    features = features.float()
    final = schedule[-1]
    batch, bits_n = features.shape[:2]
    coded = torch.zeros_like(features)          # what the residual is measured against
    fed = torch.zeros_like(features)            # what the transformer sees (codes of the bits)
    labels, inputs = [], []
    for k, (h, w) in enumerate(schedule):
        residual = features - coded
        if (h, w) != final:
            residual = F.interpolate(residual, size=(h, w), mode="area")
        codes, bits = sign_quantize(residual)
        labels.append(bits.reshape(batch, h * w, bits_n))
        flip = torch.zeros(bits.shape, dtype=torch.bool)
        if layout_scales <= k < noisy_scales and max_flip > 0:
            share = int(torch.randint(0, int(round(100 * max_flip)) + 1, (1,), generator=generator)) / 100
            flip = torch.rand(bits.shape, generator=generator) < share
        if k == 0 and first_scale_flips is not None:
            if (h, w) != (1, 1):
                raise ValueError(f"first_scale_flips needs a 1x1 first scale, the schedule starts at {(h, w)}")
            flip = flip | first_scale_flips.to(torch.bool).view(batch, 1, 1, bits_n)
        if flip.any():
            bits = torch.where(flip, 1 - bits, bits)
            codes = codes_from_bits(bits)       # re-quantised: the flipped codes are the ones used
        up = codes if (h, w) == final else upsample_codes(codes, final)
        coded = coded + up
        fed_codes = codes_from_bits(bits)
        fed = fed + (fed_codes if (h, w) == final else upsample_codes(fed_codes, final))
        if k + 1 < len(schedule):
            inputs.append(next_scale_input(fed, schedule[k + 1]))
    x = torch.cat(inputs, dim=1) if inputs else features.new_zeros(batch, 0, bits_n)
    return x, torch.cat(labels, dim=1)
