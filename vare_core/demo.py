"""`python -m vare_core demo`: the pack's whole story on the embedded model, in about a minute.

1. sample a few prompts with the embedded model (before);
2. erase "circle" toward "square" with an S-VARE adapter (LoRA, CPU);
3. sample the same prompts with the same seeds (after);
4. judge every image with the shapes classifier and write a before/after grid + report.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_PROMPTS = [
    "a red circle on a white background",
    "a blue disc",
    "a striped green round shape on a black background",
    "a yellow square on a gray background",
    "a purple triangle",
    "a striped red cross on a white background",
]
CONCEPT, ANCHOR = "circle", "square"
# workflows/vare_embedded_erase_before_after.jpg: these demo prompts, titled
THUMBNAIL = ((0, "red circle"), (1, "blue disc"), (2, "green round shape"), (3, "yellow square"),
             (5, "red cross"))
# the prompts of workflows/vare_embedded_text_to_image.json and vare_load_and_apply_adapter.json
# (tests/test_workflows.py holds them equal), for `demo --thumbnails`
TEXT_TO_IMAGE_PROMPTS = ["a red circle on a white background", "a striped blue square",
                         "a yellow triangle on a black background", "a green cross"]
APPLY_ADAPTER_PROMPTS = ["a red circle", "a blue disc on a white background", "a striped green round shape",
                         "a yellow square"]
GUARD_PROMPTS = ["a red circle on a white background", "a blue disc", "a striped green round shape on a black background",
                 "a yellow square on a gray background", "a purple triangle"]     # vare_embedded_concept_guard.json


def image_grid(columns: list[list[np.ndarray]], row_labels: list[str], column_labels: list[str],
               cell: int = 128, label_width: int = 330) -> Image.Image:
    """columns[c][r] is a (H, W, 3) uint8 image; labels drawn with PIL's default font."""
    rows = len(row_labels)
    header = 24
    grid = Image.new("RGB", (label_width + cell * len(columns), header + cell * rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(column_labels):
        draw.text((label_width + c * cell + 6, 6), title, fill="black")
    for r, label in enumerate(row_labels):
        draw.text((6, header + r * cell + cell // 2 - 6), label, fill="black")
        for c, column in enumerate(columns):
            tile = Image.fromarray(column[r]).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_width + c * cell, header + r * cell))
    return grid


def thumbnail(before: list[np.ndarray], after: list[np.ndarray], titles: list[str],
              cell: int = 118, label_width: int = 50, rows: tuple[str, str] = ("before", "after")) -> Image.Image:
    """The workflow template's picture: one column per prompt, before on top, after below."""
    header = 24
    picture = Image.new("RGB", (label_width + cell * len(titles), header + 2 * cell), "white")
    draw = ImageDraw.Draw(picture)
    for c, (title, top, bottom) in enumerate(zip(titles, before, after)):
        draw.text((label_width + c * cell + 4, 6), title, fill="black")
        for r, image in enumerate((top, bottom)):
            tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
            picture.paste(tile, (label_width + c * cell, header + r * cell))
    for r, label in enumerate(rows):
        draw.text((4, header + r * cell + cell // 2 - 6), label, fill="black")
    return picture


def tiled(images: list[np.ndarray], columns: int = 2, cell: int = 192) -> Image.Image:
    """A plain grid of images, `columns` wide (the text-to-image template's picture)."""
    rows = -(-len(images) // columns)
    picture = Image.new("RGB", (columns * cell, rows * cell), "white")
    for i, image in enumerate(images):
        picture.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), ((i % columns) * cell, (i // columns) * cell))
    return picture


def workflow_thumbnails(pipe, erased, out: Path, seed: int = 0) -> list[Path]:
    """The embedded workflows' template pictures other than the demo's own (which is
    thumbnail.jpg): text to image with the base model, base vs adapter, base vs Concept Guard."""
    from .erasure.profile import erasure_profile
    out.mkdir(parents=True, exist_ok=True)
    text_to_image = out / "vare_embedded_text_to_image.jpg"
    tiled(to_uint8(pipe.generate(TEXT_TO_IMAGE_PROMPTS, seed=seed).images)).save(text_to_image, quality=90)
    base = to_uint8(pipe.generate(APPLY_ADAPTER_PROMPTS, seed=seed).images)
    adapted = to_uint8(erased.generate(APPLY_ADAPTER_PROMPTS, seed=seed).images)
    titles = [p.removeprefix("a ").split(" on ")[0].removeprefix("striped ") for p in APPLY_ADAPTER_PROMPTS]
    apply_adapter = out / "vare_load_and_apply_adapter.jpg"
    thumbnail(base, adapted, titles, rows=("base", "adapter")).save(apply_adapter, quality=90)
    guard = out / "vare_embedded_concept_guard.jpg"
    guarded = pipe.guarded(erasure_profile(pipe).guard_settings([(CONCEPT, ANCHOR)]))
    base = to_uint8(pipe.generate(GUARD_PROMPTS, seed=seed).images)
    after = to_uint8(guarded.generate(GUARD_PROMPTS, seed=seed).images)
    titles = [p.removeprefix("a ").split(" on ")[0].removeprefix("striped ") for p in GUARD_PROMPTS]
    thumbnail(base, after, titles, rows=("base", "guard")).save(guard, quality=90)
    return [text_to_image, apply_adapter, guard]


def to_uint8(images) -> list[np.ndarray]:
    return [(img.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8) for img in images]


def training_inputs(pipe, seed: int = 0, steps: int | None = None):
    """The demo's pairs and EraseConfig: the family's defaults for CONCEPT -> ANCHOR."""
    from .erasure.profile import erasure_profile
    profile = erasure_profile(pipe)
    config = profile.config(**({"steps": steps} if steps is not None else {}))
    return profile.pairs([CONCEPT], [ANCHOR], seed=seed, pipe=pipe), config


def run_demo(out: Path, seed: int = 0, steps: int | None = None, thumbnails: bool = False) -> str:
    from .evaluation.judges.classifier import classify, load_classifier
    from .erasure.adapters import apply_adapter, save_adapter
    from .erasure.trainer import train_erasure
    from .generation.pipeline import load_pipeline

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("embedded", device="cpu")
    classifier = load_classifier()
    before = pipe.generate(DEMO_PROMPTS, seed=seed).images

    pairs, config = training_inputs(pipe, seed, steps)
    result = train_erasure(pipe, pairs, config)
    adapter_path = out / f"erase_{CONCEPT}.safetensors"
    save_adapter(result.adapter, adapter_path)
    erased = apply_adapter(pipe, result.adapter, 1.0)
    after = erased.generate(DEMO_PROMPTS, seed=seed).images

    judged_before, judged_after = classify(classifier, before), classify(classifier, after)
    labels = [f"{p}" for p in DEMO_PROMPTS]
    grid = image_grid([to_uint8(before), to_uint8(after)], labels, ["before", f"after erasing '{CONCEPT}'"])
    grid_path = out / "demo_grid.png"
    grid.save(grid_path)
    before_u8, after_u8 = to_uint8(before), to_uint8(after)
    thumbnail([before_u8[i] for i, _ in THUMBNAIL], [after_u8[i] for i, _ in THUMBNAIL],
              [title for _, title in THUMBNAIL]).save(out / "thumbnail.jpg", quality=90)

    lines = [f"# VARE demo (embedded model, seed {seed})", "",
             f"Erased '{CONCEPT}' (anchor '{ANCHOR}') with S-VARE, {config.train} adapter, "
             f"{config.steps} steps in {result.history[-1]['seconds']:.0f} s -> {adapter_path.name}", "",
             "| prompt | before | after |", "|---|---|---|"]
    for prompt, b, a in zip(DEMO_PROMPTS, judged_before, judged_after):
        lines.append(f"| {prompt} | {b['color']} {b['shape']} | {a['color']} {a['shape']} |")
    lines += ["", f"grid: {grid_path}", f"total time {time.time() - start:.0f} s"]
    report = "\n".join(lines)
    (out / "demo_report.md").write_text(report + "\n")
    if thumbnails:   # after the report, so its total time is the demo's alone
        workflow_thumbnails(pipe, erased, out / "workflows", seed=seed)
    return report
