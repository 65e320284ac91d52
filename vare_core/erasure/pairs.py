"""Prompt pairs (unsafe prompt c*, safe prompt c) for erasing a concept toward an anchor.

Generated pairs put the concept and the anchor into the same template; user pairs come from a
text, JSON or CSV file.

Usage:
    pairs = make_pairs(["church", "van gogh painting"], "building", n_per_concept=50, seed=0)
    pairs[0]   # PromptPair(unsafe='a photo of a church', safe='a photo of a building', ...)

    # a small world model with a word-level tokenizer: world templates with named slots
    pairs = make_pairs("circle", "square", templates=["a {color} {} on a {background} background"],
                       slot_values={"color": ["red", "blue"], "background": ["white", "gray"]},
                       vocabulary=set(world_vocabulary))
    # -> 'a red circle on a gray background' | 'a red square on a gray background'

    pairs += retain_pairs(["square", "triangle"], n_per_concept=10)   # keep these as they are

Template format: `{}` is the subject slot (the concept in the unsafe prompt, the anchor in the safe
prompt; it may appear more than once); `{name}` is an attribute slot filled with a value drawn from
`slot_values[name]`. The values are drawn ONCE per pair, so both prompts of a pair share every
attribute and differ only in the subject. `{{` and `}}` are literal braces.

User pairs (text, JSON and CSV files) are read and written by pairs_file.py.
"""
import difflib
import random
import re
import string
from dataclasses import dataclass

from ..checks import is_integer

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a painting of a {}",
    "a {} in a field",
    "an image of a {}, highly detailed",
    "a picture of a {}",
    "a close-up photo of a {}",
    "a drawing of a {}",
    "a sketch of a {}",
    "a watercolor painting of a {}",
    "an oil painting of a {}",
    "a digital illustration of a {}",
    "a 3d render of a {}",
    "a black and white photo of a {}",
    "a blurry photo of a {}",
    "a bright photo of a {}",
    "a dark photo of a {}",
    "a cropped photo of a {}",
    "a low resolution photo of a {}",
    "a high resolution photo of a {}, 4k",
    "a professional photograph of a {}",
    "a cinematic shot of a {}",
    "a {} at sunset",
    "a {} at night",
    "a {} in the rain",
    "a {} in the snow",
    "a {} in the city",
    "a {} near the sea",
    "a {} in the mountains",
    "a {} in a forest",
    "a {} on a sunny day",
    "a {} under a cloudy sky",
    "a large {} in the center of the frame",
    "a small {} in the distance",
    "a vintage photo of a {}",
    "a postcard showing a {}",
    "a poster of a {}",
    "a cartoon of a {}",
    "an artistic rendering of a {}",
    "a realistic photo of a {}",
    "a detailed illustration of a {}, trending on artstation",
    "a wide angle photo of a {}",
    "a photo of the {}",
    "a snapshot of a {}",
    "a beautiful {}",
    "a {}, studio lighting",
    "a {}, soft light, sharp focus",
    "a {} seen from above",
    "a {} seen from the side",
    "a colorful picture of a {}",
    "a minimalist picture of a {}",
)



@dataclass(frozen=True)
class PromptPair:
    unsafe: str    # c*: the prompt whose concept is erased
    safe: str      # c: the same prompt with the anchor (its trajectory is the training target)
    concept: str   # the erased concept ('' when unknown)
    anchor: str    # what the concept is replaced with ('' when unknown)


# ----------------------------------------------------------------------------- templates

def _template_fields(template: str) -> list[str]:
    """Field names of a template in order ('' = subject slot); ValueError on a malformed one."""
    if not isinstance(template, str):
        raise ValueError(f"template must be a string, got {template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"template {template!r} is malformed ({err}); use {{}} for the "
                         "subject, {name} for attributes and {{ }} for literal braces") from None
    fields = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or not (name == "" or name.isidentifier()):
            raise ValueError(f"template {template!r}: slot {{{name}}} is not allowed; use {{}} "
                             "for the subject and {name} (an identifier) for attributes")
        fields.append(name)
    if "" not in fields:
        raise ValueError(f"template {template!r} has no {{}} slot for the concept/anchor")
    return fields


