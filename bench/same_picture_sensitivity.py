"""How exact an adapter must keep the other prompts: the same-picture share of the original
model's own images when every raw logit gets a small Gaussian nudge.

    python bench/same_picture_sensitivity.py --cfg 4 --samples 32 --sigmas 0.003,0.01,0.03,0.1

The "others" prompt set of the fidelity benchmark (evaluation/shapes_world/fidelity.py, the
shapes other than --concept) is sampled at the same seeds with and without noise of standard deviation sigma on
the transformer's raw logits (before tau and guidance); a picture is the same when the mean
absolute pixel difference is under fidelity.SAME_PICTURE.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from vare_core.evaluation.shapes_world.fidelity import SAME_PICTURE, mean_abs_difference, sample_sets
from vare_core.generation.pipeline import load_pipeline


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--samples", type=int, default=32, help="images per prompt set")
    parser.add_argument("--sigmas", default="0.003,0.01,0.03,0.1")
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    pipe = load_pipeline("embedded", device="cpu")
    reference = sample_sets(pipe, [args.concept], args.samples, args.seed, args.cfg)
    clean_forward = pipe.model.forward_scale
    print(f"| logit noise sigma | same picture % (cfg {args.cfg:g}) | mean difference |\n|---|---|---|")
    for sigma in [float(s) for s in args.sigmas.split(",")]:
        noise = torch.Generator().manual_seed(7)

        def noisy_forward(state, index, x, sigma=sigma, noise=noise, **kwargs):
            logits = clean_forward(state, index, x, **kwargs)
            return logits + sigma * torch.randn(logits.shape, generator=noise).to(logits)
        pipe.model.forward_scale = noisy_forward
        run = sample_sets(pipe, [args.concept], args.samples, args.seed, args.cfg)
        difference = mean_abs_difference(run.images["others"], reference.images["others"])
        print(f"| {sigma:g} | {100 * np.mean(difference < SAME_PICTURE):.1f} | {difference.mean():.4f} |", flush=True)
    pipe.model.forward_scale = clean_forward


if __name__ == "__main__":
    main()
