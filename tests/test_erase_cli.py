"""`python -m vare_core erase` end to end on the tiny pipeline, and the shapes-world pairs."""
import os
import signal

import pytest
import torch

import vare_core.cli as main_cli
from vare_core.embedded.world import prompt_attributes
from vare_core.erasure import losses
from vare_core.erasure.adapters import load_adapter
from vare_core.cli.erase import config_from_args, pairs_from_args
from vare_core.erasure.formulations import FORMULATIONS
from vare_core.erasure.profile import erasure_profile
from vare_core.erasure.trainer import EraseConfig
from vare_core.testing import tiny_pipeline


@pytest.fixture
def tiny(monkeypatch):
    torch.set_num_threads(1)
    pipe = tiny_pipeline(seed=0)
    monkeypatch.setattr(main_cli.erase, "load_from_args", lambda args, **kwargs: pipe)
    return pipe


def erase(tmp_path, *extra):
    out = tmp_path / "erase.safetensors"
    argv = ["erase", "--concept", "circle", "--anchor", "square", "--steps", "3", "--n-pairs", "4",
            "--lr", "1e-3", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra]
    return main_cli.main(argv), out


def test_erase_writes_adapter(tiny, tmp_path, capsys):
    rc, out = erase(tmp_path)
    assert rc == 0, capsys.readouterr().err
    adapter = load_adapter(out)
    meta = adapter.metadata
    assert meta["concepts"] == ["circle"] and meta["anchors"] == ["square"]
    assert meta["steps_done"] == 3 and meta["method"] == "svare"
    assert meta["train"] == erasure_profile(tiny).default_train
    assert meta["base_fingerprint"] == tiny.fingerprint and meta["n_pairs"] == 4 + 3 * 2   # + 2/5 of 4 keep pairs per other shape
    assert "saved" in capsys.readouterr().out


def test_erase_lora_and_options(tiny, tmp_path, capsys):
    rc, out = erase(tmp_path, "--train", "lora", "--rank", "2", "--lora-targets", "sa,ffn",
                    "--method", "naive", "--precision", "bf16", "--batch-size", "1")
    assert rc == 0, capsys.readouterr().err
    meta = load_adapter(out).metadata
    assert meta["rank"] == 2 and meta["lora_targets"] == ["sa", "ffn"] and meta["method"] == "naive"
    assert meta["hyperparameters"]["precision"] == "bf16"
    assert meta["hyperparameters"]["batch_size"] == 1


def test_erase_pairs_file(tiny, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a red circle | a red square\na blue circle on a white background | "
                     "a blue square on a white background\n")
    rc, out = erase(tmp_path, "--pairs", str(pairs))
    assert rc == 0, capsys.readouterr().err
    assert load_adapter(out).metadata["n_pairs"] == 2


def test_unknown_concept_word(tiny, tmp_path, capsys):
    rc = main_cli.main(["erase", "--concept", "church", "--anchor", "square", "--out",
                        str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "'church'" in err and "circle" in err and "triangle" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_settings_fail_before_training(tiny, tmp_path, capsys):
    rc, out = erase(tmp_path, "--rank", "0", "--train", "lora")
    assert rc == 2 and "rank" in capsys.readouterr().err and not out.exists()
    rc = main_cli.main(["erase", "--concept", "circle", "--anchor", "square",
                        "--out", str(tmp_path / "missing" / "x.safetensors")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_ctrl_c_saves_partial_adapter(tiny, tmp_path, monkeypatch, capsys):
    calls = []
    real = losses.erasure_objective

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)      # what Ctrl-C sends, during step 2
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "erasure_objective", interrupting)
    handler = signal.getsignal(signal.SIGINT)
    rc, out = erase(tmp_path, "--steps", "10")
    assert signal.getsignal(signal.SIGINT) is handler          # handler restored
    assert rc == 130
    meta = load_adapter(out).metadata
    assert meta["cancelled"] is True and meta["steps_done"] == 2 and meta["steps_requested"] == 10
    assert "partial adapter" in capsys.readouterr().out


def test_bench_erasure_is_registered():
    args = main_cli.build_parser().parse_args(
        ["bench-erasure", "--concept", "circle", "--anchor", "square", "--samples", "8",
         "--out", "o", "--seed", "1", "--methods", "svare,naive"])
    assert args.samples == 8 and args.methods == "svare,naive" and callable(args.func)


def test_shapes_world_pairs_and_defaults(tiny, tmp_path, capsys):
    """Shapes-world models: pairs from their profile (main word, shared attributes) and the
    tuned settings for every option not given."""
    args = main_cli.build_parser().parse_args(
        ["erase", "--concept", "disc", "--anchor", "box", "--n-pairs", "20", "--out", "x"])
    config = config_from_args(args)
    args.seed = config.seed                          # as cmd_erase does: pairs use the training seed
    pairs = pairs_from_args(args, tiny)
    assert len(pairs) == 20 + 3 * 8                 # + 2/5 as keep pairs for each other shape
    keep = pairs[20:]
    assert all(p.unsafe == p.safe and prompt_attributes(p.unsafe).get("shape") != "circle" for p in keep)
    pairs = pairs[:20]
    for pair in pairs:
        unsafe, safe = prompt_attributes(pair.unsafe), prompt_attributes(pair.safe)
        assert unsafe.pop("shape") == "circle" and safe.pop("shape") == "square"
        assert unsafe == safe
        assert "circle" in pair.unsafe and "disc" not in pair.unsafe   # main word only
    embedded = erasure_profile("embedded")
    tuned = embedded.settings["consistent"]["lora"]
    assert (config.train, config.rank, config.lr, config.steps) == ("lora", tuned["rank"], tuned["lr"], 600)
    assert (config.targets, config.erase_target, config.null_weight) == ("conditional", "soft", 1.0)
    args.formulation = "paper"                       # the paper's objective, the old tuning
    paper = config_from_args(args)
    assert (paper.targets, paper.erase_target, paper.steps, paper.alpha) == ("cfg", "hard", 150, 0.05)
    args.formulation = None
    args.train = "ca_ffn"
    assert config_from_args(args).lr is None          # the tuned lr is LoRA's
    args.model, args.train, args.seed = "infinity_2b_reg.pth", None, None
    from vare_core.erasure.trajectories import TrajectorySettings
    lean = dict(train="lora", rank=8, lora_targets=("ca", "ffn"), batch_size=1, gradient_checkpointing=True,
                passes="split", stream_blocks="auto", trajectory=TrajectorySettings(batch_size=1))
    assert config_from_args(args) == EraseConfig(**lean, **FORMULATIONS["consistent"])
    args.formulation = "paper"
    assert config_from_args(args) == EraseConfig(**lean)   # the paper's objective, the profile's memory settings