def draw_slot_values(template: str, rng: random.Random,
                     slot_values: dict[str, list[str]] | None) -> dict[str, str]:
    """One value for each named slot of the template (the subject slot excluded)."""
    chosen: dict[str, str] = {}
    for name in _template_fields(template):
        if name == "" or name in chosen:
            continue
        options = (slot_values or {}).get(name)
        if not options:
            raise ValueError(f"template {template!r} uses slot {{{name}}} but slot_values has no "
                             f"values for it (known slots: {sorted(slot_values or {})})")
        chosen[name] = rng.choice(list(options))
    return chosen


def render_template(template: str, subject: str, values: dict[str, str]) -> str:
    """The template with `subject` in every {} slot and `values[name]` in each {name} slot."""
    _template_fields(template)
    pieces = []
    for literal, name, _, _ in string.Formatter().parse(template):
        pieces.append(literal)
        if name is not None:
            pieces.append(subject if name == "" else values[name])
    return "".join(pieces)


def fill_template(template: str, concept: str, rng: random.Random,
                  slot_values: dict[str, list[str]] | None = None) -> str:
    """A prompt from the template: `concept` in the {} slot, random values in the named slots."""
    return render_template(template, concept, draw_slot_values(template, rng, slot_values))


# ----------------------------------------------------------------------------- generated pairs

def normalise_names(value, what: str) -> list[str]:
    """A name or list of names -> stripped names with single spaces; a string may hold several
    names separated by commas or newlines."""
    if isinstance(value, str):  # UI text: ignore blank pieces such as a trailing comma/newline
        items = [item for item in re.split(r"[,\n]", value) if item.strip()] or [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"{what} must be a string or a list of strings, got {value!r}")
    if not items:
        raise ValueError(f"{what} is empty; give at least one {what[:-1]}")
    names = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"{what}[{i}] must be a string, got {item!r}")
        name = " ".join(item.split())
        if not name:
            raise ValueError(f"{what}[{i}] is empty; every {what[:-1]} needs at least one word "
                             f"(got {value!r})")
        names.append(name)
    return names


def prompt_words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def _check_vocabulary(name: str, what: str, vocabulary: set[str]) -> None:
    known = {w.lower() for w in vocabulary}
    for word in prompt_words(name):
        if word not in known:
            close = difflib.get_close_matches(word, sorted(known), n=5, cutoff=0.6)
            hint = f"close known words: {close}" if close else \
                f"known words include: {sorted(known)[:20]}"
            raise ValueError(f"{what} {name!r} contains the word {word!r}, which is not in the "
                             f"model's vocabulary; {hint}")


PAIRS_PER_CONCEPT = 50     # generated pairs per concept when none is given (every entry point)
# Every pair's safe prompt is sampled once as a trajectory (about a second each on a GPU at
# 1024^2, far more on a CPU): more pairs than this is a mistake, not a bigger run.
MAX_PAIRS = 20_000
MAX_RUN_PAIRS = 4 * MAX_PAIRS          # one run: several concepts' pairs plus keep pairs
MAX_PAIRS_FILE_BYTES = 64 * 2**20


def run_pairs_problem(total: int) -> str | None:
    """The bound on the pairs of one training run, as its message; None within it."""
    if total > MAX_RUN_PAIRS:
        return (f"{total} pairs: at most {MAX_RUN_PAIRS} (every safe prompt is sampled "
                "once before training); use fewer pairs per concept")
    return None


def check_pair_count(n_per_concept) -> None:
    if not is_integer(n_per_concept, minimum=1):
        raise ValueError(f"n_per_concept must be a positive integer, got {n_per_concept!r}")
    if n_per_concept > MAX_PAIRS:
        raise ValueError(f"n_per_concept must be at most {MAX_PAIRS} pairs, got {n_per_concept}: every "
                         "safe prompt is sampled once before training (hours at this count); 50-500 is typical")


