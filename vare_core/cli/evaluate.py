"""`python -m vare_core evaluate`: a prompt set (CSV) sampled with and without an adapter
(and/or a Concept Guard: --guard CONCEPT:ANCHOR), judged, tabled (the work is evaluation/prompt_eval.py's).

    python -m vare_core evaluate --model embedded --prompts prompts.csv --judge shapes \
        --concept circle --adapter erase_circle.safetensors --out out/eval

Checked before the model loads: the flags, the CSV (a regular file, bounded, every cell), and
--out (missing, empty, or a run folder evaluate marked as its own, with no links in it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..erasure.adapters import parse_adapter_spec
from ..evaluation.judges import JUDGES, make_judge
from ..evaluation.prompt_eval import (MAX_ROWS, check_out_folder, evaluate_prompt_set, fingerprint,
                                      read_prompt_rows, results_table)
from .guard_args import add_guard_args, check_guard_args, guard_from_args
from .common import (CliError, add_model_args, add_sampling_args, apply_adapter_args, load_from_args,
                     sampling_kwargs)


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="a prompt set (CSV) with and without an adapter, judged (shapes or NudeNet)")
    add_model_args(p)
    add_sampling_args(p)
    add_guard_args(p)
    p.add_argument("--prompts", required=True, help="CSV with a 'prompt' column (I2P's sd_seed, sd_guidance_scale read too)")
    p.add_argument("--judge", required=True, choices=JUDGES,
                   help="shapes: the embedded world (needs --concept); nudenet: exposed body parts (optional package)")
    p.add_argument("--concept", default=None, help="shapes judge: the shape or colour counted")
    p.add_argument("--threshold", type=float, default=None, help="nudenet: detection score threshold (default 0.6)")
    p.add_argument("--n-per-prompt", type=int, default=1, help="images per prompt and side")
    p.add_argument("--seed", type=int, default=0, help="row i uses seed + i unless its sd_seed is given")
    p.add_argument("--out", required=True, help="a new or empty folder for images, verdicts and the results "
                   "table; the same folder again resumes the run")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args):
    from tqdm import tqdm

    if not 1 <= args.n_per_prompt <= 1000:
        raise CliError(f"--n-per-prompt {args.n_per_prompt}: between 1 and 1000 images per prompt")
    if not 0 <= args.seed < 2**62 - MAX_ROWS:
        raise CliError(f"--seed {args.seed}: must be between 0 and 2^62")
    if args.judge == "shapes" and not args.concept:
        raise CliError("--judge shapes needs --concept: the shape or colour to count, e.g. --concept circle")
    if args.judge != "nudenet" and args.threshold is not None:
        raise CliError("--threshold is the nudenet judge's; leave it out with --judge shapes")
    check_guard_args(args)
    out = Path(args.out)
    rows = read_prompt_rows(Path(args.prompts), args.seed)
    check_out_folder(out)
    try:     # before the (slow) model load: a missing optional package or a bad concept fails now
        judge = make_judge(args.judge, concept=args.concept, threshold=args.threshold)
    except ImportError as err:
        raise CliError(str(err)) from None
    except ValueError as err:
        raise CliError(f"--{'concept' if args.judge == 'shapes' else 'threshold'}: {err}") from None
    base = load_from_args(args)
    pipes = {"base": base}
    if args.adapter:
        pipes["adapter"] = apply_adapter_args(base, args.adapter)
    guard = guard_from_args(args, base)
    if guard is not None:               # what the guard adds, on top of the adapters if any
        pipes["guarded"] = pipes.get("adapter", base).guarded(guard)
    sampling = sampling_kwargs(args, len(base.schedule_for(args.height, args.width)))
    if args.height is not None:
        sampling.update(height=args.height, width=args.width)
    if args.negative and args.negative.strip():
        sampling["negative_prompt"] = args.negative
    settings = {"model": args.model, "adapters": args.adapter,
                "adapter_sha256": fingerprint([parse_adapter_spec(spec)[0] for spec in args.adapter]),
                "judge": args.judge, "concept": args.concept, "threshold": getattr(judge, "threshold", None),
                "guard": dataclasses.asdict(guard) if guard is not None else None,
                "n_per_prompt": args.n_per_prompt, "seed": args.seed, "rows": len(rows),
                "prompts": Path(args.prompts).name, "prompts_sha256": hashlib.sha256(
                    json.dumps(rows).encode()).hexdigest()[:16],
                "sampling": sampling}
    with tqdm(total=len(rows) * len(pipes), desc="evaluate", unit="prompt") as bar:
        summary = evaluate_prompt_set(pipes, rows, judge, out, args.n_per_prompt, settings, sampling, bar.update)
    print(results_table(summary))
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and the images under {out / 'images'}")
