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
from vare_core.generation.pipeline import load_pipeline

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
    # v2.2: base + two decoder passes + transformer fine-tune, one command (embedded/training/recipe.py)
    assert {"recipe", "base", "decoder", "decoder_hard", "transformer"} <= set(info["training"])


def test_same_seed_same_image_and_prompt_matters(pipe):
    a = pipe.generate(["a red circle on a white background"] * 2, seed=5).images
    b = pipe.generate(["a red circle on a white background"] * 2, seed=5).images
    c = pipe.generate(["a blue square on a black background"] * 2, seed=5).images
    assert a.shape == (2, 64, 64, 3) and torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05


@pytest.mark.slow
def test_quality_bar_reduced(pipe):
    """Embedded model v2.2's targets (docs/embedded_model.md), measured on 8 samples per
    (shape, colour) instead of 32; the margins are for the smaller sample (160 images: one
    image is 0.6 points)."""
    from vare_core.evaluation.judges.classifier import load_classifier
    from vare_core.evaluation.shapes_world.model_quality import data_variety, evaluate
    result = evaluate(pipe, load_classifier(), samples=8, seed=4242)
    # shape and colour as prompted, by the classifier and by the geometric judge
    assert result["shape"] >= 0.97 and result["color"] >= 0.97
    assert result["synonym_shape"] >= 0.97 and result["synonym_color"] >= 0.97
    # geometric shape: 99.5-100% on five score seeds at 32 samples (v2: 98.3%); 4 images of margin
    assert result["shape_geometric"] >= 0.97 and result["color_geometric"] >= 0.97
    # every prompt: v2.2 misses 0-3 of 640 images at 32 samples; at 8 one image of margin
    assert result["worst_combo_shape_geometric"][1][0] >= 7 / 8, result["worst_combo_shape_geometric"]
    assert result["shape_both"] <= min(result["shape"], result["shape_geometric"])
    assert result["style"] >= 0.95 and result["background_named"] >= 0.95
    # variety of what the prompt leaves open: each background 20-47% (5-point margin), the
    # shape's centre and size spread near the data's
    shares = result["variety"]["backgrounds"]
    assert set(shares) == {"white", "black", "gray"}
    assert all(0.15 <= share <= 0.52 for share in shares.values()), shares
    data = data_variety(n=300)
    assert result["variety"]["centre_spread"] >= 0.07
    assert abs(result["variety"]["size_spread"] - data["size_spread"]) <= 0.35 * data["size_spread"]
    # clean pictures: within 10% of the VAE's own renders (intact 100%, stray 0); measured
    # intact 99.2-100% at 32 samples, so 4 images of margin
    clean = result["cleanliness"]
    assert clean["intact"] >= 0.97 and clean["stray"] <= 0.02
    assert 0 <= clean["clean"] <= clean["intact"]


def test_vae_reference_is_clean_and_the_judge_sees_damage(pipe):
    """The cleanliness ceiling: the world's renders through the model's VAE judge clean; the
    same measure fails a VAE whose decoder is damaged."""
    import copy
    from vare_core.evaluation.shapes_world.model_quality import vae_reference
    reference = vae_reference(pipe.vae, n=48)
    assert reference["intact"] >= 0.97 and reference["stray"] <= 0.01
    damaged = copy.deepcopy(pipe.vae)
    with torch.no_grad():
        for p in damaged.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert vae_reference(damaged, n=48)["intact"] < 0.5


def test_vae_draws_small_yellow_crosses_on_gray_as_crosses(pipe):
    """The hardest case for the decoder (the dark stripe shade of yellow is near gray): v2.1's
    decoder drew 22% of small yellow crosses on gray as four-point stars; v2.2's hard-example
    pass (train.py --decoder-hard) draws about 2%. Measured here on 50 renders: 3 misses allowed."""
    from vare_core.evaluation.judges.geometry import judge_images
    from vare_core.embedded.training.train import to_model_images
    from vare_core.embedded.world import Scene, render
    from vare_core.models.bsq_quant import summed_codes_from_bits
    from vare_core.generation.sampler import decode_images
    rng = np.random.default_rng(0)
    scenes = []
    for _ in range(50):
        size = int(rng.integers(26, 38))
        low, high = size / 2 + 1, 64 - size / 2 - 1
        scenes.append(Scene("cross", "yellow", "gray", ("solid", "striped")[int(rng.integers(2))], size,
                            float(rng.uniform(low, high)), float(rng.uniform(low, high))))
    renders = np.stack([render(s) for s in scenes])
    with torch.no_grad():
        bits = pipe.vae.encode_bits(to_model_images(renders), spec.SCHEDULE)
        drawn = decode_images(pipe.vae, summed_codes_from_bits(bits, spec.SCHEDULE[-1]))
    assert [j["shape"] for j in judge_images(renders)] == ["cross"] * 50
    assert sum(j["shape"] == "cross" for j in judge_images(drawn)) >= 47


def test_variety_of_the_training_data():
    """The reference the model's variety is measured against: the world's own renders."""
    from vare_core.evaluation.shapes_world.model_quality import data_variety
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


def test_the_demo_trains_the_default_adapter_the_slow_tests_judge():
    from conftest import default_training_inputs
    from vare_core import demo
    from vare_core.generation.pipeline import load_pipeline
    pipe = load_pipeline("embedded", device="cpu")
    assert demo.training_inputs(pipe) == default_training_inputs(pipe, demo.CONCEPT, demo.ANCHOR)
    assert (demo.CONCEPT, demo.ANCHOR) == ("circle", "square")
    assert demo.training_inputs(pipe, steps=2)[1].steps == 2


def test_demo_runs_and_writes_a_real_grid(tmp_path):
    """The demo's command and files. Two training steps: its adapter at the default steps is the
    family's default circle -> square adapter, which test_attacks and test_erasure_bench judge."""
    proc = subprocess.run([sys.executable, "-m", "vare_core", "demo", "--out", str(tmp_path), "--thumbnails",
                           "--steps", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    grid = np.asarray(Image.open(tmp_path / "demo_grid.png"))
    assert grid.shape[0] > 200 and grid.std() > 20
    report = (tmp_path / "demo_report.md").read_text()
    assert "after" in report and "circle" in report
    for name in ("vare_embedded_text_to_image", "vare_load_and_apply_adapter"):    # the templates' pictures
        with Image.open(tmp_path / "workflows" / f"{name}.jpg") as picture:
            assert picture.format == "JPEG" and np.asarray(picture).std() > 20
