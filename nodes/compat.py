"""The V3 node API (`io`, `ui`, `ComfyExtension`) and the pack's custom types.

Inside ComfyUI this is `comfy_api.latest`. Outside it (CI, plain Python) the stand-in in
standin.py takes its place, so the node classes import and execute the same way. A ComfyUI too
old for the V3 API is reported instead of silently falling back.

Custom types (what travels on the links between VARE nodes):
    VARE_MODEL          vare_core.pipeline.VarPipeline
    VARE_CONDITIONING   types.VareConditioning (prompts + their encoded T5 states)
    VARE_PAIRS          list[vare_core.erasure.pairs.PromptPair]
    VARE_ADAPTER        vare_core.erasure.adapters.Adapter
    VARE_LOSS_HISTORY   types.LossHistory (one dict per training step)
"""
from __future__ import annotations

import importlib.util

try:
    from comfy_api.latest import ComfyExtension, io, ui
    STANDIN = False
except ImportError as err:
    if importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None:
        raise ImportError(f"the VARE nodes need ComfyUI's V3 node API (comfy_api.latest; tested "
                          f"with ComfyUI 0.3.64): update ComfyUI ({err})") from err
    from .standin import ComfyExtension, io, ui   # noqa: F401  (no ComfyUI: tests, scripting)
    STANDIN = True

CATEGORY = "VARE"

VareModel = io.Custom("VARE_MODEL")
VareConditioning = io.Custom("VARE_CONDITIONING")
VarePairs = io.Custom("VARE_PAIRS")
VareAdapter = io.Custom("VARE_ADAPTER")
VareLossHistory = io.Custom("VARE_LOSS_HISTORY")


def node_id(cls) -> str | None:
    """The executing node's id (a string, as the frontend knows it), or None outside ComfyUI."""
    hidden = getattr(cls, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None
