"""`--guard CONCEPT:ANCHOR` and its flags on `sample` and `evaluate`."""
import json

import numpy as np
import pytest
from PIL import Image

import vare_core.cli as main_cli
from vare_core.cli.guard_args import parse_guard_pair

SAMPLE = ["sample", "--model", "embedded", "--prompt", "a red circle on a white background", "--n", "2"]


@pytest.mark.parametrize("extra, message", [
    (["--guard", "circle"], "write CONCEPT:ANCHOR"),
    (["--guard", ":square"], "write CONCEPT:ANCHOR"),
    (["--guard", "circle: "], "write CONCEPT:ANCHOR"),
    (["--guard-penalty", "2"], "also give --guard CONCEPT:ANCHOR"),
    (["--guard", "circle:square", "--guard-token-threshold", "2"], "--guard-token-threshold must be a number from 0 to 1"),
    (["--guard", "circle:square", "--guard-scales", "0"], "--guard-scales must be an integer >= 1"),
    (["--guard", "circle:square", "--guard-blocks", "1,x"], "--guard-blocks '1,x': give block indices"),
    (["--guard", "circle:square", "--guard-blocks", "9"], "this model has blocks 0 to 3"),
    (["--guard", "circle:square", "--guard-penalty", "nan"], "--guard-penalty must be a number >= 0"),
    (["--guard", "x" * 1001 + ":square"], "shorten it"),
    (sum((["--guard", f"c{i}:s"] for i in range(9)), []), "at most 8 concepts"),
])
def test_malformed_guard_flags_are_clear_messages(tmp_path, capsys, extra, message):
    assert main_cli.main(SAMPLE + ["--out", str(tmp_path / "out")] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_parse_keeps_colons_in_the_anchor():
    assert parse_guard_pair(" nudity : a person: clothed ") == ("nudity", "a person: clothed")


def test_sample_with_a_guard_draws_the_anchor(tmp_path, capsys):
    plain, guard = tmp_path / "plain", tmp_path / "guard"
    assert main_cli.main(SAMPLE + ["--out", str(plain)]) == 0
    assert main_cli.main(SAMPLE + ["--out", str(guard), "--guard", "circle:square", "--guard-penalty", "3"]) == 0
    assert "guard circle -> square" in capsys.readouterr().out
    for name in ("sample_000.png", "sample_001.png"):
        a, b = (np.asarray(Image.open(folder / name)) for folder in (plain, guard))
        assert a.shape == b.shape and not np.array_equal(a, b)


def test_evaluate_adds_a_guarded_side(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\na red circle on a white background\na blue square\n")
    out = tmp_path / "eval"
    assert main_cli.main(["evaluate", "--model", "embedded", "--prompts", str(prompts), "--judge", "shapes",
                          "--concept", "circle", "--out", str(out), "--guard", "circle:square"]) == 0
    assert len(list((out / "images" / "guarded").glob("*.png"))) == 2
    results = json.loads((out / "results.json").read_text())
    assert set(results["sides"]) == {"base", "guarded"} and results["settings"]["guard"]["concepts"] == [["circle", "square"]]
    assert "with guard" in (out / "results.md").read_text()
    # other guard settings are another evaluation: refused, not mixed
    assert main_cli.main(["evaluate", "--model", "embedded", "--prompts", str(prompts), "--judge", "shapes",
                          "--concept", "circle", "--out", str(out), "--guard", "circle:square",
                          "--guard-penalty", "1"]) == 2


def test_plan_counts_the_guard_and_refuses_it_without_sampling(capsys):
    plan = ["plan", "--model", "embedded", "--height", "64", "--width", "64", "--device", "cpu"]
    assert main_cli.main(plan + ["--guard", "circle:square"]) == 2
    assert "add --sample" in capsys.readouterr().err
    assert main_cli.main(plan + ["--sample", "--guard", "circle:square", "--guard", "cross:triangle"]) == 0
    assert "Concept Guard: 4 extra rows per image on 5 of 5 scales" in capsys.readouterr().out
