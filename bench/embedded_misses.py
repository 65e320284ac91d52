"""Where the embedded model still misses: per-prompt accuracy pooled over many score seeds.

    python bench/embedded_misses.py --seeds 1000,2000,3000,4000,5000
    python bench/embedded_misses.py --seeds 6000,7000,8000 --weights DIR --cfg 1,4,4,2,2

For each score seed, the evaluation's main set (evaluation/shapes_world/model_quality.py: 32 samples of each "a {colour}
{shape}" prompt, batches of 160 at seed + offset, so seed 1000 is the run in docs/embedded_model.md) is judged
by the geometric judge and the shapes classifier. A miss is an image either judge reads with
another shape or colour. Printed: every miss (seed, index, prompt, the judge's fit IoU, the
first-scale layout code), per seed whether every prompt was 32 of 32, the pooled per-prompt
accuracy (worst first) and the miss rate per first-scale code. The code is the first two bits
of the 1x1 first-scale token, ("white", "not black") of embedded/training/coarse_codes.py; (1, 0) is the one
the data never uses. About 25 s per seed on 2 cores.
"""
from __future__ import annotations

import argparse
import itertools
from collections import Counter

import torch

from vare_core.evaluation.judges.classifier import classify, load_classifier
from vare_core.evaluation.judges.geometry import judge_images
from vare_core.embedded.world import COLORS, SHAPES
from vare_core.embedded.loader import load_embedded
from vare_core.generation.pipeline import load_pipeline
from vare_core.generation.per_scale import parse_setting

BATCH = 160   # evaluate._generate's batch: the same images as the evaluation for a seed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", required=True, help="score seeds, comma list")
    parser.add_argument("--samples", type=int, default=32, help="images per prompt and seed")
    parser.add_argument("--weights", default=None, help="an embedded-model weights folder (default: the shipped one)")
    parser.add_argument("--cfg", default=None, help="a number or one per scale (default: the model's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    pipe = load_embedded("cpu", weights_dir=args.weights) if args.weights else load_pipeline("embedded", device="cpu")
    classifier = load_classifier()
    sampling = {"cfg": parse_setting(args.cfg, len(pipe.default_schedule), "--cfg")} if args.cfg else {}
    prompts, expected = [], []
    for shape, color in itertools.product(SHAPES, COLORS):
        prompts += [f"a {color} {shape}"] * args.samples
        expected += [(shape, color)] * args.samples

    misses, images_per_code, misses_per_code, perfect_seeds = Counter(), Counter(), Counter(), 0
    for seed in seeds:
        seed_misses = 0
        for start in range(0, len(prompts), BATCH):
            result = pipe.generate(prompts[start:start + BATCH], seed=seed + start, **sampling)
            geometric = judge_images(result.images)
            learned = classify(classifier, result.images)
            first_code = result.bits[0].reshape(len(geometric), -1)[:, :2].tolist()
            for i, (g, c) in enumerate(zip(geometric, learned)):
                shape, color = expected[start + i]
                code = tuple(first_code[i])
                images_per_code[code] += 1
                if not (g["shape"] == c["shape"] == shape and g["color"] == c["color"] == color):
                    misses[f"{color} {shape}"] += 1
                    misses_per_code[code] += 1
                    seed_misses += 1
                    print(f"miss: seed {seed} image {start + i} '{color} {shape}' -> geometric "
                          f"{g['shape']} {g['color']} (fit IoU {g['shape_iou']:.3f}), classifier "
                          f"{c['shape']} {c['color']}; first code {code}", flush=True)
        perfect_seeds += seed_misses == 0
        print(f"seed {seed}: {seed_misses} misses", flush=True)

    n = args.samples * len(seeds)
    print(f"\n{len(seeds) * len(prompts)} images, {sum(misses.values())} misses; every prompt "
          f"{args.samples} of {args.samples} on {perfect_seeds} of {len(seeds)} seeds")
    worst = [(prompt, n - k) for prompt, k in misses.most_common()]
    print("pooled per prompt (worst first; every other prompt " + f"{n} of {n}): " +
          ", ".join(f"{p} {ok}/{n} ({100 * ok / n:.2f}%)" for p, ok in worst))
    print("miss rate per first-scale code (white, not black): " +
          ", ".join(f"{code} {misses_per_code[code]}/{count} ({100 * misses_per_code[code] / count:.2f}%)"
                    for code, count in sorted(images_per_code.items())))


if __name__ == "__main__":
    main()
