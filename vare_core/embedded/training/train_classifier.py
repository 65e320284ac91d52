"""Train the shapes classifier on rendered images, reproducibly from a seed (a few CPU minutes).

Renders degraded like autoencoder reconstructions (blur, noise, colour jitter, soft/blocky detail)
teach it to judge generated images, which are never as clean as renders.

Usage:
    nice python -m vare_core.embedded.training.train_classifier \
        --out vare_core/embedded/weights/classifier.safetensors --seed 0
"""
import argparse
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...evaluation.judges.classifier import LABELS, ClassifierConfig, ShapesClassifier, save_classifier
from ..world import random_scene, render


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 600
    batch_size: int = 64
    train_images: int = 10000   # rendered once; degradations make every batch new
    eval_images: int = 1000     # held out, rendered from a different seed stream
    lr: float = 3e-3
    weight_decay: float = 1e-4
    threads: int = 2


def render_scenes(n: int, rng: np.random.Generator):
    """n random renders as (n, 3, 64, 64) float [0, 1] and their label indices per attribute."""
    images = np.empty((n, 64, 64, 3), dtype=np.uint8)
    targets = {name: np.empty(n, dtype=np.int64) for name in LABELS}
    for i in range(n):
        scene = random_scene(rng)
        images[i] = render(scene)
        for name, labels in LABELS.items():
            targets[name][i] = labels.index(getattr(scene, name))
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return batch.contiguous(), {k: torch.from_numpy(v) for k, v in targets.items()}


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image (B, C, H, W) with its own sigma (B,), separably; sigma 0 keeps it as is."""
    batch, channels, height, width = images.shape
    offsets = torch.arange(-3, 4, dtype=images.dtype)
    sigma = sigma.clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / sigma) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (3, 3, 0, 0), mode="replicate"),
                    kernel[:, None, None, :], groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, 3, 3), mode="replicate"),
                    kernel[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mimic an autoencoder reconstruction: colour jitter, blur, lost fine detail (downsample 2x
    and back), 8x8 block offsets, pixel noise. About a fifth of the batch stays clean."""
    batch = images.shape[0]

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(batch, *shape, generator=generator)

    def chance(p):
        return (torch.rand(batch, 1, 1, 1, generator=generator) < p).float()

    gain, offset = uniform(0.92, 1.08, 3, 1, 1), uniform(-0.04, 0.04, 3, 1, 1)
    out = images * gain + offset
    out = gaussian_blur(out, uniform(0.0, 1.4) * chance(0.7).flatten())
    soft = F.interpolate(F.avg_pool2d(out, 2), scale_factor=2, mode="bilinear", align_corners=False)
    use_soft = chance(0.3)
    out = use_soft * soft + (1 - use_soft) * out
    blocks = torch.randn(batch, 3, 8, 8, generator=generator) * uniform(0.0, 0.03, 1, 1, 1)
    out = out + F.interpolate(blocks, scale_factor=8, mode="nearest") * chance(0.4)
    out = out + torch.randn(out.shape, generator=generator) * uniform(0.0, 0.06, 1, 1, 1)
    clean = chance(0.2)
    return (clean * images + (1 - clean) * out).clamp(0, 1)


@torch.no_grad()
def accuracy(model, images, targets, batch_size: int = 250) -> dict[str, float]:
    model.eval()
    correct = {name: 0 for name in LABELS}
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size])
        for name in LABELS:
            hits = logits[name].argmax(dim=1) == targets[name][start:start + batch_size]
            correct[name] += int(hits.sum())
    return {name: correct[name] / images.shape[0] for name in LABELS}


def train(config: TrainConfig, log=print) -> tuple[ShapesClassifier, dict]:
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    start_time = time.time()
    # Separate seed streams: training renders never overlap the held-out ones.
    train_images, train_targets = render_scenes(config.train_images,
                                                np.random.default_rng([config.seed, 0]))
    eval_images, eval_targets = render_scenes(config.eval_images,
                                              np.random.default_rng([config.seed, 1]))
    eval_degraded = degrade(eval_images, torch.Generator().manual_seed(config.seed + 1))
    log(f"rendered {config.train_images} + {config.eval_images} images "
        f"in {time.time() - start_time:.0f}s")

    model = ShapesClassifier(ClassifierConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    warmup = max(config.steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / config.steps))))
    for step in range(config.steps):
        model.train()
        index = torch.randint(config.train_images, (config.batch_size,), generator=generator)
        logits = model(degrade(train_images[index], generator))
        loss = sum(F.cross_entropy(logits[name], train_targets[name][index]) for name in LABELS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start_time:.0f}s")

    results = {
        "heldout_clean": accuracy(model, eval_images, eval_targets),
        "heldout_degraded": accuracy(model, eval_degraded, eval_targets),
        "train_seconds": round(time.time() - start_time, 1),
    }
    return model.eval(), results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    args = parser.parse_args(argv)
    config = TrainConfig(seed=args.seed, steps=args.steps, threads=args.threads)
    model, results = train(config)
    for name in ("heldout_clean", "heldout_degraded"):
        print(name, "  ".join(f"{k} {v:.4f}" for k, v in results[name].items()))
    print(f"trained in {results['train_seconds']:.0f}s")
    # Wall time stays out of the metadata: the same seed gives the same tensors and metadata.
    save_classifier(model, args.out, {"seed": str(config.seed), "steps": str(config.steps),
                                      "heldout_clean": results["heldout_clean"],
                                      "heldout_degraded": results["heldout_degraded"]})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
