"""Rank every erasure method on the same work (embedded model; method_ranking.py says what is measured).

    OMP_NUM_THREADS=1 python bench/erasure_methods.py --out out/erasure_methods      # documented run
    python bench/erasure_methods.py --pairs circle:square,triangle:cross --seeds 0 --cfg 4 --samples 8 \\
        --attack-samples 8 --steps 20 --out /tmp/methods_quick                     # a quick look
    python bench/erasure_methods.py --speed fast --out out/erasure_methods_fast     # erased, sampled fast

--speed: how every erased model samples (its fidelity sets and attacks); the original's images,
the same-picture reference, stay exact, so "same picture" says what fast changes too.

Resumes: (pair, method) results already in OUT/pairs/ with the same settings are read, not rerun.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vare_core.evaluation.shapes_world import method_ranking as ranking


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default=",".join(ranking.DEFAULT_PAIRS), help="CONCEPT:ANCHOR,... (shapes)")
    p.add_argument("--methods", default=",".join(ranking.METHODS))
    p.add_argument("--seeds", default="0,1", help="sampling seeds")
    p.add_argument("--cfg", default="2,4,6")
    p.add_argument("--samples", type=int, default=32, help="fidelity images per prompt set (fidelity.prompt_sets)")
    p.add_argument("--attack-samples", type=int, default=20, help="images per attack family")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the profile's)")
    p.add_argument("--timing-repeats", type=int, default=5, help="interleaved timings per method (median)")
    p.add_argument("--timing-images", type=int, default=64, help="images in each timed batch")
    p.add_argument("--speed", default="exact", help="sampling speed of the erased models: exact or fast")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/erasure_methods")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from vare_core.embedded.profile import shape_name
    from vare_core.evaluation.judges.classifier import load_classifier
    from vare_core.generation.pipeline import load_pipeline
    from vare_core.generation.speed import check_speed_settings
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        pairs = [tuple(shape_name(w.strip(), flag) for w, flag in zip(p.split(":"), ("--pairs", "--pairs")))
                 for p in args.pairs.split(",")]
        if any(len(p) != 2 or p[0] == p[1] for p in pairs):
            raise ValueError(f"--pairs {args.pairs}: write CONCEPT:ANCHOR pairs of two different shapes")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in ranking.METHODS]
        if unknown or not methods:
            raise ValueError(f"--methods: choose from {', '.join(ranking.METHODS)}")
        seeds = [int(s) for s in args.seeds.split(",")]
        cfgs = [float(c) for c in args.cfg.split(",")]
        check_speed_settings(args.speed, {})
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    settings = {"seeds": seeds, "cfgs": cfgs, "samples": args.samples,
                "attack_samples": args.attack_samples, "steps": args.steps,
                **({"speed": args.speed} if args.speed != "exact" else {})}   # exact: as before
    pipe = load_pipeline("embedded", device="cpu")
    classifier = load_classifier()
    rows = []
    for concept, anchor in pairs:
        references = {}
        for method in ["original"] + methods:
            path = out / "pairs" / f"{concept}_{anchor}_{method}.json"
            trains = method in ranking.TRAINED or method == "guard+svare"
            mine = {**settings, "steps": args.steps if trains else None}     # steps: trained methods only
            if path.is_file() and json.loads(path.read_text()).get("settings") == mine:
                rows += json.loads(path.read_text())["rows"]
                continue
            if not references:          # the original's images: the reference of every method
                references = {(seed, cfg): ranking.timed_sets(pipe, concept, args.samples, seed, cfg)
                              for seed in seeds for cfg in cfgs}
            method_rows = ranking.run_method(pipe, classifier, method, concept, anchor, references, seeds, cfgs,
                                             args.samples, args.attack_samples, out, args.steps, speed=args.speed)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"settings": mine, "rows": method_rows}))
            tmp.replace(path)
            rows += method_rows
    timing_path = out / "timing.json"           # measured once per method set and speed, on the first pair
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    if timing.pop("speed", "exact") != args.speed:
        timing = {}
    missing = [m for m in methods if m not in timing]
    if missing:
        timing.update(ranking.time_methods(pipe, missing, *pairs[0], out, args.steps, args.timing_repeats,
                                           args.timing_images, speed=args.speed))
        timing_path.write_text(json.dumps({**timing, "speed": args.speed}))
    summary = ranking.summarize(rows, methods, timing)
    command = "python bench/erasure_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = ranking.format_tables(summary)
    (out / "methods.md").write_text(f"{command.strip()}\n\npairs: {', '.join(f'{c} -> {a}' for c, a in pairs)}\n\n{table}\n")
    (out / "methods.json").write_text(json.dumps({"command": command, "settings": settings, "rows": rows,
                                                  "summary": summary}, indent=1, default=str))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
