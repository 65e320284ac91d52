"""vare_core.cli (`python -m vare_core ...`): the parser and its help texts, the module entry
point, `sample` on the embedded model (the PNGs are the images the library draws, settings and
batches reach the pipeline), save_images, and bad arguments as one-line messages with exit code 2.
In-process through cli.main(argv); the bad-input matrix (test_bad_inputs.py) holds many more
sample / erase flag messages."""
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vare_core.generation.pipeline as pipeline_module
from vare_core import cli
from vare_core.cli import common
from vare_core.embedded.loader import load_embedded

SUBCOMMANDS = ["sample", "demo", "erase", "bench-erasure", "plan", "evaluate"]
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def embedded():
    torch.set_num_threads(1)
    return load_embedded("cpu")


@pytest.fixture
def cli_uses(monkeypatch, embedded):
    """`--model embedded` gets the already loaded pipeline; returns the generate() calls made."""
    calls = []
    real_generate = embedded.generate

    def generate(prompts, **kwargs):
        calls.append({"prompts": list(prompts), **kwargs})
        return real_generate(prompts, **kwargs)
    monkeypatch.setattr(pipeline_module, "load_pipeline", lambda *args, **kwargs: embedded)
    monkeypatch.setattr(embedded, "generate", generate)
    return calls


def quantised(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- parser and help

def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m vare_core")
    for command in SUBCOMMANDS:
        assert command in out


def test_the_subcommands_are_the_documented_ones():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert list(sub.choices) == SUBCOMMANDS
    assert all(name in cli.__doc__ for name in SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m vare_core {command}")
    assert "--out" in out or command == "plan"


def test_sample_help_documents_its_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--vae", "--text-encoder", "--device", "--dtype", "--cfg", "--tau",
                 "--top-k", "--top-p", "--negative", "--height", "--width", "--adapter", "--prompt",
                 "--n", "--batch", "--seed", "--out", "--stem", "--overwrite"):
        assert flag in out, flag


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: command"),
    (["draw"], "invalid choice: 'draw'"),
    (["sample"], "the following arguments are required: --prompt"),
    (["sample", "--prompt", "a circle", "--seed", "one"], "argument --seed: invalid int value: 'one'"),
])
def test_usage_errors_exit_2_with_the_usage_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m vare_core") and message in err and "Traceback" not in err


