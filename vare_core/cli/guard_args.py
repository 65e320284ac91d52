"""The Concept Guard's flags (`sample`, `evaluate`, `plan --sample`): `--guard CONCEPT:ANCHOR`,
repeatable, and one flag per GuardSettings field; what a flag leaves out is the model's profile's.

    python -m vare_core sample --model embedded --prompt "a red circle" --guard circle:square
    python -m vare_core sample ... --guard "nudity:a person wearing clothes" --guard-scales 6
"""
from __future__ import annotations

from .common import CliError

MAX_GUARD_CONCEPTS = 8          # each adds two rows per image on the guarded scales
MAX_TEXT = 1000                 # characters of a concept or anchor (the text encoder keeps fewer tokens)

# GuardSettings field -> (flag, type, help)
GUARD_FLAGS = {
    "scales": ("--guard-scales", int, "how many first scales carry the guard's rows"),
    "blocks": ("--guard-blocks", str, "transformer blocks whose cross-attention queries are read, e.g. 1,2,3,4,5"),
    "token_threshold": ("--guard-token-threshold", float, "unsafe share (0 to 1) at which a token is guarded"),
    "bit_threshold": ("--guard-bit-threshold", float, "logit difference under which a bit is guarded, at scale 0"),
    "bit_growth": ("--guard-bit-growth", float, "the bit threshold's factor per scale"),
    "penalty": ("--guard-penalty", float, "weight of the push away from the concept"),
    "warmup": ("--guard-warmup", int, "first scales with ordinary guidance"),
    "neutral": ("--guard-neutral", str, "the neutral reference text of the token mask"),
}


def add_guard_args(parser) -> None:
    group = parser.add_argument_group("Concept Guard (erasure while sampling, no training)")
    group.add_argument("--guard", action="append", default=None, metavar="CONCEPT:ANCHOR",
                       help="erase CONCEPT while sampling, steering toward ANCHOR (the safe text); repeat "
                            "for several. Every other setting is the model's profile's unless given")
    for name, (flag, kind, text) in GUARD_FLAGS.items():
        group.add_argument(flag, type=kind, default=None, dest=f"guard_{name}",
                           help=f"{text} (default: the model's profile's)")


def parse_guard_pair(text: str) -> tuple[str, str]:
    """'nudity:a person wearing clothes' -> ('nudity', 'a person wearing clothes')."""
    concept, colon, anchor = str(text).partition(":")
    concept, anchor = concept.strip(), anchor.strip()
    if not colon or not concept or not anchor:
        raise CliError(f"--guard {text!r}: write CONCEPT:ANCHOR, the concept to erase and the safe text to "
                       "steer toward, e.g. --guard circle:square or --guard 'nudity:a person wearing clothes'")
    if len(concept) > MAX_TEXT or len(anchor) > MAX_TEXT:
        raise CliError(f"--guard: a concept or anchor of more than {MAX_TEXT} characters; the text encoder "
                       "reads only the first tokens: shorten it")
    return concept, anchor


def guard_overrides(args) -> dict:
    """The GuardSettings fields given as flags."""
    given = {}
    for name, (flag, _, _) in GUARD_FLAGS.items():
        value = getattr(args, f"guard_{name}", None)
        if value is None:
            continue
        if name == "blocks":
            try:
                value = tuple(int(b) for b in value.split(",") if b.strip())
            except ValueError:
                raise CliError(f"{flag} {value!r}: give block indices as a comma list, e.g. 1,2,3,4,5") from None
        given[name] = value
    return given


def check_guard_args(args) -> list[tuple[str, str]]:
    """The (concept, anchor) pairs; a settings flag without --guard is refused. Needs no model."""
    pairs = [parse_guard_pair(text) for text in (getattr(args, "guard", None) or [])]
    if len(pairs) > MAX_GUARD_CONCEPTS:
        raise CliError(f"--guard given {len(pairs)} times: at most {MAX_GUARD_CONCEPTS} concepts (each adds "
                       "two rows per image to the first scales)")
    flags = [GUARD_FLAGS[name][0] for name in guard_overrides(args)]
    if flags and not pairs:
        raise CliError(f"{', '.join(flags)} set how the guard works: also give --guard CONCEPT:ANCHOR")
    return pairs


def guard_from_args(args, pipe):
    """GuardSettings from the flags and the model's profile, or None without --guard."""
    from ..erasure.profile import erasure_profile
    pairs = check_guard_args(args)
    if not pairs:
        return None
    try:
        settings = erasure_profile(pipe).guard_settings(pairs, **guard_overrides(args))
    except ValueError as err:                     # GuardSettings names its fields: name the flags
        message = str(err)
        for name, (flag, _, _) in GUARD_FLAGS.items():
            message = message.replace(f"guard {name} ", f"{flag} ")
        raise CliError(message) from None
    try:
        settings.check_blocks(len(pipe.model.blocks))
    except ValueError as err:
        raise CliError(str(err).replace("guard blocks", "--guard-blocks", 1)) from None
    return settings
