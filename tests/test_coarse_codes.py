"""The embedded VAE's first-scale layout (embedded/training/coarse_codes.py)."""
import pytest
import torch

from vare_core.embedded.training.coarse_codes import (LAYOUT, coarse_code_loss, coarse_targets,
                                                      first_scale_tokens, layout_agreement)
from vare_core.embedded.world import Scene
from vare_core.models.bsq_quant import quantize_multiscale


def scene(**kw):
    base = dict(shape="circle", color="red", background="white", style="solid", size_px=30, cx=20.0, cy=40.0)
    return Scene(**{**base, **kw})


def test_targets_follow_the_layout():
    targets = coarse_targets([scene(), scene(background="gray", cx=40.0, size_px=50),
                              scene(background="black", cy=10.0)], bits=16)
    assert targets.shape == (3, 16)
    assert targets[0, :5].tolist() == [1, 1, -1, 1, -1]        # white, left, lower, small
    assert targets[1, :5].tolist() == [-1, 1, 1, 1, 1]         # gray, right, large
    assert targets[2, :5].tolist() == [-1, -1, -1, -1, -1]     # black, upper
    assert (targets[:, len(LAYOUT):] == 1).all()               # the rest is constant
    # colour, shape and style never reach the first scale
    assert torch.equal(coarse_targets([scene(color="blue", shape="cross", style="striped")], 16),
                       coarse_targets([scene()], 16))


def test_too_few_bits_is_refused():
    with pytest.raises(ValueError, match="at least 5 bits"):
        coarse_targets([scene()], bits=4)


def test_first_scale_token_is_what_the_quantiser_signs():
    features = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    bits = quantize_multiscale(features, [(1, 1), (2, 2), (8, 8)])[0]       # (4, 1, 1, 16)
    assert torch.equal(bits[:, 0, 0].bool(), first_scale_tokens(features) > 0)


def test_loss_is_zero_on_the_layout_and_drives_features_to_it():
    targets = coarse_targets([scene(), scene(background="black", cx=50.0)], bits=16)
    features = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert layout_agreement(features.detach(), targets).mean() < 1.0
    opt = torch.optim.SGD([features], lr=5.0)
    for _ in range(200):
        opt.zero_grad()
        coarse_code_loss(features, targets).backward()
        opt.step()
    assert layout_agreement(features.detach(), targets).min() == 1.0
    assert coarse_code_loss(features.detach(), targets) < 1e-3


def test_repair_flips_make_the_unused_code_white_on_the_right_and_black_on_the_left():
    from vare_core.embedded.training.coarse_codes import repair_flips
    scenes = [scene(background=b, cx=x) for b in ("white", "gray", "black") for x in (20.0, 44.0)] * 100
    targets = coarse_targets(scenes, 16)
    flips = repair_flips(targets, 0.25, torch.Generator().manual_seed(0))
    assert flips[:, 2:].sum() == 0                                 # bits 0 and 1 only
    fed = torch.where(flips, -targets, targets)[:, :2]
    unused = (fed[:, 0] > 0) & (fed[:, 1] < 0)                     # (+, -)
    background = [s.background for s in scenes]
    right = targets[:, 2] > 0
    assert {background[i] for i in torch.nonzero(unused & right).flatten().tolist()} == {"white"}
    assert {background[i] for i in torch.nonzero(unused & ~right).flatten().tolist()} == {"black"}
    assert not any(background[i] == "gray" for i in torch.nonzero(flips.any(1)).flatten().tolist())
    white_right = torch.tensor([b == "white" for b in background]) & right
    assert 0.18 < flips[white_right, 1].float().mean() < 0.32
    with pytest.raises(ValueError, match="repair share"):
        repair_flips(targets[:1], 1.5)
