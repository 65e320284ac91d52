"""The method benchmark (bench/erasure_methods.py, method_ranking.py): its summary and target
report on hand-built rows, and a reduced run of every method on two pairs."""
import json
import math

import pytest

import erasure_methods
from vare_core.evaluation.shapes_world import fidelity as ranking_fidelity
from vare_core.evaluation.shapes_world import method_ranking as ranking


def _row(method, cfg, pair="circle>square", seed=0, **scores):
    base = {key: 1.0 for key, _ in ranking.FIDELITY}
    base.update(ACC_e_main=1.0 if method == "original" else 0.0, ACC_e_synonym=1.0 if method == "original" else 0.0,
                ACC_e_context=1.0 if method == "original" else 0.0)
    base.update(scores)
    return {"pair": pair, "method": method, "seed": seed, "cfg": cfg, **base, "sample_seconds": 1.0,
            "time_ratio": 1.0 if method == "original" else 1.2, "sample_peak_MiB": 100.0}


def test_summary_means_over_pairs_and_the_targets_say_by_how_much():
    rows = [_row("original", 4.0), _row("original", 4.0, pair="triangle>cross"),
            _row("guard", 4.0, same_picture=0.9), _row("guard", 4.0, pair="triangle>cross", same_picture=1.0,
                                                       ACC_e_main=0.1)]
    rows += [{"pair": "circle>square", "method": m, "seed": 0, "attacks": {"synonyms": a, "no shape named": 0.5}}
             for m, a in (("original", 1.0), ("guard", 0.0))]
    summary = ranking.summarize(rows, ["guard"])
    guard = summary["methods"]["guard"]
    assert guard["by_cfg"][4.0]["same_picture"] == pytest.approx(0.95)
    assert guard["by_cfg"][4.0]["ACC_e_main"] == pytest.approx(0.05) and guard["attacks"]["synonyms"] == 0.0
    assert math.isnan(guard["train_seconds"]) and guard["time_ratio"] == pytest.approx(1.2)
    report = ranking.target_report(summary)
    assert "- guard: ACC_e_main at cfg 4 <= 5%: met" in report
    assert "- guard: same picture at cfg 4 >= 95%: met" in report
    rows[2]["same_picture"] = 0.8                 # mean 0.9: 5 points short
    report = ranking.target_report(ranking.summarize(rows, ["guard"]))
    assert "- guard: same picture at cfg 4 >= 95%: missed by 5.0 points" in report
    table = ranking.format_tables(ranking.summarize(rows, ["guard"]))
    assert "| guard | 4 | 5.0 |" in table and "| guard | 0.0 | 50.0 | - | x1.20 |" in table


def test_bad_arguments_are_messages(tmp_path, capsys):
    assert erasure_methods.main(["--pairs", "circle:circle", "--out", str(tmp_path)]) == 2
    assert "two different shapes" in capsys.readouterr().err
    assert erasure_methods.main(["--pairs", "circle:square", "--methods", "magic", "--out", str(tmp_path)]) == 2
    assert "choose from" in capsys.readouterr().err
    assert erasure_methods.main(["--pairs", "circle:square", "--speed", "quick", "--out", str(tmp_path)]) == 2
    assert "speed must be one of exact, fast" in capsys.readouterr().err


def test_speed_fast_samples_the_erased_model_fast_against_exact_references(tmp_path, monkeypatch):
    seen = []
    sample_sets = ranking_fidelity.sample_sets

    def recording(pipe, *args, **kwargs):
        seen.append(pipe.sampling_settings().speed)
        return sample_sets(pipe, *args, **kwargs)
    monkeypatch.setattr(ranking_fidelity, "sample_sets", recording)
    args = ["--pairs", "circle:square", "--methods", "guard", "--seeds", "0", "--cfg", "4", "--samples", "4",
            "--attack-samples", "1", "--timing-repeats", "1", "--timing-images", "4", "--speed", "fast",
            "--out", str(tmp_path)]
    assert erasure_methods.main(args) == 0
    assert seen[0] == "exact" and set(seen[1:]) == {"fast"}    # the reference, then every erased model
    rows = json.loads((tmp_path / "pairs" / "circle_square_guard.json").read_text())
    assert rows["settings"]["speed"] == "fast"


@pytest.mark.slow
def test_every_method_on_two_pairs_at_reduced_samples(tmp_path):
    """The CI row: every method trains (5 steps), samples and is attacked; the guard, which needs
    no training, already erases; a second run resumes from the files."""
    args = ["--pairs", "circle:square,triangle:cross", "--seeds", "0", "--cfg", "4", "--samples", "4",
            "--attack-samples", "4", "--steps", "5", "--timing-repeats", "1", "--timing-images", "8",
            "--out", str(tmp_path)]
    assert erasure_methods.main(args) == 0
    result = json.loads((tmp_path / "methods.json").read_text())
    summary = result["summary"]["methods"]
    assert set(summary) == {"original", *ranking.METHODS}
    assert all(entry["pairs"] == ["circle>square", "triangle>cross"] for entry in summary.values())
    assert summary["guard"]["all_cfgs"]["ACC_e_main"] < 0.5 < summary["original"]["all_cfgs"]["ACC_e_main"]
    assert summary["svare"]["train_seconds"] > 0 and math.isnan(summary["guard"]["train_seconds"])
    assert len(list((tmp_path / "adapters").glob("*.safetensors"))) == 2 * len(ranking.TRAINED)
    done = sorted((tmp_path / "pairs").glob("*.json"))
    assert len(done) == 2 * (1 + len(ranking.METHODS))
    before = [path.stat().st_mtime_ns for path in done]
    assert erasure_methods.main(args) == 0                       # resumed: nothing rerun
    assert [path.stat().st_mtime_ns for path in done] == before
    assert "guard + adapter" in (tmp_path / "methods.md").read_text()
