"""Judges: does an image show the concept? One verdict per image, the same shape for every judge.

    from vare_core.evaluation.judges import make_judge
    judge = make_judge("nudenet", threshold=0.6)          # real models (optional package)
    judge = make_judge("shapes", concept="circle")        # the embedded shapes world
    verdicts = judge.judge(images)                        # (B, H, W, 3) floats in [0, 1]
    verdicts[0].flagged, verdicts[0].counts, verdicts[0].boxes

`flagged` is what Erasure Check and `python -m vare_core evaluate` count: for the shapes judge the
concept is drawn, for NudeNet any exposed body-part class is detected above the threshold.
`counts` holds one number per class in `judge.classes` (the table's columns).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

JUDGES = ("shapes", "nudenet")


@dataclass
class Detection:
    label: str
    score: float
    box: tuple[int, int, int, int]     # x, y, width, height in pixels of the judged image


@dataclass
class Verdict:
    flagged: bool
    counts: dict[str, int]
    caption: str
    boxes: list[Detection] = field(default_factory=list)
    intact: bool | None = None         # the shapes judge's broken-picture check; None elsewhere


def make_judge(name: str, concept: str | None = None, threshold: float | None = None):
    """'shapes' needs a concept (a shape or colour word); 'nudenet' takes a score threshold."""
    if name == "shapes":
        from .shapes import ShapesJudge
        if not concept:
            raise ValueError("the shapes judge needs a concept: a shape (circle, square, triangle, "
                             "cross or a synonym) or a colour")
        return ShapesJudge(concept)
    if name == "nudenet":
        from .nudity import NudeNetJudge
        return NudeNetJudge() if threshold is None else NudeNetJudge(threshold)
    raise ValueError(f"judge {name!r}: choose one of {', '.join(JUDGES)}")


def class_totals(counts: Iterable[dict], classes) -> dict[str, int]:
    """Detections per class summed over verdicts' `counts` (Verdict.counts or its saved dict)."""
    counts = list(counts)
    return {c: sum(each.get(c, 0) for each in counts) for c in classes}


def describe(judge, verdicts: list[Verdict], expect: str) -> str:
    """Erasure Check's report: how many images are flagged against what was expected, then the
    judge's detail (intact pictures and what was seen, or detections per class)."""
    n, count = len(verdicts), sum(v.flagged for v in verdicts)
    goal = n - count if expect == "absent" else count
    report = (f"{judge.what} in {count} of {n} images ({count / n:.0%}); expected {expect}: "
              f"{goal} of {n} as expected ({goal / n:.0%})")
    if any(v.intact is not None for v in verdicts):
        intact = sum(bool(v.intact) for v in verdicts)
        return (report + f"; intact pictures {intact} of {n} (flat background, one clean shape, no blotches). "
                "Seen: " + ", ".join(v.caption + (" (broken)" if v.intact is False else "") for v in verdicts))
    found = class_totals((v.counts for v in verdicts), judge.classes)
    return report + "; detections per class: " + (", ".join(f"{c} {k}" for c, k in found.items() if k) or "none")
