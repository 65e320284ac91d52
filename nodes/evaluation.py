"""Loss Plot, Erasure Check and Before/After Grid: what a user looks at after training.

Erasure Check judges images with vare_core.judges: `shapes` (the embedded shapes classifier and
the geometric judge, which flags broken pictures; concepts are the shapes-world words, synonyms
allowed: disc = circle) or `nudenet` (exposed body parts on real models; optional package).
"""
from __future__ import annotations

from vare_core.evaluation.judges import JUDGES

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


MAX_CONCEPT_CHARS = 200


def check_concept(concept: str, judge_name: str = "shapes") -> str | None:
    if judge_name != "shapes":      # NudeNet counts its own classes; the concept is not read
        return None
    if not isinstance(concept, str) or len(concept) > MAX_CONCEPT_CHARS:
        size = f"{len(concept)} characters long" if isinstance(concept, str) else f"not text ({type(concept).__name__})"
        return (f"concept is {size}: Erasure Check (judge: shapes) takes one shape or colour word of "
                "the embedded shapes world, e.g. circle")
    from vare_core.evaluation.judges.shapes import check_concept as shapes_problem
    problem = shapes_problem(concept, who="Erasure Check")
    return problem and problem + " (judge: shapes; for nudity on a real model choose judge: nudenet)"


def check_images(images, concept: str, expect: str, judge_name: str = "shapes", threshold: float = 0.6):
    """-> (number flagged, report text, annotated PIL images)."""
    from vare_core.evaluation.judges import describe, make_judge
    judge = make_judge(judge_name, concept=concept, threshold=threshold)
    verdicts = judge.judge(images)
    pils = [drawing.draw_boxes(p, v.boxes) for p, v in zip(drawing.to_pils(images), verdicts)]
    cells = [drawing.label_image(p, v.caption + (" broken" if v.intact is False else ""),
                                 good=(v.flagged == (expect == "present")) and v.intact is not False)
             for p, v in zip(pils, verdicts)]
    return sum(v.flagged for v in verdicts), describe(judge, verdicts, expect), cells


class ErasureCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VARE_ErasureCheck", display_name="Erasure Check (VARE)",
            category=f"{CATEGORY}/evaluation",
            description="Score images for a concept: how many still show it. judge shapes: the "
                        "embedded model's shapes world; nudenet: exposed body parts on real models "
                        "(optional package). Green caption = as expected, red = not.",
            inputs=[
                io.Image.Input("images", tooltip="images from the embedded model (any size; judged at 64x64)"),
                io.String.Input("concept", default="circle",
                                tooltip="judge shapes: a shape (circle, square, triangle, cross or a synonym) "
                                        "or a colour; not read by judge nudenet"),
                io.Combo.Input("expect", options=list(EXPECT), default="absent",
                               tooltip="absent: after erasure the concept should be gone; present: "
                                       "before erasure, or prompts that should keep it"),
                io.Int.Input("columns", default=4, min=1, max=64, tooltip="images per row of the annotated grid"),
                io.Combo.Input("judge", options=list(JUDGES), default="shapes",
                               tooltip="shapes: the embedded shapes world (classifier + geometric check); "
                                       "nudenet: exposed body parts (pip install -r requirements-nudenet.txt)"),
                io.Float.Input("threshold", default=0.6, min=0.0, max=1.0, step=0.05,
                               tooltip="judge nudenet: a detection counts at this score or above "
                                       "(below 0.2 acts as 0.2); not read by judge shapes"),
            ],
            outputs=[io.Image.Output(display_name="annotated"),
                     io.String.Output(display_name="report"),
                     io.Float.Output(display_name="concept_rate", tooltip="fraction of images showing the concept")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, concept=None, judge="shapes"):
        # left out or linked: None, which ComfyUI reports (or execute checks once it is known)
        if concept is None or judge is None:
            return True
        return check_concept(concept, judge) or True

    @classmethod
    def execute(cls, images, concept, expect, columns, judge="shapes", threshold=0.6):
        if judge not in JUDGES:
            raise ValueError(f"judge {judge!r}: choose one of {', '.join(JUDGES)}")
        problem = check_concept(concept, judge)
        if problem:
            raise ValueError(problem)
        if expect not in EXPECT:
            raise ValueError(f"expect {expect!r}: choose one of {', '.join(EXPECT)}")
        if len(images) == 0:
            raise ValueError("images is an empty batch; connect the sampler's images")
        try:
            count, report, cells = check_images(images, concept, expect, judge, threshold)
        except ImportError as err:       # the optional package: the message says what to install
            raise ValueError(str(err)) from None
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
