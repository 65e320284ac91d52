"""One erasure profile per model family: the pairs it trains on and the EraseConfig defaults that
every entry point uses (Train Erasure node, `erase`, `plan`, the demo, the benchmarks), so a model
trains the same way wherever it is started. The profile is the one place a product default is
decided.

    profile = erasure_profile(pipe)               # a pipeline (its family), a family name
    profile = erasure_profile("infinity_2b.pth")  # ("embedded"), or a checkpoint / preset: Infinity
    config = profile.config(steps=300)            # the family's settings, then what was given
    config = profile.config("paper", train="ca_ffn")
    pairs = profile.pairs(["church"], ["building"], seed=0, keep=["house"])
    pairs = profile.pairs(["circle"], ["square"], pipe=pipe, custom_text="a red disc | a red box")

A family registers its profile where the model lives (vare_core/families.py lists where): the
embedded shapes world in embedded/profile.py, the tiny test model in testing.py; Infinity's
settings are plain data beside its presets (models/infinity_defaults.py), registered here. A
family's EraseConfig settings are one flat dict per formulation (erasure/formulations.py) and
training mode; a field a dict does not name is EraseConfig's own (the paper's setting). Help
texts, tooltips and docs/nodes.md name these values through profile_defaults / defaults_table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .. import families
from ..checks import is_integer
from ..models import infinity_defaults
from ..generation.guard import GUARD_FIELDS, GuardSettings
from .formulations import DEFAULT_FORMULATION, FORMULATIONS, formulation_name
from .pairs import PAIRS_PER_CONCEPT, PromptPair, default_keep_count, make_pairs, retain_pairs
from .pairs_file import load_pairs_file, parse_pairs_text
from .trainable import TRAIN_MODES
from .trainer import EraseConfig
from .trajectories import TrajectorySettings


@dataclass(frozen=True)
class PairWorld:
    """A world model's closed vocabulary (the shapes world): its templates and slot values, its
    words, and its concepts; every concept not erased is kept as it is (keep pairs)."""
    templates: tuple[str, ...]
    slot_values: Mapping[str, Sequence[str]]
    vocabulary: frozenset[str]
    concepts: tuple[str, ...]
    concept_word: str                         # what messages call a concept ("shape")
    concept_name: Callable[[str, str], str]   # (word, "concept" | "anchor") -> its concept; ValueError


@dataclass(frozen=True)
class PairMining:
    """Implicit pairs mined from the original model (erasure/implicit.py): prompts that name no
    concept but are drawn as one, with the keep pairs that contrast them."""
    share: float          # implicit pairs per concept, at most, as a share of its erasure pairs
    mine: Callable        # (pipe, concepts, anchors, kept, limit, seed) -> list[PromptPair]

    def default_count(self, n_per_concept: int) -> int:
        return max(1, round(self.share * n_per_concept))


@dataclass(frozen=True)
class ErasureProfile:
    family: str                               # what VarPipeline.family says
    title: str                                # how messages and help texts name the model
    settings: Mapping[str, Mapping[str, Mapping[str, Any]]]   # formulation -> train -> fields
    default_train: str
    default_formulation: str = DEFAULT_FORMULATION
    offload_text_encoder: bool = False        # the T5 leaves the GPU between encodes while training
    world: PairWorld | None = None            # None: the default templates (erasure/pairs.py)
    mining: PairMining | None = None          # None: nothing is mined
    listed: bool = True                       # named in help texts (the tiny test model is not)
    guard: Mapping[str, Any] = field(default_factory=dict)   # GuardSettings fields but the concepts

    def __post_init__(self):
        missing = [f"{f}/{t}" for f in FORMULATIONS for t in TRAIN_MODES if t not in self.settings.get(f, {})]
        if missing:
            raise ValueError(f"the {self.family} profile has no settings for {', '.join(missing)}")

    def settings_for(self, formulation: str | None = "auto", train: str | None = None) -> dict:
        """The family's EraseConfig fields of a formulation ('auto': the profile's) and training
        mode (None: the profile's), as EraseConfig takes them."""
        table = self.settings[formulation_name(formulation, self.default_formulation)]
        train = self.default_train if train is None else train
        # a mode the table lacks is EraseConfig's to refuse, with its message
        fields = dict(table[train] if isinstance(train, str) and train in table else table[self.default_train])
        if isinstance(fields.get("trajectory"), Mapping):
            fields["trajectory"] = TrajectorySettings(**fields["trajectory"])
        return fields

    def guard_settings(self, concepts, **given) -> GuardSettings:
        """The Concept Guard (generation/guard.py) for `concepts` ((concept, anchor) pairs) with
        this family's settings, `given` in their place (ValueError names a bad value)."""
        unknown = sorted(set(given) - set(GUARD_FIELDS))
        if unknown:
            raise ValueError(f"unknown guard setting(s) {', '.join(unknown)}; known: {', '.join(GUARD_FIELDS)}")
        return GuardSettings(concepts=concepts, **{**self.guard, **given})

    def config(self, formulation: str | None = "auto", **given) -> EraseConfig:
        """EraseConfig: the family's settings for the formulation and `given`'s train mode, with
        everything `given` in their place."""
        return EraseConfig(**{**self.settings_for(formulation, given.get("train")), **given})

    def pairs(self, concepts=(), anchors=(), *, seed: int = 0, n_per_concept: int = PAIRS_PER_CONCEPT, retain=None,
              keep=(), pipe=None, implicit=None, custom_text: str | None = None, pairs_file=None,
              default_concept: str | None = None) -> list[PromptPair]:
        """The pairs this model trains on.

        concepts / anchors: names (a list, or one text with commas or line breaks), each concept
        erased toward its anchor (or the one anchor): n_per_concept generated pairs each (seeded).
        keep: concepts kept as they are, `retain` keep pairs each (None: 2/5 of n_per_concept;
        0: none). A world model (the shapes world) keeps every concept not erased itself and
        refuses a keep list. pipe: the original model, which a family that mines implicit pairs
        (embedded) mines, up to `implicit` per concept (None: its default share).
        custom_text ('unsafe | safe' lines) and pairs_file (text, JSON or CSV) add the user's
        pairs; a line without a concept is labelled default_concept (None: the one concept)."""
        concept_list, anchor_list = name_list(concepts), name_list(anchors)
        pairs: list[PromptPair] = []
        if concept_list:
            if not anchor_list:
                raise ValueError("anchors is empty: name what each concept should turn into (e.g. square)")
            pairs += self._generated(concept_list, anchor_list, seed=seed, n_per_concept=n_per_concept,
                                     retain=retain, keep=name_list(keep), pipe=pipe, implicit=implicit)
        if default_concept is None and len(concept_list) == 1:
            default_concept = concept_list[0]
        if pairs_file is not None:
            pairs += load_pairs_file(pairs_file, default_concept=default_concept)
        if custom_text and custom_text.strip():
            pairs += parse_pairs_text(custom_text, default_concept=default_concept)
        if not pairs:
            raise ValueError("no pairs: give concepts and anchors, or custom pairs ('unsafe prompt | safe prompt' lines)")
        return pairs

    def _generated(self, concepts, anchors, *, seed, n_per_concept, retain, keep, pipe, implicit):
        world, templates = self.world, {}
        if world is not None:
            if keep:
                raise ValueError(f"keep: the {self.title} model already keeps every {world.concept_word} that "
                                 f"is not erased; set how many pairs per {world.concept_word} with retain")
            concepts = [world.concept_name(c, "concept") for c in concepts]
            anchors = [world.concept_name(a, "anchor") for a in anchors]
            keep = [c for c in world.concepts if c not in concepts]
            templates = dict(templates=list(world.templates), vocabulary=set(world.vocabulary),
                             slot_values=dict(world.slot_values))
        pairs = make_pairs(concepts, anchors, n_per_concept=n_per_concept, seed=seed, **templates)
        if self.mining is not None:
            limit = self.mining.default_count(n_per_concept) if implicit is None else implicit
            if not is_integer(limit, minimum=0):
                raise ValueError(f"implicit must be an integer >= 0, got {limit!r}")
            if pipe is not None and limit:
                pairs += self.mining.mine(pipe, concepts, anchors, keep, limit, seed)
        count = default_keep_count(n_per_concept) if retain is None else retain
        if not is_integer(count, minimum=0):
            raise ValueError(f"retain must be an integer >= 0, got {count!r}")
        if keep and count:
            pairs += retain_pairs(keep, n_per_concept=count, seed=seed + 1, **templates)
        return pairs


def name_list(value) -> list[str]:
    """Names as given: a list as it is, one text split at commas and line breaks (blank pieces
    dropped, spaces collapsed), None as none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [" ".join(part.split()) for part in value.replace("\n", ",").split(",") if part.strip()]
    return list(value)


# ----------------------------------------------------------------------------- registry

_PROFILES: dict[str, ErasureProfile] = {}


def register_profile(profile: ErasureProfile) -> None:
    _PROFILES[profile.family] = profile


def family_of(model) -> str:
    """A pipeline's family, or the family a name stands for: a registered family's name, else
    Infinity (a checkpoint path or preset name)."""
    family = getattr(model, "family", None)
    if isinstance(family, str):
        return family
    name = getattr(model, "name", model)
    if isinstance(name, str) and (name in _PROFILES or name in families.ERASURE_PROFILES):
        return name
    return families.INFINITY


def erasure_profile(model) -> ErasureProfile:
    """The profile of a pipeline, a family name ('embedded') or an Infinity checkpoint / preset."""
    family = family_of(model)
    if family not in _PROFILES:
        families.import_registering_module(families.ERASURE_PROFILES, family)
    if family not in _PROFILES:
        raise ValueError(f"no erasure profile is registered for the model family {family!r}")
    return _PROFILES[family]


def listed_profiles() -> list[ErasureProfile]:
    """The profiles help texts name, in the order vare_core/families.py lists them."""
    return [erasure_profile(f) for f in families.ERASURE_PROFILES if erasure_profile(f).listed]


def shown(value) -> str:
    """A setting as help texts write it: 0.25, ca,ffn, on / off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def profile_defaults(setting, show: Callable = shown) -> str:
    """What the listed models' profiles decide for one EraseConfig field (or a function of the
    config), for help texts and tooltips: 'embedded 600, Infinity 500', or '8' when all agree."""
    get = (lambda config: getattr(config, setting)) if isinstance(setting, str) else setting
    values = [(profile.title, show(get(profile.config()))) for profile in listed_profiles()]
    if len({value for _, value in values}) == 1:
        return values[0][1]
    return ", ".join(f"{title} {value}" for title, value in values)


# What defaults_table shows: EraseConfig field -> label
TABLE_FIELDS = {"train": "trained weights", "rank": "LoRA rank", "lora_targets": "LoRA layers", "steps": "steps",
                "lr": "learning rate", "alpha": "alpha", "preservation_weight": "loss weight (L_Pre)",
                "batch_size": "pairs per step", "precision": "precision",
                "gradient_checkpointing": "gradient checkpointing", "passes": "passes",
                "stream_blocks": "blocks streamed", "trajectory": "trajectories sampled together",
                "targets": "targets", "erase_target": "erase target", "null_weight": "null weight",
                "scale_weights": "scale weights", "early_scales": "first scales (method early)",
                "entropy_weight": "entropy weight (method early)"}


def defaults_table(formulation: str = "auto") -> str:
    """The listed models' default EraseConfig as a markdown table (docs/nodes.md shows it)."""
    profiles = listed_profiles()
    configs = [profile.config(formulation) for profile in profiles]

    def cell(config, name):
        value = getattr(config, name)
        if name == "trajectory":
            return str(value.batch_size)
        if name == "lr" and value is None:
            return "the official, width-scaled"
        return shown(value)

    rows = ["| setting | " + " | ".join(p.title for p in profiles) + " |", "|---" * (len(profiles) + 1) + "|"]
    rows += [f"| {label} (`{name}`) | " + " | ".join(cell(c, name) for c in configs) + " |"
             for name, label in TABLE_FIELDS.items()]
    return "\n".join(rows) + "\n"


GUARD_LABELS = {"scales": "scales carrying the guard's rows", "warmup": "first scales left to plain guidance",
                "blocks": "blocks whose queries are read", "token_threshold": "token threshold (unsafe share)",
                "bit_threshold": "bit threshold at scale 0", "bit_growth": "bit threshold's factor per scale",
                "penalty": "penalty", "neutral": "neutral reference text"}


def guard_defaults_table() -> str:
    """The listed models' Concept Guard settings as a markdown table (docs/guard.md shows it)."""
    profiles = [p for p in listed_profiles() if p.guard]
    rows = ["| setting | " + " | ".join(p.title for p in profiles) + " |", "|---" * (len(profiles) + 1) + "|"]
    rows += [f"| {label} (`{name}`) | " + " | ".join(shown(p.guard.get(name, "-")) for p in profiles) + " |"
             for name, label in GUARD_LABELS.items()]
    return "\n".join(rows) + "\n"


register_profile(ErasureProfile(family=families.INFINITY, title="Infinity", settings=infinity_defaults.ERASURE,
                                default_train=infinity_defaults.DEFAULT_TRAIN,
                                offload_text_encoder=infinity_defaults.OFFLOAD_TEXT_ENCODER,
                                guard=infinity_defaults.GUARD))
