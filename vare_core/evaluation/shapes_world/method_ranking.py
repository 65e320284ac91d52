"""Every erasure method of the pack on the same work, on the embedded model: one ranking.

    python bench/erasure_methods.py --out out/erasure_methods                  # the documented run
    python bench/erasure_methods.py --pairs circle:square,triangle:cross --samples 8 --seeds 0 --cfg 4

Methods: the default S-VARE adapter (the profile's formulation), the paper's formulation, VARE,
naive fine-tuning, early-scale erasure (trained, each from the model's profile), the Concept Guard
alone (no training) and the guard on top of the default adapter. For every ordered pair
(concept -> anchor), sampling seed and cfg: the fidelity scores (fidelity.py: ACC_e on the main
word, unseen synonyms and context frames; colour, background and style kept on the erased
prompts; ACC_i and the same picture at the same seed on the other shapes; the spread of what
open prompts leave free), the attack families (attacks.py) at the model's cfg, training time,
sampling time against the original model's in the same run, and peak memory (resident set).

Each (pair, method) is written to OUT/pairs/ when done and each adapter to OUT/adapters/: a
stopped run resumes where it stopped, and a method added later runs alone. OUT/methods.md holds the tables, OUT/methods.json every row.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

TRAINED = {"svare": {}, "paper": {"formulation": "paper"}, "vare": {"method": "vare"},
           "naive": {"method": "naive"}, "early": {"method": "early"}}
METHODS = tuple(TRAINED) + ("guard", "guard+svare")
FIDELITY = (("ACC_e_main", "ACC_e main %"), ("ACC_e_synonym", "synonyms %"), ("ACC_e_context", "context %"),
            ("erased_color", "colour %"), ("erased_background", "background %"), ("erased_style", "style %"),
            ("erased_intact", "erased intact %"), ("ACC_i", "ACC_i %"), ("same_picture", "same picture %"),
            ("diversity", "diversity"))
DEFAULT_PAIRS = ("circle:square", "square:circle", "triangle:cross", "cross:triangle", "circle:triangle",
                 "square:cross")


_PAIRS: dict = {}          # (model fingerprint, concept, anchor) -> the pairs every method trains on


def peak_rss_mib(reset: bool = False) -> float | None:
    """The process's peak resident set (VmHWM) in MiB; reset: start a new peak (Linux)."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def train_adapter(pipe, method: str, concept: str, anchor: str, out: Path, steps: int | None):
    """The method's adapter for one pair, trained with the model's profile (cached in out)."""
    from ...erasure.adapters import load_adapter, save_adapter
    from ...erasure.profile import erasure_profile
    from ...erasure.trainer import train_erasure
    path = out / "adapters" / f"{method}_{concept}_{anchor}{'' if steps is None else f'_{steps}'}.safetensors"
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        return load_adapter(path), json.loads(info_path.read_text())
    profile = erasure_profile(pipe)
    settings = dict(TRAINED[method])
    formulation = settings.pop("formulation", "auto")
    config = profile.config(formulation, **settings, **({"steps": steps} if steps else {}))
    key = (pipe.fingerprint, concept, anchor)      # the same pairs for every method (mining takes seconds)
    if key not in _PAIRS:
        _PAIRS[key] = profile.pairs([concept], [anchor], seed=0, pipe=pipe)
    pairs = _PAIRS[key]
    peak_rss_mib(reset=True)
    start = time.perf_counter()
    result = train_erasure(pipe, pairs, config, cache_dir=out / "cache")
    info = {"train_seconds": round(time.perf_counter() - start, 1), "train_peak_MiB": peak_rss_mib(),
            "steps": config.steps}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(result.adapter, path)
    info_path.write_text(json.dumps(info))
    return result.adapter, info


def method_pipe(pipe, method: str, concept: str, anchor: str, out: Path, steps: int | None):
    """(the pipeline of `method` for one pair, its training info)."""
    from ...erasure.adapters import apply_adapter
    from ...erasure.profile import erasure_profile
    if method == "original":
        return pipe, {}
    guard = erasure_profile(pipe).guard_settings([(concept, anchor)])
    if method in TRAINED:
        adapter, info = train_adapter(pipe, method, concept, anchor, out, steps)
        return apply_adapter(pipe, adapter, 1.0), info
    if method == "guard":
        return pipe.guarded(guard), {}
    if method == "guard+svare":
        adapter, info = train_adapter(pipe, "svare", concept, anchor, out, steps)
        return apply_adapter(pipe, adapter, 1.0).guarded(guard), info
    raise ValueError(f"method {method!r}: choose from {', '.join(METHODS)}")


