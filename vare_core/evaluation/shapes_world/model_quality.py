"""Quality of the embedded model, judged by the shapes classifier and the geometric judge.

    python -m vare_core.evaluation.shapes_world.model_quality --samples 32 --seed 1000       # docs/embedded_model.md's numbers
    python -m vare_core.evaluation.shapes_world.model_quality --sweep --samples 32 --seed 2000  # pick cfg / tau

For every (shape, colour) pair the prompt "a {colour} {shape}" is sampled `samples` times;
shape and colour accuracy are the fraction judged correct. Style accuracy uses prompts that
state the fill ("a striped red circle", "a solid ..."). Synonym prompts ("disc", "box", ...)
are scored like the main word. Variety, on the "a {colour} {shape}" images (background,
position, size and fill left open), by the geometric judge: the share of each background, the
spread (std, in canvas widths) of the shape's centre and size, beside the same figures of the
training data's own renders (`data_variety`). The geometric judge (no learned weights) also
scores shape and colour, named backgrounds ("... on a black background") and cleanliness:
the share of intact / strictly clean pictures and the stray-pixel share, beside the same
figures for clean renders passed through the model's own VAE (`vae_reference`), the best
the transformer can do.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from collections import Counter

import numpy as np
import torch

from ...embedded.world import BACKGROUNDS, COLORS, SHAPES, STYLES, SYNONYMS, random_scene, render
from ...generation.per_scale import parse_setting
from ..judges.classifier import to_model_input
from ..judges.geometry import is_intact, judge_images
from .fidelity import attribute_spread


def _generate(pipe, prompts: list[str], seed: int, batch: int = 160, **kwargs) -> torch.Tensor:
    images = []
    for start in range(0, len(prompts), batch):
        images.append(pipe.generate(prompts[start:start + batch], seed=seed + start, **kwargs).images)
    return torch.cat(images)


def _accuracy(judged: list[dict], expected: list[dict], key: str) -> float:
    return sum(j[key] == e[key] for j, e in zip(judged, expected)) / max(1, len(expected))


def _per_prompt(judged: list[dict], expected: list[dict], samples: int) -> dict:
    """{"colour shape": (shape accuracy, colour accuracy)} of the "a {colour} {shape}" prompts."""
    per_prompt = {}
    for i, (shape, color) in enumerate(itertools.product(SHAPES, COLORS)):
        chunk = slice(i * samples, (i + 1) * samples)
        per_prompt[f"{color} {shape}"] = (_accuracy(judged[chunk], expected[chunk], "shape"),
                                          _accuracy(judged[chunk], expected[chunk], "color"))
    return per_prompt


def variety(images) -> dict:
    """Background shares, centre and size spread of images whose prompts leave them open."""
    spread = attribute_spread(judge_images(images))
    return {"backgrounds": {k: round(v, 3) for k, v in spread["background_shares"].items()},
            "centre_spread": round(spread["centre_spread"], 4), "size_spread": round(spread["size_spread"], 4)}


def cleanliness(geometric: list[dict]) -> dict:
    """Intact share (flat background, shape-like mask, <= 5% stray pixels), strictly clean
    share and mean stray-pixel share of judged images."""
    return {"intact": round(float(np.mean([is_intact(g) for g in geometric])), 4),
            "clean": round(float(np.mean([bool(g["clean"]) for g in geometric])), 4),
            "stray": round(float(np.mean([g["stray"] for g in geometric])), 4)}


@torch.no_grad()
def vae_reference(vae, n: int = 320, seed: int = 0) -> dict:
    """Cleanliness of the world's random renders encoded and decoded by `vae` at the model's
    schedule: the ceiling for the transformer's pictures."""
    from ...models.bsq_quant import summed_codes_from_bits
    from ...generation.sampler import decode_images
    from ...embedded import spec
    rng = np.random.default_rng(seed)
    renders = to_model_input(np.stack([render(random_scene(rng)) for _ in range(n)])) * 2 - 1
    bits = vae.encode_bits(renders.to(next(vae.parameters()).dtype), spec.SCHEDULE)
    return cleanliness(judge_images(decode_images(vae, summed_codes_from_bits(bits, spec.SCHEDULE[-1]))))


def data_variety(n: int = 640, seed: int = 0) -> dict:
    """The same figures for the world's own random scenes (what the model was trained on)."""
    rng = np.random.default_rng(seed)
    return variety(np.stack([render(random_scene(rng)) for _ in range(n)]))


