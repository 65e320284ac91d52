"""Early-scale erasure (method "early", vare_core/erasure/early.py): the objective on hand-built
logits, the window of first scales, a short run on the tiny model, the command line and the node."""
import pytest
import torch

import vare_core.cli as main_cli
from nodes import erasure as erasure_nodes
from nodes import host
from vare_core.erasure import early, losses
from vare_core.erasure.adapters import load_adapter
from vare_core.erasure.choices import Method, choices
from vare_core.erasure.losses import LossConfig
from vare_core.erasure.profile import erasure_profile
from vare_core.erasure.session import LOSS_TERMS, TrainingSession, TrainStepProgress
from vare_core.erasure.targets import without_free_scales
from vare_core.erasure.trainer import EraseConfig
from vare_core.testing import tiny_pipeline

SCHEDULE = [(1, 1), (2, 2), (4, 4)]          # 1 + 4 + 16 = 21 tokens
BITS = 4


def hand_built(seed=0, rows=3):
    g = torch.Generator().manual_seed(seed)
    L = sum(h * w for h, w in SCHEDULE)
    unsafe = torch.randn(rows, L, 2 * BITS, generator=g).requires_grad_()
    safe = torch.randn(rows, L, 2 * BITS, generator=g).requires_grad_()
    teacher = torch.randn(rows, L, 2 * BITS, generator=g) * 2
    labels = torch.randint(0, 2, (rows, L, BITS), generator=g)
    return unsafe, safe, teacher, labels


def objective(unsafe, safe, teacher, labels, k=2, entropy_weight=0.5, erase_target="soft", erase_rows=None):
    window = early.within_first_scales(None, SCHEDULE, k).expand(unsafe.shape[0], -1)
    config = LossConfig(alpha=0.25, preservation_weight=0.5, erase_target=erase_target)
    return early.early_objective(unsafe, safe, teacher, labels, config, entropy_weight,
                                 erase_rows=erase_rows, erase_token_mask=window)


def test_the_window_keeps_the_first_scales_renormalised():
    weights = early.within_first_scales(None, SCHEDULE, 2)
    assert torch.allclose(weights[0, :5], torch.full((5,), 0.2)) and weights[0, 5:].abs().sum() == 0
    # after the free scale is left out, the window holds the 2x2 scale only
    both = early.within_first_scales(without_free_scales(None, SCHEDULE, 1), SCHEDULE, 2)
    assert torch.allclose(both[0, 1:5], torch.full((4,), 0.25)) and both[0, 0] == 0 and both[0, 5:].sum() == 0
    with pytest.raises(ValueError, match="hold no token"):
        early.within_first_scales(without_free_scales(None, SCHEDULE, 1), SCHEDULE, 1)


@pytest.mark.parametrize("erase_target", ["hard", "soft"])
def test_tokens_past_the_window_change_nothing_and_get_no_gradient(erase_target):
    unsafe, safe, teacher, labels = hand_built()
    loss, stats = objective(unsafe, safe, teacher, labels, erase_target=erase_target)
    loss.backward()
    assert stats["entropy"] > 0 and stats["fce"] > 0
    assert unsafe.grad[:, 5:].abs().max() == 0 and unsafe.grad[:, :5].abs().max() > 0
    moved = unsafe.detach().clone()
    moved[:, 5:] = torch.randn_like(moved[:, 5:]) * 10
    moved_teacher = teacher.clone()
    moved_teacher[:, 5:] = 0.0                       # the targets there do not count either
    again, _ = objective(moved, safe, moved_teacher, labels, erase_target=erase_target)
    # L_Pre holds every scale of the safe rows: it sees the teacher's later tokens, so compare without it
    pre = 0.5 * losses.preservation_loss(safe, teacher)
    pre_moved = 0.5 * losses.preservation_loss(safe, moved_teacher)
    assert torch.allclose(loss - pre, again - pre_moved, atol=1e-6)