def timed_sets(pipe, concept, samples, seed, cfg):
    """(fidelity.sample_sets, seconds, peak MiB)."""
    from .fidelity import sample_sets
    peak_rss_mib(reset=True)
    start = time.perf_counter()
    run = sample_sets(pipe, [concept], samples, seed, cfg)
    return run, time.perf_counter() - start, peak_rss_mib()


def run_method(pipe, classifier, method: str, concept: str, anchor: str, references: dict, seeds, cfgs,
               samples: int, attack_samples: int, out: Path, steps: int | None = None, log=print,
               speed: str = "exact") -> list[dict]:
    """One method's rows for one pair: fidelity per seed and cfg against the original's sets
    (references: (seed, cfg) -> timed_sets of the original), then the attack families per seed.
    speed: how the erased model samples (generation/speed.py); the references are as given."""
    from .attacks import family_scores
    from .fidelity import fidelity_scores
    erased, info = method_pipe(pipe, method, concept, anchor, out, steps)
    if speed != "exact":
        erased = dataclasses.replace(erased, defaults={**erased.defaults, "speed": speed})
    rows, pair = [], f"{concept}>{anchor}"
    for seed in seeds:
        for cfg in cfgs:
            reference, base_seconds, _ = references[seed, cfg]
            base = fidelity_scores(reference, classifier, reference=reference)
            run, seconds, peak = timed_sets(erased, concept, samples, seed, cfg)
            scores = fidelity_scores(run, classifier, reference=reference)
            rows.append(_row(pair, method, seed, cfg, scores, base, seconds, base_seconds, peak, info))
            log(f"{pair} seed {seed} cfg {cfg:g} {method}: ACC_e {100 * scores['ACC_e']:.0f}% "
                f"ACC_i {100 * scores['ACC_i']:.0f}% same {100 * scores['same_picture']:.0f}% "
                f"time x{seconds / base_seconds:.2f}")
        rows.append({"pair": pair, "method": method, "seed": seed,
                     "attacks": family_scores(erased, classifier, concept, attack_samples, seed)})
    return rows


def time_methods(pipe, methods, concept: str, anchor: str, out: Path, steps: int | None, repeats: int = 5,
                 images: int = 64, speed: str = "exact") -> dict:
    """method -> sampling time against the original model (sampled exact): the median ratio
    of `repeats` interleaved timings of the same batch (the other shapes' fidelity prompts, one
    seed), so a busy machine slows both sides of each ratio alike. speed: the erased model's."""
    from .fidelity import prompt_sets
    prompts = [p for p, _ in prompt_sets([concept], images)["others"]][:images]
    ratios = {}
    for method in methods:
        erased, _ = method_pipe(pipe, method, concept, anchor, out, steps)
        measured = []
        for _ in range(repeats):
            start = time.perf_counter()
            pipe.generate(prompts, seed=0)
            middle = time.perf_counter()
            erased.generate(prompts, seed=0, speed=speed)
            measured.append((time.perf_counter() - middle) / (middle - start))
        ratios[method] = float(np.median(measured))
    return ratios


def _row(pair, method, seed, cfg, scores, base, seconds, base_seconds, peak, info) -> dict:
    spread = base["open_others_centre_spread"]
    row = {"pair": pair, "method": method, "seed": seed, "cfg": cfg,
           **{key: float(scores[key]) for key, _ in FIDELITY if key != "diversity"},
           "diversity": float(scores["open_others_centre_spread"] / spread) if spread else float("nan"),
           "sample_seconds": round(seconds, 3), "time_ratio": seconds / base_seconds, "sample_peak_MiB": peak}
    return {**row, **{k: v for k, v in info.items() if k != "steps"}}


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else float("nan")


