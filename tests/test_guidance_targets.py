"""Guidance-consistent erasure targets (EraseConfig.targets / erase_target / null_weight /
scale_weights): what each one trains toward, checked at the first step, where a LoRA (B = 0) is
still exactly the frozen model."""
import pytest
import torch

from vare_core.erasure.profile import erasure_profile
from vare_core.erasure import losses
from vare_core.erasure.trainer import EraseConfig, train_erasure
from vare_core.testing import tiny_pipeline


@pytest.fixture
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def pairs():
    return erasure_profile("embedded").pairs("circle", "square", n_per_concept=4, seed=0, retain=2)


def run(pipe, pairs, tmp_path, **overrides):
    config = dict(train="lora", rank=2, steps=3, lr=3e-3, batch_size=4, seed=0)
    config.update(overrides)
    return train_erasure(pipe, pairs, EraseConfig(**config), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("targets", ["conditional", "guided"])
def test_preservation_starts_at_zero_with_consistent_targets(pipe, pairs, tmp_path, targets):
    """conditional: the safe prompt's conditional branch is held to its own frozen output;
    guided: the student's CFG output (frozen null branch) is held to the CFG teacher, which is
    the same mix of the same frozen branches. Either way L_Pre is 0 before training moves."""
    result = run(pipe, pairs, tmp_path, targets=targets, null_weight=1.0)
    first = result.history[0]
    assert first["pre"] < 1e-6
    assert first["null_pre"] < 1e-8
    assert result.adapter.metadata["hyperparameters"]["targets"] == targets


def test_paper_targets_start_away_from_the_conditional_branch(pipe, pairs, tmp_path):
    """The paper's CFG-combined teacher is not what the conditional branch outputs: L_Pre > 0
    at the first step (the mismatch the sampler then guides a second time)."""
    result = run(pipe, [p for p in pairs if p.unsafe != p.safe], tmp_path, targets="cfg")
    assert result.history[0]["pre"] > 1e-4


def test_null_branch_hold_is_trained_only_when_weighted(pipe, pairs, tmp_path):
    held = run(pipe, pairs, tmp_path, targets="conditional", null_weight=1.0, steps=4)
    free = run(pipe, pairs, tmp_path, targets="conditional", null_weight=0.0, steps=4)
    assert "null_pre" in held.history[-1] and "null_pre" not in free.history[-1]
    assert held.history[-1]["loss"] > held.history[-1]["fce"]   # the hold adds to the objective


def test_soft_erase_target_trains_toward_the_target_distribution():
    torch.manual_seed(0)
    student = torch.randn(2, 5, 8, requires_grad=True)
    target = torch.randn(2, 5, 8)
    labels = torch.randint(0, 2, (2, 5, 4))
    soft, stats = losses.soft_filtered_ce_loss(student, target, labels, alpha=0.0)
    kl = losses.token_kl(student, target).sum(1).mean() / 5 * 2      # per-bit mean KL, token mean
    grad_soft, = torch.autograd.grad(soft, student)
    grad_kl, = torch.autograd.grad(kl, student)
    assert torch.allclose(grad_soft, grad_kl, atol=1e-6)              # same gradient as the KL
    assert stats["selected_fraction"] == 1.0
    # a target that is sure of the labels gives back the hard filtered CE
    sure = torch.where(torch.nn.functional.one_hot(labels, 2).bool(), 30.0, -30.0).view(2, 5, 8)
    hard, _ = losses.filtered_ce_loss(student, labels, alpha=0.25)
    soft_sure, _ = losses.soft_filtered_ce_loss(student, sure, labels, alpha=0.25)
    assert torch.allclose(hard, soft_sure, atol=1e-5)
    with pytest.raises(ValueError, match="erase_target"):
        losses.LossConfig(erase_target="fuzzy")


def test_scale_balanced_weights_count_every_scale_the_same(pipe, pairs, tmp_path, monkeypatch):
    seen = {}
    real = losses.erasure_objective

    def spy(*args, **kwargs):
        seen["mask"] = kwargs.get("token_mask")
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "erasure_objective", spy)
    run(pipe, pairs, tmp_path, scale_weights="balanced", steps=1, targets="conditional")
    mask = seen["mask"][0]
    schedule = pipe.default_schedule
    sums, start = [], 0
    for h, w in schedule:
        sums.append(float(mask[start:start + h * w].sum()))
        start += h * w
    assert start == len(mask)
    assert all(abs(s - 1 / len(schedule)) < 1e-6 for s in sums)


@pytest.mark.parametrize("kwargs, field", [
    ({"targets": "teacher"}, "targets"), ({"erase_target": "fuzzy"}, "erase_target"),
    ({"null_weight": -1.0}, "null_weight"), ({"scale_weights": "log"}, "scale_weights"),
    ({"erase_free_scales": 1}, "erase_free_scales"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EraseConfig(**kwargs)
