"""The shapes judge: is a shape or colour of the embedded world drawn?

The shipped classifier (judges/classifier.py) OR the geometric judge (no learned weights)
seeing the concept flags an image: the classifier alone calls a frame-filling blotch "a square".
A picture the geometric judge finds broken (no flat background, no clean shape) is marked so.
"""
from __future__ import annotations

from functools import lru_cache

from . import Verdict


def concept_attribute(concept: str) -> tuple[str, str] | None:
    """'disc' -> ('shape', 'circle'); 'red' -> ('color', 'red'); None if the world has no such word."""
    from ...embedded.world import prompt_attributes
    try:
        found = prompt_attributes(concept)
    except ValueError:
        return None
    found = {k: v for k, v in found.items() if k in ("shape", "color")}
    return next(iter(found.items())) if len(found) == 1 else None


def check_concept(concept: str, who: str = "the shapes judge") -> str | None:
    """A message naming the words the judge knows, or None when `concept` is one of them."""
    from ...embedded.world import COLORS, SYNONYMS
    if concept_attribute(concept) is None:
        words = sorted(w for ws in SYNONYMS.values() for w in ws) + list(COLORS)
        return (f"concept {concept!r}: {who} knows the embedded shapes world's shapes and "
                f"colours, one at a time: {', '.join(words)}")
    return None


@lru_cache(maxsize=1)
def _classifier():
    from .classifier import load_classifier
    return load_classifier()


class ShapesJudge:
    name = "shapes"

    def __init__(self, concept: str):
        problem = check_concept(concept)
        if problem:
            raise ValueError(problem)
        self.attribute, self.value = concept_attribute(concept)
        self.classes = (self.value,)
        self.what = f"{self.value} ({self.attribute})"

    def judge(self, images) -> list[Verdict]:
        from .classifier import classify
        from .geometry import is_intact, judge_images
        learned = classify(_classifier(), images)
        geometric = judge_images(images)
        verdicts = []
        for seen, measured in zip(learned, geometric):
            shown = seen[self.attribute] == self.value or measured[self.attribute] == self.value
            intact = is_intact(measured)
            caption = f"{seen['color']} {seen['shape']} {seen['confidence'][self.attribute]:.0%}"
            verdicts.append(Verdict(flagged=shown, counts={self.value: int(shown)}, caption=caption, intact=intact))
        return verdicts
