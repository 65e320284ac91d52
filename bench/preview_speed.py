"""Per-scale previews: a full VAE decode vs the preview decode at the shown size
(generation/preview.py).

    python bench/preview_speed.py                        # d32 VAE (Infinity-2B's), 1024², CPU
    python bench/preview_speed.py --device cuda          # the same on a GPU (bench/gpu_check.sh)
    python bench/preview_speed.py --quick                # CI: a small VAE, 256², preview 128

Timed: one decode of the final summed codes at full size and one at the preview size (the cost
does not depend on the scale: the summed codes always have the final latent size), median of
--repeats, and the extra time previews add to one image (x the schedule's scales). Weights are
random: the time is what is measured. Quality, on the embedded model (its own weights and
samples): the preview at half its size against the full decode area-resized to that size, mean
absolute difference on [0, 1] per scale.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import median_seconds
from vare_core.models.bsq_vae import BSQVAE, VAEConfig
from vare_core.generation.preview import SHOWN_SIDE, decode_preview
from vare_core.generation.sampler import decode_images


def speed(vae_cfg: VAEConfig, size: int, max_side: int, scales: int, repeats: int, device, dtype):
    torch.manual_seed(0)
    vae = BSQVAE(vae_cfg).to(device, dtype).eval()
    side = size // vae_cfg.patch_size
    codes = (torch.randint(0, 2, (1, vae_cfg.bits, side, side), device=device) * 2 - 1).to(dtype)
    full = median_seconds(lambda: decode_images(vae, codes), repeats, device)
    preview = median_seconds(lambda: decode_preview(vae, codes, max_side), repeats, device)
    return full, preview, scales


@torch.no_grad()
def quality(seed: int = 1):
    """Embedded model: preview at half size vs the full decode resized, per scale."""
    from vare_core.generation.pipeline import load_pipeline
    pipe = load_pipeline("embedded", device="cpu")
    prompts = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "yellow")
               for s in ("circle", "square", "triangle", "cross") for b in ("white", "black")]
    steps = []
    pipe.generate(prompts, seed=seed, callback=lambda step: steps.append(step.summed_codes.clone()))
    half = pipe.vae.config.patch_size * steps[-1].shape[-1] // 2
    errors = []
    for codes in steps:
        full = decode_images(pipe.vae, codes).permute(0, 3, 1, 2)
        target = F.interpolate(full, size=(half, half), mode="area").permute(0, 2, 3, 1)
        errors.append(float((decode_preview(pipe.vae, codes, half) - target).abs().mean()))
    return half, errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--max-side", type=int, default=SHOWN_SIDE)
    parser.add_argument("--scales", type=int, default=13, help="previews per image (2B at 1024²: 13)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    vae_cfg, size, max_side = VAEConfig(), args.size, args.max_side
    if args.quick:
        vae_cfg = VAEConfig(bits=16, patch_size=16, base_channels=24, channel_mult=(1, 1, 1, 1, 1), num_res_blocks=1)
        size, max_side = 256, 128
    full, preview, n = speed(vae_cfg, size, max_side, args.scales, args.repeats, device, dtype)
    print(f"VAE d{vae_cfg.bits}, {size}x{size}, {args.dtype} on {device.type}; preview long side {max_side} px\n")
    print("| decode | one decode (s) | previews of one image, x" + str(n) + " (s) |")
    print("|---|---|---|")
    print(f"| full size | {full:.3f} | {full * n:.2f} |")
    print(f"| preview size | {preview:.3f} | {preview * n:.2f} |")
    print(f"\npreview / full: {preview / full:.2f}")
    if not args.quick:
        half, errors = quality()
        print(f"\nembedded model, preview at {half} px vs the full decode resized: mean |diff| per scale "
              + ", ".join(f"{e:.3f}" for e in errors))
    print("\ncommand: python bench/preview_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
