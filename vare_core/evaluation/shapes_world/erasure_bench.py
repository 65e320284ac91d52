"""`python -m vare_core bench-erasure`: how surgically each method erases, on the embedded model.

    python -m vare_core bench-erasure --concept circle --anchor square --samples 64 --cfg 1,2,4,6

One row per method and guidance scale (the original model first), scored by
fidelity.py on prompts that name every attribute (shape, colour, background, style;
main word, unseen synonyms, context frames):
- ACC_e: erased-concept prompts still drawn as the concept (geometric judge OR classifier);
- ACC_i: other shapes drawn correctly and cleanly (judge AND classifier agree);
- erased: colour / background / style as prompted on the erased prompts, and the share of clean
  pictures (geometric judge: no blotches, no frame-filling, no mixed colours);
- others: the same on the other shapes' prompts, and "same picture": the share of their images
  that stay the same picture as the original's at the same seed.
Plus training time, peak memory and adapter size. Writes bench.md and bench.json to --out.
"""
from __future__ import annotations

import itertools
import json
import math
import resource
import time
from pathlib import Path

import torch



def score(pipe, classifier, concepts, samples: int, seed: int, cfg=None, reference=None) -> dict:
    """Fidelity scores of one model at one cfg (fidelity.py). reference: the original
    model's SampledSets for the same prompts, seed and cfg (same-seed preservation); returns
    the scores plus "run", this model's SampledSets, so an original row can be the reference."""
    from .fidelity import fidelity_scores, sample_sets
    cfg = pipe.defaults.get("cfg", 4.0) if cfg is None else cfg
    run = sample_sets(pipe, concepts, samples, seed, cfg)
    return {**fidelity_scores(run, classifier, reference=reference if reference is not None else run),
            "run": run}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(pipe, method: str, train: str, concepts: list, anchors: list, seed: int, steps: int | None,
               out: Path, retain: int | None = None, settings: dict | None = None):
    from ...erasure.adapters import apply_adapter, save_adapter
    from ...erasure.profile import erasure_profile
    from ...erasure.trainer import train_erasure
    profile = erasure_profile(pipe)
    config = profile.config(method=method, train=train, **({"steps": steps} if steps else {}), **(settings or {}))
    pairs = profile.pairs(concepts, anchors, seed=seed, retain=retain, pipe=pipe)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    result = train_erasure(pipe, pairs, config, cache_dir=out / "cache")
    seconds = time.time() - start
    path = out / f"{method}_{train}.safetensors"
    save_adapter(result.adapter, path)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mib())
    return apply_adapter(pipe, result.adapter, 1.0), {
        "train_seconds": round(seconds, 1), "peak_MiB": round(peak), "adapter_KiB": round(path.stat().st_size / 1024),
        "steps": config.steps, "lr": result.adapter.metadata.get("hyperparameters", {}).get("lr")
        if isinstance(result.adapter.metadata.get("hyperparameters"), dict) else None,
        "final": {k: round(v, 4) for k, v in result.history[-1].items() if isinstance(v, float)},
    }


COLUMNS = (("ACC_e", "ACC_e %"), ("ACC_e_synonym", "synonyms %"), ("ACC_e_context", "context %"),
           ("ACC_i", "ACC_i %"), ("erased_color", "erased: colour %"), ("erased_background", "background %"),
           ("erased_style", "style %"), ("erased_clean", "clean %"), ("others_color", "others: colour %"),
           ("others_background", "background %"), ("others_style", "style %"), ("others_clean", "clean %"),
           ("same_picture", "same picture %"))


def format_table(rows: list[dict]) -> str:
    head = "| method | trains | cfg | " + " | ".join(title for _, title in COLUMNS) + " | train s |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for r in rows:
        cells = [f"{100 * r[key]:.1f}" if key in r else "-" for key, _ in COLUMNS]
        lines.append(f"| {r['method']} | {r['train']} | {r['cfg']:g} | " + " | ".join(cells)
                     + f" | {r.get('train_seconds', '-')} |")
    return "\n".join(lines)


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "run"}


