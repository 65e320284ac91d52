"""The shipped embedded model: loads by name through the normal loaders, meets its quality bar
(reduced sample count), the CLI samples with it, and the demo runs end to end."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vare_core.embedded import spec
from vare_core.pipeline import load_pipeline

REPO = spec.WEIGHTS_DIR.parents[2]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("embedded", device="cpu")


def test_weights_are_small_and_load_with_the_normal_loaders(pipe):
    total = sum(f.stat().st_size for f in spec.WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total <= 40 * 2**20
    assert pipe.name == "embedded" and pipe.preset == "embedded"
    assert pipe.resolutions() == [(64, 64)]
    info = json.loads((spec.WEIGHTS_DIR / spec.INFO_FILE).read_text())
    assert info["training"]["seed"] == 0


def test_same_seed_same_image_and_prompt_matters(pipe):
    a = pipe.generate(["a red circle on a white background"] * 2, seed=5).images
    b = pipe.generate(["a red circle on a white background"] * 2, seed=5).images
    c = pipe.generate(["a blue square on a black background"] * 2, seed=5).images
    assert a.shape == (2, 64, 64, 3) and torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05


@pytest.mark.slow
def test_quality_bar_reduced(pipe):
    """The README's bar (shape >= 90%, colour >= 90%, style >= 85%, synonyms within 5 points)
    measured on 8 samples per (shape, colour) instead of 32; margins are stated per check."""
    from vare_core.embedded.classifier import load_classifier
    from vare_core.embedded.evaluate import evaluate
    result = evaluate(pipe, load_classifier(), samples=8, seed=4242)
    assert result["shape"] >= 0.88          # 2-point margin for the small sample
    assert result["color"] >= 0.88
    assert result["style"] >= 0.82
    assert result["synonym_shape"] >= result["shape"] - 0.08
    # variety of what the prompt leaves open is reported (the shipped model's is a known limit,
    # README "The embedded model"; the model-v2 issue sets its targets)
    shares = result["variety"]["backgrounds"]
    assert set(shares) == {"white", "black", "gray"} and 0.9 <= sum(shares.values()) <= 1 + 1e-6   # None: unreadable
    assert 0 <= result["variety"]["centre_spread"] < 0.5 and 0 <= result["variety"]["size_spread"] < 0.5
    # the geometric judge beside the classifier, named backgrounds, cleanliness
    assert result["shape_both"] <= min(result["shape"], result["shape_geometric"])
    assert result["shape_geometric"] >= 0.6 and result["color_geometric"] >= 0.85
    assert result["background_named"] >= 0.9
    clean = result["cleanliness"]
    assert 0 <= clean["clean"] <= clean["intact"] <= 1 and 0 <= clean["stray"] <= 1


def test_vae_reference_is_clean_and_the_judge_sees_damage(pipe):
    """The cleanliness ceiling: the world's renders through the model's VAE judge clean; the
    same measure fails a VAE whose decoder is damaged."""
    import copy
    from vare_core.embedded.evaluate import vae_reference
    reference = vae_reference(pipe.vae, n=48)
    assert reference["intact"] >= 0.97 and reference["stray"] <= 0.01
    damaged = copy.deepcopy(pipe.vae)
    with torch.no_grad():
        for p in damaged.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert vae_reference(damaged, n=48)["intact"] < 0.5


def test_variety_of_the_training_data():
    """The reference the model's variety is measured against: the world's own renders."""
    from vare_core.embedded.evaluate import data_variety
    data = data_variety(n=300)
    assert all(0.25 <= share <= 0.42 for share in data["backgrounds"].values())
    assert 0.09 <= data["centre_spread"] <= 0.14 and 0.09 <= data["size_spread"] <= 0.15


def test_cli_sample_writes_pngs(tmp_path):
    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, "-m", "vare_core", "sample", "--model", "embedded", "--prompt",
                           "a red circle on a white background", "--n", "3", "--seed", "0", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.glob("*.png"))
    assert len(files) == 3
    image = np.asarray(Image.open(files[0]))
    assert image.shape == (64, 64, 3) and image.std() > 10


def test_cli_bad_input_is_a_message_not_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vare_core", "sample", "--model", "embedded", "--prompt",
                           "a circle", "--cfg", "3,4", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--cfg" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_runs_and_writes_a_real_grid(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vare_core", "demo", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    grid = np.asarray(Image.open(tmp_path / "demo_grid.png"))
    assert grid.shape[0] > 200 and grid.std() > 20
    report = (tmp_path / "demo_report.md").read_text()
    assert "after" in report and "circle" in report
