"""`python -m vare_core evaluate`: a prompt set sampled with and without an adapter, judged, tabled.

    python -m vare_core evaluate --model embedded --adapter erase_circle.safetensors \
        --prompts prompts.csv --judge shapes --concept circle --n-per-prompt 4 --seed 0 --out out/eval
    python -m vare_core evaluate --model infinity_2b_reg.pth --vae infinity_vae_d32reg.pth \
        --text-encoder models/text_encoders/flan-t5-xl --adapter erase_nudity.safetensors \
        --prompts i2p.csv --judge nudenet --n-per-prompt 1 --out out/i2p

The CSV (a regular file of at most MAX_PROMPTS_BYTES) needs a `prompt` column (I2P's layout works
as it is); when present, `sd_seed` gives a row's seed (a whole number from 0 to 2^62-1, read as an
integer: "123" or "123.0"; otherwise --seed + the row's number) and `sd_guidance_scale` its cfg
(unless --cfg is given). A bad cell is refused with its line and column. A row's images are drawn
as one batch from its seed, the same with and without the adapter.

The run folder (--out) is made by evaluate and marked as its own (run_folder.py): a missing or
empty folder starts a run, a marked one resumes, any other folder is refused (never written
into), and a symbolic link at any file or sub-folder of the run is refused by name.

Every image (atomically) and verdict (an fsynced line of verdicts.jsonl) is written as it is
made, so a stopped run resumes where it was: rows already judged are not sampled again. A line
of verdicts.jsonl is trusted only as a whole: a line cut short by a crash (the last one, without
its newline) is dropped silently and its prompt sampled again; any other line must be one of this
run's records (a key naming this run's side and prompt, that prompt's seed and text hash,
n_per_prompt verdicts with the judge's classes), else the run is refused naming the file and line
(delete that line, and its prompt is sampled again, or delete the folder to start over): an
edited record is never silently taken into the table. A full disk stops the run with a message;
an image is written whole or not at all and a verdict line is cut back if it could not be
written whole, so resuming after freeing space samples that prompt again.

Results: results.md (per class, total detections before / after, the paper's layout) and
results.json in --out.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from .. import paths
from .judges import class_totals
from .run_folder import MARKER_NAME, RunFolder, TooLarge, read_regular_file
from ..generation.per_scale import check_setting_range

SIDES = ("base", "adapter", "guarded")     # guarded: a Concept Guard on top of the adapters, if any
STATE_FILE = "verdicts.jsonl"
RESULT_FILES = ("results.md", "results.json")
MAX_ROWS = 100_000
MAX_PROMPTS_BYTES = 64 * 2**20        # far above a prompt set (text, at most MAX_ROWS rows)
MAX_ROW_SEED = 2**62                  # a row's seed is below this (torch generators take 63 bits)
MAX_CAPTION = 500                     # a verdict's caption is kept to this many characters
MAX_COUNT = 100_000                   # detections of one class in one image, at most
_WHOLE = re.compile(r"\+?([0-9]+)(?:\.0*)?")


def _short(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _read_prompts_bytes(path: Path) -> bytes:
    """The file's bytes: a regular file only (a FIFO would block, /dev/zero never ends), at most
    MAX_PROMPTS_BYTES, checked before reading and bounded while reading."""
    paths.require_regular_file(path, "--prompts")
    try:
        return read_regular_file(path, MAX_PROMPTS_BYTES)
    except TooLarge as err:
        raise ValueError(f"--prompts {path} is {err.size / 2**20:.0f} MiB; at most {MAX_PROMPTS_BYTES // 2**20} "
                         f"MiB ({MAX_ROWS} prompts) are read: split it") from None
    except ValueError:                                     # replaced since the check
        raise ValueError(f"--prompts {path} is not a regular file; give the CSV file itself") from None
    except OSError as err:
        raise ValueError(f"--prompts {path}: cannot be read ({err.strerror or err})") from None


def parse_row_seed(value: str, column: str = "sd_seed") -> int:
    """A CSV seed cell -> int, read as an integer ("123"; "123.0" as spreadsheets write it),
    never through float(); ValueError naming the column and saying what is wrong."""
    match = _WHOLE.fullmatch(value)
    if not match:
        raise ValueError(f"{column} {_short(value)} is not a whole number (digits) from 0 to 2^62-1")
    digits = match.group(1).lstrip("0") or "0"
    if len(digits) > 19 or int(digits) >= MAX_ROW_SEED:
        raise ValueError(f"{column} {_short(value)} is too large: seeds go from 0 to 2^62-1 ({MAX_ROW_SEED - 1})")
    return int(digits)


def parse_row_cfg(value: str, column: str = "sd_guidance_scale") -> float:
    """A CSV guidance cell -> float within the sampler's cfg range (per_scale.check_setting_range)."""
    try:
        cfg = float(value)
    except ValueError:
        raise ValueError(f"{column} {_short(value)} is not a number") from None
    check_setting_range([cfg], column)
    return cfg


