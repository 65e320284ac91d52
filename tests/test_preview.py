"""Previews decoded at the size ComfyUI shows them (vare_core/generation/preview.py)."""
import torch
import torch.nn.functional as F

from vare_core.models.bsq_vae import BSQVAE, VAEConfig
from vare_core.generation.preview import SHOWN_SIDE, decode_preview, preview_grid
from vare_core.generation.sampler import decode_images


def test_preview_grid_keeps_the_aspect_ratio_within_the_shown_size():
    assert preview_grid(64, 64, 16) == (32, 32)              # 1024² -> 512²
    assert preview_grid(48, 64, 16) == (24, 32)              # 768x1024
    assert preview_grid(8, 8, 8) == (8, 8)                   # the embedded model: exact
    assert preview_grid(32, 32, 16) == (32, 32)              # 512²: already the shown size
    assert max(preview_grid(90, 30, 16, 256)) * 16 <= 256
    assert SHOWN_SIDE == 512


def test_small_images_are_previewed_exactly_large_ones_at_the_shown_size():
    torch.manual_seed(0)
    vae = BSQVAE(VAEConfig(bits=8, patch_size=4, base_channels=24, channel_mult=(1, 1, 1),
                           num_res_blocks=1)).eval()
    small = torch.randn(2, 8, 8, 8)
    assert torch.equal(decode_preview(vae, small), decode_images(vae, small))
    large = torch.randn(1, 8, 12, 16)                        # 48x64 px
    preview = decode_preview(vae, large, max_side=32)
    assert preview.shape == (1, 24, 32, 3)
    expected = decode_images(vae, F.interpolate(large, size=(6, 8), mode="area"))
    assert torch.equal(preview, expected) and 0 <= float(preview.min()) <= float(preview.max()) <= 1
