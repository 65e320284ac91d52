"""The benchmark scripts run in quick mode and print a full table of finite, positive numbers.

CI checks that they run, not how fast: timings on a shared CPU say little.
"""
import importlib.util
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def table_rows(output: str) -> list[list[str]]:
    """Body rows of the markdown table in `output`, as lists of cell strings."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, output
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_sample_speed_quick(capsys):
    rows = load_bench("sample_speed").main(["--quick"])
    out = capsys.readouterr().out
    assert "command: python bench/sample_speed.py --quick" in out
    table = table_rows(out)
    assert [r[1] for r in table] == ["ours (KV cache, batched CFG)", "ours, speed fast (Infinity's defaults)",
                                     "reference (no cache, 2-pass CFG)"]
    for row in table:
        seconds, tokens_per_s, peak = number(row[3]), number(row[4]), number(row[5])
        assert all(math.isfinite(v) and v > 0 for v in (seconds, tokens_per_s, peak)), row
    assert number(table[2][6]) > 99.0          # the reference draws the same codes
    assert 0 < number(table[1][6]) < 100.0     # fast draws other codes, not unrelated ones
    assert len(rows) == 3


def test_train_step_quick(capsys):
    bench = load_bench("train_step")
    rows = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "command: python bench/train_step.py --quick" in out
    table = table_rows(out)
    assert [(r[0], r[1], r[2]) for r in table] == [
        (train, precision, "on" if ckpt else "off") for train, precision, ckpt in bench.QUICK_ROWS]
    for row, result in zip(table, rows):
        assert "error" not in result, result     # fp16 autocast + GradScaler run on the CPU too
        step_s, peak = number(row[3]), number(row[4])
        assert math.isfinite(step_s) and step_s > 0 and peak > 0, row
        assert math.isfinite(number(row[5])), row


def test_train_step_reports_a_row_that_cannot_run():
    text = load_bench("train_step").format_table([
        {"train": "lora", "precision": "fp16", "checkpointing": True, "error": "RuntimeError: no kernel"}])
    assert "| lora | fp16 | on | - | - | - | cannot run: RuntimeError: no kernel |" in text


def test_load_quick(capsys):
    rows = load_bench("load").main(["--quick"])
    out = capsys.readouterr().out
    assert "command: python bench/load.py --quick" in out
    table = table_rows(out)
    assert [(r[0], r[1]) for r in table] == [("ours", ".pth"), ("naive", ".pth")]
    for row in table:   # quick rows share this process: memory columns are rough, not checked
        seconds, rss, anon = number(row[2]), number(row[3]), number(row[4])
        assert math.isfinite(seconds) and seconds > 0, row
        assert math.isfinite(rss) and math.isfinite(anon), row
    assert re.search(r"\(9\.2 M params", out) and len(rows) == 2


def test_our_loader_makes_no_fp32_copy(tmp_path):
    """In a fresh process, loading into bf16 adds about the bf16 weights to anonymous memory,
    far below the fp32 file: the file is memory-mapped and cast tensor by tensor."""
    bench = load_bench("load")
    cfg = bench.small_config()
    paths = bench.write_checkpoints(cfg, tmp_path)
    params = sum(math.prod(s) for s in bench.official_layout(cfg).values())
    args = SimpleNamespace(preset="small", dtype="bf16", device="cpu", threads=1)
    row = bench._run_isolated("ours", paths["pth"], args)
    assert "error" not in row, row
    assert 0 < row["anon_gib"] * 2**30 < params * 2 * 1.5      # bf16 = 2 bytes per parameter
    assert paths["pth"].stat().st_size > params * 4            # the file itself is fp32


def test_streamed_safetensors_file_is_valid(tmp_path):
    """The bench's own safetensors writer gives a file our loader reads in the official layout."""
    from vare_core.checkpoints import load_state_dict
    from vare_core.models.infinity import InfinityConfig
    from vare_core.models.presets import build_infinity
    bench = load_bench("load")
    cfg = InfinityConfig.tiny()
    layout = bench.official_layout(cfg)
    bench.write_safetensors_streaming(tmp_path / "m.safetensors", layout, seed=1)
    weights = load_state_dict(tmp_path / "m.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == layout
    assert any(k.startswith("block_chunks.1.module.1.") for k in weights)
    model = build_infinity(weights, dtype=torch.bfloat16)
    assert model.blocks[3].ffn.fc1.weight.dtype == torch.bfloat16
    assert 0.015 < float(weights["block_chunks.0.module.0.ffn.fc1.weight"].std()) < 0.025


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_erasure_seeds_runs_and_summarises(capsys):
    """bench/erasure_seeds.py: one JSON line per (pair, seed, cfg) after the original's, then
    markdown tables whose cells are the means of those lines (2 seeds, 2 steps, 4 samples: it
    runs, it does not measure)."""
    import json
    module = load_bench("erasure_seeds")
    rows = module.main(["--pairs", "circle:square", "--seeds", "0,1", "--cfgs", "4", "--samples", "4",
                        "--set", "steps=2", "--set", "lora_targets=ca,ffn", "--retain", "1"])
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines == json.loads(json.dumps(rows))
    assert [r["seed"] for r in lines] == ["original", 0, 1]
    assert lines[0]["same_picture"] == 1.0 and lines[0]["others_difference"] == 0.0
    trained = lines[1:]
    for key in module.KEYS:
        assert all(0.0 <= r[key] <= 1.0 for r in lines), key
    mean_acc_i = sum(r["ACC_i"] for r in trained) / 2
    erased_row = next(line for line in out.splitlines() if line.startswith("| cfg 4, erased"))
    assert f"| {100 * mean_acc_i:.1f} |" in erased_row
    assert '"lora_targets": ["ca", "ffn"]' in out and "circle -> square" in out


def test_memory_check_quick(capsys):
    # the plan against two real CPU runs (fresh processes); the full run is in docs/memory.md
    worst = load_bench("memory_check").main(["--quick"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert len(rows) == 2 and all(number(row[5]) > 0 and number(row[6]) > 0 for row in rows)
    assert "max error:" in out and worst <= 0.20


def test_gpu_check_quick_on_cpu(capsys):
    # the GPU script's code path on a tiny model: every row runs and is planned
    rows = load_bench("gpu_check").main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    table = table_rows(out)
    assert len(table) == len(rows) == 5
    measured = [line[len("measured: "):] for line in out.splitlines() if line.startswith("measured: |")]
    assert measured == [line for line in out.splitlines() if line.startswith("|")][2:]   # each row at once
    assert all(r["seconds"] > 0 and r["plan"] > 0 and r["peak"] is None for r in rows)
    assert "speed fast" in out
    assert "S-VARE erasure, defaults (lora, split passes)" in out and "DDP (NCCL): skipped" in out
    assert "Concept Guard (2 scales)" in out


def test_preview_speed_quick(capsys):
    load_bench("preview_speed").main(["--quick"])
    out = capsys.readouterr().out
    assert "command: python bench/preview_speed.py --quick" in out
    table = table_rows(out)
    assert [r[0] for r in table] == ["full size", "preview size"]
    assert all(number(c) > 0 and math.isfinite(number(c)) for r in table for c in r[1:])


def test_same_picture_sensitivity_is_exact_without_noise_and_drops_with_it(capsys):
    load_bench("same_picture_sensitivity").main(["--samples", "4", "--sigmas", "0,1.0"])
    rows = re.findall(r"^\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", capsys.readouterr().out, re.M)
    assert [float(r[0]) for r in rows] == [0.0, 1.0]
    (_, same_clean, diff_clean), (_, same_noisy, diff_noisy) = rows
    assert float(same_clean) == 100.0 and float(diff_clean) == 0.0
    assert float(same_noisy) < 100.0 and float(diff_noisy) > 0.0


def test_embedded_misses_counts_every_image_and_flags_what_a_judge_rejects(capsys, monkeypatch):
    bench = load_bench("embedded_misses")
    bench.main(["--seeds", "0", "--samples", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "20 images, " in out and "seed 0: " in out
    per_code = re.findall(r"\(\d, \d\) (\d+)/(\d+)", out.splitlines()[-1])
    assert sum(int(total) for _, total in per_code) == 20
    # a judge that reads no shape: every image is a miss, on every prompt
    judge = bench.judge_images
    monkeypatch.setattr(bench, "judge_images", lambda images: [dict(j, shape=None) for j in judge(images)])
    bench.main(["--seeds", "0", "--samples", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "20 images, 20 misses; every prompt 1 of 1 on 0 of 1 seeds" in out
    assert out.count("miss: seed 0") == 20
    assert sum(int(missed) for missed, _ in re.findall(r"\(\d, \d\) (\d+)/(\d+)", out.splitlines()[-1])) == 20


def test_fast_sampling_speed_part_reports_every_knob(capsys):
    # the speed part on a one-block model at the smallest schedule: every variant runs, the
    # exact row agrees with itself and the budget row's cache is the budget's share
    load_bench("fast_sampling").main(["--part", "speed", "--depth", "1", "--width", "64",
                                      "--preset", "0.06M", "--repeats", "1"])
    rows = {row[0]: row for row in table_rows(capsys.readouterr().out)}
    assert set(rows) == {"exact", "unguided_scales=2", "pruned_scales=3, keep_share=(0.5, 0.4, 0.3)",
                         "kv_budget=0.2", "fast (all)"}
    assert rows["exact"][5] == "100.0 / 100.0" and rows["exact"][3].endswith("(1.00)")
    assert number(rows["kv_budget=0.2"][3].split("(")[1].rstrip(")")) <= 0.25


def test_official_speed_profile_splits_linear_attention_and_the_rest():
    import torch.nn.functional as F
    split = load_bench("official_speed").op_profile({
        "linear": lambda: F.linear(torch.randn(256, 256), torch.randn(256, 256), torch.randn(256)),
        "attention": lambda: F.scaled_dot_product_attention(*torch.randn(3, 1, 2, 128, 32)),
    })
    assert split["linear"]["linear"] > 0 and split["linear"]["attention"] == 0
    assert split["attention"]["attention"] > 0 and split["attention"]["linear"] == 0
    assert all(part["other"] >= 0 for part in split.values())


def test_sampling_peak_measures_a_fresh_process(capsys):
    """bench/sampling_peak.py: a real peak from a fresh process (the sampler's memory, more than
    the images alone) under the request estimate; it runs, it does not measure."""
    found = load_bench("sampling_peak").main(["--images", "4", "--runs", "1"])
    assert len(found["peaks"]) == 1 and 4 * 64 * 64 * 3 * 4 < found["peaks"][0] < found["need"]
    assert 4 * 64 * 64 * 3 * 4 < found["tensors"] < found["need"]
    out = capsys.readouterr().out
    assert "| tensors | 4 | 1 |" in out and "| default | 4 | 1 |" in out
