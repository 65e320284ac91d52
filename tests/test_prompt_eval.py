"""`python -m vare_core evaluate`: CSV reading (I2P's columns), same seeds on both sides, resume,
the results table; end to end on the embedded model with the shapes judge."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


from vare_core.embedded import spec
from vare_core.erasure.adapters import FORMAT_VERSION, Adapter, apply_adapter, save_adapter
from vare_core.erasure.trainable import lora_layer_names
from vare_core.evaluation.judges import make_judge
from vare_core.generation.pipeline import load_pipeline
from vare_core.evaluation.prompt_eval import evaluate_prompt_set, read_prompt_rows, results_table

REPO = spec.WEIGHTS_DIR.parents[2]
CSV = "prompt,sd_seed,sd_guidance_scale,categories\na red circle on a white background,7,,shapes\na blue disc,,3.5,shapes\n"


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("embedded", device="cpu")


def random_lora(pipe, scale: float) -> Adapter:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in lora_layer_names(pipe.model, ("ca",)):
        out_f, in_f = pipe.model.get_submodule(layer).weight.shape
        tensors[f"{layer}.lora_A"] = torch.randn(4, in_f, generator=gen) * scale
        tensors[f"{layer}.lora_B"] = torch.randn(out_f, 4, generator=gen) * scale
    return Adapter(tensors, {"format": FORMAT_VERSION, "train": "lora", "base_fingerprint": pipe.fingerprint,
                             "concepts": ["circle"], "method": "svare"})


def test_rows_read_i2p_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(CSV)
    rows = read_prompt_rows(path, seed=100)
    assert rows == [{"prompt": "a red circle on a white background", "seed": 7, "cfg": None},
                    {"prompt": "a blue disc", "seed": 101, "cfg": 3.5}]
    for text, message in (("text\nhello\n", "'prompt' column"), ("prompt\n\n", "no prompts"),
                          ("prompt,sd_seed\na cat,x\n", "line 2: sd_seed 'x'"), ("prompt\n \n", "line 2")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_prompt_rows(path, 0)


def test_same_seeds_resume_and_table(pipe, tmp_path, monkeypatch):
    rows = [{"prompt": "a red circle on a white background", "seed": 3, "cfg": None},
            {"prompt": "a green square", "seed": 4, "cfg": 2.0}]
    judge = make_judge("shapes", concept="circle")
    settings = {"judge": "shapes", "rows": 2, "n_per_prompt": 2, "seed": 0, "prompts": "test"}
    calls = []

    def counted(p):
        original = p.generate

        def generate(prompts, **kwargs):
            calls.append((prompts[0], kwargs.get("seed"), kwargs.get("cfg")))
            return original(prompts, **kwargs)
        monkeypatch.setattr(p, "generate", generate)
        return p

    # strength 0: the adapter side must give the very same pictures (same seeds, same settings)
    pipes = {"base": counted(pipe), "adapter": counted(apply_adapter(pipe, random_lora(pipe, 0.2), 0.0))}
    summary = evaluate_prompt_set(pipes, rows, judge, tmp_path, 2, settings)
    assert sorted(calls) == sorted([("a red circle on a white background", 3, None), ("a green square", 4, 2.0)] * 2)
    for name in ("00000_00", "00000_01", "00001_00", "00001_01"):
        base = np.asarray(Image.open(tmp_path / "images" / "base" / f"{name}.png"))
        adapted = np.asarray(Image.open(tmp_path / "images" / "adapter" / f"{name}.png"))
        assert np.array_equal(base, adapted)
    assert summary["sides"]["base"]["images"] == 4 and summary["sides"]["base"]["flagged"] == 2
    assert summary["sides"]["base"]["detections"] == {"circle": 2} and summary["sides"]["base"]["flagged_rows"] == [0]
    table = (tmp_path / "results.md").read_text()
    assert "| circle | 2 | 2 |" in table and "without adapter" in table and "2 of 4 (50.0%)" in table
    assert json.loads((tmp_path / "results.json").read_text())["sides"]["adapter"]["flagged"] == 2

    # resume: nothing is sampled again; a missing verdict is sampled alone
    calls.clear()
    assert evaluate_prompt_set(pipes, rows, judge, tmp_path, 2, settings) == summary and calls == []
    state_file = tmp_path / "verdicts.jsonl"
    lines = state_file.read_text().splitlines(keepends=True)
    assert len(lines) == 1 + 4 and json.loads(lines[-1])["key"] == "adapter/1"
    state_file.write_text("".join(lines[:-1]) + lines[-1][:20])        # the last row cut short by a crash
    assert evaluate_prompt_set(pipes, rows, judge, tmp_path, 2, settings) == summary
    assert calls == [("a green square", 4, 2.0)]
    assert [json.loads(line)["key"] for line in state_file.read_text().splitlines()[1:]] == \
        ["base/0", "base/1", "adapter/0", "adapter/1"]
    # another run's folder is not mixed in
    with pytest.raises(ValueError, match="other settings.*n_per_prompt"):
        evaluate_prompt_set(pipes, rows, judge, tmp_path, 1, {**settings, "n_per_prompt": 1})


def test_results_table_layout():
    summary = {"settings": {"judge": "nudenet", "rows": 3, "n_per_prompt": 1, "seed": 0, "prompts": "i2p.csv"},
               "classes": ["BELLY_EXPOSED", "FEET_EXPOSED"],
               "sides": {"base": {"images": 3, "flagged": 2, "detections": {"BELLY_EXPOSED": 4, "FEET_EXPOSED": 1}},
                         "adapter": {"images": 3, "flagged": 0, "detections": {"BELLY_EXPOSED": 0, "FEET_EXPOSED": 0}}}}
    table = results_table(summary)
    assert "| BELLY_EXPOSED | 4 | 0 |" in table and "| **total detections** | 5 | 0 |" in table
    assert "| images flagged | 2 of 3 (66.7%) | 0 of 3 (0.0%) |" in table


def test_cli_end_to_end_with_an_adapter(pipe, tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(CSV)
    adapter = tmp_path / "a.safetensors"
    save_adapter(random_lora(pipe, 0.2), adapter)
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "vare_core", "evaluate", "--model", "embedded", "--prompts", str(prompts),
               "--judge", "shapes", "--concept", "circle", "--n-per-prompt", "2", "--seed", "0",
               "--adapter", str(adapter), "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "with adapter" in proc.stdout and (out / "results.md").is_file()
    assert len(list((out / "images" / "adapter").glob("*.png"))) == 4
    # a changed adapter file is another evaluation: refused, not mixed
    save_adapter(random_lora(pipe, 0.3), adapter)
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "adapter_sha256" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("extra, message", [
    (["--judge", "shapes"], "needs --concept"),
    (["--judge", "shapes", "--concept", "dog"], "--concept"),
    (["--judge", "shapes", "--concept", "circle", "--threshold", "0.5"], "--threshold is the nudenet"),
    (["--judge", "nudenet", "--threshold", "2"], "--threshold"),
    (["--judge", "shapes", "--concept", "circle", "--n-per-prompt", "0"], "--n-per-prompt"),
])
def test_cli_bad_input_is_a_message(tmp_path, capsys, extra, message):
    from vare_core.cli import main
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(CSV)
    args = ["evaluate", "--prompts", str(prompts), "--out", str(tmp_path / "o")] + extra
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_names_the_missing_judge_package(tmp_path, capsys, monkeypatch):
    """Checked before the model loads: the message says what to install, no traceback."""
    from vare_core.cli import main
    from vare_core.evaluation.judges import nudity

    def missing():
        raise nudity.MissingJudge(nudity.INSTALL_HINT)
    monkeypatch.setattr(nudity, "load_detector", missing)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(CSV)
    assert main(["evaluate", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--judge", "nudenet"]) == 2
    err = capsys.readouterr().err
    assert "pip install -r requirements-nudenet.txt" in err and "Traceback" not in err
