"""`python -m vare_core evaluate`: a prompt set sampled with and without an adapter, judged, tabled.

    python -m vare_core evaluate --model embedded --adapter erase_circle.safetensors \
        --prompts prompts.csv --judge shapes --concept circle --n-per-prompt 4 --seed 0 --out out/eval
    python -m vare_core evaluate --model infinity_2b_reg.pth --vae infinity_vae_d32reg.pth \
        --text-encoder models/text_encoders/flan-t5-xl --adapter erase_nudity.safetensors \
        --prompts i2p.csv --judge nudenet --n-per-prompt 1 --out out/i2p

The CSV needs a `prompt` column (I2P's layout works as it is); when present, `sd_seed` gives a
row's seed (otherwise --seed + the row's number) and `sd_guidance_scale` its cfg (unless --cfg is
given). A row's images are drawn as one batch from its seed, the same with and without the
adapter. Every image (atomically) and verdict (an fsynced line of verdicts.jsonl) is written as it
is made, so a stopped run resumes where it was: rows already judged are not sampled again.
Results: results.md (per class, total detections before / after, the paper's layout) and
results.json in --out.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .judges import class_totals
from .paths import write_bytes_atomic

SIDES = ("base", "adapter")
STATE_FILE = "verdicts.jsonl"
MAX_ROWS = 100_000


def read_prompt_rows(path: Path, seed: int) -> list[dict]:
    """CSV -> [{"prompt", "seed", "cfg" (None: the sampler's)}]; seeds default to seed + row."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {path}: cannot read it as a UTF-8 CSV file ({err})") from None
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
        raise ValueError(f"--prompts {path}: needs a header row with a 'prompt' column "
                       f"(found: {', '.join(reader.fieldnames or []) or 'nothing'})")
    rows = []
    for number, record in enumerate(reader, start=2):          # line 1 is the header
        prompt = (record.get("prompt") or "").strip()
        if not prompt:
            raise ValueError(f"--prompts {path}, line {number}: the prompt is empty; fill it in or remove the line")
        row = {"prompt": prompt, "seed": seed + len(rows), "cfg": None}
        for column, key, kind in (("sd_seed", "seed", int), ("sd_guidance_scale", "cfg", float)):
            value = (record.get(column) or "").strip()
            if value:
                try:
                    row[key] = kind(float(value)) if kind is int else kind(value)
                except ValueError:
                    raise ValueError(f"--prompts {path}, line {number}: {column} {value!r} is not a number") from None
        if not 0 <= row["seed"] < 2**62:
            raise ValueError(f"--prompts {path}, line {number}: seed {row['seed']} must be between 0 and 2^62")
        rows.append(row)
        if len(rows) > MAX_ROWS:
            raise ValueError(f"--prompts {path}: more than {MAX_ROWS} rows; split the file")
    if not rows:
        raise ValueError(f"--prompts {path}: no prompts after the header")
    return rows


def fingerprint(paths: list[str]) -> list[str]:
    """Content hashes of the adapter files: a resumed run must use the same adapter."""
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16] for p in paths]


def load_state(out: Path, settings: dict) -> dict:
    """The verdicts already written to `out` for these settings; an error if `out` holds
    another run (resuming it would mix two evaluations).

    verdicts.jsonl: line 1 the settings, then one line per judged (side, row), appended and
    fsynced as each is made (a whole-file rewrite per row would grow with the prompt set). A
    line cut short by a crash is dropped, so that row is sampled again."""
    path = out / STATE_FILE
    if not path.is_file():
        write_bytes_atomic(path, (json.dumps({"settings": settings}) + "\n").encode())
        return {"settings": settings, "done": {}}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--out {out}: {STATE_FILE} cannot be read ({err}); remove it to start over") from None
    complete, _, torn = text.rpartition("\n")
    if torn:                                      # a crash mid-line: keep the whole lines only
        write_bytes_atomic(path, (complete + "\n").encode() if complete else b"")
    try:
        records = [json.loads(line) for line in complete.splitlines() if line.strip()]
    except ValueError as err:
        raise ValueError(f"--out {out}: {STATE_FILE} is damaged ({err}); remove it to start over") from None
    saved = records[0].get("settings", {}) if records else {}
    if saved != settings:
        changed = sorted(k for k in set(settings) | set(saved) if settings.get(k) != saved.get(k))
        raise ValueError(f"--out {out} holds an evaluation with other settings ({', '.join(changed)}); "
                       "give another --out, or delete that folder to start over")
    return {"settings": settings, "done": {r["key"]: r["verdicts"] for r in records[1:]}}


def append_record(path: Path, record: dict) -> None:
    """One line, flushed and fsynced before the next row starts."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_png(image: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    write_bytes_atomic(path, buffer.getvalue())


def evaluate_prompt_set(pipes: dict, rows: list[dict], judge, out: Path, n_per_prompt: int,
                        settings: dict, sampling: dict | None = None, progress=None) -> dict:
    """Sample every row with each pipe (same seeds), judge, write images and verdicts as they
    are made; -> the summary (also written as results.json / results.md)."""
    from .judges.nudity import to_uint8
    sampling = sampling or {}
    out.mkdir(parents=True, exist_ok=True)
    state = load_state(out, settings)
    for side, pipe in pipes.items():
        (out / "images" / side).mkdir(parents=True, exist_ok=True)
        for index, row in enumerate(rows):
            key = f"{side}/{index}"
            if key in state["done"]:
                if progress:
                    progress(1)
                continue
            kwargs = dict(sampling)
            if row["cfg"] is not None and "cfg" not in sampling:
                kwargs["cfg"] = row["cfg"]
            images = pipe.generate([row["prompt"]] * n_per_prompt, seed=row["seed"], **kwargs).images
            verdicts = judge.judge(images)
            for k, image in enumerate(to_uint8(images)):
                save_png(image, out / "images" / side / f"{index:05d}_{k:02d}.png")
            state["done"][key] = [{"flagged": v.flagged, "counts": v.counts, "caption": v.caption} for v in verdicts]
            append_record(out / STATE_FILE, {"key": key, "verdicts": state["done"][key]})
            if progress:
                progress(1)
    summary = summarize(state, list(pipes), len(rows), judge.classes)
    write_bytes_atomic(out / "results.json", json.dumps(summary, indent=1).encode())
    write_bytes_atomic(out / "results.md", (results_table(summary) + "\n").encode())
    return summary


def summarize(state: dict, sides: list[str], n_rows: int, classes) -> dict:
    summary = {"settings": state["settings"], "classes": list(classes), "sides": {}}
    for side in sides:
        verdicts = [v for index in range(n_rows) for v in state["done"][f"{side}/{index}"]]
        summary["sides"][side] = {
            "images": len(verdicts), "flagged": sum(v["flagged"] for v in verdicts),
            "detections": class_totals((v["counts"] for v in verdicts), classes),
            "flagged_rows": [index for index in range(n_rows)
                             if any(v["flagged"] for v in state["done"][f"{side}/{index}"])]}
    return summary


def results_table(summary: dict) -> str:
    sides = list(summary["sides"])
    titles = {"base": "without adapter", "adapter": "with adapter"}
    settings = summary["settings"]
    lines = [f"# Prompt-set evaluation ({settings['judge']} judge)", "",
             f"{settings['rows']} prompts x {settings['n_per_prompt']} images, seed {settings['seed']}; "
             f"prompts {settings['prompts']}", "",
             "| class | " + " | ".join(titles[s] for s in sides) + " |", "|---|" + "---|" * len(sides)]
    for c in summary["classes"]:
        lines.append(f"| {c} | " + " | ".join(str(summary["sides"][s]["detections"][c]) for s in sides) + " |")
    lines.append("| **total detections** | " + " | ".join(
        str(sum(summary["sides"][s]["detections"].values())) for s in sides) + " |")
    lines.append("| images flagged | " + " | ".join(
        f"{summary['sides'][s]['flagged']} of {summary['sides'][s]['images']} "
        f"({summary['sides'][s]['flagged'] / max(1, summary['sides'][s]['images']):.1%})" for s in sides) + " |")
    return "\n".join(lines)
