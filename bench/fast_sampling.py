"""Fast sampling (speed "fast", generation/speed.py): what each knob costs in quality on the
embedded model, and what it saves on an Infinity-shaped transformer with random weights.

    python bench/fast_sampling.py                                   # both parts
    python bench/fast_sampling.py --part quality --samples 64 --cfgs 2,4,6 --grid-dir /tmp
    python bench/fast_sampling.py --part speed --depth 2 --width 512 --preset 1M
    python bench/fast_sampling.py --variant 'keep75={"pruned_scales":1,"keep_share":0.75}'

Variants: exact; each knob of the family's fast defaults alone (pipe.fast_defaults for the
embedded model, models/infinity_defaults.FAST for Infinity); speed "fast" (all of them); and
any `--variant NAME=JSON` (knobs of SamplingSettings; repeatable, used by both parts).

quality: the fidelity benchmark's prompt set with no concept erased (evaluation/shapes_world/
fidelity.py "others": every shape, under its main word, synonyms and context frames, in every
colour, background and style; `--samples` per shape), sampled at the same seeds by every
variant. Scores: ACC_i (classifier shape right AND the geometric judge finds the picture
intact: fidelity's headline), shape by the classifier and by the geometric judge, colour by
the judge, intact share, and the share of images that are the same picture as the exact
sampler's (mean |difference| < fidelity.SAME_PICTURE); each with its difference to exact in
points. "time" is the variant's generation time over exact's (same cfg, interleaved).
`--grid-dir DIR` writes DIR/fast_grid_cfg{N}.png: 8 prompts, rows exact / variant /
|difference| x4, 2x zoom.

speed: Infinity(depth, width, bits 32, text 2048) from init_weights plus N(0, 0.02) on every
parameter, the `--preset` schedule (1M: 10,521 tokens), batch 2, cfg 3, tau 1, no decode;
seconds: median of 3 interleaved runs after a warm-up; KV: the peak over scales of the bytes
the self-attention caches hold (SamplingState.cache_bytes) as a share of exact's; RSS: the
process's peak resident set over one run in a fresh process (VmHWM); bits: share of all
sampled bits equal to the exact sampler's at the same seed, and of the last scale's.
Timings use one thread. Prints markdown tables and the command.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sample_speed import _cpu_peak_gib, _reset_cpu_peak

from vare_core.generation.sampler import SamplingSettings, sample
from vare_core.models.infinity import Infinity, InfinityConfig, init_weights
from vare_core.models.scales import scale_schedule

KNOB_GROUPS = (("unguided_scales",), ("pruned_scales", "keep_share"), ("kv_budget",))
BATCH = 200          # images per generate() call, as fidelity.py: part of what fixes the seeds


def variants_from(fast: dict, extra: list[str]) -> dict[str, dict]:
    """name -> SamplingSettings knobs: exact, each fast knob alone, all (speed "fast"), extras."""
    variants = {"exact": {}}
    for group in KNOB_GROUPS:
        knobs = {k: fast[k] for k in group if k in fast}
        if knobs:
            variants[", ".join(f"{k}={v}" for k, v in knobs.items())] = knobs
    variants["fast (all)"] = {"speed": "fast"}
    for text in extra:
        name, _, knobs = text.partition("=")
        variants[name] = json.loads(knobs)
    return variants


def points(value: float, reference: float) -> str:
    """A share in percent with its difference to the reference in points."""
    diff = 100 * (value - reference)
    return f"{100 * value:.1f}" + ("" if abs(diff) < 0.05 else f" ({diff:+.1f})")


# ----------------------------------------------------------------------------------- quality

def generate_timed(pipe, prompts: list[str], seed: int, settings) -> tuple[np.ndarray, float]:
    """uint8 (N, 64, 64, 3) images, batched as fidelity.py does, and the seconds it took."""
    start, out = time.perf_counter(), []
    for first in range(0, len(prompts), BATCH):
        images = pipe.generate(prompts[first:first + BATCH], seed=seed + first, settings=settings).images
        out.append((images.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return np.concatenate(out), time.perf_counter() - start


def quality_scores(images: np.ndarray, items, cfg: float, classifier, exact: np.ndarray) -> dict:
    from vare_core.evaluation.shapes_world.fidelity import (SAME_PICTURE, SampledSets, judged_set,
                                                             mean_abs_difference)
    run = SampledSets(concepts=[], cfg=cfg, seed=0, items={"others": items}, images={"others": images})
    pairs = list(zip(judged_set(run, "others", classifier), [e for _, e in items]))
    difference = mean_abs_difference(images, exact)
    return {"ACC_i": np.mean([j["classifier_shape"] == e["shape"] and j["intact"] for j, e in pairs]),
            "shape (classifier)": np.mean([j["classifier_shape"] == e["shape"] for j, e in pairs]),
            "shape (judge)": np.mean([j["shape"] == e["shape"] for j, e in pairs]),
            "colour (judge)": np.mean([j["color"] == e["color"] for j, e in pairs]),
            "intact": np.mean([j["intact"] for j, _ in pairs]),
            "same picture": np.mean(difference < SAME_PICTURE),
            "mean diff": float(difference.mean())}


def save_grid(path: Path, exact: np.ndarray, other: np.ndarray, count: int = 8) -> None:
    """Columns: `count` prompts spread over the set; rows: exact, other, |difference| x4; 2x zoom."""
    from PIL import Image
    picks = np.linspace(0, len(exact) - 1, count).round().astype(int)
    diff = np.clip(np.abs(exact[picks].astype(int) - other[picks].astype(int)).max(-1, keepdims=True) * 4,
                   0, 255).repeat(3, -1).astype(np.uint8)
    rows = [exact[picks], other[picks], diff]
    size, gap = exact.shape[1] * 2, 4
    canvas = np.full((len(rows) * (size + gap), count * (size + gap), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            zoomed = image.repeat(2, 0).repeat(2, 1)
            canvas[r * (size + gap):r * (size + gap) + size, c * (size + gap):c * (size + gap) + size] = zoomed
    Image.fromarray(canvas).save(path)


def run_quality(args, extra: list[str]) -> None:
    import dataclasses
    from vare_core.evaluation.judges.classifier import load_classifier
    from vare_core.evaluation.shapes_world.fidelity import prompt_sets
    from vare_core.generation.pipeline import load_pipeline
    pipe = load_pipeline("embedded", device="cpu")
    classifier = load_classifier()
    variants = variants_from(pipe.fast_defaults, extra)
    items = prompt_sets([], args.samples)["others"]
    prompts = [p for p, _ in items]
    print(f"embedded model, fast defaults {pipe.fast_defaults}; {len(prompts)} images per (variant, cfg)\n")
    columns = ["ACC_i", "shape (classifier)", "shape (judge)", "colour (judge)", "intact", "same picture"]
    print("| variant | cfg | " + " | ".join(f"{c} %" for c in columns) + " | mean diff | time vs exact |")
    print("|---|---|" + "---|" * (len(columns) + 2), flush=True)
    for cfg in args.cfgs:
        images, seconds = {}, {}
        for name, knobs in variants.items():           # interleaved: the cfgs' noise hits all alike
            variant = dataclasses.replace(pipe, defaults={**pipe.defaults, **knobs})
            images[name], seconds[name] = generate_timed(variant, prompts, args.seed, variant.sampling_settings(cfg=cfg))
        exact = quality_scores(images["exact"], items, cfg, classifier, images["exact"])
        for name in variants:
            scores = quality_scores(images[name], items, cfg, classifier, images["exact"])
            cells = [points(scores[c], exact[c]) if name != "exact" else f"{100 * scores[c]:.1f}" for c in columns]
            print(f"| {name} | {cfg:g} | " + " | ".join(cells) +
                  f" | {scores['mean diff']:.4f} | {seconds[name] / seconds['exact']:.2f} ({seconds[name]:.1f} s) |",
                  flush=True)
        if args.grid_dir:
            save_grid(Path(args.grid_dir) / f"fast_grid_cfg{cfg:g}.png", images["exact"], images[args.grid_variant])


# ------------------------------------------------------------------------------------- speed

def build_model(depth: int, width: int) -> tuple[Infinity, torch.Tensor, torch.Tensor]:
    """Random Infinity-shaped weights (init_weights + small noise, so no block is the identity)
    and a random text condition for batch 2."""
    config = InfinityConfig(depth=depth, embed_dim=width, num_heads=max(1, width // 64), bits=32,
                            text_channels=2048, block_chunks=1)
    torch.manual_seed(0)
    model = init_weights(Infinity(config)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model, torch.randn(2, 16, config.text_channels), torch.full((2,), 16)


class CachePeak:
    """Records the peak SamplingState.cache_bytes after every Infinity.forward_scale while inside."""

    def __enter__(self):
        self.peak, self._original = 0, Infinity.forward_scale

        def recording(model, state, *args, **kwargs):
            out = self._original(model, state, *args, **kwargs)
            self.peak = max(self.peak, state.cache_bytes)
            return out
        Infinity.forward_scale = recording
        return self

    def __exit__(self, *exc):
        Infinity.forward_scale = self._original


def sample_variant(model, text, lens, schedule, knobs: dict):
    from vare_core.models.infinity_defaults import FAST
    settings = SamplingSettings(cfg=3.0, tau=1.0, **knobs)
    return sample(model, None, text, lens, schedule, settings, decode=False, fast_defaults=FAST,
                  generator=torch.Generator().manual_seed(0))


def bit_agreement(bits, reference) -> tuple[float, float]:
    """Share of all sampled bits equal to the reference's, and of the last scale's."""
    equal = torch.cat([(a == b).flatten() for a, b in zip(bits, reference)])
    return float(equal.float().mean()), float((bits[-1] == reference[-1]).float().mean())


def peak_rss_row(args, knobs: dict) -> dict:
    """One run of a variant in this (fresh) process: the peak resident set it reaches."""
    model, text, lens = build_model(args.depth, args.width)
    _reset_cpu_peak()
    sample_variant(model, text, lens, scale_schedule(1.0, args.preset), knobs)
    return {"peak_gib": _cpu_peak_gib()}


def peak_rss_isolated(args, knobs: dict) -> float:
    command = [sys.executable, __file__, "--rss-row", json.dumps(knobs), "--depth", str(args.depth),
               "--width", str(args.width), "--preset", args.preset]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1])["peak_gib"] if done.returncode == 0 and lines else float("nan")


def run_speed(args, extra: list[str]) -> None:
    from vare_core.models.infinity_defaults import FAST
    model, text, lens = build_model(args.depth, args.width)
    schedule = scale_schedule(1.0, args.preset)
    variants = variants_from(FAST, extra)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\nInfinity depth {args.depth}, width {args.width} ({params:.1f} M params, random weights), "
          f"preset {args.preset}: {len(schedule)} scales, {sum(h * w for h, w in schedule):,} tokens; "
          f"batch 2, cfg 3, tau 1, 1 thread; FAST = {FAST}\n", flush=True)
    results, times = {}, {name: [] for name in variants}
    for name, knobs in variants.items():               # warm-up; bits and KV peak
        with CachePeak() as peak:
            results[name] = (sample_variant(model, text, lens, schedule, knobs).bits, peak.peak)
    for _ in range(args.repeats):                       # interleaved timings
        for name, knobs in variants.items():
            start = time.perf_counter()
            sample_variant(model, text, lens, schedule, knobs)
            times[name].append(time.perf_counter() - start)
    exact_bits, exact_kv = results["exact"]
    exact_s = statistics.median(times["exact"])
    print("| variant | seconds | speed-up vs exact | peak KV cache (share of exact) | peak RSS GiB | "
          "bits equal to exact % (all / last scale) |\n|---|---|---|---|---|---|")
    for name, knobs in variants.items():
        seconds = statistics.median(times[name])
        bits, kv = results[name]
        agree_all, agree_last = bit_agreement(bits, exact_bits)
        print(f"| {name} | {seconds:.2f} | {exact_s / seconds:.2f}x | {kv / 2**20:.0f} MiB ({kv / exact_kv:.2f}) | "
              f"{peak_rss_isolated(args, knobs):.2f} | {100 * agree_all:.1f} / {100 * agree_last:.1f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["quality", "speed", "both"], default="both")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help='extra variant, e.g. keep40={"pruned_scales":1,"keep_share":0.4}')
    parser.add_argument("--cfgs", default="2,4,6", help="quality: guidance scales")
    parser.add_argument("--samples", type=int, default=64, help="quality: images per shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-dir", default=None, help="quality: write fast_grid_cfg{N}.png here")
    parser.add_argument("--grid-variant", default="fast (all)", help="the variant the grid shows beside exact")
    parser.add_argument("--depth", type=int, default=2, help="speed: transformer blocks")
    parser.add_argument("--width", type=int, default=512, help="speed: embed dim (heads: width / 64)")
    parser.add_argument("--preset", default="1M", help="speed: schedule preset (0.06M, 0.25M, 0.60M, 1M)")
    parser.add_argument("--repeats", type=int, default=3, help="speed: timed runs per variant")
    parser.add_argument("--rss-row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.rss_row is not None:
        print(json.dumps(peak_rss_row(args, json.loads(args.rss_row))))
        return
    args.cfgs = [float(c) for c in args.cfgs.split(",")]
    for text in args.variant:
        if "=" not in text:
            parser.error(f"--variant {text!r}: write NAME=JSON")
    if args.part in ("quality", "both"):
        run_quality(args, args.variant)
    if args.part in ("speed", "both"):
        run_speed(args, args.variant)
    print("\n    python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
