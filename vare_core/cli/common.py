"""What the commands share: model and sampling flags, loading from them, their checks, CliError,
writing images.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

import numpy as np
from PIL import Image

from ..generation.budget import MAX_IMAGES  # noqa: F401  (images per run: the CLI and the nodes)
from ..generation.pipeline import ModelDtype

MAX_SEED = 2**63 - 1


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def check_image_count(flag: str, value: int, hint: str = "") -> None:
    """A number of images (sample's --n and --batch, plan's --batch): 1 to MAX_IMAGES."""
    if value < 1:
        raise CliError(f"{flag} {value}: must be at least 1")
    if value > MAX_IMAGES:
        raise CliError(f"{flag} {value}: at most {MAX_IMAGES} images per run" + (f" ({hint})" if hint else ""))


def check_image_size(height: int | None, width: int | None) -> None:
    """--height / --width (sample, plan): positive pixels, both or neither; which sizes a model
    draws is its schedule's check (pipeline.schedule_for)."""
    if (height is None) != (width is None):
        raise CliError("give --height and --width together (or neither, for the model's default size)")
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and value < 1:
            raise CliError(f"{flag} {value}: must be a positive number of pixels")


def save_images(images, out: Path, stem: str, overwrite: bool = False) -> list[Path]:
    """(B, H, W, 3) floats in [0, 1] -> numbered PNGs, each written atomically. Without
    overwrite the numbers continue after the files already in `out` (nothing is replaced)."""
    import io

    from ..paths import free_numbered_names, write_bytes_atomic
    out.mkdir(parents=True, exist_ok=True)
    names = [out / f"{stem}_{i:03d}.png" for i in range(len(images))] if overwrite \
        else free_numbered_names(out, stem, len(images))
    for image, path in zip(images, names):
        buffer = io.BytesIO()
        Image.fromarray((image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)).save(buffer, "PNG")
        write_bytes_atomic(path, buffer.getvalue())
    return names


def add_model_args(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="embedded",
                       help="'embedded' (ships with the pack) or an Infinity checkpoint (.pth/.safetensors/sharded folder)")
    group.add_argument("--vae", help="BSQ VAE checkpoint (needed with a checkpoint --model)")
    group.add_argument("--text-encoder", help="flan-t5-xl folder, or an encoder .safetensors with --tokenizer")
    group.add_argument("--tokenizer", help="tokenizer.json when --text-encoder is a single file")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    group.add_argument("--dtype", default="auto", choices=get_args(ModelDtype))


def add_sampling_args(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("sampling")
    group.add_argument("--cfg", default=None, help="guidance: a number or one per scale, e.g. '3,3,4,4,4'")
    group.add_argument("--tau", default=None, help="temperature: a number or one per scale")
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--speed", default=None, choices=("exact", "fast"),
                       help="exact (default): every token of every scale; fast: the knobs below at the "
                            "model's fast values (docs/speed.md)")
    group.add_argument("--unguided-scales", type=int, default=None,
                       help="the last N scales without guidance (the unconditional half leaves the batch)")
    group.add_argument("--pruned-scales", type=int, default=None,
                       help="the last N scales compute only --keep-share of their tokens")
    group.add_argument("--keep-share", default=None,
                       help="share of tokens computed on each pruned scale: one number or one per pruned scale")
    group.add_argument("--kv-budget", type=float, default=None,
                       help="share of the image's tokens each block keeps in its key/value cache (1: all)")
    group.add_argument("--negative", default=None, help="negative prompt")
    group.add_argument("--height", type=int, default=None)
    group.add_argument("--width", type=int, default=None)
    group.add_argument("--adapter", action="append", default=[], metavar="FILE[:STRENGTH]",
                       help="erasure adapter to apply (repeatable), strength default 1.0")