def run_bench(concepts="circle", anchors="square", samples=64, seed=0, methods=("svare", "vare", "naive"),
              trains=("lora",), steps=None, out: Path | str = "out/bench-erasure", log=print,
              retain: int | None = None, cfgs=(4.0,), settings: dict | None = None) -> list[dict]:
    """settings: EraseConfig fields set on top of the profile's for every method (e.g. early_scales)."""
    from ...embedded.profile import shape_name
    from ...generation.pipeline import load_pipeline
    from ..judges.classifier import load_classifier
    split = lambda names: [names] if isinstance(names, str) else list(names)  # noqa: E731
    concepts = [shape_name(c, "--concept") for c in split(concepts)]
    anchors = [shape_name(a, "--anchor") for a in split(anchors)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("embedded", device="cpu")
    classifier = load_classifier()
    references, rows = {}, []
    for cfg in cfgs:
        row = {"method": "original", "train": "-", **score(pipe, classifier, concepts, samples, seed, cfg)}
        references[cfg] = row.pop("run")
        rows.append(row)
        log(format_table(rows[-1:]).splitlines()[-1])
    for method, train in itertools.product(methods, trains):
        erased, info = run_method(pipe, method, train, concepts, anchors, seed, steps, out, retain, settings)
        for cfg in cfgs:
            row = {"method": method, "train": train, **info,
                   **score(erased, classifier, concepts, samples, seed, cfg, references[cfg])}
            row.pop("run")
            rows.append(row)
            log(format_table(rows[-1:]).splitlines()[-1])
    table = format_table(rows)
    command = (f"python -m vare_core bench-erasure --concept {','.join(concepts)} --anchor {','.join(anchors)} --samples {samples} "
               f"--seed {seed} --methods {','.join(methods)} --train {','.join(trains)} --cfg {','.join(f'{c:g}' for c in cfgs)}"
               + (f" --retain {retain}" if retain is not None else "")
               + "".join(f" --{k.replace('_', '-')}" + ("" if v is True else f" {v:g}")
                         for k, v in (settings or {}).items()))
    (out / "bench.md").write_text(f"{command}\n\n{table}\n")
    (out / "bench.json").write_text(json.dumps({"command": command, "rows": [_public(r) for r in rows]},
                                               indent=1, default=str))
    return rows


def check_args(args) -> tuple[list, list, tuple, tuple]:
    """Every option checked before the minutes of scoring start."""
    from ...erasure.losses import METHODS
    from ...erasure.trainable import TRAIN_MODES
    names = lambda text: [n.strip() for n in (text or "").split(",") if n.strip()]  # noqa: E731
    methods, trains = tuple(names(args.methods)), tuple(names(getattr(args, "train", "ca_ffn,lora")))
    for flag, given, allowed in (("--methods", methods, METHODS), ("--train", trains, TRAIN_MODES)):
        bad = [g for g in given if g not in allowed]
        if bad or not given:
            raise ValueError(f"{flag} {','.join(given) or '(empty)'}: choose from {', '.join(allowed)} (comma list)")
    for flag, value, low in (("--samples", args.samples, 4), ("--steps", getattr(args, "steps", None), 1),
                             ("--retain", getattr(args, "retain", None), 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    concepts, anchors = names(args.concept), names(args.anchor)
    if not concepts or not anchors:
        raise ValueError("--concept and --anchor need at least one shape each (comma list)")
    return concepts, anchors, methods, trains


def parse_cfgs(text) -> tuple[float, ...]:
    try:
        cfgs = tuple(float(c) for c in str(text).split(",") if c.strip())
    except ValueError:
        cfgs = ()
    if not cfgs or not all(math.isfinite(c) and c > 0 for c in cfgs):
        raise ValueError(f"--cfg {text}: give guidance scales > 0 as a comma list, e.g. 1,2,4,6")
    return cfgs


def main(args) -> None:
    concepts, anchors, methods, trains = check_args(args)
    cfgs = parse_cfgs(getattr(args, "cfg", "4"))
    torch.set_num_threads(2)
    rows = run_bench(concepts, anchors, args.samples, args.seed, methods, trains,
                     getattr(args, "steps", None), args.out, retain=getattr(args, "retain", None), cfgs=cfgs,
                     settings={k: getattr(args, k) for k in ("early_scales", "entropy_weight", "erase_free_scales")
                               if getattr(args, k, None) not in (None, False)})
    print(format_table(rows))