def test_entropy_term_is_zero_at_the_targets_sharpness_and_grows_when_collapsed_or_uniform():
    unsafe, _, teacher, labels = hand_built()
    window = early.within_first_scales(None, SCHEDULE, 3)
    same, _ = early.entropy_gap(teacher.clone(), teacher, window)
    flipped = teacher.view(3, 21, BITS, 2).flip(-1).reshape(3, 21, 2 * BITS)   # other bits, same sharpness
    mirrored, _ = early.entropy_gap(flipped, teacher, window)
    assert float(same) == 0 and float(mirrored) < 1e-10
    collapsing = [float(early.entropy_gap(teacher * s, teacher, window)[0]) for s in (1.5, 4.0, 50.0)]
    spreading = [float(early.entropy_gap(teacher * s, teacher, window)[0]) for s in (0.7, 0.3, 0.0)]
    assert 0 < collapsing[0] < collapsing[1] < collapsing[2]
    assert 0 < spreading[0] < spreading[1] < spreading[2]
    gap, stats = early.entropy_gap(teacher * 0.0, teacher, window)       # uniform: ln 2 per bit
    assert abs(stats["student_entropy"] - 0.693147) < 1e-5 and stats["target_entropy"] < 0.69


def test_every_scale_and_no_entropy_is_svare():
    unsafe, safe, teacher, labels = hand_built()
    rows = torch.tensor([True, False, True])                  # one keep pair
    for erase_target in ("hard", "soft"):
        config = LossConfig(alpha=0.25, preservation_weight=0.5, erase_target=erase_target)
        window = early.within_first_scales(None, SCHEDULE, len(SCHEDULE)).expand(3, -1)
        got, got_stats = early.early_objective(unsafe, safe, teacher, labels, config, 0.0, erase_rows=rows,
                                               erase_token_mask=window)
        want, want_stats = losses.erasure_objective("svare", unsafe, safe, teacher, labels, config, erase_rows=rows)
        assert torch.allclose(got, want, atol=1e-7)
        assert all(abs(got_stats[k] - want_stats[k]) < 1e-6 for k in ("fce", "pre", "loss"))


def test_keep_rows_take_no_part_in_the_entropy_term():
    unsafe, safe, teacher, labels = hand_built()
    rows = torch.tensor([True, False, False])
    loss, _ = objective(unsafe, safe, teacher, labels, erase_rows=rows, entropy_weight=1.0)
    loss.backward()
    assert unsafe.grad[1:].abs().max() == 0           # keep rows: only their safe side (L_Pre) trains
    gap, _ = early.entropy_gap(unsafe, teacher, None, torch.tensor([False, False, False]))
    assert float(gap.detach()) == 0


def test_bad_settings_are_refused_with_the_name():
    with pytest.raises(ValueError, match="early_scales must be an integer >= 1, got 0"):
        EraseConfig(method="early", early_scales=0)
    for bad in (-0.1, float("nan"), "1"):
        with pytest.raises(ValueError, match="entropy_weight must be a finite number >= 0"):
            EraseConfig(method="early", entropy_weight=bad)
    with pytest.raises(ValueError, match="entropy_weight must be"):
        early.check_entropy_weight(-1)
    with pytest.raises(ValueError, match="early_scales 6: the model's schedule has 5 scales"):
        early.check_early_scales(6, 5, 1)
    with pytest.raises(ValueError, match="covers only the model's 1 free scale"):
        early.check_early_scales(1, 5, 1)
    with pytest.raises(ValueError, match="early.early_objective"):
        unsafe, safe, teacher, labels = hand_built()
        losses.erasure_objective("early", unsafe, safe, teacher, labels, LossConfig())


def test_method_early_is_offered_everywhere():
    assert "early" in choices(Method)
    inputs = {i.id: i for i in erasure_nodes.TrainErasure.GET_SCHEMA().inputs}
    assert "early" in inputs["method"].options
    assert "entropy" in LOSS_TERMS
    profile = erasure_profile("embedded")
    for formulation in ("consistent", "paper"):
        for train in ("lora", "ca_ffn"):
            config = profile.config(formulation, train=train, method="early")
            assert config.early_scales == profile.config().early_scales
            assert config.entropy_weight == profile.config().entropy_weight