def read_prompt_rows(path: Path, seed: int) -> list[dict]:
    """CSV -> [{"prompt", "seed", "cfg" (None: the sampler's)}]; seeds default to seed + row."""
    path = Path(path)
    try:
        text = _read_prompts_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompts {path}: cannot read it as a UTF-8 CSV file ({err})") from None
    reader = csv.DictReader(io.StringIO(text))

    def csv_problem(err: csv.Error) -> ValueError:
        where = f"--prompts {path}, line {reader.reader.line_num}"
        if "field limit" in str(err):
            return ValueError(f"{where}: a cell is longer than {csv.field_size_limit()} characters, the "
                              "CSV reader's limit (a prompt is read up to the text encoder's 512 tokens "
                              "anyway); shorten it")
        return ValueError(f"{where}: not a readable CSV row ({err}); check its quotes")

    try:
        fieldnames = reader.fieldnames
    except csv.Error as err:
        raise csv_problem(err) from None
    if not fieldnames or "prompt" not in fieldnames:
        raise ValueError(f"--prompts {path}: needs a header row with a 'prompt' column "
                         f"(found: {', '.join(fieldnames or []) or 'nothing'})")
    rows = []
    records = iter(reader)
    while True:
        try:
            record = next(records)
        except StopIteration:
            break
        except csv.Error as err:
            raise csv_problem(err) from None
        where = f"--prompts {path}, line {reader.reader.line_num}"
        prompt = record.get("prompt")
        prompt = prompt.strip() if isinstance(prompt, str) else ""
        if not prompt:
            raise ValueError(f"{where}: the prompt is empty; fill it in or remove the line")
        row = {"prompt": prompt, "seed": seed + len(rows), "cfg": None}
        for column, key, parse in (("sd_seed", "seed", parse_row_seed), ("sd_guidance_scale", "cfg", parse_row_cfg)):
            value = record.get(column)
            value = value.strip() if isinstance(value, str) else ""
            if value:
                try:
                    row[key] = parse(value, column)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
        if not 0 <= row["seed"] < MAX_ROW_SEED:
            raise ValueError(f"{where}: seed {row['seed']} must be between 0 and 2^62-1")
        rows.append(row)
        if len(rows) > MAX_ROWS:
            raise ValueError(f"--prompts {path}: more than {MAX_ROWS} rows; split the file")
    if not rows:
        raise ValueError(f"--prompts {path}: no prompts after the header")
    return rows


def fingerprint(files: list[str]) -> list[str]:
    """Content hashes of the adapter files: a resumed run must use the same adapter."""
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16] for p in files]


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def run_folder(out: Path) -> RunFolder:
    """The --out folder as evaluate's run folder (run_folder.RunFolder)."""
    return RunFolder(Path(out), "evaluate", own_names=(STATE_FILE, "images") + RESULT_FILES)


def check_out_folder(out: Path) -> None:
    """Before the slow model load: --out is missing, empty or an evaluate run with no links in it
    (ValueError otherwise). Writes nothing."""
    folder = run_folder(out)
    if folder.inspect() == "run":
        folder.check_tree((MARKER_NAME, STATE_FILE) + RESULT_FILES, ("images",) + tuple(f"images/{s}" for s in SIDES))


