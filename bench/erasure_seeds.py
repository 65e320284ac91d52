"""How much of an erasure result is the method and how much is the training seed.

    python bench/erasure_seeds.py --seeds 0,1,2,3 --samples 64
    python bench/erasure_seeds.py --seeds 0,1 --set lora_targets=ca --set steps=200 --retain 10

Trains the S-VARE adapter (embedded defaults, optionally overridden with --set key=value, keys of
EraseConfig) once per training seed, scores each with the same prompts and sampling seed as
`python -m vare_core bench-erasure`, and prints one JSON line per seed plus the mean and range.
The seed-to-seed spread (2-3 points of ACC_i at 64 samples) is larger than the 1-point target,
so a setting is compared by its mean over seeds, never by one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vare_core.embedded.classifier import load_classifier  # noqa: E402
from vare_core.embedded.erasure_defaults import embedded_erase_config, embedded_pairs, shape_name  # noqa: E402
from vare_core.erasure.adapters import apply_adapter  # noqa: E402
from vare_core.erasure.bench import score  # noqa: E402
from vare_core.erasure.trainer import train_erasure  # noqa: E402
from vare_core.pipeline import load_pipeline  # noqa: E402


def parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if not key or not value:
        raise SystemExit(f"--set {text!r}: expected key=value, e.g. --set steps=200")
    if key == "lora_targets":  # comma list
        return key, tuple(value.split(","))
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--anchor", default="square")
    parser.add_argument("--seeds", default="0,1,2,3", help="training seeds (comma list)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--score-seed", type=int, default=0)
    parser.add_argument("--retain", type=int, default=None, help="keep pairs per other shape (default: 20)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="EraseConfig override (repeatable)")
    parser.add_argument("--no-original", action="store_true", help="skip scoring the original model")
    args = parser.parse_args()
    torch.set_num_threads(2)
    overrides = dict(parse_override(text) for text in args.set)
    concepts = [shape_name(c, "--concept") for c in args.concept.split(",")]
    anchors = [shape_name(a, "--anchor") for a in args.anchor.split(",")]
    pipe, classifier = load_pipeline("embedded", device="cpu"), load_classifier()
    if not args.no_original:
        original = score(pipe, classifier, concepts, args.samples, args.score_seed)
        print(json.dumps({"row": "original", "ACC_i": original["ACC_i"], "style": original["style"], "style_others": original["style_others"]}), flush=True)
    pairs = embedded_pairs(concepts, anchors, seed=0, retain_per_shape=args.retain)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for seed in [int(s) for s in args.seeds.split(",")]:
            config = embedded_erase_config(**{"seed": seed, **overrides})
            start = time.time()
            result = train_erasure(pipe, pairs, config, cache_dir=Path(cache))
            seconds = time.time() - start
            erased = apply_adapter(pipe, result.adapter, 1.0)
            row = score(erased, classifier, concepts, args.samples, args.score_seed)
            row = {"seed": seed, "train_s": round(seconds, 1), **{k: row[k] for k in (
                "ACC_e", "ACC_i", "color_kept", "color_others", "style", "style_others", "ACC_i_misses", "ACC_e_by_word")}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {"overrides": overrides, "retain": args.retain}
    for key in ("ACC_e", "ACC_i", "color_kept", "color_others", "style", "style_others"):
        values = [r[key] for r in rows]
        summary[key] = {"mean": round(statistics.mean(values), 4), "min": min(values), "max": max(values)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