# ----------------------------------------------------------------------------- training

@pytest.fixture
def tiny(monkeypatch):
    torch.set_num_threads(1)
    pipe = tiny_pipeline(seed=0)
    monkeypatch.setattr(main_cli.erase, "load_from_args", lambda args, **kwargs: pipe)
    return pipe


def test_a_short_run_saves_an_adapter_that_says_early_and_k(tiny, tmp_path, capsys):
    out = tmp_path / "early.safetensors"
    rc = main_cli.main(["erase", "--concept", "circle", "--anchor", "square", "--steps", "3", "--n-pairs", "4",
                        "--method", "early", "--early-scales", "2", "--entropy-weight", "0.5",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    meta = load_adapter(out).metadata
    assert meta["method"] == "early" and meta["steps_done"] == 3
    assert meta["hyperparameters"]["early_scales"] == 2 and meta["hyperparameters"]["entropy_weight"] == 0.5
    assert "entropy" in meta["final_losses"] and "fce" in meta["final_losses"]


def test_progress_carries_the_entropy_term(tiny, tmp_path):
    profile = erasure_profile(tiny)
    pairs = profile.pairs(["circle"], ["square"], n_per_concept=4, retain=1)
    events = []
    session = TrainingSession(tiny, pairs, profile.config(method="early", steps=2, early_scales=2),
                              cache_dir=tmp_path)
    session.train(progress=events.append)
    steps = [e for e in events if isinstance(e, TrainStepProgress)]
    assert len(steps) == 2 and set(steps[-1].terms) == {"fce", "entropy", "pre"}


def test_a_window_past_the_schedule_is_refused_before_sampling(tiny, tmp_path):
    profile = erasure_profile(tiny)
    pairs = profile.pairs(["circle"], ["square"], n_per_concept=4, retain=0)
    session = TrainingSession(tiny, pairs, profile.config(method="early", steps=2, early_scales=4),
                              cache_dir=tmp_path)
    with pytest.raises(ValueError, match="early_scales 4: the model's schedule has 3 scales"):
        session.train()
    assert not any(tmp_path.iterdir())                     # nothing was sampled


def test_cli_refuses_an_empty_window(tiny, tmp_path, capsys):
    out = tmp_path / "early.safetensors"
    rc = main_cli.main(["erase", "--concept", "circle", "--anchor", "square", "--method", "early",
                        "--early-scales", "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--early-scales must be an integer >= 1, got 0" in err and not out.exists()
    rc = main_cli.main(["erase", "--concept", "circle", "--anchor", "square", "--method", "early",
                        "--entropy-weight", "-1", "--out", str(out)])
    assert rc == 2 and "--entropy-weight must be a finite number >= 0" in capsys.readouterr().err


def test_the_node_trains_early_and_sends_the_entropy_term(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("VARE_CACHE_DIR", str(tmp_path / "cache"))
    sent = []
    monkeypatch.setattr(host, "report_progress", lambda *a, **k: None)
    monkeypatch.setattr(host, "send_event", lambda name, data: sent.append(data))
    pairs = erasure_nodes.PromptPairs.execute(tiny, "circle", "square", 2, 0, "")[0]
    with torch.inference_mode():
        adapter, history = erasure_nodes.TrainErasure.execute(
            model=tiny, pairs=pairs, method="early", train="lora", rank=2, steps=2, learning_rate=0.0,
            alpha=-1.0, gamma=0.0, loss_weight=-1.0, batch_size=2, precision="auto",
            gradient_checkpointing=False, seed=0)
    assert adapter.metadata["method"] == "early"
    assert adapter.metadata["hyperparameters"]["early_scales"] == erasure_profile(tiny).config().early_scales
    assert any("entropy" in e.get("terms", {}) for e in sent if e["phase"] == "train")