class Layout:
    """What this run's verdicts.jsonl may hold: a record per (side, prompt) of this run."""

    def __init__(self, sides, rows: list[dict], n_per_prompt: int, classes):
        self.sides, self.rows, self.n_per_prompt = list(sides), rows, n_per_prompt
        self.classes = set(classes)
        self.key = re.compile(r"(" + "|".join(map(re.escape, self.sides)) + r")/(0|[1-9][0-9]{0,9})")

    def limit(self) -> int:
        """verdicts.jsonl's largest honest size (bounded captions and counts), for the read."""
        per_verdict = 200 + MAX_CAPTION * 6 + sum(len(c) + 12 for c in self.classes)
        return 2**20 + len(self.sides) * len(self.rows) * (300 + self.n_per_prompt * per_verdict)

    def check(self, record) -> tuple[str, list]:
        """(key, verdicts) of one record line, or ValueError saying what is wrong with it."""
        if not isinstance(record, dict):
            raise ValueError(f"not a verdict record but a JSON {type(record).__name__}")
        fields = {"key", "seed", "prompt_sha256", "verdicts"}
        if set(record) != fields:
            raise ValueError(f"has the fields {sorted(record)}, a verdict record has {sorted(fields)}")
        key = record["key"]
        match = self.key.fullmatch(key) if isinstance(key, str) else None
        if not match or int(match.group(2)) >= len(self.rows):
            raise ValueError(f"key {json.dumps(key)[:60]} is none of this run's: side/prompt with side "
                             f"{' or '.join(self.sides)} and prompt 0 to {len(self.rows) - 1}")
        row = self.rows[int(match.group(2))]
        if type(record["seed"]) is not int or record["seed"] != row["seed"]:
            raise ValueError(f"{key}: seed {json.dumps(record['seed'])[:40]} is not that prompt's seed {row['seed']}")
        if record["prompt_sha256"] != prompt_hash(row["prompt"]):
            raise ValueError(f"{key}: prompt_sha256 is not that of this run's prompt {int(match.group(2))}")
        verdicts = record["verdicts"]
        if not isinstance(verdicts, list) or len(verdicts) != self.n_per_prompt:
            raise ValueError(f"{key}: verdicts must be a list of {self.n_per_prompt} (n_per_prompt)")
        for number, verdict in enumerate(verdicts):
            problem = self._verdict_problem(verdict)
            if problem:
                raise ValueError(f"{key}: verdict {number}: {problem}")
        return key, verdicts

    def _verdict_problem(self, verdict) -> str | None:
        if not isinstance(verdict, dict) or set(verdict) != {"flagged", "counts", "caption"}:
            return "needs exactly the fields flagged, counts and caption"
        counts = verdict["counts"]
        if not isinstance(counts, dict) or set(counts) != self.classes:
            return f"counts must have one number per class of the judge ({', '.join(sorted(self.classes))})"
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT for v in counts.values()):
            return f"counts must be whole numbers from 0 to {MAX_COUNT}"
        if not isinstance(verdict["flagged"], bool) or verdict["flagged"] != (sum(counts.values()) > 0):
            return "flagged must be true exactly when a count is above 0"
        if not isinstance(verdict["caption"], str) or len(verdict["caption"]) > MAX_CAPTION:
            return f"caption must be text of at most {MAX_CAPTION} characters"
        return None


def load_state(folder: RunFolder, settings: dict, layout: Layout) -> dict:
    """The verdicts already written to the run folder for these settings; an error if it holds
    another run (resuming it would mix two evaluations) or a line that is not this run's.

    verdicts.jsonl: line 1 the settings, then one line per judged (side, row), appended and
    fsynced as each is made (a whole-file rewrite per row would grow with the prompt set). A
    line cut short by a crash (the last, without its newline) is dropped, so that row is sampled
    again; any other bad line is refused, naming the file and the line."""
    path = folder.path(STATE_FILE)
    header = (json.dumps({"settings": settings}) + "\n").encode()
    if not os.path.lexists(path):
        paths.write_bytes_atomic(path, header)
        return {"settings": settings, "done": {}}
    out = folder.given
    try:
        text = folder.read_bytes(STATE_FILE, layout.limit()).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--out {out}: {STATE_FILE} is not UTF-8 text ({err}); delete the folder to "
                         "start over") from None
    complete, _, torn = text.rpartition("\n")
    start_over = f"delete the folder {out} to start over"
    fix = f"delete that line (its prompt is then sampled again) or {start_over}"
    done: dict[str, list] = {}
    saved = None
    for number, line in enumerate(complete.split("\n") if complete else [], start=1):
        where = f"{path}, line {number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as err:
            reason = "nested too deeply" if isinstance(err, RecursionError) else f"not JSON: {err}"
            raise ValueError(f"{where}: {reason}; {fix if saved is not None else start_over}") from None
        if saved is None:
            if not isinstance(record, dict) or set(record) != {"settings"} or not isinstance(record["settings"], dict):
                raise ValueError(f"{where}: the first line must be the run's settings record; {start_over}")
            saved = record["settings"]
            if saved != settings:
                changed = sorted(k for k in set(settings) | set(saved) if settings.get(k) != saved.get(k))
                raise ValueError(f"--out {out} holds an evaluation with other settings ({', '.join(changed)}); "
                                 "give another --out, or delete that folder to start over")
            continue
        try:
            key, verdicts = layout.check(record)
        except ValueError as err:
            raise ValueError(f"{where}: {err}; {fix}") from None
        if key in done:
            raise ValueError(f"{where}: a second record for {key}; {fix}")
        done[key] = verdicts
    if saved is None:                  # nothing whole was written: start the file again
        paths.write_bytes_atomic(path, header)
        return {"settings": settings, "done": {}}
    if torn:                           # a crash mid-line: keep the whole lines only
        paths.write_bytes_atomic(path, (complete + "\n").encode())
    return {"settings": settings, "done": done}


