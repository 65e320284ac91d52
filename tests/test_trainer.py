"""The erasure loop: reproducibility, cancel, precision (GradScaler overflow), learning, restore."""
import math

import pytest
import torch

from vare_core.erasure import losses, trainer
from vare_core.erasure.adapters import AdapterError, apply_adapter, load_adapter, save_adapter
from vare_core.erasure.profile import erasure_profile
from vare_core.erasure.losses import filtered_ce_loss
from vare_core.erasure.trainer import EraseConfig, TrainResult, default_lr, train_erasure
from vare_core.erasure.trajectories import build_trajectories
from vare_core.testing import tiny_pipeline


@pytest.fixture
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def pairs():
    return erasure_profile("embedded").pairs("circle", "square", n_per_concept=6, seed=0, retain=0)


def run(pipe, pairs, tmp_path, **overrides) -> TrainResult:
    config = dict(steps=4, lr=3e-3)
    config.update(overrides)
    return train_erasure(pipe, pairs, EraseConfig(**config), cache_dir=tmp_path / "cache")


def snapshot(model):
    return {n: (t, t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()}


def test_same_seed_same_adapter(pipe, pairs, tmp_path):
    a = run(pipe, pairs, tmp_path)
    b = run(pipe, pairs, tmp_path)
    assert set(a.adapter.tensors) == set(b.adapter.tensors)
    assert all(torch.equal(a.adapter.tensors[k], b.adapter.tensors[k]) for k in a.adapter.tensors)
    assert any(t.abs().max() > 0 for t in a.adapter.tensors.values())
    c = run(pipe, pairs, tmp_path, seed=7)
    assert not all(torch.equal(a.adapter.tensors[k], c.adapter.tensors[k]) for k in a.adapter.tensors)


def test_base_model_restored(pipe, pairs, tmp_path):
    snap = snapshot(pipe.model)
    flags = [p.requires_grad for p in pipe.model.parameters()]
    run(pipe, pairs, tmp_path, train="lora", rank=2, gradient_checkpointing=True)
    run(pipe, pairs, tmp_path, steps=2)
    now = pipe.model.state_dict(keep_vars=True)
    for name, (obj, value) in snap.items():
        assert now[name] is obj and torch.equal(obj.detach(), value), name
    assert [p.requires_grad for p in pipe.model.parameters()] == flags
    assert not pipe.model.training and not pipe.model.gradient_checkpointing
    assert all(p.grad is None for p in pipe.model.parameters())


@pytest.mark.parametrize("train", ["ca_ffn", "lora"])
def test_gradient_checkpointing_same_result(pipe, pairs, tmp_path, train):
    plain = run(pipe, pairs, tmp_path, steps=3, train=train, rank=2)
    ckpt = run(pipe, pairs, tmp_path, steps=3, train=train, rank=2, gradient_checkpointing=True)
    changed = [t for name, t in ckpt.adapter.tensors.items() if not name.endswith("lora_A")]
    assert any(t.abs().max() > 0 for t in changed)              # deltas / B moved off zero
    for name, tensor in plain.adapter.tensors.items():
        assert torch.allclose(tensor, ckpt.adapter.tensors[name], atol=1e-6), name


def test_cancel_after_k_steps(pipe, pairs, tmp_path):
    build_trajectories(pipe, [p.safe for p in pairs], cache_dir=tmp_path)   # no cancel checks
    checks = []

    def cancel():
        checks.append(1)
        return len(checks) > 3               # checked before each step: 3 steps run

    result = train_erasure(pipe, pairs, EraseConfig(steps=10, lr=3e-3), cancel=cancel,
                           cache_dir=tmp_path)
    assert result.cancelled and len(result.history) == 3
    meta = result.adapter.metadata
    assert meta["steps_done"] == 3 and meta["steps_requested"] == 10 and meta["cancelled"] is True
    save_adapter(result.adapter, tmp_path / "partial.safetensors")
    loaded = load_adapter(tmp_path / "partial.safetensors")
    assert loaded.metadata["steps_done"] == 3
    apply_adapter(pipe, loaded)


def test_cancel_during_trajectories(pipe, pairs, tmp_path):
    result = train_erasure(pipe, pairs, EraseConfig(steps=3), cancel=lambda: True, cache_dir=tmp_path)
    assert result.cancelled and result.adapter is None and result.history == []


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_overflow_step_is_skipped(pipe, pairs, tmp_path, monkeypatch, precision):
    calls = []
    real = losses.erasure_objective

    def overflowing(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:                  # inject an inf gradient on the second step
            loss = loss * float("inf")
        return loss, stats

    monkeypatch.setattr(losses, "erasure_objective", overflowing)
    result = run(pipe, pairs, tmp_path, steps=4, precision=precision)
    history = result.history
    assert [h["skipped"] for h in history] == [False, True, False, False]
    assert history[-1]["skipped_steps"] == 1 == result.adapter.metadata["skipped_steps"]
    assert all(bool(torch.isfinite(t).all()) for t in result.adapter.tensors.values())
    if precision == "fp16":
        assert history[1]["loss_scale"] < history[0]["loss_scale"]     # GradScaler backed off
    assert result.adapter.metadata["hyperparameters"]["precision"] == precision


def test_bf16_autocast_runs(pipe, pairs, tmp_path):
    result = run(pipe, pairs, tmp_path, steps=2, precision="bf16")
    assert all(math.isfinite(h["loss"]) for h in result.history)


def evaluate_fce(pipe, pairs, trajs):
    """L_FCE of the model on every unsafe prompt + safe trajectory (no training)."""
    model = pipe.model
    with torch.no_grad():
        states, lens = pipe.encode_prompts([p.unsafe for p in pairs])
        batch = trajs.batch(list(range(len(pairs))))
        logits = model(model.encode_condition(states, lens), batch["x_wo_prefix"], trajs.schedule)
        return float(filtered_ce_loss(logits, batch["bit_labels"])[0])


@pytest.mark.parametrize("method", ["svare", "naive"])
def test_training_lowers_fce(pipe, pairs, tmp_path, method):
    result = run(pipe, pairs, tmp_path, steps=20, lr=1e-2, method=method, batch_size=3)
    trajs = build_trajectories(pipe, [p.safe for p in pairs], cache_dir=tmp_path / "cache")
    before = evaluate_fce(pipe, pairs, trajs)
    after = evaluate_fce(apply_adapter(pipe, result.adapter), pairs, trajs)
    assert after < before - 0.02, (before, after)


def test_callback_and_metadata(pipe, pairs, tmp_path):
    seen = []
    result = train_erasure(pipe, pairs, EraseConfig(steps=3, lr=3e-3, train="lora", rank=2),
                           callback=seen.append, cache_dir=tmp_path)
    phases = [info["phase"] for info in seen]
    assert phases[:len(pairs)] == ["trajectories"] * len(pairs) and phases[len(pairs):] == ["train"] * 3
    step = seen[-1]
    for key in ("step", "steps", "loss", "fce", "pre", "selected_fraction", "lr", "seconds",
                "skipped_steps"):
        assert key in step, key
    assert step["step"] == 3 and step["steps"] == 3 and step["lr"] == 3e-3
    meta = result.adapter.metadata
    assert meta["base_fingerprint"] == pipe.fingerprint and meta["concepts"] == ["circle"]
    assert meta["anchors"] == ["square"] and meta["train"] == "lora" and meta["rank"] == 2
    assert meta["method"] == "svare" and meta["steps_done"] == 3 and not meta["cancelled"]
    assert set(meta["final_losses"]) >= {"loss", "fce", "pre"}
    assert all(k.endswith((".lora_A", ".lora_B")) for k in result.adapter.tensors)
    assert any(".ca." in k for k in result.adapter.tensors) and not any(".sa." in k for k in result.adapter.tensors)


def test_zero_preservation_weight_skips_safe_pass(pipe, pairs, tmp_path, monkeypatch):
    batches = []
    real_forward = type(pipe.model).forward

    def spy(self, cond, x, schedule, rope_grid=None):
        batches.append(x.shape[0])
        return real_forward(self, cond, x, schedule, rope_grid)

    monkeypatch.setattr(type(pipe.model), "forward", spy)
    run(pipe, pairs, tmp_path, steps=1, batch_size=2, preservation_weight=0.0)
    run(pipe, pairs, tmp_path, steps=1, batch_size=2)
    run(pipe, pairs, tmp_path, steps=1, batch_size=2, method="vare")
    assert batches == [2, 4, 2]


@pytest.mark.parametrize("keep_target", ["frozen", "teacher"])
def test_keep_pairs_target(pipe, tmp_path, keep_target):
    """Keep pairs (same prompt both sides) held to the frozen model's own conditional logits
    start at L_Pre = 0 (LoRA starts as the identity); held to the CFG teacher, they start away
    from it, i.e. the teacher target would pull the model off its own output."""
    keep_only = erasure_profile("embedded").pairs("circle", "square", n_per_concept=4, seed=0, retain=2)
    keep_only = [p for p in keep_only if p.unsafe == p.safe]
    result = run(pipe, keep_only, tmp_path, train="lora", rank=2, steps=3, keep_target=keep_target)
    pre = [h["pre"] for h in result.history]
    assert result.adapter.metadata["hyperparameters"]["keep_target"] == keep_target
    if keep_target == "frozen":
        assert abs(pre[0]) < 1e-8
    else:
        assert pre[0] > 1e-4


@pytest.mark.parametrize("kwargs, field", [
    ({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"),
    ({"method": "esd"}, "method"), ({"train": "full"}, "train"), ({"rank": 0}, "rank"),
    ({"precision": "fp8"}, "precision"), ({"lora_targets": ("mlp",)}, "lora_targets"),
    ({"alpha": 1.5}, "alpha"), ({"betas": (0.9,)}, "betas"), ({"batch_size": 0}, "batch_size"),
    ({"keep_target": "cfg"}, "keep_target"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EraseConfig(**kwargs)


def test_lora_rank_above_width_refused(pipe, pairs, tmp_path):
    with pytest.raises(ValueError, match="rank 65"):
        train_erasure(pipe, pairs, EraseConfig(train="lora", rank=65), cache_dir=tmp_path)


def test_half_model_trains_in_its_dtype(pipe, pairs, tmp_path):
    pipe.model.to(torch.bfloat16)
    result = run(pipe, pairs, tmp_path, steps=2)                 # auto -> bf16 autocast
    assert result.adapter.metadata["hyperparameters"]["precision"] == "bf16"
    assert all(t.dtype == torch.bfloat16 for t in result.adapter.tensors.values())   # deltas
    assert pipe.model.blocks[0].ffn.fc1.weight.dtype == torch.bfloat16
    for precision in ("fp32", "fp16"):   # fp16 autocast cannot mix with bf16 weights
        with pytest.raises(ValueError, match=f"precision {precision} does not work .* bf16"):
            train_erasure(pipe, pairs, EraseConfig(precision=precision), cache_dir=tmp_path)


def test_default_lr_scales_with_width():
    assert default_lr("ca_ffn", 2048) == pytest.approx(2.34e-5)
    assert default_lr("ca_ffn", 512) == pytest.approx(4.68e-5)
    assert default_lr("lora", 2048) == pytest.approx(2.34e-4)


def test_single_process_needs_no_process_group(pipe, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    result = run(pipe, pairs, tmp_path, steps=1)
    assert not torch.distributed.is_initialized()
    assert result.adapter is not None and "distributed" not in result.adapter.metadata["hyperparameters"]
    with pytest.raises(ValueError, match="torchrun"):                 # FSDP needs processes
        train_erasure(pipe, pairs, EraseConfig(steps=1), cache_dir=tmp_path, fsdp=True)


def test_stop_before_the_first_step_gives_no_adapter(pipe, pairs, tmp_path):
    # trajectories done, then Ctrl-C before step 1: nothing was trained, so nothing may be saved
    # over an existing adapter (hardening 2, item 8)
    build_trajectories(pipe, [p.safe for p in pairs], cache_dir=tmp_path)
    result = train_erasure(pipe, pairs, EraseConfig(steps=5, lr=3e-3), cancel=lambda: True, cache_dir=tmp_path)
    assert result.cancelled and result.adapter is None and result.history == []


def test_diverged_training_is_never_an_adapter(pipe, pairs, tmp_path):
    with pytest.raises(trainer.TrainingDiverged, match="inf/NaN.*nothing was saved"):
        run(pipe, pairs, tmp_path, lr=1e308, steps=2)
    result = run(pipe, pairs, tmp_path, steps=1)
    name = next(iter(result.adapter.tensors))
    result.adapter.tensors[name].view(-1)[0] = float("nan")
    with pytest.raises(AdapterError, match="inf/NaN"):
        save_adapter(result.adapter, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("method, formulation", [("svare", "consistent"), ("svare", "paper"), ("vare", "paper"),
                                                 ("naive", "paper")])
def test_split_passes_give_the_joint_gradients(pipe, pairs, tmp_path, method, formulation):
    # passes="split" holds one row group's activations at a time: the adapter must be the same
    from vare_core.erasure.formulations import FORMULATIONS
    settings = dict(FORMULATIONS[formulation], method=method, train="lora", rank=2, steps=3, batch_size=3)
    joint = run(pipe, pairs, tmp_path, **settings)
    split = run(pipe, pairs, tmp_path, passes="split", **settings)
    assert split.adapter.metadata["hyperparameters"]["passes"] == "split"
    for name, tensor in joint.adapter.tensors.items():
        assert torch.allclose(tensor, split.adapter.tensors[name], atol=1e-5, rtol=1e-4), name
    assert any(t.abs().max() > 0 for n, t in split.adapter.tensors.items() if n.endswith("lora_B"))
    assert joint.history[-1]["loss"] == pytest.approx(split.history[-1]["loss"], rel=1e-4)


def test_streaming_the_blocks_for_trajectories_changes_nothing(pipe, pairs, tmp_path):
    # stream_blocks="on": trajectories and targets run with the blocks copied in one at a time
    # (on CPU the copies are CPU to CPU); the adapter is the same and the blocks come back
    plain = run(pipe, pairs, tmp_path / "a", train="lora", rank=2, steps=2)
    streamed = run(pipe, pairs, tmp_path / "b", train="lora", rank=2, steps=2, stream_blocks="on")
    for name, tensor in plain.adapter.tensors.items():
        assert torch.equal(tensor, streamed.adapter.tensors[name]), name
    assert pipe.model.stream_device is None
    assert streamed.adapter.metadata["hyperparameters"]["stream_blocks"] == "on"
    with pytest.raises(ValueError, match="stream_blocks"):
        EraseConfig(stream_blocks="sometimes")
