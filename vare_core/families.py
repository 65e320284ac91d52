"""The model families the pack ships, and the module of each that registers what it owns.

A family is a kind of model with choices of its own: Infinity (every checkpoint file and preset),
the embedded shapes world, the tiny random test model (vare_core/testing.py). What a family owns
is registered by its own modules, where the model lives: a model loaded by name
(generation/registry.py: "embedded" -> embedded/loader.py) and its erasure profile
(erasure/profile.py: pairs and EraseConfig defaults; Infinity's are plain data beside its presets,
models/infinity_defaults.py). Settings a family will own later (e.g. guard defaults) are
registered the same way, from the same modules.

The lower layers never import a family's modules: asked for a family they do not know yet, they
import the module listed here, which registers it. These lists are the only place a lower layer
names a higher one, and only by a string.
"""
from __future__ import annotations

import importlib

INFINITY = "infinity"       # the family of every checkpoint file and preset name

# name a pipeline is loaded by -> the module that registers its loader
NAMED_MODELS = {"embedded": "vare_core.embedded.loader"}

# family -> the module that registers its erasure profile, in the order help texts list them
ERASURE_PROFILES = {"embedded": "vare_core.embedded.profile",
                    "tiny": "vare_core.testing",
                    INFINITY: "vare_core.erasure.profile"}


def import_registering_module(table: dict[str, str], name: str) -> bool:
    """Import the module `table` lists for `name` (it registers what it owns); False if none."""
    module = table.get(name)
    if module is None:
        return False
    importlib.import_module(module)
    return True