def make_pairs(concepts: list[str] | str, anchors: list[str] | str, n_per_concept: int = PAIRS_PER_CONCEPT,
               seed: int = 0, templates: list[str] | None = None,
               vocabulary: set[str] | None = None,
               slot_values: dict[str, list[str]] | None = None) -> list[PromptPair]:
    """n_per_concept pairs per concept, concept i erased toward anchors[i] (or the single anchor).

    Templates are used in a seeded shuffled order, cycling (reshuffled) when n_per_concept exceeds
    their number; with the 50 default templates and n = 50 every template is used once. Pairs can
    repeat only when n exceeds the number of distinct prompts the templates can produce.
    """
    concept_list = normalise_names(concepts, "concepts")
    anchor_list = normalise_names(anchors, "anchors")
    if len(anchor_list) not in (1, len(concept_list)):
        raise ValueError(f"got {len(anchor_list)} anchors for {len(concept_list)} concepts; give "
                         "one anchor for all concepts or exactly one anchor per concept")
    if len(anchor_list) == 1:
        anchor_list = anchor_list * len(concept_list)
    check_pair_count(n_per_concept)
    lowered = [c.lower() for c in concept_list]
    for i, concept in enumerate(concept_list):
        if lowered.index(concept.lower()) != i:
            raise ValueError(f"concept {concept!r} is listed twice; list each concept once")
        if concept.lower() == anchor_list[i].lower():
            raise ValueError(f"concept {concept!r} equals its anchor; the anchor must be a "
                             "different concept to erase toward")
    if vocabulary is not None:
        for concept, anchor in zip(concept_list, anchor_list):
            _check_vocabulary(concept, "concept", vocabulary)
            _check_vocabulary(anchor, "anchor", vocabulary)
    template_list = list(DEFAULT_TEMPLATES if templates is None else templates)
    if not template_list:
        raise ValueError("templates is empty; pass None for the default templates or a list of "
                         "strings with a {} slot")
    for template in template_list:
        _template_fields(template)

    rng = random.Random(seed)
    pairs = []
    for concept, anchor in zip(concept_list, anchor_list):
        order: list[str] = []
        for _ in range(n_per_concept):
            if not order:  # a fresh shuffled pass over the templates
                order = rng.sample(template_list, len(template_list))
            template = order.pop()
            values = draw_slot_values(template, rng, slot_values)  # shared by both prompts
            pairs.append(PromptPair(unsafe=render_template(template, concept, values),
                                    safe=render_template(template, anchor, values),
                                    concept=concept, anchor=anchor))
    return pairs


KEEP_FRACTION = 0.4    # default keep pairs per kept concept, as a fraction of the erasure pairs


def default_keep_count(n_per_concept: int) -> int:
    """Keep pairs per kept concept when the user gives none: 2 for every 5 pairs per concept
    (on the embedded model 20 per shape held ACC_i at 99.9% over 4 seeds, 10 at 99.6%)."""
    return max(1, round(KEEP_FRACTION * n_per_concept))


def retain_pairs(keep: list[str] | str, n_per_concept: int = 10, seed: int = 0,
                 templates: list[str] | None = None, vocabulary: set[str] | None = None,
                 slot_values: dict[str, list[str]] | None = None) -> list[PromptPair]:
    """Pairs whose two prompts are the same prompt about a concept to KEEP (concept = anchor = "").

    Added to the erasure pairs, they hold the trained weights to what the frozen model draws for
    neighbouring concepts: they take part in L_Pre only, held to the frozen model's own
    conditional logits (trainer.EraseConfig.keep_target). Without them, a LoRA that maps
    "circle" to "square" also drifts on "triangle".
    Same templates and slots as make_pairs."""
    keep_list = normalise_names(keep, "keep")
    check_pair_count(n_per_concept)
    if vocabulary is not None:
        for name in keep_list:
            _check_vocabulary(name, "keep", vocabulary)
    template_list = list(DEFAULT_TEMPLATES if templates is None else templates)
    rng = random.Random(seed)
    pairs = []
    for name in keep_list:
        for i in range(n_per_concept):
            template = template_list[rng.randrange(len(template_list))]
            prompt = fill_template(template, name, rng, slot_values)
            pairs.append(PromptPair(unsafe=prompt, safe=prompt, concept="", anchor=""))
    return pairs
