"""The shapes classifier: a small CNN that reads shape, colour, style and background off an image.

It scores images of the shapes world (see embedded/world.py), including generated ones, which are
a little blurry and noisy: it was trained on renders degraded like autoencoder reconstructions
(embedded/training/train_classifier.py). Weights ship beside the embedded model's
(embedded/weights/) as safetensors with the label lists in the metadata.

Usage:
    model = load_classifier()                      # the shipped weights, on CPU
    results = classify(model, images)              # (B, H, W, 3) float [0, 1] or uint8
    results[0]["shape"], results[0]["confidence"]["shape"]
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ...checkpoints import safetensors_metadata
from ...embedded import spec
from ...embedded.world import BACKGROUNDS, COLORS, SHAPES, STYLES

DEFAULT_WEIGHTS = spec.WEIGHTS_DIR / spec.CLASSIFIER_FILE
FORMAT_NAME = "vare-shapes-classifier"
FORMAT_VERSION = "1"
LABELS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "color": COLORS, "style": STYLES, "background": BACKGROUNDS,
}
TRAIN_COMMAND = ("python -m vare_core.embedded.training.train_classifier "
                 "--out vare_core/embedded/weights/classifier.safetensors --seed 0")


@dataclass
class ClassifierConfig:
    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 48, 64)  # one conv stage per entry, each halves H and W


class ShapesClassifier(nn.Module):
    """Conv stages (conv 3x3, batch norm, ReLU, max pool), then global mean+max pooling and one
    linear head per attribute. Mean pooling reads colours, max pooling catches local evidence
    (corners, stripes) wherever the shape is."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        stages, width = [], 3
        for channels in config.channels:
            stages += [nn.Conv2d(width, channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            width = channels
        self.features = nn.Sequential(*stages)
        self.heads = nn.ModuleDict({name: nn.Linear(2 * width, len(labels))
                                    for name, labels in LABELS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, 64, 64) float in [0, 1] -> {attribute: (B, n_labels) logits}."""
        features = self.features(images * 2 - 1)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}


def save_classifier(model: ShapesClassifier, path, extra_metadata: dict | None = None) -> None:
    """Write weights + metadata (format, version, label lists, config, anything extra)."""
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "labels": json.dumps({k: list(v) for k, v in LABELS.items()}),
        "config": json.dumps(asdict(model.config)),
    }
    metadata.update({k: v if isinstance(v, str) else json.dumps(v)
                     for k, v in (extra_metadata or {}).items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def read_metadata(path) -> dict:
    """The metadata strings of a classifier file."""
    return safetensors_metadata(path)


def load_classifier(path=None, device="cpu") -> ShapesClassifier:
    """Load a classifier in eval mode; path=None loads the shipped weights."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found at {path}; train them with "
                                f"`{TRAIN_COMMAND}` or pass the right path")
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a shapes classifier file (metadata format="
                         f"{metadata.get('format')!r}, expected {FORMAT_NAME!r})")
    if metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has classifier format version {metadata.get('version')!r}; this "
                         f"code reads version {FORMAT_VERSION!r}: retrain with `{TRAIN_COMMAND}`")
    labels = {k: tuple(v) for k, v in json.loads(metadata["labels"]).items()}
    if labels != LABELS:
        raise ValueError(f"{path} was trained for labels {labels}, but the world defines "
                         f"{LABELS}: retrain with `{TRAIN_COMMAND}`")
    config_fields = json.loads(metadata["config"])
    config = ClassifierConfig(image_size=config_fields["image_size"],
                              channels=tuple(config_fields["channels"]))
    model = ShapesClassifier(config)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def to_model_input(images, image_size: int = 64) -> torch.Tensor:
    """(B, H, W, 3) or (H, W, 3) images, float [0, 1] or uint8, numpy or torch ->
    (B, 3, image_size, image_size) float32 in [0, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise ValueError("images must be a numpy array or torch tensor, "
                         f"got {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (B, H, W, 3) (ComfyUI IMAGE layout), "
                         f"got {tuple(images.shape)}")
    batch = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    batch = batch.permute(0, 3, 1, 2)
    if batch.shape[-2:] != (image_size, image_size):
        batch = F.interpolate(batch, size=(image_size, image_size), mode="bilinear",
                              antialias=True, align_corners=False)
    return batch.clamp(0, 1).contiguous()


@torch.no_grad()
def classify(model: ShapesClassifier, images) -> list[dict]:
    """Per image {"shape", "color", "style", "background", "confidence": {attribute: prob}}."""
    parameter = next(model.parameters())
    batch = to_model_input(images, model.config.image_size).to(parameter.device, parameter.dtype)
    was_training = model.training
    model.eval()
    logits = model(batch)
    model.train(was_training)
    results = [{"confidence": {}} for _ in range(batch.shape[0])]
    for name, head_logits in logits.items():
        probs = head_logits.float().softmax(dim=1)
        confidence, index = probs.max(dim=1)
        for result, i, p in zip(results, index.tolist(), confidence.tolist()):
            result[name] = LABELS[name][i]
            result["confidence"][name] = p
    return results
