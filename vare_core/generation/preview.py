"""Previews of a sample in progress, decoded at the size they are shown.

    for step in steps:                                   # the sampler's per-scale callback
        image = decode_preview(pipe.vae, step.summed_codes[:1])    # (1, h, w, 3) in [0, 1]

A preview after every scale is a VAE decode of the codes summed so far. ComfyUI shows a preview
at most SHOWN_SIDE (512) pixels on its long side, so the codes are first area-resized to the
latent grid of that size: at 1024² the decoder then runs on 32x32 latents instead of 64x64, a
quarter of the work, 13 times per image (bench/preview_speed.py measures it). Images at or below
the shown size are decoded exactly as the final image is.

A linear latent-to-RGB map (ComfyUI's latent previews for its own models) was measured on the
embedded model and left out: fitted by least squares on the model's own samples, it is off by
0.11-0.14 per pixel on [0, 1] at every scale, hardly better than painting each image its mean
colour (0.17). The BSQ decoder is far from linear in the codes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampler import decode_images

SHOWN_SIDE = 512        # ComfyUI's progress preview: longest side in pixels


def preview_grid(height: int, width: int, patch: int, max_side: int = SHOWN_SIDE) -> tuple[int, int]:
    """Latent grid (h, w) whose decoded image fits in max_side x max_side, same aspect ratio."""
    longest = max(height, width) * patch
    if longest <= max_side:
        return height, width
    shrink = max_side / longest
    return max(1, round(height * shrink)), max(1, round(width * shrink))


@torch.no_grad()
def decode_preview(vae, summed_codes: torch.Tensor, max_side: int = SHOWN_SIDE) -> torch.Tensor:
    """Summed codes (B, bits, H, W) -> (B, h, w, 3) float32 RGB in [0, 1], long side <= max_side
    (rounded to the VAE's patch size)."""
    height, width = summed_codes.shape[-2:]
    grid = preview_grid(height, width, vae.config.patch_size, max_side)
    if grid != (height, width):
        summed_codes = F.interpolate(summed_codes.float(), size=grid, mode="area")
    return decode_images(vae, summed_codes)


def tint_mask(image: torch.Tensor, mask: torch.Tensor, color=(1.0, 0.1, 0.1), opacity: float = 0.45) -> torch.Tensor:
    """(H, W, 3) image in [0, 1] with the cells of a coarse (h, w) bool mask (e.g. the tokens a
    Concept Guard acts on, ScaleStep.guard_mask) tinted `color`."""
    height, width = image.shape[:2]
    cells = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[0, 0, :, :, None]
    tint = torch.tensor(color, dtype=image.dtype, device=image.device)
    return image * (1 - opacity * cells) + tint * opacity * cells