def summarize(rows: list[dict], methods, timing: dict | None = None) -> dict:
    """Means over pairs and seeds: per (method, cfg) the fidelity columns, per method the attack
    families, training time, sampling time ratio (timing's, from time_methods, when given) and
    peak memory."""
    fidelity_rows = [r for r in rows if "cfg" in r]
    cfgs = sorted({r["cfg"] for r in fidelity_rows})
    out = {"cfgs": cfgs, "methods": {}}
    for method in ("original",) + tuple(methods):
        mine = [r for r in fidelity_rows if r["method"] == method]
        if not mine:
            continue
        entry = {"by_cfg": {cfg: {key: _mean(r[key] for r in mine if r["cfg"] == cfg) for key, _ in FIDELITY}
                            for cfg in cfgs},
                 "all_cfgs": {key: _mean(r[key] for r in mine) for key, _ in FIDELITY},
                 "time_ratio": (timing or {}).get(method, 1.0 if method == "original" else
                                                  _mean(r["time_ratio"] for r in mine)),
                 "sample_peak_MiB": max((r["sample_peak_MiB"] or 0) for r in mine),
                 "train_seconds": _mean(r.get("train_seconds") for r in mine),
                 "train_peak_MiB": max((r.get("train_peak_MiB") or 0) for r in mine),
                 "pairs": sorted({r["pair"] for r in mine})}
        attack_rows = [r["attacks"] for r in rows if r.get("method") == method and "attacks" in r]
        families = attack_rows[0].keys() if attack_rows else ()
        entry["attacks"] = {f: _mean(a[f] for a in attack_rows) for f in families}
        out["methods"][method] = entry
    return out


def target_report(summary: dict) -> list[str]:
    """The guard's targets on the embedded model: met, or missed by how much."""
    methods, lines = summary["methods"], []
    if "guard" in methods and "original" in methods:
        guard, original = methods["guard"]["by_cfg"], methods["original"]["by_cfg"]
        checks = []
        for cfg in summary["cfgs"]:
            for key in ("ACC_e_main", "ACC_e_synonym", "ACC_e_context"):
                checks.append((f"{key} at cfg {cfg:g} <= 5%", guard[cfg][key] - 0.05))
            for key in ("erased_color", "erased_background", "erased_style"):
                checks.append((f"{key} at cfg {cfg:g} within 3 points", original[cfg][key] - guard[cfg][key] - 0.03))
            checks.append((f"ACC_i at cfg {cfg:g} within 1 point", original[cfg]["ACC_i"] - guard[cfg]["ACC_i"] - 0.01))
            checks.append((f"same picture at cfg {cfg:g} >= 95%", 0.95 - guard[cfg]["same_picture"]))
        checks.append(("sampling time <= 1.5x", (methods["guard"]["time_ratio"] - 1.5) / 100))
        for name, excess in checks:
            lines.append(f"- guard: {name}: " + ("met" if excess <= 1e-9 else f"missed by {100 * excess:.1f} points"
                                                  if "time" not in name else f"missed: x{methods['guard']['time_ratio']:.2f}"))
    if "guard+svare" in methods and "svare" in methods:
        both, alone = methods["guard+svare"], methods["svare"]
        worse = [f for f, v in both["attacks"].items() if f != "no shape named" and v > alone["attacks"].get(f, 1) + 1e-9]
        lines.append("- guard + adapter: no attack family above the adapter alone: " +
                     ("met" if not worse else f"missed on {', '.join(worse)}"))
        for cfg in summary["cfgs"]:
            same = both["by_cfg"][cfg]["same_picture"]
            lines.append(f"- guard + adapter: same picture at cfg {cfg:g} >= 95%: " +
                         ("met" if same >= 0.95 else f"missed by {100 * (0.95 - same):.1f} points"))
    return lines


def format_tables(summary: dict) -> str:
    """Markdown: one fidelity row per method and cfg, then attacks, cost and the targets."""
    head = "| method | cfg | " + " | ".join(title for _, title in FIDELITY) + " |"
    lines = [head, "|" + "---|" * (len(FIDELITY) + 2)]
    for method, entry in summary["methods"].items():
        for cfg, values in entry["by_cfg"].items():
            cells = [f"{values[key]:.2f}" if key == "diversity" else f"{100 * values[key]:.1f}" for key, _ in FIDELITY]
            lines.append(f"| {method} | {cfg:g} | " + " | ".join(cells) + " |")
    families = next((list(e["attacks"]) for e in summary["methods"].values() if e["attacks"]), [])
    lines += ["", "| method | " + " | ".join(f"{f} %" for f in families) + " | train s | sampling time | "
              "peak MiB (train / sample) |", "|" + "---|" * (len(families) + 4)]
    for method, entry in summary["methods"].items():
        cells = [f"{100 * entry['attacks'].get(f, float('nan')):.1f}" for f in families]
        train = "-" if math.isnan(entry["train_seconds"]) else f"{entry['train_seconds']:.0f}"
        peaks = " / ".join(f"{value:.0f}" if value else "-" for value in (entry["train_peak_MiB"], entry["sample_peak_MiB"]))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {train} | x{entry['time_ratio']:.2f} | {peaks} |")
    return "\n".join(lines + [""] + target_report(summary))
