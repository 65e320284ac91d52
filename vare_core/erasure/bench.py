"""`python -m vare_core bench-erasure`: how surgically each method erases, on the embedded model.

    python -m vare_core bench-erasure --concept circle --anchor square --samples 64

One row per method (the original model, then naive fine-tuning, basic VARE and S-VARE, each
with full CA+FFN weights and with LoRA), judged by the shapes classifier:
- ACC_e: prompts naming the erased concept (its main word AND its synonyms, which training
  never saw) still drawn as the concept. Lower is better.
- ACC_i: prompts naming the other shapes drawn correctly. Should stay at the original's level.
- colour kept: erased-concept prompts whose colour is still the prompted one; colour, others:
  the same on the other shapes' prompts.
- style: striped / solid prompts over all shapes drawn with the prompted fill; style, others:
  only the shapes not erased (what must not change at all).
Plus training time, peak memory and adapter size. Writes bench.md and bench.json to --out.
"""
from __future__ import annotations

import collections
import itertools
import json
import resource
import time
from pathlib import Path

import torch

from ..embedded.world import COLORS, SHAPES, STYLES, SYNONYMS


def prompt_sets(concepts, samples: int) -> dict:
    """Prompt lists with the attributes expected of each image; `concepts`: one shape or a list."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    colors = list(COLORS)
    per = max(1, samples // len(colors))
    erased = [(f"a {c} {w}", {"shape": concept, "color": c})
              for concept in concepts for w in SYNONYMS[concept] for c in colors for _ in range(per)]
    others = [(f"a {c} {s}", {"shape": s, "color": c})
              for s in SHAPES if s not in concepts for c in colors for _ in range(per)]
    per_style = max(1, samples // (len(SHAPES) * len(STYLES)))
    styles = [(f"a {st} {c} {s}", {"style": st, "shape": s})
              for s, st in itertools.product(SHAPES, STYLES) for c in colors[:2] for _ in range(per_style)]
    return {"erased": erased, "others": others, "styles": styles}


def judge(pipe, classifier, items, seed: int, batch: int = 200) -> list[tuple[dict, dict]]:
    from ..embedded.classifier import classify
    out = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        images = pipe.generate([p for p, _ in chunk], seed=seed + start).images
        out += list(zip(classify(classifier, images), [e for _, e in chunk]))
    return out


def score(pipe, classifier, concepts, samples: int, seed: int) -> dict:
    """ACC_e counts an erased-concept prompt as a failure when its OWN concept is drawn."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    sets = prompt_sets(concepts, samples)
    erased = judge(pipe, classifier, sets["erased"], seed)
    others = judge(pipe, classifier, sets["others"], seed + 100_000)
    styles = judge(pipe, classifier, sets["styles"], seed + 200_000)
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    kept = [j["shape"] == e["shape"] for j, e in erased]
    by_word = {}
    for concept in concepts:
        for word in SYNONYMS[concept]:
            by_word[word] = mean([hit for hit, (p, e) in zip(kept, sets["erased"])
                                  if e["shape"] == concept and p.endswith(f" {word}")])
    result = {
        "ACC_e": mean(kept),
        "ACC_e_by_word": by_word,
        "ACC_i": mean([j["shape"] == e["shape"] for j, e in others]),
        "ACC_i_by_shape": {s: mean([j["shape"] == s for j, e in others if e["shape"] == s])
                           for s in SHAPES if s not in concepts},
        "color_kept": mean([j["color"] == e["color"] for j, e in erased]),
        "color_others": mean([j["color"] == e["color"] for j, e in others]),
        "style": mean([j["style"] == e["style"] for j, e in styles]),
        "style_others": mean([j["style"] == e["style"] for j, e in styles if e["shape"] not in concepts]),
        "erased_drawn_as": {s: mean([j["shape"] == s for j, _ in erased]) for s in SHAPES},
        # which other-shape prompts failed, and as what: {"triangle -> square": 3}
        "ACC_i_misses": dict(collections.Counter(f"{e['shape']} -> {j['shape']}" for j, e in others
                                                 if j["shape"] != e["shape"])),
    }
    if len(concepts) > 1:
        result["ACC_e_by_concept"] = {c: mean([hit for hit, (_, e) in zip(kept, erased) if e["shape"] == c])
                                      for c in concepts}
    return result


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(pipe, method: str, train: str, concepts: list, anchors: list, seed: int, steps: int | None,
               out: Path, retain: int | None = None):
    from ..embedded.erasure_defaults import embedded_erase_config, embedded_pairs
    from .adapters import apply_adapter, save_adapter
    from .trainer import train_erasure
    config = embedded_erase_config(steps=steps, method=method, train=train)
    pairs = embedded_pairs(concepts, anchors, seed=seed, retain_per_shape=retain)
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


