"""Models loaded by name: `load_pipeline("embedded")` instead of checkpoint files.

A family that ships its own weights registers a loader under a name, in its own module
(embedded/loader.py); vare_core/families.py lists that module, so the name is known before it is
first used and the generation layer never imports the family.

    register_named_model(NamedModel(name="embedded", family="embedded", load=load_embedded))
    is_named_model("embedded")                   # True (imports embedded/loader.py if needed)
    named_model("embedded").load(device="cpu")   # a VarPipeline
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import families


@dataclass(frozen=True)
class NamedModel:
    name: str                     # what load_pipeline, `--model` and Load VAR Model accept
    family: str                   # the family its pipelines belong to (VarPipeline.family)
    load: Callable                # load(device=None, dtype=None, *, offload_text_encoder, low_vram)
    plan_device: str | None = None   # where `plan` plans it unless told ("cpu": a small model)


_NAMED: dict[str, NamedModel] = {}


def register_named_model(model: NamedModel) -> None:
    _NAMED[model.name] = model


def named_model(name) -> NamedModel | None:
    """The model registered under `name` (a str), or None: `name` is then a checkpoint path."""
    if not isinstance(name, str):
        return None
    if name not in _NAMED:
        families.import_registering_module(families.NAMED_MODELS, name)
    return _NAMED.get(name)


def is_named_model(name) -> bool:
    return named_model(name) is not None


def named_models() -> list[str]:
    """Every name a model can be loaded by, the pack's own first."""
    for name in families.NAMED_MODELS:
        named_model(name)
    return list(_NAMED)