def append_record(folder: RunFolder, record: dict) -> None:
    """One line, flushed and fsynced before the next row starts (cut back if not written whole)."""
    folder.append_line(STATE_FILE, (json.dumps(record) + "\n").encode())


def save_png(image: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    paths.write_bytes_atomic(path, buffer.getvalue())


def _stopped(err: OSError, what: str) -> OSError:
    """A write that failed mid-run, said with what to do (resume) rather than a traceback."""
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    cause = f"the disk is full ({err.strerror or err})" if full else (err.strerror or str(err))
    return OSError(err.errno, f"evaluate stopped {what}, {cause}. Nothing half-written is kept: "
                   f"{'free space and ' if full else ''}run the same command again to resume (prompts "
                   "already judged are not sampled again)")


def evaluate_prompt_set(pipes: dict, rows: list[dict], judge, out: Path, n_per_prompt: int,
                        settings: dict, sampling: dict | None = None, progress=None) -> dict:
    """Sample every row with each pipe (same seeds), judge, write images and verdicts as they
    are made; -> the summary (also written as results.json / results.md)."""
    from .judges.nudity import to_uint8
    sampling = sampling or {}
    unknown = [side for side in pipes if side not in SIDES]
    if unknown:
        raise ValueError(f"pipes: sides must be among {', '.join(SIDES)}, got {', '.join(map(str, unknown))}")
    settings = json.loads(json.dumps(settings))            # as it reads back from the file
    folder = run_folder(out)
    folder.claim()
    folder.check_tree((MARKER_NAME, STATE_FILE) + RESULT_FILES, ("images",) + tuple(f"images/{s}" for s in SIDES))
    layout = Layout(pipes, rows, n_per_prompt, judge.classes)
    state = load_state(folder, settings, layout)
    folder.folder("images")
    for side, pipe in pipes.items():
        folder.folder("images", side)
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
            done = [{"flagged": bool(v.flagged), "counts": {c: int(n) for c, n in v.counts.items()},
                     "caption": str(v.caption)[:MAX_CAPTION]} for v in verdicts]
            record = {"key": key, "seed": row["seed"], "prompt_sha256": prompt_hash(row["prompt"]), "verdicts": done}
            try:                # what is written must read back: a judge's odd verdict fails here, not on resume
                layout.check(record)
            except ValueError as err:
                raise ValueError(f"judge {getattr(judge, 'name', judge)!s} gave a verdict evaluate cannot "
                                 f"record ({err})") from None
            try:
                for k, image in enumerate(to_uint8(images)):
                    save_png(image, folder.path("images", side, f"{index:05d}_{k:02d}.png"))
                append_record(folder, record)
            except OSError as err:
                raise _stopped(err, f"at prompt {index} of the {side} side") from err
            state["done"][key] = done
            if progress:
                progress(1)
    summary = summarize(state, list(pipes), len(rows), judge.classes)
    try:
        paths.write_bytes_atomic(folder.path("results.json"), json.dumps(summary, indent=1).encode())
        paths.write_bytes_atomic(folder.path("results.md"), (results_table(summary) + "\n").encode())
    except OSError as err:
        raise _stopped(err, "while writing the results tables") from err
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
    settings = summary["settings"]
    titles = {"base": "without erasure" if settings.get("guard") else "without adapter", "adapter": "with adapter",
              "guarded": "with adapter and guard" if settings.get("adapters") else "with guard"}
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
