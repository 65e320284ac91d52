"""How an erasure setting fares over (concept, anchor) pairs, training seeds and guidance scales.

    python bench/erasure_seeds.py --pairs all --seeds 0,1 --cfgs 1,2,4,6 --samples 64
    python bench/erasure_seeds.py --pairs circle:square,square:triangle --seeds 0,1 --set steps=200

Trains the S-VARE adapter (the embedded model's profile, optionally overridden with --set
key=value, keys of EraseConfig) once per pair and training seed, scores it with
evaluation/shapes_world/fidelity.py at every cfg (the original model at the same prompts, seed
and cfg is the reference), and prints one JSON line per (pair, seed, cfg), then markdown
tables: the mean over pairs and seeds per cfg, and per pair at each cfg. `--pairs all` is every ordered pair of the four shapes (12). A setting is
compared by its mean over pairs and seeds, never by one run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vare_core.embedded.loader import load_embedded
from vare_core.embedded.profile import shape_name
from vare_core.embedded.world import SHAPES
from vare_core.erasure.adapters import apply_adapter
from vare_core.erasure.profile import erasure_profile
from vare_core.erasure.trainer import train_erasure
from vare_core.erasure.trajectories import TrajectorySettings
from vare_core.evaluation.judges.classifier import load_classifier
from vare_core.evaluation.shapes_world.erasure_bench import score
from vare_core.generation.pipeline import load_pipeline

KEYS = ("ACC_e", "ACC_e_synonym", "ACC_e_context", "ACC_i", "erased_color", "erased_background",
        "erased_style", "erased_intact", "others_color", "others_background", "others_style",
        "others_intact", "same_picture", "erased_clean", "others_clean", "others_difference",
        "open_erased_centre_spread", "open_others_centre_spread", "open_erased_top_background",
        "open_others_top_background")
TABLE_KEYS = KEYS[:13]


def parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if not key or not value:
        raise SystemExit(f"--set {text!r}: expected key=value, e.g. --set steps=200")
    if key == "lora_targets":  # comma list
        return key, tuple(value.split(","))
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def parse_pairs(text: str) -> list[tuple[list[str], list[str]]]:
    """'all' or 'circle:square,square:triangle' (several concepts: 'circle+triangle:square')."""
    if text == "all":
        return [([c], [a]) for c, a in itertools.permutations(SHAPES, 2)]
    pairs = []
    for item in text.split(","):
        concept, _, anchor = item.partition(":")
        if not anchor:
            raise SystemExit(f"--pairs {item!r}: expected concept:anchor, e.g. circle:square")
        pairs.append(([shape_name(c, "--pairs concept") for c in concept.split("+")],
                      [shape_name(a, "--pairs anchor") for a in anchor.split("+")]))
    return pairs


def pair_name(concepts, anchors) -> str:
    return f"{'+'.join(concepts)} -> {'+'.join(anchors)}"


def markdown(rows: list[dict], label: str) -> str:
    head = f"| {label} | " + " | ".join(TABLE_KEYS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_KEYS) + 1)]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(
            f"{100 * row[k]:.1f}" if isinstance(row.get(k), float) else "-" for k in TABLE_KEYS) + " |")
    return "\n".join(lines)


def mean_rows(rows: list[dict]) -> dict:
    return {k: statistics.mean(r[k] for r in rows) for k in KEYS if all(k in r for r in rows)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="circle:square", help="'all' or concept:anchor comma list")
    parser.add_argument("--seeds", default="0,1", help="training seeds (comma list)")
    parser.add_argument("--cfgs", default="4", help="guidance scales (comma list)")
    parser.add_argument("--samples", type=int, default=64, help="images per prompt set")
    parser.add_argument("--score-seed", type=int, default=0)
    parser.add_argument("--retain", type=int, default=None, help="keep pairs per other shape (default: 20)")
    parser.add_argument("--implicit", type=int, default=None,
                        help="mined implicit pairs per concept, at most (default: 24, a share of the 50 erasure pairs)")
    parser.add_argument("--weights", default=None, help="an embedded-model weights folder (default: the shipped one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="EraseConfig override (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    overrides = dict(parse_override(text) for text in args.set)
    trajectory = {k.split(".", 1)[1]: overrides.pop(k) for k in list(overrides) if k.startswith("trajectory.")}
    if trajectory:   # --set trajectory.cfg=2: fields of TrajectorySettings
        overrides["trajectory"] = TrajectorySettings(**trajectory)
    cfgs = [float(c) for c in args.cfgs.split(",")]
    pipe = load_embedded("cpu", weights_dir=args.weights) if args.weights else load_pipeline("embedded", device="cpu")
    classifier = load_classifier()
    rows, originals = [], {}
    with tempfile.TemporaryDirectory() as cache:
        for concepts, anchors in parse_pairs(args.pairs):
            name = pair_name(concepts, anchors)
            for cfg in cfgs:   # the original's run at these prompts: the reference
                key = (tuple(concepts), cfg)
                if key not in originals:
                    original = score(pipe, classifier, concepts, args.samples, args.score_seed, cfg)
                    originals[key] = original.pop("run")
                    rows.append({"pair": name, "seed": "original", "cfg": cfg, **{k: original[k] for k in KEYS}})
                    print(json.dumps(rows[-1]), flush=True)
            profile = erasure_profile(pipe)
            pairs = profile.pairs(concepts, anchors, seed=0, retain=args.retain, pipe=pipe, implicit=args.implicit)
            for seed in [int(s) for s in args.seeds.split(",")]:
                config = profile.config(**{"seed": seed, **overrides})
                start = time.time()
                result = train_erasure(pipe, pairs, config, cache_dir=Path(cache))
                seconds = time.time() - start
                erased = apply_adapter(pipe, result.adapter, 1.0)
                for cfg in cfgs:
                    scores = score(erased, classifier, concepts, args.samples, args.score_seed, cfg,
                                   originals[(tuple(concepts), cfg)])
                    rows.append({"pair": name, "seed": seed, "cfg": cfg, "train_s": round(seconds, 1),
                                 **{k: scores[k] for k in KEYS}})
                    print(json.dumps(rows[-1]), flush=True)
    trained = [r for r in rows if r["seed"] != "original"]
    per_cfg = [{"label": f"cfg {cfg:g}, original", **mean_rows([r for r in rows if r["cfg"] == cfg and r["seed"] == "original"])}
               for cfg in cfgs]
    per_cfg += [{"label": f"cfg {cfg:g}, erased", **mean_rows([r for r in trained if r["cfg"] == cfg])} for cfg in cfgs]
    print(f"\nsettings: {json.dumps(overrides, default=str)}; mean over pairs and seeds\n")
    print(markdown(per_cfg, "cfg"))
    for cfg in cfgs:
        per_pair = [{"label": pair, **mean_rows([r for r in trained if r["pair"] == pair and r["cfg"] == cfg])}
                    for pair in dict.fromkeys(r["pair"] for r in trained)]
        print(f"\ncfg {cfg:g}, per pair (mean over seeds)\n")
        print(markdown(per_pair, "pair"))
    print(f"\ntraining seconds: mean {statistics.mean(r['train_s'] for r in trained):.1f}")
    return rows


if __name__ == "__main__":
    main()