def test_the_module_entry_point_exits_with_mains_code(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m vare_core", "sample", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("vare_core", run_name="__main__")
    assert exit_info.value.code == 0 and "--prompt" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["python -m vare_core", "sample", "--prompt", "a circle", "--n", "0",
                                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("vare_core", run_name="__main__")
    assert exit_info.value.code == 2 and "--n 0: must be at least 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sample

def test_sample_writes_the_images_the_library_draws(embedded, tmp_path, capsys):
    """Through the real loader (--model embedded --device cpu): with --batch 1 image i is the
    library's image for seed + i, written losslessly as an 8-bit PNG."""
    out = tmp_path / "pictures"
    code = cli.main(["sample", "--model", "embedded", "--device", "cpu", "--dtype", "fp32",
                     "--prompt", PROMPT, "--n", "2", "--batch", "1", "--seed", "5",
                     "--stem", "pic", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["pic_000.png", "pic_001.png"]
    assert f"wrote 2 images to {out} (pic_000.png to pic_001.png)" in captured.out
    for i in range(2):
        with Image.open(out / f"pic_{i:03d}.png") as png:
            assert png.mode == "RGB" and png.size == (64, 64)
            written = np.asarray(png)
        expected = quantised(embedded.generate([PROMPT], seed=5 + i).images[0])
        assert np.array_equal(written, expected), i


def test_sample_settings_reach_the_pipeline(cli_uses, tmp_path, capsys):
    code = cli.main(["sample", "--prompt", PROMPT, "--n", "1", "--cfg", "3,3,4,4,5", "--tau", "0.7",
                     "--top-k", "1", "--top-p", "0.9", "--negative", "a yellow cross",
                     "--height", "64", "--width", "64", "--seed", "9", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    (call,) = cli_uses
    assert call["prompts"] == [PROMPT] and call["seed"] == 9
    settings = call["settings"]                                  # one SamplingSettings for the run
    assert settings.cfg == (3.0, 3.0, 4.0, 4.0, 5.0) and settings.tau == 0.7   # one number stays one
    assert settings.top_k == 1 and settings.top_p == 0.9
    assert call["negative_prompt"] == "a yellow cross"
    assert (call["height"], call["width"]) == (64, 64)


def test_unset_settings_are_left_to_the_model_and_a_blank_negative_is_none(cli_uses, embedded, tmp_path,
                                                                           capsys):
    assert cli.main(["sample", "--prompt", PROMPT, "--n", "1", "--negative", "   ",
                     "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    (call,) = cli_uses
    assert call["negative_prompt"] is None
    assert call["settings"] == embedded.sampling_settings()          # the model's defaults
    assert call["height"] is None and call["width"] is None


def test_sample_splits_n_into_batches_with_consecutive_seeds(cli_uses, tmp_path, capsys):
    assert cli.main(["sample", "--prompt", PROMPT, "--n", "5", "--batch", "2", "--seed", "10",
                     "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    assert [len(c["prompts"]) for c in cli_uses] == [2, 2, 1]
    assert [c["seed"] for c in cli_uses] == [10, 12, 14]         # seed + index of the batch's first image
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"sample_{i:03d}.png" for i in range(5)]


@pytest.mark.parametrize("flags, message", [
    (["--height", "-5", "--width", "-5"], "--height -5: must be a positive number of pixels"),
    (["--n", "-3"], "--n -3: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be between 0 and"),
    (["--stem", ".hidden"], "--stem '.hidden': give a file name prefix"),
    (["--stem", ""], "--stem '': give a file name prefix"),
    (["--top-k", "-1"], "--top-k -1: must be 0 (off), 1 (greedy) or 2"),
    (["--top-p", "-0.1"], "--top-p -0.1: must be between 0 and 1"),
    (["--tau", "0.5,0.5,0,0.5,0.5"], "--tau 0.5,0.5,0,0.5,0.5: the temperature must be > 0 on every scale"),
    (["--device", "meta"], "--device meta: VARE runs on cpu, cuda or mps"),
    (["--tokenizer", "tokenizer.json"], "--tokenizer: only for a checkpoint --model"),
])
def test_bad_sample_arguments_are_one_line_messages(cli_uses, flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["sample", "--prompt", PROMPT, "--n", "1", "--out", str(out)] + flags)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not cli_uses and not out.exists()                    # refused before anything was drawn


def test_a_program_error_is_not_hidden_as_a_message(monkeypatch, tmp_path):
    """Only user-facing errors become exit code 2: a real bug keeps its traceback."""
    def broken(args):
        raise RuntimeError("shape mismatch in block 3")
    monkeypatch.setattr(cli.sample, "cmd_sample", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["sample", "--prompt", "a circle", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- save_images

def test_save_images_writes_lossless_clamped_pngs(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 8, 6, 3, generator=g) * 1.4 - 0.2              # some values outside [0, 1]
    paths = common.save_images(images, tmp_path / "new" / "folder", "img")
    assert [p.name for p in paths] == ["img_000.png", "img_001.png"]
    for path, image in zip(paths, images):
        with Image.open(path) as png:
            assert png.size == (6, 8)
            assert np.array_equal(np.asarray(png), quantised(image))
    assert not list((tmp_path / "new" / "folder").glob("*.tmp"))


def test_save_images_numbers_after_existing_files_of_its_stem_only(tmp_path):
    images = torch.zeros(2, 4, 4, 3)
    common.save_images(images[:1], tmp_path, "other")                     # another stem: not counted
    first = common.save_images(images, tmp_path, "img")
    second = common.save_images(images, tmp_path, "img")
    assert [p.name for p in first + second] == [f"img_{i:03d}.png" for i in range(4)]
    replaced = common.save_images(torch.ones(1, 4, 4, 3), tmp_path, "img", overwrite=True)
    assert [p.name for p in replaced] == ["img_000.png"]
    assert len(list(tmp_path.glob("img_*.png"))) == 4
    with Image.open(tmp_path / "img_000.png") as png:
        assert np.asarray(png).min() == 255


# ----------------------------------------------------------------------------- sampling_kwargs

def test_sampling_kwargs_turn_flags_into_pipeline_settings():
    parser = cli.build_parser()

    def kwargs(*flags):
        return common.sampling_kwargs(parser.parse_args(["sample", "--prompt", "x", *flags]), 5)
    assert kwargs() == {}
    assert kwargs("--cfg", "4") == {"cfg": 4.0}
    assert kwargs("--cfg", "[1, 2, 3, 4, 5]", "--tau", "0.5 0.5 1 1 1") == {
        "cfg": [1.0, 2.0, 3.0, 4.0, 5.0], "tau": [0.5, 0.5, 1.0, 1.0, 1.0]}
    assert kwargs("--top-k", "0", "--top-p", "1") == {"top_k": 0, "top_p": 1.0}
    with pytest.raises(ValueError, match="--cfg: got 2 values for 5 scales"):
        kwargs("--cfg", "3,4")
