"""Loading the embedded model by name: `load_pipeline("embedded")` (generation/registry.py finds
this loader through vare_core/families.py). Its sampling defaults are those embedded.json holds
(written by its training, embedded/training/train.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoints import load_state_dict
from ..checks import is_integer
from ..generation.pipeline import (
    OFFLOAD_DEVICE,
    VarPipeline,
    load_transformer,
    pick_device,
    pick_dtype,
)
from ..generation.registry import NamedModel, register_named_model
from ..models.bsq_vae import build_vae
from ..models.text_encoder import TextEncoder
from . import spec

NAME = spec.NAME


def load_embedded(device=None, dtype=None, weights_dir: Path | None = None, *,
                  offload_text_encoder: bool = False, low_vram: bool = False) -> VarPipeline:
    folder = Path(weights_dir or spec.WEIGHTS_DIR)
    info_path = folder / spec.INFO_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"embedded model not found in {folder} (no {spec.INFO_FILE}); "
                                "reinstall the pack or train it: python -m vare_core.embedded.training.train")
    info = json.loads(info_path.read_text())
    free = info.get("free_scales", 0)
    if not is_integer(free, minimum=0) or not free < len(info["scale_schedule"]):
        raise ValueError(f"{info_path}: free_scales must be an integer from 0 to the number of scales - 1, "
                         f"got {free!r}; reinstall the pack or retrain the model")
    device = pick_device(device)
    dtype = pick_dtype(dtype, device) if dtype not in (None, "auto") else torch.float32
    model, fingerprint = load_transformer(folder / spec.TRANSFORMER_FILE, dtype=dtype, device=device,
                                          low_vram=low_vram)
    vae = build_vae(load_state_dict(folder / spec.VAE_FILE), dtype=dtype, device=device)
    text_encoder = TextEncoder.from_folder(folder / spec.TEXT_ENCODER_DIR, dtype=dtype,
                                           device=OFFLOAD_DEVICE if offload_text_encoder else device,
                                           max_length=model.cfg.text_maxlen)
    return VarPipeline(model=model, vae=vae, text_encoder=text_encoder, name=NAME,
                       fingerprint=fingerprint,
                       default_schedule=[tuple(s) for s in info["scale_schedule"]],
                       defaults={**{k: info[k] for k in ("cfg", "tau", "top_p", "free_scales") if k in info},
                                 "fast": dict(spec.FAST)},
                       fixed_schedule=True, offload_text_encoder=offload_text_encoder,
                       family=NAME, named=True)


# a small model: `plan` plans it on the CPU unless told otherwise
register_named_model(NamedModel(name=NAME, family=NAME, load=load_embedded, plan_device="cpu"))