def check_device(text: str | None) -> None:
    """--device must name a device torch can use here (not only one it can spell)."""
    if text is None:
        return
    import torch
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise CliError(f"--device {text!r} is not a device; use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {text}: torch sees no CUDA GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {text}: there are only {torch.cuda.device_count()} CUDA "
                           f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {text}: the Apple MPS backend is not available; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CliError(f"--device {text}: VARE runs on cpu, cuda or mps")


def check_model_args(args) -> None:
    """File flags and --device, checked before anything loads so the message names the flag."""
    from ..generation.registry import is_named_model
    check_device(args.device)
    extra = [flag for flag, value in (("--vae", args.vae), ("--text-encoder", args.text_encoder),
                                      ("--tokenizer", args.tokenizer)) if value]
    if is_named_model(args.model) and extra:
        raise CliError(f"{', '.join(extra)}: only for a checkpoint --model; the {args.model} model "
                       "brings its own VAE and text encoder (leave them out, or pass --model FILE)")
    files = [("--model", args.model), ("--vae", args.vae), ("--text-encoder", args.text_encoder),
             ("--tokenizer", args.tokenizer)]
    from ..paths import file_kind
    for flag, value in files:
        if not value or is_named_model(value):
            continue
        kind = file_kind(Path(value))
        if kind == "missing":
            raise CliError(f"{flag} {value}: no such file or folder")
        if kind not in ("file", "folder"):   # a FIFO would block the load forever
            raise CliError(f"{flag} {value}: is a {kind}, not a weight file or folder; give the file itself")


def load_from_args(args, offload_text_encoder: bool = False):
    from ..generation.pipeline import load_pipeline
    check_model_args(args)
    return load_pipeline(args.model, args.vae, args.text_encoder, device=args.device, dtype=args.dtype,
                         tokenizer=args.tokenizer, offload_text_encoder=offload_text_encoder)


def sampling_kwargs(args, n_scales: int) -> dict:
    from ..generation.per_scale import check_setting_range, parse_per_scale, parse_setting
    kwargs = {}
    if args.cfg is not None:
        kwargs["cfg"] = parse_setting(args.cfg, n_scales, "--cfg")
    if args.tau is not None:
        kwargs["tau"] = parse_setting(args.tau, n_scales, "--tau")
        if any(t <= 0 for t in parse_per_scale(kwargs["tau"], n_scales, "--tau")):
            raise CliError(f"--tau {args.tau}: the temperature must be > 0 on every scale "
                           "(lower = more deterministic, e.g. 0.5)")
    for flag in ("cfg", "tau"):
        if flag in kwargs:
            check_setting_range(parse_per_scale(kwargs[flag], n_scales, "--" + flag), "--" + flag)
    if args.top_k is not None:
        if not 0 <= args.top_k <= 2:
            raise CliError(f"--top-k {args.top_k}: must be 0 (off), 1 (greedy) or 2; "
                           "each bit has only two values")
        kwargs["top_k"] = args.top_k
    if args.top_p is not None:
        if not 0 <= args.top_p <= 1:
            raise CliError(f"--top-p {args.top_p}: must be between 0 and 1")
        kwargs["top_p"] = args.top_p
    return {**kwargs, **speed_kwargs(args)}


def speed_kwargs(args) -> dict:
    """--speed and the fast-sampling knobs given (generation/speed.py), checked by flag."""
    from ..generation.speed import KNOBS, check_speed_settings
    knobs = {name: getattr(args, name) for name in KNOBS if getattr(args, name, None) is not None}
    try:
        knobs = check_speed_settings(getattr(args, "speed", None) or "exact", knobs)
    except ValueError as err:
        text = str(err)
        name = next((name for name in KNOBS if text.startswith(name)), None)
        raise CliError(text if name is None else "--" + name.replace("_", "-") + text[len(name):]) from None
    if getattr(args, "speed", None):
        knobs["speed"] = args.speed
    return knobs


def apply_adapter_args(pipe, specs: list[str]):
    """A new pipeline with every --adapter FILE[:STRENGTH] applied in order (base unchanged)."""
    if not specs:
        return pipe
    from ..erasure.adapters import apply_adapter, load_adapter, parse_adapter_spec
    for spec in specs:
        path, strength = parse_adapter_spec(spec)
        pipe = apply_adapter(pipe, load_adapter(path), strength)
    return pipe