def format_table(rows: list[dict]) -> str:
    lines = ["| method | trains | ACC_e % (lower) | ACC_i % | colour kept % | colour, others % | style % "
             "| style, others % | train s | peak MiB | adapter KiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['train']} | {100 * r['ACC_e']:.1f} | {100 * r['ACC_i']:.1f} | "
                     f"{100 * r['color_kept']:.1f} | {100 * r['color_others']:.1f} | {100 * r['style']:.1f} | "
                     f"{100 * r['style_others']:.1f} | {r.get('train_seconds', '-')} | "
                     f"{r.get('peak_MiB', '-')} | {r.get('adapter_KiB', '-')} |")
    return "\n".join(lines)


def run_bench(concepts="circle", anchors="square", samples=64, seed=0, methods=("svare", "vare", "naive"),
              trains=("ca_ffn", "lora"), steps=None, out: Path | str = "out/bench-erasure", log=print,
              retain: int | None = None) -> list[dict]:
    from ..embedded.classifier import load_classifier
    from ..embedded.erasure_defaults import shape_name
    from ..pipeline import load_pipeline
    split = lambda names: [names] if isinstance(names, str) else list(names)  # noqa: E731
    concepts = [shape_name(c, "--concept") for c in split(concepts)]
    anchors = [shape_name(a, "--anchor") for a in split(anchors)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("embedded", device="cpu")
    classifier = load_classifier()
    rows = [{"method": "original", "train": "-", **score(pipe, classifier, concepts, samples, seed)}]
    log(format_table(rows))
    for method, train in itertools.product(methods, trains):
        erased, info = run_method(pipe, method, train, concepts, anchors, seed, steps, out, retain)
        rows.append({"method": method, "train": train, **info, **score(erased, classifier, concepts, samples, seed)})
        log(format_table(rows[-1:]).splitlines()[-1])
    table = format_table(rows)
    command = (f"python -m vare_core bench-erasure --concept {','.join(concepts)} --anchor {','.join(anchors)} --samples {samples} "
               f"--seed {seed} --methods {','.join(methods)} --train {','.join(trains)}"
               + (f" --retain {retain}" if retain is not None else ""))
    (out / "bench.md").write_text(f"{command}\n\n{table}\n")
    (out / "bench.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    return rows


def check_args(args) -> tuple[list, list, tuple, tuple]:
    """Every option checked before the minutes of scoring start."""
    from .adapters import TRAIN_MODES
    from .losses import METHODS
    names = lambda text: [n.strip() for n in (text or "").split(",") if n.strip()]  # noqa: E731
    methods, trains = tuple(names(args.methods)), tuple(names(getattr(args, "train", "ca_ffn,lora")))
    for flag, given, allowed in (("--methods", methods, METHODS), ("--train", trains, TRAIN_MODES)):
        bad = [g for g in given if g not in allowed]
        if bad or not given:
            raise ValueError(f"{flag} {','.join(given) or '(empty)'}: choose from {', '.join(allowed)} (comma list)")
    for flag, value, low in (("--samples", args.samples, 1), ("--steps", getattr(args, "steps", None), 1),
                             ("--retain", getattr(args, "retain", None), 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    concepts, anchors = names(args.concept), names(args.anchor)
    if not concepts or not anchors:
        raise ValueError("--concept and --anchor need at least one shape each (comma list)")
    return concepts, anchors, methods, trains


def main(args) -> None:
    concepts, anchors, methods, trains = check_args(args)
    torch.set_num_threads(2)
    rows = run_bench(concepts, anchors, args.samples, args.seed, methods, trains,
                     getattr(args, "steps", None), args.out, retain=getattr(args, "retain", None))
    print(format_table(rows))
