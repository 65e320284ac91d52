"""The BSQ tokenizer / VAE of Infinity: a convolutional encoder-decoder with bit tokens.

    vae = build_vae(load_file("infinity_vae_d32.safetensors"), device="cuda")  # or the 'vae' dict of a .pth
    bits = vae.encode_bits(images, [(1, 1), (2, 2), (4, 4), ..., (64, 64)])  # images (B, 3, H, W) in [-1, 1]
    image = vae.decode(summed_codes_from_bits(bits, (64, 64)))               # (B, 3, H, W) in [-1, 1], RGB

Architecture (FoundationVision/Infinity `infinity/models/bsq_vae/flux_vqgan.py`, image mode, no
attention): conv_in; per level `num_res_blocks` ResNet blocks (GroupNorm -> swish -> conv, twice,
1x1 `nin_shortcut` when channels change), then a stride-2 conv after right/bottom zero padding on
the first log2(patch_size) levels; middle = two ResNet blocks; GroupNorm -> swish -> conv_out to
`bits` channels. The decoder mirrors it with `num_res_blocks + 1` blocks per level and
nearest-x2 + conv upsampling after levels 1..log2(patch_size) (walking from the coarsest level).
GroupNorm: eps 1e-6, 32 groups when channels % 32 == 0, else 24 groups when % 24 == 0.
The quantiser has no weights (see `bsq_quant.py`); the checkpoints' `quantizer.lfq.mask` and
`quantize.lfq.mask` buffers (2**[d-1..0], only for integer labels) are dropped.

Real checkpoints: the 2B model's VAE ("d32": bits 32, patch 16, ch_mult (1, 2, 4, 4, 4)) and the
8B model's ("d56": bits 14, patch 8, ch_mult (1, 2, 4, 4), seen by the transformer as 2x2
pixel-unshuffled 56-bit tokens; see `bsq_quant.py` for the layout). Official keys wrap every conv
as `<name>.conv.weight` and every norm as `<name>.norm.weight`; we use plain `nn.Conv2d` /
`nn.GroupNorm`, so `normalize_vae_keys` strips those wrappers.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .bsq_quant import quantize_multiscale


def group_norm_groups(channels: int) -> int:
    """The official GroupNorm rule: 32 groups if possible, else 24."""
    if channels % 32 == 0:
        return 32
    if channels % 24 == 0:
        return 24
    raise ValueError(f"{channels} channels: the official VAE needs a multiple of 32 or 24")


@dataclass
class VAEConfig:
    bits: int = 32  # codebook_dim = latent channels = bits per token
    patch_size: int = 16  # total downsampling (2**number of down levels)
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2  # encoder blocks per level; the decoder uses num_res_blocks + 1
    image_channels: int = 3
    norm_eps: float = 1e-6
    # "group": the official GroupNorm. "none": no normalisation, for small models of flat
    # synthetic images, where per-image statistics would wash out absolute colours.
    norm: str = "group"

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        num_down = int(math.log2(self.patch_size)) if self.patch_size >= 1 else -1
        if self.patch_size < 1 or 2**num_down != self.patch_size:
            raise ValueError(f"VAEConfig.patch_size={self.patch_size} must be a power of two")
        if num_down > len(self.channel_mult) - 1:
            raise ValueError(f"VAEConfig: patch_size {self.patch_size} needs at least {num_down + 1} levels "
                             f"in channel_mult, got {self.channel_mult}")
        if self.bits < 1 or self.num_res_blocks < 1:
            raise ValueError(f"VAEConfig: bits ({self.bits}) and num_res_blocks ({self.num_res_blocks}) must be >= 1")
        if self.norm not in ("group", "none"):
            raise ValueError(f"VAEConfig.norm={self.norm!r}: use 'group' (official) or 'none'")
        if self.norm == "group":
            for m in self.channel_mult:
                group_norm_groups(self.base_channels * m)

    @property
    def num_down(self) -> int:
        return int(math.log2(self.patch_size))


def make_norm(channels: int, cfg: VAEConfig) -> nn.Module:
    if cfg.norm == "none":
        return NoNorm()
    return nn.GroupNorm(group_norm_groups(channels), channels, eps=cfg.norm_eps)


class NoNorm(nn.Module):
    """Stands where GroupNorm would; returns a copy so the in-place swish never touches x."""

    def forward(self, x: Tensor) -> Tensor:
        return x if torch.is_grad_enabled() else x.clone()


def _swish(x: Tensor) -> Tensor:
    # x * sigmoid(x) as the official code (F.silu rounds differently, ~1e-6, which could flip a
    # bit whose feature sits near zero); in place when no graph is recorded, to save memory
    # when decoding large images. Only ever called on a fresh norm output.
    if torch.is_grad_enabled():
        return x * torch.sigmoid(x)
    return x.mul_(torch.sigmoid(x))


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = make_norm(in_ch, cfg)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = make_norm(out_ch, cfg)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h if torch.is_grad_enabled() else h.add_(shortcut)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the official model


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block` list plus an optional `downsample` / `upsample`."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, cfg: VAEConfig):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, cfg) for i in range(num_blocks))


class MidBlocks(nn.Module):
    def __init__(self, ch: int, cfg: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, cfg)
        self.block_2 = ResnetBlock(ch, ch, cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.image_channels, cfg.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        for i, ch in enumerate(chans):
            level = Level(cfg.base_channels if i == 0 else chans[i - 1], ch, cfg.num_res_blocks, cfg)
            if i < cfg.num_down:
                level.downsample = Downsample(ch)
            self.down.append(level)
        self.mid = MidBlocks(chans[-1], cfg)
        self.norm_out = make_norm(chans[-1], cfg)
        self.conv_out = nn.Conv2d(chans[-1], cfg.bits, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.bits, chans[-1], 3, padding=1)
        self.mid = MidBlocks(chans[-1], cfg)
        # `up[i]` is level i (index 0 = finest); it runs coarsest first, as in the official model.
        levels, in_ch = [], chans[-1]
        for i in reversed(range(len(chans))):
            level = Level(in_ch, chans[i], cfg.num_res_blocks + 1, cfg)
            if 1 <= i <= cfg.num_down:
                level.upsample = Upsample(chans[i])
            levels.insert(0, level)
            in_ch = chans[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = make_norm(chans[0], cfg)
        self.conv_out = nn.Conv2d(chans[0], cfg.image_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class BSQVAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode_features(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> raw latent features (B, d, H/p, W/p), float32."""
        p, c = self.config.patch_size, self.config.image_channels
        if images.ndim != 4 or images.shape[1] != c:
            raise ValueError(f"images must be (B, {c}, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        if images.shape[2] % p or images.shape[3] % p:
            raise ValueError(f"image size {tuple(images.shape[2:])} must be a multiple of the patch size {p}")
        weight = self.encoder.conv_in.weight
        return self.encoder(images.to(weight.device, weight.dtype)).float()

    def encode_bits(self, images: Tensor, scale_schedule) -> list[Tensor]:
        """Images -> bits per scale, each (B, h_k, w_k, d) int64 (1 = positive code)."""
        return quantize_multiscale(self.encode_features(images), scale_schedule)

    def decode(self, summed_codes: Tensor) -> Tensor:
        """Summed codes (B, d, h, w) -> images (B, 3, h*p, w*p) clamped to [-1, 1], RGB."""
        if summed_codes.ndim == 5 and summed_codes.shape[2] == 1:  # official (B, d, 1, h, w)
            summed_codes = summed_codes.squeeze(2)
        if summed_codes.ndim != 4 or summed_codes.shape[1] != self.config.bits:
            raise ValueError(f"summed_codes must be (B, {self.config.bits}, h, w), got shape {tuple(summed_codes.shape)}")
        weight = self.decoder.conv_in.weight
        return self.decoder(summed_codes.to(weight.device, weight.dtype)).clamp_(-1, 1)


# ---------------------------------------------------------------- checkpoint loading

_CONV_WRAPPED = re.compile(r"^(.*\.(?:conv_in|conv_out|conv1|conv2|nin_shortcut|conv))\.conv\.(weight|bias)$")
_NORM_WRAPPED = re.compile(r"^(.*\.(?:norm1|norm2|norm_out))\.norm\.(weight|bias)$")
_DROPPED = ("quantizer.lfq.mask", "quantize.lfq.mask")


def normalize_vae_keys(state_dict) -> dict:
    """Official VAE keys (with or without `.conv.` / `.norm.` wrappers) -> our module's keys.

    Also accepts a whole official `.pth` dict holding the weights under 'vae' (or 'ema').
    Unknown keys are kept, so a strict load can name them.
    """
    if "vae" in state_dict and isinstance(state_dict["vae"], dict):
        state_dict = state_dict["vae"]
    elif "ema" in state_dict and isinstance(state_dict["ema"], dict):
        state_dict = state_dict["ema"]
    out = {}
    for key, value in state_dict.items():
        if key in _DROPPED:
            continue
        key = _CONV_WRAPPED.sub(r"\1.\2", key)
        key = _NORM_WRAPPED.sub(r"\1.\2", key)
        out[key] = value
    return out


def _count_indices(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def detect_vae_config(state_dict) -> VAEConfig:
    """Read the VAE's sizes off a state dict's tensor shapes."""
    sd = normalize_vae_keys(state_dict)
    needed = ["encoder.conv_in.weight", "encoder.conv_out.weight"]
    if any(k not in sd for k in needed):
        raise ValueError(f"not a BSQ VAE state dict: missing {[k for k in needed if k not in sd]} "
                         f"(first keys: {list(sd)[:5]})")
    base = sd["encoder.conv_in.weight"].shape[0]
    levels = _count_indices(sd, "encoder.down.")
    mult = []
    for i in range(levels):
        key = f"encoder.down.{i}.block.0.conv1.weight"
        if key not in sd:
            raise ValueError(f"VAE state dict has no '{key}'; cannot read level {i}'s width")
        mult.append(sd[key].shape[0] // base)
    num_down = sum(f"encoder.down.{i}.downsample.conv.weight" in sd for i in range(levels))
    return VAEConfig(
        bits=sd["encoder.conv_out.weight"].shape[0],
        patch_size=2**num_down,
        base_channels=base,
        channel_mult=tuple(mult),
        num_res_blocks=_count_indices(sd, "encoder.down.0.block."),
        image_channels=sd["encoder.conv_in.weight"].shape[1],
        norm="group" if "encoder.norm_out.weight" in sd else "none",
    )


def build_vae(state_dict, dtype=None, device=None) -> BSQVAE:
    """Detect the config, build on the meta device and load the weights strictly (eval, frozen)."""
    sd = normalize_vae_keys(state_dict)
    config = detect_vae_config(sd)
    with torch.device("meta"):
        vae = BSQVAE(config)
    expected = {k: v.shape for k, v in vae.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: {tuple(sd[k].shape)} vs {tuple(s)}" for k, s in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(s)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"VAE state dict does not fit the detected config {asdict(config)}: "
            f"{len(missing)} missing (first: {missing[:5]}), {len(unexpected)} unexpected "
            f"(first: {unexpected[:5]}), {len(wrong)} with wrong shapes (first: {wrong[:3]}). "
            "Is this an Infinity BSQ VAE checkpoint (the 'vae' dict of a .pth)?")
    not_float = [f"{k} ({v.dtype})" for k, v in sd.items() if not v.is_floating_point()]
    if not_float:
        raise ValueError(f"VAE weights must be floating point; {len(not_float)} tensors are not "
                         f"(first: {not_float[:3]}). Is this a BSQ VAE checkpoint?")
    if dtype is None:
        dtype = sd["encoder.conv_in.weight"].dtype
    vae.load_state_dict(sd, strict=True, assign=True)
    vae = vae.to(device=device, dtype=dtype)
    vae.eval().requires_grad_(False)
    return vae
