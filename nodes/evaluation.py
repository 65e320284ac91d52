"""Loss Plot, Erasure Check and Before/After Grid: what a user looks at after training.

Erasure Check judges images with the embedded shapes classifier (vare_core.embedded.classifier)
and the geometric judge (vare_core.embedded.judge: no learned weights, flags broken pictures),
so it scores the embedded model's images; its concepts are the shapes-world words (a shape or
a colour, synonyms allowed: disc = circle).
"""
from __future__ import annotations

from functools import lru_cache

from . import drawing
from .compat import CATEGORY, VareLossHistory, io, ui

EXPECT = ("absent", "present")


class LossPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VARE_LossPlot", display_name="Erasure Loss Plot (VARE)",
            category=f"{CATEGORY}/evaluation",
            description="Draw the training losses (total, and each term) against the step.",
            inputs=[
                VareLossHistory.Input("loss_history", tooltip="from Train Erasure"),
                io.Int.Input("width", default=768, min=256, max=4096, step=8, tooltip="image width in pixels"),
                io.Int.Input("height", default=384, min=128, max=4096, step=8, tooltip="image height in pixels"),
            ],
            outputs=[io.Image.Output(display_name="plot")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, loss_history, width, height):
        plot = drawing.to_tensor(drawing.plot_losses(loss_history.steps, loss_history.title, width, height))
        return io.NodeOutput(plot, ui=ui.PreviewImage(plot, cls=cls))


def concept_attribute(concept: str) -> tuple[str, str] | None:
    """'disc' -> ('shape', 'circle'); 'red' -> ('color', 'red'); None if the world has no such word."""
    from vare_core.embedded.world import prompt_attributes
    try:
        found = prompt_attributes(concept)
    except ValueError:
        return None
    found = {k: v for k, v in found.items() if k in ("shape", "color")}
    return next(iter(found.items())) if len(found) == 1 else None


def check_concept(concept: str) -> str | None:
    from vare_core.embedded.world import COLORS, SYNONYMS
    if concept_attribute(concept) is None:
        words = sorted(w for ws in SYNONYMS.values() for w in ws) + list(COLORS)
        return (f"concept {concept!r}: Erasure Check knows the embedded shapes world's shapes and "
                f"colours, one at a time: {', '.join(words)}")
    return None


@lru_cache(maxsize=1)
def _classifier():
    from vare_core.embedded.classifier import load_classifier
    return load_classifier()


def judge(images, concept: str, expect: str):
    """-> (labels per image, number showing the concept, report text, annotated PIL images)."""
    from vare_core.embedded.classifier import classify
    from vare_core.embedded.fidelity import is_intact
    from vare_core.embedded.judge import judge_images
    attribute, value = concept_attribute(concept)
    results = classify(_classifier(), images)
    geometric = judge_images(images)
    # shown when the classifier OR the geometric judge sees it (the classifier alone calls a
    # frame-filling blotch "a square"); a picture the judge finds broken is marked as such
    shown = [r[attribute] == value or g[attribute] == value for r, g in zip(results, geometric)]
    intact = [is_intact(g) for g in geometric]
    count = sum(shown)
    pils = drawing.to_pils(images)
    cells = [drawing.label_image(p, f"{r['color']} {r['shape']} {r['confidence'][attribute]:.0%}"
                                 + ("" if ok else " broken"),
                                 good=(has == (expect == "present")) and ok)
             for p, r, has, ok in zip(pils, results, shown, intact)]
    n = len(results)
    goal = n - count if expect == "absent" else count
    report = (f"{value} ({attribute}) in {count} of {n} images ({count / n:.0%}); expected {expect}: "
              f"{goal} of {n} as expected ({goal / n:.0%}); intact pictures {sum(intact)} of {n} "
              "(flat background, one clean shape, no blotches). Seen: "
              + ", ".join(f"{r['color']} {r['shape']}" + ("" if ok else " (broken)")
                          for r, ok in zip(results, intact)))
    return results, count, report, cells


class ErasureCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VARE_ErasureCheck", display_name="Erasure Check (VARE)",
            category=f"{CATEGORY}/evaluation",
            description="Score images for a concept with the embedded shapes classifier: how many "
                        "still show it. Green caption = as expected, red = not.",
            inputs=[
                io.Image.Input("images", tooltip="images from the embedded model (any size; judged at 64x64)"),
                io.String.Input("concept", default="circle",
                                tooltip="a shape (circle, square, triangle, cross or a synonym) or a colour"),
                io.Combo.Input("expect", options=list(EXPECT), default="absent",
                               tooltip="absent: after erasure the concept should be gone; present: "
                                       "before erasure, or prompts that should keep it"),
                io.Int.Input("columns", default=4, min=1, max=64, tooltip="images per row of the annotated grid"),
            ],
            outputs=[io.Image.Output(display_name="annotated"),
                     io.String.Output(display_name="report"),
                     io.Float.Output(display_name="concept_rate", tooltip="fraction of images showing the concept")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, concept):
        return check_concept(concept) or True

    @classmethod
    def execute(cls, images, concept, expect, columns):
        problem = check_concept(concept)
        if problem:
            raise ValueError(problem)
        if expect not in EXPECT:
            raise ValueError(f"expect {expect!r}: choose one of {', '.join(EXPECT)}")
        if len(images) == 0:
            raise ValueError("images is an empty batch; connect the sampler's images")
        _, count, report, cells = judge(images, concept, expect)
        annotated = drawing.to_tensor(drawing.grid(cells, min(columns, len(cells))))
        return io.NodeOutput(annotated, report, count / len(cells),
                             ui={**ui.PreviewImage(annotated, cls=cls).as_dict(), "text": [report]})


class CompareGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VARE_CompareGrid", display_name="Before/After Grid (VARE)",
            category=f"{CATEGORY}/evaluation",
            description="Put two image batches side by side (row r: before[r] | after[r]).",
            inputs=[
                io.Image.Input("before", tooltip="e.g. the base model's images"),
                io.Image.Input("after", tooltip="the same prompts and seed with the adapter applied"),
                io.String.Input("before_title", default="before", tooltip="title above the first column"),
                io.String.Input("after_title", default="after erasure", tooltip="title above the second column"),
                io.String.Input("row_labels", multiline=True, default="",
                                tooltip="optional: one label per row (e.g. the prompts), one per line"),
            ],
            outputs=[io.Image.Output(display_name="grid")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, before, after, before_title, after_title, row_labels=""):
        if before.shape[0] != after.shape[0]:
            raise ValueError(f"before has {before.shape[0]} images and after {after.shape[0]}: sample "
                             "the same prompts with the same batch size on both sides")
        labels = [line.strip() for line in row_labels.splitlines()]
        picture = drawing.side_by_side([drawing.to_pils(before), drawing.to_pils(after)],
                                       [before_title, after_title], labels)
        result = drawing.to_tensor(picture)
        return io.NodeOutput(result, ui=ui.PreviewImage(result, cls=cls))
