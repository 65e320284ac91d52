"""Implicit pairs: prompts that do not name the concept, yet the original model draws it.

An erasure trained only on prompts that name the concept leaves the model's own habits alone: a
model that draws a nude for "a person on the beach", or a circle for a prompt naming no shape,
keeps doing so. Mining finds such prompts among candidates by sampling the ORIGINAL model and
asking a judge; each one found becomes an erasure pair toward a safe prompt of the same wording.

    pairs = mine_implicit_pairs(pipe, candidates, shows_concept, concept="circle", anchor="square")
    # candidates: [(prompt without the concept's name, safe prompt), ...]
    # shows_concept(images) -> [bool, ...]: does each (B, H, W, 3) image show the concept?

The judge decides, not a word list, so the same code serves any concept a judge can see
(NudeNet for nudity, the geometric judge of the shapes world). Candidates are sampled at the
pipeline's own sampling defaults, `samples` images each, the same seeds on every call.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..checks import is_integer
from .pairs import PromptPair

MIN_SHARE = 0.5        # a candidate counts when at least half its images show the concept


def concept_shares(pipe, prompts: Sequence[str], shows_concept: Callable, samples: int = 4,
                   seed: int = 0, batch: int = 64) -> list[float]:
    """Per prompt: the share of `samples` images of the original pipeline that show the concept."""
    if not is_integer(samples, minimum=1):
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    repeated = [p for p in prompts for _ in range(samples)]
    verdicts: list[bool] = []
    for start in range(0, len(repeated), batch):
        images = pipe.generate(repeated[start:start + batch], seed=seed + start).images
        verdicts += [bool(v) for v in shows_concept(images)]
    return [sum(verdicts[i * samples:(i + 1) * samples]) / samples for i in range(len(prompts))]


def mine_implicit_pairs(pipe, candidates: Sequence[tuple[str, str]], shows_concept: Callable,
                        concept: str, anchor: str, samples: int = 4, seed: int = 0,
                        limit: int | None = None, min_share: float = MIN_SHARE) -> list[PromptPair]:
    """Erasure pairs (candidate, its safe prompt) for the candidates whose images show the concept
    in at least `min_share` of `samples` images, in the candidates' order, at most `limit`."""
    if not 0 < min_share <= 1:
        raise ValueError(f"min_share must be in (0, 1], got {min_share!r}")
    if limit is not None and not is_integer(limit, minimum=0):
        raise ValueError(f"limit must be an integer >= 0 or None, got {limit!r}")
    if not candidates or limit == 0:
        return []
    shares = concept_shares(pipe, [unsafe for unsafe, _ in candidates], shows_concept, samples, seed)
    found = [PromptPair(unsafe=unsafe, safe=safe, concept=concept, anchor=anchor)
             for (unsafe, safe), share in zip(candidates, shares) if share >= min_share]
    return found if limit is None else found[:limit]