def evaluate(pipe, classifier, samples: int = 32, seed: int = 0, **sampling) -> dict:
    from ..judges.classifier import classify
    results = {"settings": {"samples": samples, "seed": seed, **{k: v for k, v in sampling.items()}}}
    # shape x colour with the main word
    prompts, expected = [], []
    for shape, color in itertools.product(SHAPES, COLORS):
        prompts += [f"a {color} {shape}"] * samples
        expected += [{"shape": shape, "color": color}] * samples
    images = _generate(pipe, prompts, seed, **sampling)
    judged = classify(classifier, images)
    results["variety"] = variety(images)
    geometric = judge_images(images)
    results["shape_geometric"] = _accuracy(geometric, expected, "shape")
    results["color_geometric"] = _accuracy(geometric, expected, "color")
    results["shape_both"] = sum(j["shape"] == g["shape"] == e["shape"] for j, g, e in zip(judged, geometric, expected)) / len(expected)
    results["cleanliness"] = cleanliness(geometric)
    results["shape"] = _accuracy(judged, expected, "shape")
    results["color"] = _accuracy(judged, expected, "color")
    per_combo = _per_prompt(judged, expected, samples)
    per_combo_geometric = _per_prompt(geometric, expected, samples)
    results["worst_combo_shape"] = min(per_combo.items(), key=lambda kv: kv[1][0])
    results["worst_combo_color"] = min(per_combo.items(), key=lambda kv: kv[1][1])
    # the target holds on every prompt, by both judges: the geometric judge's worst prompt too
    results["worst_combo_shape_geometric"] = min(per_combo_geometric.items(), key=lambda kv: kv[1][0])
    results["worst_combo_color_geometric"] = min(per_combo_geometric.items(), key=lambda kv: kv[1][1])
    results["per_shape"] = {s: sum(per_combo[f"{c} {s}"][0] for c in COLORS) / len(COLORS) for s in SHAPES}
    results["per_shape_geometric"] = {
        s: round(_accuracy([g for g, e in zip(geometric, expected) if e["shape"] == s],
                           [e for e in expected if e["shape"] == s], "shape"), 4) for s in SHAPES}
    results["backgrounds_unprompted"] = dict(Counter(j["background"] for j in judged))

    # style
    prompts, expected = [], []
    per_style = max(4, samples // 4)
    for shape, style, color in itertools.product(SHAPES, STYLES, COLORS):
        prompts += [f"a {style} {color} {shape}"] * per_style
        expected += [{"style": style}] * per_style
    judged = classify(classifier, _generate(pipe, prompts, seed + 10**6, **sampling))
    results["style"] = _accuracy(judged, expected, "style")

    # named backgrounds (geometric judge: the border)
    prompts, expected = [], []
    per_background = max(2, samples // 8)
    for shape, color, background in itertools.product(SHAPES, COLORS, BACKGROUNDS):
        prompts += [f"a {color} {shape} on a {background} background"] * per_background
        expected += [{"background": background}] * per_background
    results["background_named"] = _accuracy(judge_images(_generate(pipe, prompts, seed + 3 * 10**6, **sampling)),
                                            expected, "background")

    # synonyms (every non-main word), scored against the main word's accuracy
    prompts, expected = [], []
    per_synonym = max(4, samples // 2)
    for shape, words in SYNONYMS.items():
        for word, color in itertools.product(words[1:], COLORS):
            prompts += [f"a {color} {word}"] * per_synonym
            expected += [{"shape": shape, "color": color}] * per_synonym
    judged = classify(classifier, _generate(pipe, prompts, seed + 2 * 10**6, **sampling))
    results["synonym_shape"] = _accuracy(judged, expected, "shape")
    results["synonym_color"] = _accuracy(judged, expected, "color")
    return results


def main(argv=None):
    from ...embedded.loader import load_embedded
    from ...generation.pipeline import load_pipeline
    from ..judges.classifier import load_classifier
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--weights", default=None, help="weights folder (default: the shipped one)")
    parser.add_argument("--sweep", action="store_true", help="grid of cfg x tau")
    parser.add_argument("--cfg", default=None, help="a number or one per scale (1,4,4,4,4)")
    parser.add_argument("--tau", default=None, help="a number or one per scale")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_embedded("cpu", weights_dir=args.weights) if args.weights else load_pipeline("embedded", device="cpu")
    classifier = load_classifier()
    grid = [(args.cfg, args.tau)]
    if args.sweep:
        grid = list(itertools.product([2.0, 3.0, 4.0, 6.0], [0.1, 0.3, 0.5, 1.0]))
    print(json.dumps({"data_variety": data_variety(), "vae_reference": vae_reference(pipe.vae)}), flush=True)
    for cfg, tau in grid:
        start = time.time()
        sampling = {k: parse_setting(v, len(pipe.default_schedule), "--" + k)
                    for k, v in {"cfg": cfg, "tau": tau}.items() if v is not None}
        if args.top_p is not None:
            sampling["top_p"] = args.top_p
        result = evaluate(pipe, classifier, args.samples, args.seed, **sampling)
        result["seconds"] = round(time.time() - start, 1)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
