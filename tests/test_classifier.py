"""The shipped shapes classifier: accuracy on fresh and degraded renders, input handling, files."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from vare_core.evaluation.judges.classifier import (LABELS, ClassifierConfig, ShapesClassifier, classify,
                                                    load_classifier, read_metadata, save_classifier)
from vare_core.embedded.training.train_classifier import degrade
from vare_core.embedded.world import make_dataset, render, Scene

FRESH_SEED = 20240611  # never used by training (which draws from SeedSequence([seed, 0/1]))
ATTRIBUTES = ("shape", "color", "style", "background")


@pytest.fixture(scope="module")
def model():
    return load_classifier()


@pytest.fixture(scope="module")
def fresh():
    images, _, scenes = make_dataset(500, seed=FRESH_SEED)
    return images, scenes


def accuracy(model, images, scenes) -> dict[str, float]:
    results = classify(model, images)
    return {k: float(np.mean([r[k] == getattr(s, k) for r, s in zip(results, scenes)]))
            for k in ATTRIBUTES}


def blur_and_noise(images: np.ndarray, seed: int) -> np.ndarray:
    """Degradation independent of the training augmentation: PIL Gaussian blur + pixel noise."""
    rng = np.random.default_rng(seed)
    out = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1.2)))
                    for im in images]).astype(np.float32) / 255
    return np.clip(out + rng.normal(0, 0.05, out.shape).astype(np.float32), 0, 1)


def test_accuracy_on_fresh_renders(model, fresh):
    scores = accuracy(model, *fresh)
    assert all(score >= 0.98 for score in scores.values()), scores


def test_accuracy_on_blurred_noisy_renders(model, fresh):
    images, scenes = fresh
    degraded = blur_and_noise(images, seed=1)
    assert np.abs(degraded - images / 255).mean() > 0.03  # really degraded
    scores = accuracy(model, degraded, scenes)
    assert all(score >= 0.95 for score in scores.values()), scores


def test_classify_accepts_comfy_floats_uint8_and_other_sizes(model, fresh):
    images, scenes = fresh[0][:16], fresh[1][:16]
    from_uint8 = classify(model, images)
    from_float = classify(model, torch.from_numpy(images).float() / 255)
    assert [r["shape"] for r in from_uint8] == [r["shape"] for r in from_float]
    big = torch.from_numpy(np.stack([render(s, size=128) for s in scenes])).float() / 255
    assert [r["shape"] for r in classify(model, big)] == [s.shape for s in scenes]
    single = classify(model, images[0])
    assert len(single) == 1 and set(single[0]) == set(ATTRIBUTES) | {"confidence"}
    assert all(0 < p <= 1 for p in single[0]["confidence"].values())
    with pytest.raises(ValueError, match="B, H, W, 3"):
        classify(model, np.zeros((2, 3, 64, 64), dtype=np.uint8))


def test_confident_on_a_clean_render(model):
    result = classify(model, render(Scene("triangle", "purple", "gray", "striped", 40, 30.0, 34.0)))
    assert {k: result[0][k] for k in ATTRIBUTES} == {
        "shape": "triangle", "color": "purple", "style": "striped", "background": "gray"}
    assert min(result[0]["confidence"].values()) > 0.9


def test_shipped_file_is_small_with_metadata():
    from vare_core.evaluation.judges.classifier import DEFAULT_WEIGHTS
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    metadata = read_metadata(DEFAULT_WEIGHTS)
    assert metadata["format"] == "vare-shapes-classifier" and metadata["version"] == "1"
    assert metadata["seed"] == "0" and "heldout_degraded" in metadata


def test_save_load_round_trip_and_errors(tmp_path):
    model = ShapesClassifier(ClassifierConfig(channels=(4, 8))).eval()
    path = tmp_path / "tiny.safetensors"
    save_classifier(model, path, {"note": "test"})
    loaded = load_classifier(path)
    batch = torch.rand(3, 3, 64, 64)
    for name in LABELS:
        assert torch.equal(model(batch)[name], loaded(batch)[name])
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        load_classifier(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
    with pytest.raises(ValueError, match="not a shapes classifier"):
        load_classifier(tmp_path / "other.safetensors")


def test_training_degradation_is_deterministic_and_bounded():
    images = torch.rand(8, 3, 64, 64)
    a = degrade(images, torch.Generator().manual_seed(3))
    b = degrade(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, degrade(images, torch.Generator().manual_seed(4)))


def test_train_runs_end_to_end_and_is_reproducible():
    from vare_core.embedded.training.train_classifier import TrainConfig, train
    config = TrainConfig(seed=5, steps=3, batch_size=8, train_images=24, eval_images=16)
    model_a, results = train(config, log=lambda message: None)
    model_b, _ = train(config, log=lambda message: None)
    assert set(results["heldout_clean"]) == set(LABELS)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
