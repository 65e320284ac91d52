"""The first scale's code of the embedded VAE, laid out so that bits drawn one by one make a
valid picture (embedded model v2).

    targets = coarse_targets(scenes, bits=16)          # (n, 16) of +-1
    loss = coarse_code_loss(vae.encode_features(x), targets)

Why: Infinity predicts the bits of a token independently. The first scale is one token, and in
an unconstrained VAE the three backgrounds' codes differ in ~10 of 16 bits; for a prompt that
leaves the background open the model predicts those bits near 0.5, the bits drawn almost never
form a white or a black code, and the later scales continue the mixture as gray (the shipped
model: 85-100% gray). Here the training set's first-scale token is held to a layout in which
each attribute a prompt may leave open has its own bits and every other bit is constant, so any
combination of independently drawn bits is a picture of the world:

    bit 0: white background (+) or not      bit 2: centre in the right half
    bit 1: black background (-) or not      bit 3: centre in the lower half
                                            bit 4: larger than the median size
    bits 5..: +1 always (colour, shape and style are left to the finer scales)

(+, -) on bits 0-1 is the one combination no image has: drawn a ninth of the time when the
background is open, and continued by a transformer that never saw it as a broken picture (the
1500-step pilot: 37% of those drew the shape). `repair_flips` teaches the transformer to continue
it by bit 2, which is drawn independently at even odds: as white when the shape is in the right
half, as black in the left. A share of those white (and black) images is fed with bit 1 (bit 0)
flipped at the first scale; labels unchanged, later scales re-quantised from the flipped code
(models/self_correction.py). Open backgrounds then come out white 5/18, gray 4/9, black 5/18.

The layout is a training target of the VAE only: the weights keep the official layout, and
loaders and the sampler are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..world import CANVAS, MAX_SIZE_PX, MIN_SIZE_PX

LAYOUT = ("white background", "not a black background", "right half", "lower half", "large")
MEDIAN_SIZE_PX = (MIN_SIZE_PX + MAX_SIZE_PX) / 2


def coarse_targets(scenes, bits: int) -> torch.Tensor:
    """(n, bits) of +-1: the first-scale code each scene's image is trained toward."""
    if bits < len(LAYOUT):
        raise ValueError(f"the coarse layout needs at least {len(LAYOUT)} bits, the VAE has {bits}")
    targets = torch.ones(len(scenes), bits)
    for row, scene in enumerate(scenes):
        targets[row, 0] = 1.0 if scene.background == "white" else -1.0
        targets[row, 1] = -1.0 if scene.background == "black" else 1.0
        targets[row, 2] = 1.0 if scene.cx > CANVAS / 2 else -1.0
        targets[row, 3] = 1.0 if scene.cy > CANVAS / 2 else -1.0
        targets[row, 4] = 1.0 if scene.size_px > MEDIAN_SIZE_PX else -1.0
    return targets


def first_scale_tokens(features: torch.Tensor) -> torch.Tensor:
    """(B, d): the 1x1 token the quantiser signs (area mean, L2-normalised over the channels)."""
    return F.normalize(F.adaptive_avg_pool2d(features, 1).flatten(1), dim=1)


def coarse_code_loss(features: torch.Tensor, targets: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Hinge on the first-scale token: each channel on its target's side by `margin` (a channel
    of a unit token is 1/sqrt(d) = 0.25 on average for d = 16)."""
    return F.relu(margin - targets.to(features.dtype) * first_scale_tokens(features)).mean()


def layout_agreement(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of images whose first-scale bits match their targets, per channel (d,)."""
    return ((first_scale_tokens(features) > 0) == (targets > 0)).float().mean(0)


def repair_flips(targets: torch.Tensor, share: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, d) bool, the first-scale flips that make (+, -) on bits 0-1 a white background's code
    when bit 2 is + and a black one's when it is -: bit 1 of white images in the right half,
    bit 0 of black images in the left half, each for a random `share` of them."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"repair share must be in [0, 1], got {share}")
    flips = torch.zeros(targets.shape, dtype=torch.bool)
    chosen = torch.rand(targets.shape[0], generator=generator) < share
    right = targets[:, 2] > 0
    flips[:, 1] = chosen & (targets[:, 0] > 0) & right            # white (+, +) -> (+, -)
    flips[:, 0] = chosen & (targets[:, 1] < 0) & ~right           # black (-, -) -> (+, -)
    return flips
